"""How a node's log reads: text or JSON lines, readable times, and rate-limited messages.

An operator's log must stay readable when something goes wrong repeatedly (a peer with the
wrong secret retries every second, every request fails its quorum while a node is down), so
repeated messages go through :class:`RateLimitedLog`: the first is logged, the rest are
counted, and the next one logged says how many were not. This module only formats and
filters; it never opens files or sockets, and never imports trio.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import Final, Generic, TextIO, TypeVar

KeyT = TypeVar("KeyT", bound=Hashable)

#: The text format: time, level, logger and message on one line.
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Seconds between two quorum-failure warnings (the ones in between are counted).
QUORUM_LOG_INTERVAL: Final = 10.0


def iso_time(seconds: float) -> str:
    """A unix time as ISO 8601 UTC with milliseconds: ``2026-12-03T19:13:35.123Z``."""
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_time_us(microseconds: int) -> str:
    """A unix time in microseconds (flush times, version timestamps) as ISO 8601 UTC."""
    moment = datetime.fromtimestamp(microseconds / 1_000_000, tz=UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time``, ``level``, ``logger``, ``message``.

    ``time`` is ISO 8601 UTC (:func:`iso_time`); a traceback, if the record has one, goes in
    ``exception`` as one string (JSON escapes its newlines, so a record is still one line).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def log_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing to ``stream`` (stderr) in ``log_format``, ``text`` or ``json``
    (:data:`kai.core.config.LOG_FORMATS`)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    return handler


class RateLimitedLog(Generic[KeyT]):
    """Logs at most one message per key every ``interval`` seconds and counts the rest.

    The next message logged for a key after some were held back ends with how many, so
    nothing goes unnoticed, and an operator sees one line per minute instead of two per
    second. Keys are what "the same problem" means to the caller: a peer's address, an
    error class. At most ``max_keys`` keys are remembered; the ones logged longest ago are
    forgotten first.

    Args:
        logger: Where messages go.
        level: Their level (``logging.WARNING``, ...).
        interval: Seconds that must pass between two messages of one key.
        clock: Returns the current time in seconds (tests pass a fake one).
        max_keys: How many keys to remember.
    """

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        if interval <= 0 or max_keys < 1:
            raise ValueError(f"need interval > 0 and max_keys >= 1, not {interval}, {max_keys}")
        self.logger = logger
        self.level = level
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        #: Per key: when its last message was logged, and how many were held back since.
        self._keys: dict[KeyT, tuple[float, int]] = {}

    def log(self, key: KeyT, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``key`` was logged less than ``interval`` ago.

        Returns:
            Whether it was logged (False: it was counted, or the level is disabled).
        """
        if not self.logger.isEnabledFor(self.level):
            return False
        now = self._clock()
        state = self._keys.get(key)
        if state is not None:
            logged_at, held = state
            if now - logged_at < self.interval:
                self._keys[key] = (logged_at, held + 1)
                return False
            del self._keys[key]  # re-inserted below: the dict stays ordered by time logged
            if held:
                message += " (%d more like this in the last %.0f s were not logged)"
                args = (*args, held, now - logged_at)
        elif len(self._keys) >= self._max_keys:
            del self._keys[next(iter(self._keys))]
        self._keys[key] = (now, 0)
        self.logger.log(self.level, message, *args)
        return True

    def held_back(self, key: KeyT) -> int:
        """How many messages of ``key`` were not logged since its last one."""
        state = self._keys.get(key)
        return 0 if state is None else state[1]

    def due(self) -> list[KeyT]:
        """The keys that have messages held back and may log again now (for a summary)."""
        now = self._clock()
        return [
            key
            for key, (logged_at, held) in self._keys.items()
            if held and now - logged_at >= self.interval
        ]


#: Quorum failures that reach a client (``SERVER_ERROR``), keyed by the error's class.
quorum_failures: Final[RateLimitedLog[str]] = RateLimitedLog(
    logging.getLogger("kai.quorum"), logging.WARNING, QUORUM_LOG_INTERVAL
)


def log_quorum_failure(error: Exception, reply: str) -> None:
    """Warn (rate-limited) that a request failed its quorum and the client got ``reply``."""
    kind = type(error).__name__
    quorum_failures.log(
        kind, "quorum failure, client answered SERVER_ERROR %s: %s", reply, str(error) or kind
    )

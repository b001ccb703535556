"""memcached command semantics on top of a Dynamo coordinator (DESIGN §6).

Turns parsed requests into coordinator reads and writes and renders the exact memcached 1.6
replies. Conditional commands (add, replace, cas, append, prepend, incr, decr, touch, gat,
delete) read, check and then write with the read's causal context; a per-key lock makes that
sequence atomic among the clients of this node (not across nodes: see the README).
Never touches sockets: the server module feeds requests in and writes replies out.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from kai.coordinator import Coordinator, ReadResult
from kai.core.errors import CoordinatorError, TooManySiblings
from kai.core.memcache import protocol as mc
from kai.core.memcache.report import VERSION_REPLY, NodeInfo, StatsReport
from kai.core.stats import NodeStats
from kai.core.versions import Version, absolute_expiry, newest, visible
from kai.storage.replica import Payload

logger = logging.getLogger(__name__)

_U64 = 2**64
_NON_NUMERIC = mc.client_error("cannot increment or decrement non-numeric value")
_TOO_LARGE = mc.server_error("object too large for cache")
_OUT_OF_MEMORY = mc.server_error("out of memory storing object")
_TOO_MANY_SIBLINGS = mc.server_error("too many siblings")


class KeyLocks:
    """One lock per key being read-modified-written on this node; unused locks are dropped."""

    def __init__(self) -> None:
        self._locks: dict[bytes, tuple[trio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: bytes) -> AsyncIterator[None]:
        """Hold ``key``'s lock for the duration of the block."""
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def parse_counter(value: bytes) -> int | None:
    """The unsigned 64-bit number a stored value holds, as memcached's strtoull reads it."""
    digits = value.lstrip(b" ").rstrip(b" \t\r\n")
    if not digits or not digits.isdigit() or len(digits) > 20:
        return None
    number = int(digits)
    return number if number < _U64 else None


class CommandExecutor:
    """Executes parsed memcached requests against a coordinator.

    Args:
        coordinator: where reads and writes go.
        stats: counters to update.
        info: static node facts for ``stats``.
        item_counts: returns (items, bytes) for ``curr_items`` / ``bytes``.
        extra_stats: more ``stats`` fields from other parts of the node (storage, cache).
        all_siblings: return every live sibling (``siblings = "all"``) instead of the newest.
        wall_clock: unix time in seconds (injectable for tests).
    """

    def __init__(
        self,
        coordinator: Coordinator,
        stats: NodeStats,
        info: NodeInfo,
        *,
        item_counts: Callable[[], tuple[int, int]] = lambda: (0, 0),
        extra_stats: Callable[[], list[tuple[str, object]]] = list,
        all_siblings: bool = False,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.coordinator = coordinator
        self.stats = stats
        self.info = info
        self.all_siblings = all_siblings
        self.wall_clock = wall_clock
        self.locks = KeyLocks()
        #: What ``stats`` answers (``general()`` is also what ``kai-admin stats`` shows).
        self.report = StatsReport(
            stats,
            info,
            members=lambda: self.coordinator.members(),
            item_counts=item_counts,
            extra_stats=extra_stats,
            wall_clock=wall_clock,
        )

    async def execute(self, request: mc.Request | mc.Invalid) -> bytes:
        """The reply bytes for one request (``b""`` when noreply suppresses it).

        Raises nothing for bad input or unavailable replicas: those become error replies.
        """
        try:
            if type(request) is mc.Get:  # the hot path: skip the dispatch table
                return await self._get(request.keys, request.with_cas)
            return await self._dispatch(request)
        except CoordinatorError as error:
            self.stats.kai_quorum_failures += 1
            return b"" if _noreply(request) else mc.server_error(error.reply_text)
        except TooManySiblings:
            return b"" if _noreply(request) else _TOO_MANY_SIBLINGS

    def execute_now(self, request: mc.Request | mc.Invalid) -> bytes | None:
        """The reply to ``request`` if it can be made without waiting; None if it needs
        :meth:`execute` (and then nothing was done or counted).

        Answered at once: ``get``/``gets`` and ``set``, when the coordinator serves the keys
        without other nodes (:meth:`Coordinator.get_at_once`), and ``version``. Replies,
        counters and errors are those :meth:`execute` gives.
        """
        if type(request) is mc.Get:
            started = time.perf_counter()
            keys = request.keys
            get_at_once = self.coordinator.get_at_once
            if len(keys) == 1 and not self.all_siblings:
                result = get_at_once(keys[0])
                if result is None:
                    return None
                return self._get_reply(keys[0], result, request.with_cas, started)
            results = []
            for key in keys:
                found = get_at_once(key)
                if found is None:
                    return None
                results.append(found)
            return self._get_many_reply(keys, results, request.with_cas, started)
        if type(request) is mc.Store:
            if request.command != "set":
                return None
            started = time.perf_counter()
            payload = self._payload_of(request)
            try:
                if self.coordinator.put_at_once(request.key, payload, context=None) is None:
                    return None
                reply = _quiet(request.noreply, mc.STORED)
            except TooManySiblings:
                reply = b"" if request.noreply else _TOO_MANY_SIBLINGS
            self.stats.cmd_set += 1
            self.stats.set_latency.record(time.perf_counter() - started)
            return reply
        if type(request) is mc.Version:
            return VERSION_REPLY
        return None

    async def _dispatch(self, request: mc.Request | mc.Invalid) -> bytes:
        match request:
            case mc.Get(keys=keys, with_cas=with_cas):
                return await self._get(keys, with_cas)
            case mc.Store():
                started = time.perf_counter()
                try:
                    return await self._store(request)
                finally:
                    self.stats.set_latency.record(time.perf_counter() - started)
            case mc.Delete(key=key, noreply=noreply):
                return _quiet(noreply, await self._delete(key))
            case mc.Arithmetic(key=key, delta=delta, incr=incr, noreply=noreply):
                return _quiet(noreply, await self._arithmetic(key, delta, incr=incr))
            case mc.Touch(key=key, exptime=exptime, noreply=noreply):
                return _quiet(noreply, await self._touch(key, exptime))
            case mc.GetAndTouch(exptime=exptime, keys=keys, with_cas=with_cas):
                return await self._get_and_touch(keys, exptime, with_cas)
            case mc.ValueTooLarge(command=command, key=key, noreply=noreply):
                return _quiet(noreply, await self._too_large(command, key))
            case mc.FlushAll(delay=delay, noreply=noreply):
                return _quiet(noreply, await self._flush_all(delay))
            case mc.Stats(args=args):
                return self.report.reply(args)
            case mc.Version():
                return VERSION_REPLY
            case mc.Verbosity(noreply=noreply):
                return _quiet(noreply, mc.OK)
            case mc.Invalid(reply=reply):
                return reply
            case _:
                # Quit is handled by the connection; anything else is a programming error.
                raise TypeError(f"cannot execute {request!r}")

    # --- reads --------------------------------------------------------------------------------

    def _view(self, result: ReadResult, now: float) -> list[Version]:
        return visible(
            result.siblings,
            now,
            self.coordinator.flushed_before(now),
            all_siblings=self.all_siblings,
        )

    async def _get(self, keys: Sequence[bytes], with_cas: bool) -> bytes:
        started = time.perf_counter()
        if len(keys) == 1 and not self.all_siblings:
            # The most common request of all: one key, newest-version view.
            key = keys[0]
            return self._get_reply(key, await self.coordinator.get(key), with_cas, started)
        results = await self.coordinator.get_many(keys)
        return self._get_many_reply(keys, results, with_cas, started)

    def _get_many_reply(
        self, keys: Sequence[bytes], results: Sequence[ReadResult], with_cas: bool, started: float
    ) -> bytes:
        """The reply to a get of any number of keys in either view, counted."""
        now = self.wall_clock()
        flushed_before = self.coordinator.flushed_before(now)
        stats = self.stats
        stats.cmd_get += len(keys)
        parts: list[bytes] = []
        hits = 0
        for key, result in zip(keys, results, strict=True):
            shown = visible(result.siblings, now, flushed_before, all_siblings=self.all_siblings)
            if not shown:
                self._count_miss(result, now, flushed_before)
                continue
            hits += 1
            if len(result.siblings) > 1:
                stats.kai_unreconciled_get += 1
            cas = result.cas_unique if with_cas else None
            for version in shown:
                assert version.value is not None
                parts.append(mc.encode_value(key, version.flags, version.value, cas))
        stats.get_hits += hits
        stats.get_misses += len(keys) - hits
        parts.append(mc.END)
        stats.get_latency.record(time.perf_counter() - started)
        return b"".join(parts)

    def _get_reply(self, key: bytes, result: ReadResult, with_cas: bool, started: float) -> bytes:
        """The reply to a one-key get in the newest-version view, counted."""
        stats = self.stats
        stats.cmd_get += 1
        siblings = result.siblings
        now = self.wall_clock()
        flushed_before = self.coordinator.flushed_before(now)
        latest = siblings[0] if len(siblings) == 1 else newest(siblings)
        if latest is None or not latest.is_live(now, flushed_before):
            stats.get_misses += 1
            self._count_miss(result, now, flushed_before)
            reply = mc.END
        else:
            stats.get_hits += 1
            if len(siblings) > 1:
                stats.kai_unreconciled_get += 1
            assert latest.value is not None
            cas = result.cas_unique if with_cas else None
            reply = mc.encode_value(key, latest.flags, latest.value, cas) + mc.END
        stats.get_latency.record(time.perf_counter() - started)
        return reply

    def _count_miss(self, result: ReadResult, now: float, flushed_before: int) -> None:
        latest = max(result.siblings, key=Version.sort_key, default=None)
        if latest is None or latest.value is None:
            return
        if latest.timestamp <= flushed_before:
            self.stats.get_flushed += 1
        elif latest.expiry and now >= latest.expiry:
            self.stats.get_expired += 1

    async def _read_live(self, key: bytes) -> tuple[ReadResult, Version | None]:
        result = await self.coordinator.get(key)
        shown = self._view(result, self.wall_clock())
        return result, (shown[0] if shown else None)

    # --- writes -------------------------------------------------------------------------------

    async def _store(self, request: mc.Store) -> bytes:
        self.stats.cmd_set += 1
        command, key, noreply = request.command, request.key, request.noreply
        payload = self._payload_of(request)
        if command == "set":
            await self.coordinator.put(key, payload, context=None)
            return _quiet(noreply, mc.STORED)
        async with self.locks.hold(key):
            result, live = await self._read_live(key)
            if command == "add":
                reply = mc.NOT_STORED if live is not None else await self._put(key, payload, result)
            elif command == "replace":
                reply = mc.NOT_STORED if live is None else await self._put(key, payload, result)
            elif command == "cas":
                if live is None:
                    self.stats.cas_misses += 1
                    reply = mc.NOT_FOUND
                elif result.cas_unique != request.cas_unique:
                    self.stats.cas_badval += 1
                    reply = mc.EXISTS
                else:
                    self.stats.cas_hits += 1
                    reply = await self._put(key, payload, result)
            else:  # append / prepend keep the stored flags and expiry
                if live is None:
                    reply = mc.NOT_STORED
                else:
                    assert live.value is not None
                    joined = (
                        live.value + request.value
                        if command == "append"
                        else request.value + live.value
                    )
                    if len(joined) > self.info.max_item_size:
                        reply = _OUT_OF_MEMORY
                    else:
                        combined = Payload(live.flags, live.expiry, joined)
                        reply = await self._put(key, combined, result)
        return _quiet(noreply, reply)

    def _payload_of(self, request: mc.Store) -> Payload:
        return Payload(
            request.flags, absolute_expiry(request.exptime, self.wall_clock()), request.value
        )

    async def _put(self, key: bytes, payload: Payload, read: ReadResult) -> bytes:
        await self.coordinator.put(key, payload, context=read.context)
        return mc.STORED

    async def _delete(self, key: bytes) -> bytes:
        async with self.locks.hold(key):
            result, live = await self._read_live(key)
            if live is None:
                self.stats.delete_misses += 1
                return mc.NOT_FOUND
            await self.coordinator.put(key, Payload(), context=result.context)
        self.stats.delete_hits += 1
        return mc.DELETED

    async def _arithmetic(self, key: bytes, delta: int, *, incr: bool) -> bytes:
        async with self.locks.hold(key):
            result, live = await self._read_live(key)
            if live is None:
                if incr:
                    self.stats.incr_misses += 1
                else:
                    self.stats.decr_misses += 1
                return mc.NOT_FOUND
            assert live.value is not None
            number = parse_counter(live.value)
            if number is None:
                return _NON_NUMERIC
            number = (number + delta) % _U64 if incr else max(number - delta, 0)
            encoded = str(number).encode()
            await self.coordinator.put(
                key, Payload(live.flags, live.expiry, encoded), context=result.context
            )
        if incr:
            self.stats.incr_hits += 1
        else:
            self.stats.decr_hits += 1
        return encoded + b"\r\n"

    async def _touch(self, key: bytes, exptime: int) -> bytes:
        self.stats.cmd_touch += 1
        touched = await self._retouch(key, exptime)
        if touched is None:
            self.stats.touch_misses += 1
            return mc.NOT_FOUND
        self.stats.touch_hits += 1
        return mc.TOUCHED

    async def _retouch(self, key: bytes, exptime: int) -> tuple[Version, int] | None:
        """Give a live key a new expiry; returns the old version and the new cas, or None."""
        async with self.locks.hold(key):
            result, live = await self._read_live(key)
            if live is None:
                return None
            expiry = absolute_expiry(exptime, self.wall_clock())
            written = await self.coordinator.put(
                key, Payload(live.flags, expiry, live.value), context=result.context
            )
        return live, ReadResult.of((written,)).cas_unique

    async def _get_and_touch(self, keys: Sequence[bytes], exptime: int, with_cas: bool) -> bytes:
        parts: list[bytes] = []
        self.stats.cmd_touch += len(keys)
        self.stats.cmd_get += len(keys)
        for key in keys:
            touched = await self._retouch(key, exptime)
            if touched is None:
                self.stats.touch_misses += 1
                self.stats.get_misses += 1
                continue
            self.stats.touch_hits += 1
            self.stats.get_hits += 1
            version, cas = touched
            assert version.value is not None
            parts.append(
                mc.encode_value(key, version.flags, version.value, cas if with_cas else None)
            )
        parts.append(mc.END)
        return b"".join(parts)

    async def _too_large(self, command: str, key: bytes) -> bytes:
        self.stats.store_too_large += 1
        if command == "set":
            # memcached drops the old value when a set is refused as too large.
            async with self.locks.hold(key):
                result, live = await self._read_live(key)
                if live is not None:
                    await self.coordinator.put(key, Payload(), context=result.context)
        return _TOO_LARGE

    async def _flush_all(self, delay: int) -> bytes:
        self.stats.cmd_flush += 1
        now = self.wall_clock()
        at = absolute_expiry(delay, now) if delay > 0 else now
        await self.coordinator.flush_all(int(at * 1_000_000))
        return mc.OK


def _quiet(noreply: bool, reply: bytes) -> bytes:
    return b"" if noreply else reply


def _noreply(request: object) -> bool:
    return bool(getattr(request, "noreply", False))

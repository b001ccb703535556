"""The Dynamo API over memcached: the meta commands' ``K`` flag (docs/dynamo-api.md).

``mg <key> K`` reads every live sibling of a key with the causal context of the read, as an
opaque token (:mod:`kai.core.contexts`); ``ms <key> <len> K<token>`` and ``md <key>
K<token>`` write and delete in the context of such a read, superseding exactly what it
covers. The meta executor hands every request that carries ``K`` here; this module turns it
into coordinator reads and writes and renders the replies. Quorum failures propagate to the
command executor, which answers ``SERVER_ERROR`` as for every other write. Never touches
sockets, and never decides a write itself: the coordinating primary does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import attrs

from kai.cluster.coordinator import Coordinator
from kai.core.contexts import BadContext, decode_context, encode_context
from kai.core.memcache import meta_replies, protocol
from kai.core.memcache.meta import MetaDelete, MetaGet, MetaRequest, MetaSet
from kai.core.pending import Step, then
from kai.core.stats import NodeStats
from kai.core.versions import (
    Payload,
    SiblingSet,
    Version,
    absolute_expiry,
    cas_of,
    context_of,
)

#: The reply to a token that is not a context Kai handed out.
BAD_CONTEXT = protocol.client_error("bad causal context")


@attrs.frozen(slots=True)
class Fetched:
    """What a read in the Dynamo API found: the live siblings, newest first, and the
    context of everything read (live, deleted and expired versions alike)."""

    key: bytes
    live: tuple[Version, ...]
    context: bytes
    cas: int


class DynamoCommands:
    """Reads with contexts and writes in context, on a coordinator.

    Args:
        coordinator: where reads and writes go.
        stats: the counters memcached's own commands move (``cmd_get``, ``cmd_set``, ...).
        wall_clock: unix time in seconds.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        stats: NodeStats,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.coordinator = coordinator
        self.stats = stats
        self.wall_clock = wall_clock

    def execute(self, request: MetaRequest) -> Step[bytes]:
        """The reply to a meta request that carries ``K`` (what the meta executor hands
        here).

        Raises:
            TypeError: a request without ``K`` (a programming error).
        """
        if type(request) is MetaGet and request.with_context:
            return then(self.read(request.key), partial(self._read_reply, request))
        if type(request) is MetaSet and request.context is not None:
            return self._written(
                request, request.context, request.value, request.flags, request.exptime
            )
        if type(request) is MetaDelete and request.context is not None:
            return self._written(request, request.context, None, 0, 0)
        raise TypeError(f"not a request in the Dynamo API: {request!r}")

    def _written(
        self,
        request: MetaSet | MetaDelete,
        token: bytes,
        value: bytes | None,
        flags: int,
        exptime: int,
    ) -> Step[bytes]:
        try:
            written = self.write(request.key, token, value, flags=flags, exptime=exptime)
        except BadContext:
            return BAD_CONTEXT
        return then(written, partial(self._write_reply, request))

    def _read_reply(self, request: MetaGet, fetched: Fetched) -> bytes:
        block = self.sibling_block(fetched.live)
        line = _line(b"VA %d" % len(block), request, fetched.context, fetched.cas)
        return b"%b\r\n%b\r\n" % (line, block)

    def _write_reply(self, request: MetaSet | MetaDelete, written: tuple[bytes, int]) -> bytes:
        if request.quiet:
            return b""
        token, cas = written
        return _line(b"HD", request, token, cas) + b"\r\n"

    def read(self, key: bytes) -> Step[Fetched]:
        """A quorum read of ``key``: its live siblings and the read's context token."""
        return then(self.coordinator.get((key,)), lambda found: self._fetched(key, found[0]))

    def _fetched(self, key: bytes, siblings: SiblingSet) -> Fetched:
        now = self.wall_clock()
        flushed_before = self.coordinator.flushed_before(now)
        live = sorted(
            (version for version in siblings if version.is_live(now, flushed_before)),
            key=Version.sort_key,
            reverse=True,
        )
        context = context_of(siblings)
        self.stats.cmd_get += 1
        if live:
            self.stats.get_hits += 1
        else:
            self.stats.get_misses += 1
        return Fetched(key, tuple(live), encode_context(context), cas_of(key, siblings))

    def write(
        self, key: bytes, token: bytes, value: bytes | None, *, flags: int = 0, exptime: int = 0
    ) -> Step[tuple[bytes, int]]:
        """Write ``value`` (None: a tombstone) in the context ``token``: the token and the
        cas unique of the version written.

        Raises:
            BadContext: the token is not a context Kai handed out (reply
                :data:`BAD_CONTEXT`); nothing is written.
        """
        context = decode_context(token)
        if value is None:
            self.stats.delete_hits += 1
            payload = Payload()
        else:
            self.stats.cmd_set += 1
            payload = Payload(flags, absolute_expiry(exptime, self.wall_clock()), value)
        return then(self.coordinator.put(key, payload, context), partial(_written, key))

    # --- rendering ------------------------------------------------------------------------------

    def sibling_block(self, live: Sequence[Version]) -> bytes:
        """The data block of a read: one ``VA <size> f<flags> t<ttl>`` entry per sibling."""
        now = self.wall_clock()
        parts = []
        for version in live:
            value = version.value
            assert value is not None  # live versions have values
            ttl = meta_replies.ttl(version.expiry, now)
            parts.append(b"VA %d f%d t%d\r\n%b\r\n" % (len(value), version.flags, ttl, value))
        return b"".join(parts)


def _line(code: bytes, request: MetaGet | MetaSet | MetaDelete, token: bytes, cas: int) -> bytes:
    """A reply line: ``code``, then the return flags in request order, as memcached."""
    parts = [code]
    for letter in request.returns:
        if letter == "K":
            parts.append(b" K" + token)
        elif letter == "c":
            parts.append(b" c%d" % cas)
        else:
            parts.append(meta_replies.echo(request, letter))
    return b"".join(parts)


def _written(key: bytes, version: Version) -> tuple[bytes, int]:
    return encode_context(context_of((version,))), cas_of(key, (version,))

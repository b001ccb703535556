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

from kai.cluster.coordinator import Coordinator
from kai.core.errors import CoordinatorError, TooManySiblings
from kai.core.memcache import protocol
from kai.core.memcache.report import VERSION_REPLY, NodeInfo, StatsReport
from kai.core.pending import Pending, Step, resolve, then
from kai.core.stats import NodeStats
from kai.core.versions import (
    ReadResult,
    SiblingSet,
    Version,
    absolute_expiry,
    cas_unique,
    context_of,
    visible,
)
from kai.storage.replica import Payload

logger = logging.getLogger(__name__)

_U64 = 2**64
_NON_NUMERIC = protocol.client_error("cannot increment or decrement non-numeric value")
_OUT_OF_MEMORY = protocol.server_error("out of memory storing object")
_TOO_MANY_SIBLINGS = protocol.server_error("too many siblings")


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

    def execute(self, request: protocol.Request | protocol.Invalid) -> Step[bytes]:
        """The reply bytes for one request (``b""`` when noreply suppresses it), at once when
        it can be made without waiting, else as a pending step.

        Raises nothing for bad input or unavailable replicas: those become error replies.
        """
        try:
            reply = self._dispatch(request)
        except (CoordinatorError, TooManySiblings) as error:
            return self._error_reply(request, error)
        if isinstance(reply, Pending):
            return Pending(self._finish(request, reply))
        return reply

    async def _finish(
        self, request: protocol.Request | protocol.Invalid, reply: Pending[bytes]
    ) -> bytes:
        try:
            return await reply
        except (CoordinatorError, TooManySiblings) as error:
            return self._error_reply(request, error)

    def _error_reply(
        self,
        request: protocol.Request | protocol.Invalid,
        error: CoordinatorError | TooManySiblings,
    ) -> bytes:
        if isinstance(error, CoordinatorError):
            self.stats.kai_quorum_failures += 1
            reply = protocol.server_error(error.reply_text)
        else:
            reply = _TOO_MANY_SIBLINGS
        return b"" if getattr(request, "noreply", False) else reply

    def _dispatch(self, request: protocol.Request | protocol.Invalid) -> Step[bytes]:
        # The commonest requests first, by exact type: cheaper than a match on every request.
        kind = type(request)
        if kind is protocol.Get:
            assert isinstance(request, protocol.Get)
            return self._get(request.keys, request.with_cas)
        if kind is protocol.Store:
            assert isinstance(request, protocol.Store)
            return self._store(request)
        match request:
            case protocol.Delete(key=key, noreply=noreply):
                return Pending(self._delete(key, noreply))
            case protocol.Arithmetic(key=key, delta=delta, incr=incr, noreply=noreply):
                return Pending(self._arithmetic(key, delta, incr, noreply))
            case protocol.Touch(key=key, exptime=exptime, noreply=noreply):
                return Pending(self._touch(key, exptime, noreply))
            case protocol.GetAndTouch(exptime=exptime, keys=keys, with_cas=with_cas):
                return Pending(self._get_and_touch(keys, exptime, with_cas))
            case protocol.ValueTooLarge(command=command, key=key, noreply=noreply):
                return Pending(self._too_large(command, key, noreply))
            case protocol.FlushAll(delay=delay, noreply=noreply):
                return self._flush_all(delay, noreply)
            case protocol.Stats(args=args):
                return self.report.reply(args)
            case protocol.Version():
                return VERSION_REPLY
            case protocol.Verbosity(noreply=noreply):
                return _quiet(noreply, protocol.OK)
            case protocol.Invalid(reply=reply):
                return reply
            case _:
                # Quit is handled by the connection; anything else is a programming error.
                raise TypeError(f"cannot execute {request!r}")

    # --- reads --------------------------------------------------------------------------------

    def _get(self, keys: Sequence[bytes], with_cas: bool) -> Step[bytes]:
        started = time.perf_counter()
        found = self.coordinator.get(keys)
        if isinstance(found, Pending):
            return Pending(self._get_when_read(keys, with_cas, started, found))
        return self._get_reply(keys, with_cas, started, found)

    async def _get_when_read(
        self,
        keys: Sequence[bytes],
        with_cas: bool,
        started: float,
        found: Pending[list[SiblingSet]],
    ) -> bytes:
        return self._get_reply(keys, with_cas, started, await found)

    def _get_reply(
        self, keys: Sequence[bytes], with_cas: bool, started: float, results: list[SiblingSet]
    ) -> bytes:
        """The reply to a get of any number of keys in either sibling view, counted."""
        now = self.wall_clock()
        flushed_before = self.coordinator.flushed_before(now)
        all_siblings = self.all_siblings
        stats = self.stats
        parts: list[bytes] = []
        append, encode_value = parts.append, protocol.encode_value
        hits = 0
        for key, siblings in zip(keys, results, strict=True):
            if len(siblings) == 1 and not all_siblings:  # the common case: one version
                version = siblings[0]
                if version.is_live(now, flushed_before):
                    hits += 1
                    assert version.value is not None
                    cas = cas_unique(context_of(siblings)) if with_cas else None
                    append(encode_value(key, version.flags, version.value, cas))
                    continue
                shown = []
            else:
                shown = visible(siblings, now, flushed_before, all_siblings=all_siblings)
            if not shown:
                self._count_miss(siblings, now, flushed_before)
                continue
            hits += 1
            if len(siblings) > 1:
                stats.kai_unreconciled_get += 1
            cas = cas_unique(context_of(siblings)) if with_cas else None
            for version in shown:
                assert version.value is not None
                append(encode_value(key, version.flags, version.value, cas))
        stats.cmd_get += len(keys)
        stats.get_hits += hits
        stats.get_misses += len(keys) - hits
        parts.append(protocol.END)
        stats.get_latency.record(time.perf_counter() - started)
        return b"".join(parts)

    def _count_miss(self, siblings: SiblingSet, now: float, flushed_before: int) -> None:
        latest = max(siblings, key=Version.sort_key, default=None)
        if latest is None or latest.value is None:
            return
        if latest.timestamp <= flushed_before:
            self.stats.get_flushed += 1
        elif latest.expiry and now >= latest.expiry:
            self.stats.get_expired += 1

    async def _read_live(self, key: bytes) -> tuple[ReadResult, Version | None]:
        (siblings,) = await resolve(self.coordinator.get((key,)))
        result = ReadResult(siblings)
        now = self.wall_clock()
        shown = visible(
            siblings,
            now,
            self.coordinator.flushed_before(now),
            all_siblings=self.all_siblings,
        )
        return result, (shown[0] if shown else None)

    # --- writes -------------------------------------------------------------------------------

    def _store(self, request: protocol.Store) -> Step[bytes]:
        started = time.perf_counter()
        self.stats.cmd_set += 1
        if request.command != "set":
            return Pending(self._store_conditionally(request, started))
        written = self.coordinator.put(request.key, self._payload_of(request), context=None)
        reply = b"" if request.noreply else protocol.STORED
        if isinstance(written, Pending):
            return Pending(self._stored_when_written(started, reply, written))
        return self._stored(started, reply)

    async def _stored_when_written(
        self, started: float, reply: bytes, written: Pending[Version]
    ) -> bytes:
        await written
        return self._stored(started, reply)

    def _stored(self, started: float, reply: bytes) -> bytes:
        self.stats.set_latency.record(time.perf_counter() - started)
        return reply

    async def _store_conditionally(self, request: protocol.Store, started: float) -> bytes:
        command, key, noreply = request.command, request.key, request.noreply
        payload = self._payload_of(request)
        try:
            async with self.locks.hold(key):
                result, live = await self._read_live(key)
                if command == "add":
                    reply = (
                        protocol.NOT_STORED
                        if live is not None
                        else await self._put(key, payload, result)
                    )
                elif command == "replace":
                    reply = (
                        protocol.NOT_STORED
                        if live is None
                        else await self._put(key, payload, result)
                    )
                elif command == "cas":
                    if live is None:
                        self.stats.cas_misses += 1
                        reply = protocol.NOT_FOUND
                    elif result.cas_unique != request.cas_unique:
                        self.stats.cas_badval += 1
                        reply = protocol.EXISTS
                    else:
                        self.stats.cas_hits += 1
                        reply = await self._put(key, payload, result)
                else:  # append / prepend keep the stored flags and expiry
                    if live is None:
                        reply = protocol.NOT_STORED
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
        finally:
            self.stats.set_latency.record(time.perf_counter() - started)
        return _quiet(noreply, reply)

    def _payload_of(self, request: protocol.Store) -> Payload:
        return Payload(
            request.flags, absolute_expiry(request.exptime, self.wall_clock()), request.value
        )

    async def _put(self, key: bytes, payload: Payload, read: ReadResult) -> bytes:
        await resolve(self.coordinator.put(key, payload, context=read.context))
        return protocol.STORED

    async def _delete(self, key: bytes, noreply: bool) -> bytes:
        async with self.locks.hold(key):
            result, live = await self._read_live(key)
            if live is None:
                self.stats.delete_misses += 1
                return _quiet(noreply, protocol.NOT_FOUND)
            await resolve(self.coordinator.put(key, Payload(), context=result.context))
        self.stats.delete_hits += 1
        return _quiet(noreply, protocol.DELETED)

    async def _arithmetic(self, key: bytes, delta: int, incr: bool, noreply: bool) -> bytes:
        async with self.locks.hold(key):
            result, live = await self._read_live(key)
            if live is None:
                if incr:
                    self.stats.incr_misses += 1
                else:
                    self.stats.decr_misses += 1
                return _quiet(noreply, protocol.NOT_FOUND)
            assert live.value is not None
            number = parse_counter(live.value)
            if number is None:
                return _quiet(noreply, _NON_NUMERIC)
            number = (number + delta) % _U64 if incr else max(number - delta, 0)
            encoded = str(number).encode()
            await resolve(
                self.coordinator.put(
                    key, Payload(live.flags, live.expiry, encoded), context=result.context
                )
            )
        if incr:
            self.stats.incr_hits += 1
        else:
            self.stats.decr_hits += 1
        return _quiet(noreply, encoded + b"\r\n")

    async def _touch(self, key: bytes, exptime: int, noreply: bool) -> bytes:
        self.stats.cmd_touch += 1
        touched = await self._retouch(key, exptime)
        if touched is None:
            self.stats.touch_misses += 1
            return _quiet(noreply, protocol.NOT_FOUND)
        self.stats.touch_hits += 1
        return _quiet(noreply, protocol.TOUCHED)

    async def _retouch(self, key: bytes, exptime: int) -> tuple[Version, int] | None:
        """Give a live key a new expiry; returns the old version and the new cas, or None."""
        async with self.locks.hold(key):
            result, live = await self._read_live(key)
            if live is None:
                return None
            expiry = absolute_expiry(exptime, self.wall_clock())
            written = await resolve(
                self.coordinator.put(
                    key, Payload(live.flags, expiry, live.value), context=result.context
                )
            )
        return live, ReadResult((written,)).cas_unique

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
                protocol.encode_value(key, version.flags, version.value, cas if with_cas else None)
            )
        parts.append(protocol.END)
        return b"".join(parts)

    async def _too_large(self, command: str, key: bytes, noreply: bool) -> bytes:
        self.stats.store_too_large += 1
        if command == "set":
            # memcached drops the old value when a set is refused as too large.
            async with self.locks.hold(key):
                result, live = await self._read_live(key)
                if live is not None:
                    await resolve(self.coordinator.put(key, Payload(), context=result.context))
        return _quiet(noreply, protocol.OBJECT_TOO_LARGE)

    def _flush_all(self, delay: int, noreply: bool) -> Step[bytes]:
        self.stats.cmd_flush += 1
        now = self.wall_clock()
        at = absolute_expiry(delay, now) if delay > 0 else now
        reply = _quiet(noreply, protocol.OK)
        return then(self.coordinator.flush_all(int(at * 1_000_000)), lambda _: reply)


def _quiet(noreply: bool, reply: bytes) -> bytes:
    return b"" if noreply else reply

"""memcached command semantics on top of a Dynamo coordinator (DESIGN §6).

Turns parsed requests into coordinator reads and writes and renders the exact memcached 1.6
replies. Conditional commands (add, replace, cas, append, prepend, incr, decr, touch, gat,
delete) become an :class:`~kai.core.updates.Update` that the key's coordinating primary
checks and applies under its lock for the key (:mod:`kai.cluster.writes`), wherever the
client sent it; this module turns the outcome into the reply and the counters.
Never touches sockets: the server module feeds requests in and writes replies out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import cast

import trio

from kai.cluster.coordinator import Coordinator
from kai.core.errors import CoordinatorError, TooManySiblings
from kai.core.memcache import protocol
from kai.core.memcache.report import (
    CACHEDUMP_CLASS,
    CACHEDUMP_MAX_BYTES,
    VERSION_REPLY,
    NodeInfo,
    StatsReport,
    encode_cachedump_item,
    parse_cachedump,
)
from kai.core.pending import Pending, Step, resolve, then
from kai.core.stats import NodeStats
from kai.core.updates import Applied, Command, Outcome, Update
from kai.core.versions import (
    Payload,
    SiblingSet,
    Version,
    absolute_expiry,
    cas_of,
    decode_siblings,
    newest,
    visible,
)
from kai.logs import log_quorum_failure
from kai.memcache.meta_commands import Extension, MetaExecutor

logger = logging.getLogger(__name__)

_NON_NUMERIC = protocol.client_error("cannot increment or decrement non-numeric value")
_OUT_OF_MEMORY = protocol.server_error("out of memory storing object")
_TOO_MANY_SIBLINGS = protocol.server_error("too many siblings")
#: The reply to a store command (add, replace, cas, append, prepend) for each outcome.
_STORE_REPLIES = {
    Outcome.STORED: protocol.STORED,
    Outcome.NOT_STORED: protocol.NOT_STORED,
    Outcome.EXISTS: protocol.EXISTS,
    Outcome.NOT_FOUND: protocol.NOT_FOUND,
    Outcome.TOO_LARGE: _OUT_OF_MEMORY,
}


class CommandExecutor:
    """Executes parsed memcached requests against a coordinator.

    Args:
        coordinator: where reads and writes go.
        stats: counters to update.
        info: static node facts for ``stats``.
        item_counts: returns (items, bytes) for ``curr_items`` / ``bytes``.
        extra_stats: more ``stats`` fields from other parts of the node (storage, cache).
        ring: the fields of ``stats kai_ring`` (see :class:`StatsReport`).
        all_siblings: return every live sibling (``siblings = "all"``) instead of the newest.
        wall_clock: unix time in seconds (injectable for tests).
        extension: serves the meta requests that carry Kai's ``K`` flag (the Dynamo API);
            None answers them ``CLIENT_ERROR invalid flag``, as memcached does.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        stats: NodeStats,
        info: NodeInfo,
        *,
        item_counts: Callable[[], tuple[int, int]] = lambda: (0, 0),
        extra_stats: Callable[[], list[tuple[str, object]]] = list,
        ring: Callable[[], list[tuple[str, object]]] = list,
        all_siblings: bool = False,
        wall_clock: Callable[[], float] = time.time,
        extension: Extension | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.stats = stats
        self.info = info
        self.all_siblings = all_siblings
        self.wall_clock = wall_clock
        #: What ``stats`` answers (``general()`` is also what ``kai-admin stats`` shows).
        self.report = StatsReport(
            stats,
            info,
            members=lambda: self.coordinator.members(),
            item_counts=item_counts,
            extra_stats=extra_stats,
            ring=ring,
            wall_clock=wall_clock,
        )
        #: Serves the meta commands (``mg ms md ma me mn``).
        self.meta = MetaExecutor(
            coordinator,
            stats,
            max_item_size=info.max_item_size,
            count_miss=self._count_miss,
            all_siblings=all_siblings,
            extension=extension,
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
            log_quorum_failure(error, error.reply_text)
            reply = protocol.server_error(error.reply_text)
        else:
            reply = _TOO_MANY_SIBLINGS
        return b"" if getattr(request, "noreply", False) else reply

    def _dispatch(self, request: protocol.Request | protocol.Invalid) -> Step[bytes]:
        # The commonest requests first, by exact type: cheaper than a match on every request.
        if type(request) is protocol.Get:
            return self._get(request.keys, request.with_cas)
        if type(request) is protocol.Store:
            return self._store(request)
        match request:
            case protocol.Delete(key=key, noreply=noreply):
                return then(self._update(key, "delete"), partial(self._deleted, noreply))
            case protocol.Arithmetic(key=key, delta=delta, incr=incr, noreply=noreply):
                arithmetic: Command = "incr" if incr else "decr"
                return then(
                    self._update(key, arithmetic, delta=delta),
                    partial(self._counted, incr, noreply),
                )
            case protocol.Touch(key=key, exptime=exptime, noreply=noreply):
                self.stats.cmd_touch += 1
                return then(self._touch(key, exptime), partial(self._touched, noreply))
            case protocol.GetAndTouch(exptime=exptime, keys=keys, with_cas=with_cas):
                return Pending(self._get_and_touch(keys, exptime, with_cas))
            case protocol.ValueTooLarge(command=command, key=key, noreply=noreply):
                return Pending(self._too_large(command, key, noreply))
            case protocol.FlushAll(delay=delay, noreply=noreply):
                return self._flush_all(delay, noreply)
            case protocol.Stats(args=args):
                if args[:1] == (b"cachedump",):
                    return self._cachedump(args)
                return self.report.reply(args)
            case protocol.Version():
                return VERSION_REPLY
            case protocol.Verbosity(noreply=noreply) | protocol.SlabsAutomove(noreply=noreply):
                return _quiet(noreply, protocol.OK)
            case protocol.Invalid(reply=reply):
                return reply
            case (
                protocol.MetaGet()
                | protocol.MetaSet()
                | protocol.MetaValueTooLarge()
                | protocol.MetaDelete()
                | protocol.MetaArithmetic()
                | protocol.MetaDebug()
                | protocol.MetaNoop()
            ):
                return self.meta.execute(request)
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
        hits = 0
        for index, key in enumerate(keys):  # cheaper than a zip(strict=True) of two
            siblings = results[index]
            if len(siblings) == 1 and not all_siblings:  # the common case: one version
                version = siblings[0]
                if version.is_live(now, flushed_before):
                    hits += 1
                    value = version.value
                    assert value is not None
                    cas = cas_of(key, siblings) if with_cas else None
                    parts.append(protocol.encode_value(key, version.flags, value, cas))
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
            cas = cas_of(key, siblings) if with_cas else None
            for version in shown:
                assert version.value is not None
                parts.append(protocol.encode_value(key, version.flags, version.value, cas))
        count = len(keys)
        stats.cmd_get += count
        stats.get_hits += hits
        stats.get_misses += count - hits
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

    # --- writes -------------------------------------------------------------------------------

    def _store(self, request: protocol.Store) -> Step[bytes]:
        started = time.perf_counter()
        self.stats.cmd_set += 1
        payload = self._payload_of(request)
        if request.command == "set":
            reply = b"" if request.noreply else protocol.STORED
            written = self.coordinator.put(request.key, payload)
            if isinstance(written, Pending):
                return Pending(self._stored_when_written(started, reply, written))
            return self._stored(started, reply)
        applied = self._update(
            request.key,
            cast(Command, request.command),
            flags=payload.flags,
            expiry=payload.expiry,
            value=request.value,
            cas=request.cas_unique or 0,
        )
        return then(applied, lambda done: self._stored(started, self._store_reply(request, done)))

    async def _stored_when_written(
        self, started: float, reply: bytes, written: Pending[Version]
    ) -> bytes:
        await written
        return self._stored(started, reply)

    def _stored(self, started: float, reply: bytes) -> bytes:
        self.stats.set_latency.record(time.perf_counter() - started)
        return reply

    def _store_reply(self, request: protocol.Store, applied: Applied) -> bytes:
        outcome = applied.outcome
        if request.command == "cas":
            if outcome is Outcome.NOT_FOUND:
                self.stats.cas_misses += 1
            elif outcome is Outcome.EXISTS:
                self.stats.cas_badval += 1
            else:
                self.stats.cas_hits += 1
        return _quiet(request.noreply, _STORE_REPLIES[outcome])

    def _payload_of(self, request: protocol.Store) -> Payload:
        return Payload(
            request.flags, absolute_expiry(request.exptime, self.wall_clock()), request.value
        )

    def _update(
        self,
        key: bytes,
        command: Command,
        *,
        flags: int = 0,
        expiry: int = 0,
        value: bytes = b"",
        cas: int = 0,
        delta: int = 0,
    ) -> Step[Applied]:
        update = Update(
            command,
            flags,
            expiry,
            value,
            cas,
            delta,
            all_siblings=self.all_siblings,
            max_size=self.info.max_item_size,
        )
        return self.coordinator.update(key, update)

    def _deleted(self, noreply: bool, applied: Applied) -> bytes:
        if applied.outcome is Outcome.DELETED:
            self.stats.delete_hits += 1
            return _quiet(noreply, protocol.DELETED)
        self.stats.delete_misses += 1
        return _quiet(noreply, protocol.NOT_FOUND)

    def _counted(self, incr: bool, noreply: bool, applied: Applied) -> bytes:
        outcome = applied.outcome
        if outcome is Outcome.NON_NUMERIC:
            return _quiet(noreply, _NON_NUMERIC)
        hit = outcome is Outcome.STORED
        if incr:
            self.stats.incr_hits += hit
            self.stats.incr_misses += not hit
        else:
            self.stats.decr_hits += hit
            self.stats.decr_misses += not hit
        if not hit:
            return _quiet(noreply, protocol.NOT_FOUND)
        assert applied.version is not None
        assert applied.version.value is not None
        return _quiet(noreply, applied.version.value + b"\r\n")

    def _touch(self, key: bytes, exptime: int) -> Step[Applied]:
        return self._update(key, "touch", expiry=absolute_expiry(exptime, self.wall_clock()))

    def _touched(self, noreply: bool, applied: Applied) -> bytes:
        if applied.outcome is Outcome.TOUCHED:
            self.stats.touch_hits += 1
            return _quiet(noreply, protocol.TOUCHED)
        self.stats.touch_misses += 1
        return _quiet(noreply, protocol.NOT_FOUND)

    async def _get_and_touch(self, keys: Sequence[bytes], exptime: int, with_cas: bool) -> bytes:
        parts: list[bytes] = []
        self.stats.cmd_touch += len(keys)
        self.stats.cmd_get += len(keys)
        for key in keys:
            applied = await resolve(self._touch(key, exptime))
            version = applied.version
            if applied.outcome is not Outcome.TOUCHED or version is None:
                self.stats.touch_misses += 1
                self.stats.get_misses += 1
                continue
            self.stats.touch_hits += 1
            self.stats.get_hits += 1
            assert version.value is not None
            cas = applied.cas if with_cas else None
            parts.append(protocol.encode_value(key, version.flags, version.value, cas))
        parts.append(protocol.END)
        return b"".join(parts)

    async def _too_large(self, command: str, key: bytes, noreply: bool) -> bytes:
        self.stats.store_too_large += 1
        if command == "set":
            # memcached drops the old value when a set is refused as too large.
            await resolve(self._update(key, "delete"))
        return _quiet(noreply, protocol.OBJECT_TOO_LARGE)

    def _flush_all(self, delay: int, noreply: bool) -> Step[bytes]:
        self.stats.cmd_flush += 1
        now = self.wall_clock()
        at = absolute_expiry(delay, now) if delay > 0 else now
        reply = _quiet(noreply, protocol.OK)
        return then(self.coordinator.flush_all(int(at * 1_000_000)), lambda _: reply)

    # --- stats cachedump -----------------------------------------------------------------------

    #: Records read from storage between two checkpoints of a cachedump scan.
    CACHEDUMP_CHUNK = 256

    def _cachedump(self, args: tuple[bytes, ...]) -> Step[bytes]:
        """``stats cachedump <class> <limit>``: this node's live keys (what memcdump lists).

        Kai has one item class, 1; every other class is empty. Only this node's replicas are
        listed (a node holds the keys of its partitions, not the cluster's), in storage order,
        up to ``limit`` items (0 = all) and memcached's 2 MiB reply limit.
        """
        parsed = parse_cachedump(args)
        if isinstance(parsed, bytes):
            return parsed
        item_class, limit = parsed
        if item_class != CACHEDUMP_CLASS:
            return protocol.END
        return Pending(self._cachedump_scan(limit))

    async def _cachedump_scan(self, limit: int) -> bytes:
        replica = self.coordinator.replica
        lines: list[bytes] = []
        size = len(protocol.END)
        for partition in range(replica.buckets):
            start_after: bytes | None = None
            while True:
                # A long scan: chunked, with a checkpoint per chunk, so it never stalls the loop.
                chunk = replica.engine.scan(
                    partition, start_after=start_after, limit=self.CACHEDUMP_CHUNK
                )
                now = self.wall_clock()
                flushed_before = self.coordinator.flushed_before(now)
                for key, record in chunk:
                    latest = newest(decode_siblings(record))
                    if latest is None or not latest.is_live(now, flushed_before):
                        continue
                    assert latest.value is not None
                    line = encode_cachedump_item(key, len(latest.value), latest.expiry)
                    size += len(line)
                    if size > CACHEDUMP_MAX_BYTES:
                        return b"".join(lines) + protocol.END
                    lines.append(line)
                    if len(lines) == limit:
                        return b"".join(lines) + protocol.END
                await trio.lowlevel.checkpoint()
                if len(chunk) < self.CACHEDUMP_CHUNK:
                    break
                start_after = chunk[-1][0]
        return b"".join(lines) + protocol.END


def _quiet(noreply: bool, reply: bytes) -> bytes:
    return b"" if noreply else reply

"""memcached 1.6's meta commands on top of a Dynamo coordinator.

Serves the records of :mod:`kai.core.memcache.meta` with memcached 1.6.18's replies, byte
for byte. Every read is a quorum read (``coordinator.get``); everything that writes (``ms``
in every mode, ``md``, ``ma``, and an ``mg`` that touches, creates or hands out a win) is an
:class:`~kai.core.updates.Update` decided at the key's coordinating primary under its lock
(:func:`kai.core.updates.decide`), so racing clients through any nodes get memcached's
answers: one ``W``, the others ``Z``. Stale (``X``) and win-sent (``Z``) are marks of the
stored version; ``h``, ``l`` and ``me``'s ``fetch``/``la`` are this node's own
(:mod:`kai.core.accesses`). Requests carrying Kai's ``K`` go to the extension it is given.
Never touches sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Final, TypeAlias

from kai.cluster.coordinator import Coordinator
from kai.core.accesses import AccessLog
from kai.core.memcache import meta_replies as replies, protocol
from kai.core.memcache.meta import (
    MetaArithmetic,
    MetaDebug,
    MetaDelete,
    MetaGet,
    MetaNoop,
    MetaRequest,
    MetaSet,
    MetaValueTooLarge,
)
from kai.core.memcache.meta_parser import INVALID_FLAG, INVALID_OR_DUPLICATE
from kai.core.memcache.meta_replies import expiry_of
from kai.core.pending import Pending, Step, resolve, then
from kai.core.stats import NodeStats
from kai.core.updates import Applied, Command, MetaUpdate, Outcome, Update
from kai.core.versions import SiblingSet, Version, absolute_expiry, cas_of, visible

#: What serves the requests that carry ``K`` (docs/dynamo-api.md).
Extension: TypeAlias = Callable[[MetaGet | MetaSet | MetaDelete], Step[bytes]]

#: The return code of ``ms`` for each outcome (``TOO_LARGE`` is an error line instead).
_SET_CODES: Final = {
    Outcome.STORED: b"HD",
    Outcome.NOT_STORED: b"NS",
    Outcome.EXISTS: b"EX",
    Outcome.NOT_FOUND: b"NF",
}


class MetaExecutor:
    """Executes meta requests against a coordinator.

    Args:
        coordinator: where reads and writes go.
        stats: the counters memcached moves for meta commands too (``cmd_get``,
            ``get_hits``, ``cmd_set``, ``cmd_touch``, ``delete_hits``, ``incr_hits``, ...).
        max_item_size: the largest value ``ms`` append and prepend may make.
        count_miss: counts an expired or flushed miss, as a classic get does.
        all_siblings: a key is live when any sibling is (``siblings = "all"``).
        extension: serves requests with ``K``; None answers them ``CLIENT_ERROR invalid
            flag``, as memcached does.
        accesses: this node's memory of what it served (``h``, ``l``, ``me``).
        wall_clock: unix time in seconds.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        stats: NodeStats,
        *,
        max_item_size: int,
        count_miss: Callable[[SiblingSet, float, int], None] = lambda *_: None,
        all_siblings: bool = False,
        extension: Extension | None = None,
        accesses: AccessLog | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.coordinator = coordinator
        self.stats = stats
        self.max_item_size = max_item_size
        self.count_miss = count_miss
        self.all_siblings = all_siblings
        self.extension = extension
        self.accesses = AccessLog() if accesses is None else accesses
        self.wall_clock = wall_clock

    def execute(self, request: MetaRequest) -> Step[bytes]:
        """The reply to one meta request, at once or as a pending step.

        Raises (at once, or from the pending step): the coordinator's errors, which the
        command executor turns into ``SERVER_ERROR`` lines (always sent, as memcached's).
        """
        match request:
            case (
                MetaGet(with_context=True) | MetaSet(context=bytes()) | MetaDelete(context=bytes())
            ):
                return self._extended(request)
            case MetaGet():
                return self._get(request)
            case MetaSet():
                return self._set(request)
            case MetaDelete():
                return self._delete(request)
            case MetaArithmetic():
                return self._arithmetic(request)
            case MetaDebug():
                return self._debug(request)
            case MetaValueTooLarge():
                return self._too_large(request)
            case MetaNoop():
                return replies.NOOP
        raise TypeError(f"cannot execute {request!r}")

    def _extended(self, request: MetaGet | MetaSet | MetaDelete) -> Step[bytes]:
        if self.extension is None:
            # What memcached, which has no K, answers (md says so for any flag it refuses).
            return (INVALID_OR_DUPLICATE if type(request) is MetaDelete else INVALID_FLAG).reply
        return self.extension(request)

    def _update(
        self,
        key: bytes,
        command: Command,
        meta: MetaUpdate,
        *,
        flags: int = 0,
        expiry: int = 0,
        value: bytes = b"",
        cas: int = 0,
        delta: int = 0,
    ) -> Step[Applied]:
        """Carry out a meta command's write at the key's coordinating primary."""
        update = Update(
            command,
            flags,
            expiry,
            value,
            cas,
            delta,
            all_siblings=self.all_siblings,
            max_size=self.max_item_size,
            meta=meta,
        )
        return self.coordinator.update(key, update)

    def _live(self, siblings: SiblingSet, now: float) -> Version | None:
        shown = visible(
            siblings, now, self.coordinator.flushed_before(now), all_siblings=self.all_siblings
        )
        return shown[0] if shown else None

    # --- mg -------------------------------------------------------------------------------

    def _get(self, request: MetaGet) -> Step[bytes]:
        found = self.coordinator.get((request.key,))
        if isinstance(found, Pending):
            return Pending(self._get_when_read(request, found))
        return self._got(request, found[0])

    async def _get_when_read(self, request: MetaGet, found: Pending[list[SiblingSet]]) -> bytes:
        return await resolve(self._got(request, (await found)[0]))

    def _got(self, request: MetaGet, siblings: SiblingSet) -> Step[bytes]:
        now = self.wall_clock()
        live = self._live(siblings, now)
        if live is None:
            if request.vivify_exptime is None:
                self.stats.cmd_get += 1
                self.stats.get_misses += 1
                self.count_miss(siblings, now, self.coordinator.flushed_before(now))
                return replies.miss(request)
        elif request.touch_exptime is None and not _wins(request, live, now):
            return self._hit(request, live, cas_of(request.key, siblings), now)
        return Pending(self._get_writing(request, live, now))

    async def _get_writing(self, request: MetaGet, live: Version | None, now: float) -> bytes:
        """An ``mg`` that creates, touches or wins: decided at the key's primary."""
        meta = MetaUpdate(
            touch=request.touch_exptime is not None,
            vivify=request.vivify_exptime is not None,
            vivify_expiry=replies.created_expiry(request, now),
            recache_before=expiry_of(request.recache_exptime, now),
            new_cas=request.new_cas or 0,
        )
        expiry = expiry_of(request.touch_exptime, now)
        applied = await resolve(self._update(request.key, "meta_get", meta, expiry=expiry))
        outcome, version = applied.outcome, applied.version
        if outcome is Outcome.NOT_FOUND:
            self.stats.cmd_get += 1
            self.stats.get_misses += 1
            return replies.miss(request)
        if version is None:
            # Nothing to write at the primary after all (another client won meanwhile, or
            # the key changed): answer what is there now, without writing.
            (siblings,) = await resolve(self.coordinator.get((request.key,)))
            current = self._live(siblings, self.wall_clock())
            if current is None:
                self.stats.cmd_get += 1
                self.stats.get_misses += 1
                return replies.miss(request)
            cas = cas_of(request.key, siblings)
            return self._hit(request, current, cas, now)
        created = outcome is Outcome.CREATED
        return self._hit(
            request,
            version,
            applied.cas,
            now,
            before=None if created else live,
            won=created or outcome is Outcome.WON,
            created=created,
        )

    def _hit(
        self,
        request: MetaGet,
        version: Version,
        cas: int,
        now: float,
        *,
        before: Version | None = None,
        won: bool = False,
        created: bool = False,
    ) -> bytes:
        """The reply to a hit on ``version`` (as written, when this mg wrote it: ``before``
        is what it replaced, if known; ``won``: this mg won; ``created``: it made the item),
        counted as memcached counts it."""
        stats = self.stats
        if request.touch_exptime is None:
            stats.cmd_get += 1
            stats.get_hits += 1
        else:
            stats.cmd_touch += 1
            stats.touch_hits += 1
        hit_before, idle = self.accesses.before(request.key, before or version, now)
        if not request.no_bump:
            self.accesses.served(request.key, version, now)
        return replies.hit(
            request,
            version,
            cas,
            now,
            expiry_before=(before or version).expiry,
            hit_before=hit_before,
            idle=idle,
            won=won,
            created=created,
        )

    # --- ms -------------------------------------------------------------------------------

    def _set(self, request: MetaSet) -> Step[bytes]:
        self.stats.cmd_set += 1
        meta = MetaUpdate(
            mode=request.mode,
            has_cas=request.compare_cas is not None,
            invalidate=request.invalidate,
            new_cas=request.new_cas or 0,
        )
        applied = self._update(
            request.key,
            "meta_set",
            meta,
            flags=request.flags,
            expiry=absolute_expiry(request.exptime, self.wall_clock()),
            value=request.value,
            cas=request.compare_cas or 0,
        )
        return then(applied, partial(self._set_reply, request))

    def _set_reply(self, request: MetaSet, applied: Applied) -> bytes:
        outcome = applied.outcome
        if outcome is Outcome.TOO_LARGE:
            return replies.OUT_OF_MEMORY
        if request.compare_cas is not None and request.mode in "SR":
            stats = self.stats
            if outcome is Outcome.NOT_FOUND:
                stats.cas_misses += 1
            elif outcome is Outcome.EXISTS:
                stats.cas_badval += 1
            else:
                stats.cas_hits += 1
        if outcome is not Outcome.STORED:
            return replies.set_line(_SET_CODES[outcome], request, 0)
        return b"" if request.quiet else replies.set_line(b"HD", request, applied.cas)

    def _too_large(self, request: MetaValueTooLarge) -> Step[bytes]:
        if request.context is not None:
            if self.extension is None:
                return INVALID_FLAG.reply
            self.stats.store_too_large += 1
            return protocol.OBJECT_TOO_LARGE  # a write in context drops nothing
        self.stats.store_too_large += 1
        # memcached drops the key's value when an ms is refused as too large, in any mode.
        deleted = self._update(request.key, "meta_delete", MetaUpdate())
        return then(deleted, lambda _: protocol.OBJECT_TOO_LARGE)

    # --- md -------------------------------------------------------------------------------

    def _delete(self, request: MetaDelete) -> Step[bytes]:
        meta = MetaUpdate(
            has_cas=request.compare_cas is not None,
            invalidate=request.invalidate,
            touch=request.invalidate and request.exptime is not None,
            new_cas=request.new_cas or 0,
        )
        applied = self._update(
            request.key,
            "meta_delete",
            meta,
            expiry=expiry_of(request.exptime, self.wall_clock()),
            cas=request.compare_cas or 0,
        )
        return then(applied, partial(self._delete_reply, request))

    def _delete_reply(self, request: MetaDelete, applied: Applied) -> bytes:
        outcome = applied.outcome
        if outcome is Outcome.DELETED:
            self.stats.delete_hits += 1
        elif outcome is not Outcome.INVALIDATED:
            self.stats.delete_misses += 1
            return replies.status(b"NF" if outcome is Outcome.NOT_FOUND else b"EX", request)
        return b"" if request.quiet else replies.status(b"HD", request)

    # --- ma -------------------------------------------------------------------------------

    def _arithmetic(self, request: MetaArithmetic) -> Step[bytes]:
        returns = request.returns
        if "T" in returns and 0 <= returns.find("t") < returns.find("T"):
            # A t before the T shows the TTL the counter had: read it first.
            return Pending(self._arithmetic_after_read(request))
        return self._arithmetic_with(request, None)

    async def _arithmetic_after_read(self, request: MetaArithmetic) -> bytes:
        (siblings,) = await resolve(self.coordinator.get((request.key,)))
        live = self._live(siblings, self.wall_clock())
        return await resolve(self._arithmetic_with(request, None if live is None else live.expiry))

    def _arithmetic_with(self, request: MetaArithmetic, old_expiry: int | None) -> Step[bytes]:
        now = self.wall_clock()
        meta = MetaUpdate(
            has_cas=request.compare_cas is not None,
            touch=request.touch_exptime is not None,
            vivify=request.vivify_exptime is not None,
            vivify_expiry=replies.created_expiry(request, now),
            initial=request.initial,
            incr=request.incr,
            new_cas=request.new_cas or 0,
        )
        applied = self._update(
            request.key,
            "meta_arithmetic",
            meta,
            expiry=expiry_of(request.touch_exptime, now),
            cas=request.compare_cas or 0,
            delta=request.delta,
        )
        return then(applied, partial(self._arithmetic_reply, request, old_expiry, now))

    def _arithmetic_reply(
        self, request: MetaArithmetic, old_expiry: int | None, now: float, applied: Applied
    ) -> bytes:
        outcome, version = applied.outcome, applied.version
        stats = self.stats
        if outcome is Outcome.NON_NUMERIC:
            return replies.NON_NUMERIC
        if outcome is Outcome.EXISTS:
            return replies.status(b"EX", request)
        if outcome is Outcome.NOT_FOUND:
            if request.incr:
                stats.incr_misses += 1
            else:
                stats.decr_misses += 1
            return replies.status(b"NF", request)
        assert version is not None
        assert version.value is not None
        created = outcome is Outcome.CREATED
        if not created:
            if request.incr:
                stats.incr_hits += 1
            else:
                stats.decr_hits += 1
            if request.quiet:
                return b""  # memcached hides a success, not the creation of a counter
        return replies.counted(
            request,
            version.value,
            applied.cas,
            now,
            expiry_before=version.expiry if old_expiry is None else old_expiry,
            created=created,
        )

    # --- me -------------------------------------------------------------------------------

    def _debug(self, request: MetaDebug) -> Step[bytes]:
        return then(self.coordinator.get((request.key,)), partial(self._debug_reply, request))

    def _debug_reply(self, request: MetaDebug, found: list[SiblingSet]) -> bytes:
        """memcached's ``ME`` line; ``la`` and ``fetch`` are this node's (see
        :mod:`kai.core.accesses`)."""
        (siblings,) = found
        now = self.wall_clock()
        live = self._live(siblings, now)
        if live is None:
            return replies.MISS
        fetched, idle = self.accesses.before(request.key, live, now)
        cas = cas_of(request.key, siblings)
        return replies.debug(request, live, cas, now, fetched=fetched, idle=idle)


# --- helpers ---------------------------------------------------------------------------------


def _wins(request: MetaGet, live: Version, now: float) -> bool:
    """Whether an ``mg`` of ``live`` hands out the win (before the primary confirms it)."""
    if live.win_sent:
        return False
    return live.is_stale or 0 < live.expiry < expiry_of(request.recache_exptime, now)

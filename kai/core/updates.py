"""Conditional writes: the memcached commands that read, check and write (DESIGN §3, §6).

Pure code (no I/O, no trio; callers pass the current time in). cas, add, replace, append,
prepend, incr, decr, touch (and gat) and delete become an :class:`Update`, which travels to
the key's coordinating primary. There, under the key's lock, the primary reads the key (a
quorum read), :func:`decide` says what to answer and what to write, and the write carries the
context of that read. Deciding where the new version is built is what makes two ``cas`` with
one token give one STORED and one EXISTS, wherever the clients sent them.

memcached's meta commands that write (``ms`` in every mode, ``md``, ``ma``, and an ``mg``
that touches, vivifies or hands out a win) are Updates too, with their flags in a
:class:`MetaUpdate`; so of two clients racing for a win through any two nodes, one is told
``W`` and the other ``Z``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Literal, get_args

import attrs

from kai.core.versions import (
    STALE,
    WIN_SENT,
    Payload,
    SiblingSet,
    Version,
    cas_of,
    visible,
)

#: The commands an :class:`Update` can carry.
Command = Literal[
    "add",
    "replace",
    "cas",
    "append",
    "prepend",
    "incr",
    "decr",
    "touch",
    "delete",
    "meta_get",
    "meta_set",
    "meta_delete",
    "meta_arithmetic",
]
COMMANDS: tuple[Command, ...] = get_args(Command)
#: The commands that carry a :class:`MetaUpdate` (and only they do).
META_COMMANDS: frozenset[Command] = frozenset(
    ("meta_get", "meta_set", "meta_delete", "meta_arithmetic")
)
#: The modes of ``meta_set``: add, append, prepend, replace, set (memcached's ``ms M``).
META_SET_MODES = frozenset("EAPRS")

_U64 = 2**64


class Outcome(enum.Enum):
    """What a conditional write came to (each is one memcached reply)."""

    STORED = "stored"
    NOT_STORED = "not_stored"
    EXISTS = "exists"
    NOT_FOUND = "not_found"
    DELETED = "deleted"
    TOUCHED = "touched"
    #: incr/decr of a value that is not a number.
    NON_NUMERIC = "non_numeric"
    #: append/prepend would make the value larger than the item size limit.
    TOO_LARGE = "too_large"
    #: A meta command made the missing item (``mg``/``ma`` with ``N``).
    CREATED = "created"
    #: An ``mg`` handed out the win (``W``), and marked the item so.
    WON = "won"
    #: ``md`` with ``I`` marked the item stale.
    INVALIDATED = "invalidated"
    #: An ``mg`` found the item with nothing to write (the client's node reads it again).
    FOUND = "found"


@attrs.frozen(slots=True)
class MetaUpdate:
    """The flags of a meta command that writes, as its :class:`Update` carries them.

    Attributes:
        mode: ``ms``'s mode, one of :data:`META_SET_MODES`.
        has_cas: a ``C`` was sent (its token is :attr:`Update.cas`).
        invalidate: ``I``: ``ms`` with an outdated cas stores the value marked stale;
            ``md`` marks the item stale instead of deleting it.
        touch: a ``T`` was sent (the new expiry is :attr:`Update.expiry`).
        vivify: an ``N`` was sent: create the missing item.
        vivify_expiry: the absolute expiry of an item so created (0 = never).
        recache_before: ``mg``'s ``R`` as an absolute time: an item expiring before it is
            won, once (0: no ``R``).
        initial: ``ma``'s ``J``: the number a created counter holds.
        incr: ``ma`` increments (else it decrements).
        new_cas: ``E``: the cas unique of the version the command writes (0: none, Kai's
            own). A win handed out marks the version it found and keeps its cas.
    """

    mode: str = "S"
    has_cas: bool = False
    invalidate: bool = False
    touch: bool = False
    vivify: bool = False
    vivify_expiry: int = 0
    recache_before: int = 0
    initial: int = 0
    incr: bool = True
    new_cas: int = 0

    def __attrs_post_init__(self) -> None:
        if self.mode not in META_SET_MODES:
            raise ValueError(f"unknown meta set mode {self.mode!r}")


@attrs.frozen(slots=True)
class Update:
    """One conditional write, as the client's node hands it to the coordinating primary.

    Attributes:
        command: the memcached command.
        flags: the client flags to store (add, replace, cas).
        expiry: absolute unix seconds (0 = never), computed on the client's node from the
            request's exptime (add, replace, cas, touch).
        value: the value to store (add, replace, cas), or to join (append, prepend).
        cas: the token to compare (cas).
        delta: the amount to add or subtract (incr, decr).
        all_siblings: the client's node shows every live sibling (``siblings = "all"``): a
            key is live when any sibling is; else only when its newest version is.
        max_size: the largest value append and prepend may make (the client's node's limit).
        meta: the flags of a meta command (exactly for :data:`META_COMMANDS`).
    """

    command: Command
    flags: int = 0
    expiry: int = 0
    value: bytes = b""
    cas: int = 0
    delta: int = 0
    all_siblings: bool = False
    max_size: int = 1024 * 1024
    meta: MetaUpdate | None = None


@attrs.frozen(slots=True)
class Decision:
    """What :func:`decide` found: the outcome, and what to write (None: nothing)."""

    outcome: Outcome
    write: Payload | None = None


@attrs.frozen(slots=True)
class Applied:
    """A conditional write carried out at the coordinating primary.

    Attributes:
        outcome: what it came to.
        version: the version written (None when nothing was).
        cas: the key's cas unique after the write (0 when nothing was written).
    """

    outcome: Outcome
    version: Version | None = None
    cas: int = 0


def parse_counter(value: bytes) -> int | None:
    """The unsigned 64-bit number a stored value holds, as memcached's strtoull reads it."""
    digits = value.lstrip(b" ").rstrip(b" \t\r\n")
    if not digits or not digits.isdigit() or len(digits) > 20:
        return None
    number = int(digits)
    return number if number < _U64 else None


def decide(
    update: Update, key: bytes, siblings: SiblingSet, *, now: float, flushed_before: int
) -> Decision:
    """The memcached semantics of ``update`` on ``key``, whose sibling set (read at the
    coordinating primary) is ``siblings``, at unix time ``now``."""
    shown = visible(siblings, now, flushed_before, all_siblings=update.all_siblings)
    live = shown[0] if shown else None
    command = update.command
    meta = update.meta
    if meta is not None:
        decision = _META_DECISIONS[command](update, meta, key, live, siblings)
        written = decision.write
        if meta.new_cas and written is not None and written.same_write is None:
            return Decision(decision.outcome, written._replace(cas=meta.new_cas))
        return decision
    if command == "add":
        if live is not None:
            return Decision(Outcome.NOT_STORED)
        return Decision(Outcome.STORED, Payload(update.flags, update.expiry, update.value))
    if live is None:
        miss = Outcome.NOT_STORED if command in ("replace", "append", "prepend") else None
        return Decision(miss or Outcome.NOT_FOUND)
    assert live.value is not None
    if command == "replace":
        return Decision(Outcome.STORED, Payload(update.flags, update.expiry, update.value))
    if command == "cas":
        if cas_of(key, siblings) != update.cas:
            return Decision(Outcome.EXISTS)
        return Decision(Outcome.STORED, Payload(update.flags, update.expiry, update.value))
    if command in ("append", "prepend"):
        joined = live.value + update.value if command == "append" else update.value + live.value
        if len(joined) > update.max_size:
            return Decision(Outcome.TOO_LARGE)
        return Decision(Outcome.STORED, Payload(live.flags, live.expiry, joined))
    if command in ("incr", "decr"):
        number = parse_counter(live.value)
        if number is None:
            return Decision(Outcome.NON_NUMERIC)
        if command == "incr":
            number = (number + update.delta) % _U64
        else:
            number = max(number - update.delta, 0)
        # memcached changes a number in place: the item keeps its meta marks.
        number_bytes = str(number).encode()
        return Decision(Outcome.STORED, Payload(live.flags, live.expiry, number_bytes, live.mark))
    if command == "touch":
        return Decision(Outcome.TOUCHED, Payload(live.flags, update.expiry, live.value, live.mark))
    assert command == "delete"
    return Decision(Outcome.DELETED, Payload())


# --- meta commands ----------------------------------------------------------------------------


def _cas_matches(update: Update, key: bytes, siblings: SiblingSet) -> bool:
    return cas_of(key, siblings) == update.cas


def _decide_meta_get(
    update: Update, meta: MetaUpdate, key: bytes, live: Version | None, siblings: SiblingSet
) -> Decision:
    """``mg`` with ``N``, ``T`` or ``R``, or on a stale item: create, touch, hand out a win."""
    if live is None:
        if not meta.vivify:
            return Decision(Outcome.NOT_FOUND)
        return Decision(Outcome.CREATED, Payload(0, meta.vivify_expiry, b"", WIN_SENT))
    expires_soon = 0 < live.expiry < meta.recache_before
    won = not live.win_sent and (live.is_stale or expires_soon)
    mark = live.mark | WIN_SENT if won else live.mark
    if meta.touch:
        outcome = Outcome.WON if won else Outcome.TOUCHED
        return Decision(outcome, Payload(live.flags, update.expiry, live.value, mark))
    if won:
        # Only the mark changes: the same write, so the cas unique stays, as in memcached.
        return Decision(Outcome.WON, Payload(mark=mark, same_write=live))
    return Decision(Outcome.FOUND)


def _decide_meta_set(
    update: Update, meta: MetaUpdate, key: bytes, live: Version | None, siblings: SiblingSet
) -> Decision:
    """``ms`` in its modes, with ``C`` and ``I`` as memcached 1.6.18's store does."""
    mode = meta.mode
    written = Payload(update.flags, update.expiry, update.value)
    if mode == "E":
        return (
            Decision(Outcome.NOT_STORED) if live is not None else Decision(Outcome.STORED, written)
        )
    if meta.has_cas and mode in "SR":
        if live is None:
            return Decision(Outcome.NOT_FOUND)
        if _cas_matches(update, key, siblings):
            return Decision(Outcome.STORED, written)
        if meta.invalidate and update.cas != 0:
            # memcached stores a value whose cas is older than the item's, marked stale, with
            # the item's expiry and win. A cas unique here is a digest, not a counter: any
            # other token counts as older.
            mark = STALE | live.mark & WIN_SENT
            return Decision(Outcome.STORED, Payload(update.flags, live.expiry, update.value, mark))
        return Decision(Outcome.EXISTS)
    if mode == "S":
        return Decision(Outcome.STORED, written)
    if live is None:
        return Decision(Outcome.NOT_STORED)
    if mode == "R":
        return Decision(Outcome.STORED, written)
    assert live.value is not None
    if meta.has_cas and update.cas != 0 and not _cas_matches(update, key, siblings):
        return Decision(Outcome.EXISTS)
    joined = live.value + update.value if mode == "A" else update.value + live.value
    if len(joined) > update.max_size:
        return Decision(Outcome.TOO_LARGE)
    return Decision(Outcome.STORED, Payload(live.flags, live.expiry, joined))


def _decide_meta_delete(
    update: Update, meta: MetaUpdate, key: bytes, live: Version | None, siblings: SiblingSet
) -> Decision:
    """``md``: delete, or with ``I`` mark stale (a new version: a new cas, as memcached's)."""
    if live is None:
        return Decision(Outcome.NOT_FOUND)
    if meta.has_cas and not _cas_matches(update, key, siblings):
        return Decision(Outcome.EXISTS)
    if meta.invalidate:
        expiry = update.expiry if meta.touch else live.expiry
        return Decision(Outcome.INVALIDATED, Payload(live.flags, expiry, live.value, STALE))
    return Decision(Outcome.DELETED, Payload())


def _decide_meta_arithmetic(
    update: Update, meta: MetaUpdate, key: bytes, live: Version | None, siblings: SiblingSet
) -> Decision:
    """``ma``: incr/decr, ``N`` creating a missing counter, ``C`` (0 checks nothing)."""
    if live is None:
        if not meta.vivify:
            return Decision(Outcome.NOT_FOUND)
        initial = str(meta.initial).encode()
        return Decision(Outcome.CREATED, Payload(0, meta.vivify_expiry, initial))
    if not live.value:
        return Decision(Outcome.NON_NUMERIC)  # memcached looks at an empty value first
    if meta.has_cas and update.cas != 0 and not _cas_matches(update, key, siblings):
        return Decision(Outcome.EXISTS)
    number = parse_counter(live.value)
    if number is None:
        return Decision(Outcome.NON_NUMERIC)
    number = (number + update.delta) % _U64 if meta.incr else max(number - update.delta, 0)
    expiry = update.expiry if meta.touch else live.expiry
    value = str(number).encode()
    return Decision(Outcome.STORED, Payload(live.flags, expiry, value, live.mark))


_MetaDecision = Callable[[Update, MetaUpdate, bytes, "Version | None", SiblingSet], Decision]
_META_DECISIONS: dict[str, _MetaDecision] = {
    "meta_get": _decide_meta_get,
    "meta_set": _decide_meta_set,
    "meta_delete": _decide_meta_delete,
    "meta_arithmetic": _decide_meta_arithmetic,
}

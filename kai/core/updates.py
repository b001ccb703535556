"""Conditional writes: the memcached commands that read, check and write (DESIGN §3, §6).

Pure code (no I/O, no trio; callers pass the current time in). cas, add, replace, append,
prepend, incr, decr, touch (and gat) and delete become an :class:`Update`, which travels to
the key's coordinating primary. There, under the key's lock, the primary reads the key (a
quorum read), :func:`decide` says what to answer and what to write, and the write carries the
context of that read. Deciding where the new version is built is what makes two ``cas`` with
one token give one STORED and one EXISTS, wherever the clients sent them.
"""

from __future__ import annotations

import enum
from typing import Literal

import attrs

from kai.core.versions import Payload, SiblingSet, Version, cas_unique, context_of, visible

#: The commands an :class:`Update` can carry.
Command = Literal["add", "replace", "cas", "append", "prepend", "incr", "decr", "touch", "delete"]
COMMANDS: tuple[Command, ...] = (
    "add",
    "replace",
    "cas",
    "append",
    "prepend",
    "incr",
    "decr",
    "touch",
    "delete",
)

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
    """

    command: Command
    flags: int = 0
    expiry: int = 0
    value: bytes = b""
    cas: int = 0
    delta: int = 0
    all_siblings: bool = False
    max_size: int = 1024 * 1024


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
        if cas_unique(key, context_of(siblings)) != update.cas:
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
        return Decision(Outcome.STORED, Payload(live.flags, live.expiry, str(number).encode()))
    if command == "touch":
        return Decision(Outcome.TOUCHED, Payload(live.flags, update.expiry, live.value))
    assert command == "delete"
    return Decision(Outcome.DELETED, Payload())

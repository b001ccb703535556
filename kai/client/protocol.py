"""Sans-IO requests of Kai's Dynamo API (docs/dynamo-api.md) and what their replies mean.

Each request record encodes itself (:meth:`encode`) and turns the reply that answers it
(framed by :class:`~kai.client.framing.ReplyParser`) into a typed result, or raises the
:mod:`~kai.client.errors` error that says what to do next (:meth:`interpret`):

- :class:`ReadSiblings` (``mg <key> K``) -> :class:`~kai.client.records.Fetched`
- :class:`WriteInContext` (``ms <key> <len> K<token>``) -> the new :class:`Context`
- :class:`DeleteInContext` (``md <key> K<token>``) -> the new :class:`Context`
- :class:`DescribeRing` (``stats kai_ring``) -> :class:`~kai.client.records.RingDescription`
- :class:`NoOp` (``mn``) -> None

Replies come back in request order, so a connection may pipeline requests: send several,
then interpret the replies one by one against the requests in the order sent. Never does
I/O.
"""

from __future__ import annotations

import base64
import re
from typing import Final, Protocol, TypeAlias, TypeVar

import attrs

from kai.client.errors import ClientError, KaiError, ProtocolError, ServerError
from kai.client.framing import CLOSED, ErrorReply, MetaReply, Reply, ReplyParser, StatsReply
from kai.client.records import (
    FLAGS_MAX,
    Address,
    Context,
    Fetched,
    RingDescription,
    RingMember,
    Sibling,
    is_whole_number,
)
from kai.core.ring import NodeId

#: A key as callers give it: bytes, or a str sent as UTF-8.
Key: TypeAlias = bytes | str

#: Longest key memcached accepts on a command line, in bytes.
KEY_MAX_LENGTH: Final = 250
#: Longest key that can be sent base64-encoded (its encoding must fit 250 bytes too).
BINARY_KEY_MAX_LENGTH: Final = KEY_MAX_LENGTH // 4 * 3
#: Longest command line a node accepts, CRLF excluded.
LINE_MAX_LENGTH: Final = 2047
#: Largest TTL: memcached's exptime is a signed 32-bit number.
TTL_MAX: Final = 2**31 - 1

#: The context of a read that saw nothing: a write in it supersedes nothing. It is the token
#: Kai answers ``mg <never written key> K`` with; the client never derives tokens, this one
#: is written down because the API has no other way to name the empty context
#: (tests/test_client_protocol.py checks it against the server's encoder).
EMPTY_CONTEXT: Final = Context(b"AZA")

# Bytes never allowed in a classic key (Kai's rule: no space, control byte or DEL).
_FORBIDDEN_KEY_BYTE: Final = re.compile(rb"[\x00-\x20\x7f]")

T_co = TypeVar("T_co", covariant=True)


@attrs.frozen(slots=True)
class WireKey:
    """A key as stored and hashed (:attr:`raw`) and as written on a command line
    (:attr:`token`: the key itself, or its base64 with :attr:`binary` set: the ``b`` flag)."""

    raw: bytes
    token: bytes
    binary: bool


def wire_key(key: Key) -> WireKey:
    """``key`` as the protocol carries it.

    A classic memcached key (1 to 250 bytes, no space, control byte or DEL) goes as it is;
    any other non-empty key of up to 186 bytes goes base64-encoded with the ``b`` flag.

    Raises:
        TypeError: ``key`` is neither bytes nor str.
        ClientError: the key is empty or too long to send.
    """
    if isinstance(key, str):
        raw = key.encode()
    elif isinstance(key, bytes):
        raw = key
    else:
        raise TypeError(f"a key is bytes or str, not {type(key).__name__}")
    if 0 < len(raw) <= KEY_MAX_LENGTH and _FORBIDDEN_KEY_BYTE.search(raw) is None:
        return WireKey(raw, raw, binary=False)
    if not raw:
        raise ClientError("a key cannot be empty: give at least one byte")
    if len(raw) > BINARY_KEY_MAX_LENGTH and _FORBIDDEN_KEY_BYTE.search(raw) is not None:
        raise ClientError(
            f"a key holding spaces or control bytes is sent base64-encoded and can be at most "
            f"{BINARY_KEY_MAX_LENGTH} bytes, not {len(raw)}: use a shorter key"
        )
    if len(raw) > KEY_MAX_LENGTH:
        raise ClientError(f"a key is at most {KEY_MAX_LENGTH} bytes, not {len(raw)}")
    return WireKey(raw, base64.b64encode(raw), binary=True)


class Request(Protocol[T_co]):
    """A request: its bytes, and what its reply means."""

    @property
    def routing_key(self) -> bytes | None:
        """The key whose primaries should get it (None: any node will do)."""

    @property
    def is_read(self) -> bool:
        """Whether sending it twice is harmless (a read), whatever became of the first."""

    def encode(self) -> bytes:
        """The request's bytes."""

    def interpret(self, reply: Reply, *, node: str) -> T_co:
        """The result ``reply`` (from ``node``) gives, or the error it means.

        Raises:
            KaiError: the reply is an error or does not fit the request.
        """


# --- requests ---------------------------------------------------------------------------------


def _check_line(line: bytes) -> bytes:
    if len(line) > LINE_MAX_LENGTH:
        raise ClientError(
            f"the command line would be {len(line)} bytes, more than a node accepts "
            f"({LINE_MAX_LENGTH}): use a shorter key"
        )
    return line + b"\r\n"


def _binary_flag(key: WireKey) -> bytes:
    return b" b" if key.binary else b""


@attrs.frozen(slots=True)
class ReadSiblings:
    """``mg <key> K``: every live sibling of ``key`` and the read's causal context."""

    key: WireKey
    is_read: bool = attrs.field(default=True, init=False)

    @property
    def routing_key(self) -> bytes:
        return self.key.raw

    def encode(self) -> bytes:
        return _check_line(b"mg %b K%b" % (self.key.token, _binary_flag(self.key)))

    def interpret(self, reply: Reply, *, node: str) -> Fetched:
        meta = _meta_reply(reply, b"VA", what="mg K", node=node, write=False)
        assert meta.data is not None  # a VA reply has its block
        return Fetched(_siblings(meta.data, node=node), _context_of(meta, node=node))


def _check_value(_instance: object, _attribute: object, value: bytes) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"a value is bytes, not {type(value).__name__}")


def _check_flags(_instance: object, _attribute: object, flags: int) -> None:
    if not is_whole_number(flags) or not 0 <= flags <= FLAGS_MAX:
        raise ClientError(f"client flags are an integer from 0 to 2**32-1, not {flags!r}")


def _check_ttl(_instance: object, _attribute: object, ttl: int) -> None:
    if not is_whole_number(ttl) or not 0 <= ttl <= TTL_MAX:
        raise ClientError(f"a ttl is whole seconds from 0 (never expires) to 2**31-1, not {ttl!r}")


@attrs.frozen(slots=True)
class WriteInContext:
    """``ms <key> <len> K<token>``: a new version that supersedes what ``context`` covers.

    ``ttl`` is memcached's exptime: 0 never expires, up to 30 days (2592000) is seconds from
    now, larger is a unix time.
    """

    key: WireKey
    value: bytes = attrs.field(validator=_check_value)
    context: Context = attrs.field(validator=attrs.validators.instance_of(Context))
    flags: int = attrs.field(default=0, validator=_check_flags)
    ttl: int = attrs.field(default=0, validator=_check_ttl)
    is_read: bool = attrs.field(default=False, init=False)

    @property
    def routing_key(self) -> bytes:
        return self.key.raw

    def encode(self) -> bytes:
        line = b"ms %b %d K%b" % (self.key.token, len(self.value), self.context.token)
        if self.flags:
            line += b" F%d" % self.flags
        if self.ttl:
            line += b" T%d" % self.ttl
        return _check_line(line + _binary_flag(self.key)) + self.value + b"\r\n"

    def interpret(self, reply: Reply, *, node: str) -> Context:
        return _context_of(_meta_reply(reply, b"HD", what="ms K", node=node, write=True), node=node)


@attrs.frozen(slots=True)
class DeleteInContext:
    """``md <key> K<token>``: a tombstone that supersedes what ``context`` covers."""

    key: WireKey
    context: Context = attrs.field(validator=attrs.validators.instance_of(Context))
    is_read: bool = attrs.field(default=False, init=False)

    @property
    def routing_key(self) -> bytes:
        return self.key.raw

    def encode(self) -> bytes:
        line = b"md %b K%b" % (self.key.token, self.context.token)
        return _check_line(line + _binary_flag(self.key))

    def interpret(self, reply: Reply, *, node: str) -> Context:
        return _context_of(_meta_reply(reply, b"HD", what="md K", node=node, write=True), node=node)


@attrs.frozen(slots=True)
class DescribeRing:
    """``stats kai_ring``: the ring, so keys can be sent to their primaries."""

    is_read: bool = attrs.field(default=True, init=False)

    @property
    def routing_key(self) -> None:
        return None

    def encode(self) -> bytes:
        return b"stats kai_ring\r\n"

    def interpret(self, reply: Reply, *, node: str) -> RingDescription:
        if isinstance(reply, ErrorReply):
            raise _error_of(reply, what="stats kai_ring", node=node, write=False)
        if not isinstance(reply, StatsReply):
            raise _unexpected(reply, what="stats kai_ring", node=node)
        return _ring_description(reply, node=node)


@attrs.frozen(slots=True)
class NoOp:
    """``mn``: answered ``MN`` once every request sent before it has been answered."""

    is_read: bool = attrs.field(default=True, init=False)

    @property
    def routing_key(self) -> None:
        return None

    def encode(self) -> bytes:
        return b"mn\r\n"

    def interpret(self, reply: Reply, *, node: str) -> None:
        _meta_reply(reply, b"MN", what="mn", node=node, write=False)


# --- replies ----------------------------------------------------------------------------------


def _meta_reply(reply: Reply, code: bytes, *, what: str, node: str, write: bool) -> MetaReply:
    if isinstance(reply, ErrorReply):
        raise _error_of(reply, what=what, node=node, write=write)
    if not isinstance(reply, MetaReply) or reply.code != code:
        raise _unexpected(reply, what=what, node=node)
    return reply


def _error_of(reply: ErrorReply, *, what: str, node: str, write: bool) -> KaiError:
    if reply.kind == "SERVER_ERROR":
        consequence = (
            "the write may still have landed on some replicas; read the key to see"
            if write
            else "nothing was changed; reading again may succeed"
        )
        return ServerError(
            f"{node} answered {what} with SERVER_ERROR {reply.message}: {consequence}",
            reply_text=reply.message,
        )
    if reply.kind == "ERROR":
        return ClientError(
            f"{node} does not know the command {what} (ERROR): it is not a Kai node that "
            "serves the Dynamo API (docs/dynamo-api.md)",
            reply=reply.line,
        )
    advice = {
        "bad causal context": "pass the context of a read from this cluster, unchanged",
        "invalid flag": "the node does not serve Kai's Dynamo API (K flag); is it memcached?",
    }.get(reply.message, "fix the request")
    return ClientError(
        f"{node} refused {what} with CLIENT_ERROR {reply.message}: {advice}", reply=reply.line
    )


def _unexpected(reply: Reply, *, what: str, node: str) -> ProtocolError:
    line = reply.line if isinstance(reply, MetaReply) else b"STAT ..."
    return ProtocolError(
        f"{node} answered {what} with {line[:80]!r}, which docs/dynamo-api.md does not allow; "
        "the request may or may not have been carried out",
        reply=line,
        framing_lost=False,
    )


def _bad(message: str, reply: bytes, *, node: str) -> ProtocolError:
    return ProtocolError(
        f"{node} sent {message}: {reply[:80]!r}", reply=reply[:200], framing_lost=False
    )


def _context_of(reply: MetaReply, *, node: str) -> Context:
    token = reply.flag(b"K")
    if token is None:
        raise _bad("a reply without the K<token> return flag", reply.line, node=node)
    try:
        return Context(token)
    except ValueError:
        raise _bad("a causal context that is not URL-safe base64", reply.line, node=node) from None


def _siblings(block: bytes, *, node: str) -> tuple[Sibling, ...]:
    """The siblings of a ``mg K`` block: ``VA <size> f<flags> t<ttl>`` entries, back to back."""
    parser = ReplyParser(max_block_size=len(block))
    parser.receive_data(block)
    parser.receive_data(b"")
    siblings = []
    while True:
        try:
            entry = parser.next_reply()
        except ProtocolError as error:
            raise _bad("a sibling block that does not parse", error.reply, node=node) from None
        if entry is CLOSED:
            break
        if not isinstance(entry, MetaReply) or entry.code != b"VA":
            line = entry.line if isinstance(entry, MetaReply | ErrorReply) else b"STAT ..."
            raise _bad("a sibling block entry that is not VA", line, node=node)
        assert entry.data is not None  # a VA reply has its block
        flags = _number(entry.flag(b"f"), maximum=FLAGS_MAX)
        ttl = _number(entry.flag(b"t"), maximum=TTL_MAX, allow_minus_one=True)
        if flags is None or ttl is None:
            raise _bad("a sibling without f<flags> and t<ttl>", entry.line, node=node)
        siblings.append(Sibling(entry.data, flags, None if ttl == -1 else ttl))
    if parser.buffered or parser.in_reply:
        raise _bad("a sibling block that ends inside an entry", block[-80:], node=node)
    return tuple(siblings)


def _number(token: bytes | None, *, maximum: int, allow_minus_one: bool = False) -> int | None:
    if token is None:
        return None
    if allow_minus_one and token == b"-1":
        return -1
    if not token.isdigit() or len(token) > 20:
        return None
    value = int(token)
    return value if value <= maximum else None


def _ring_description(reply: StatsReply, *, node: str) -> RingDescription:
    fields: dict[str, str] = {}
    members = []
    try:
        for name, value in reply.fields:
            if name == "node":
                rpc, _, memcached = value.partition(" ")
                address = None if memcached == "-" else Address.parse(memcached)
                members.append(RingMember(NodeId.parse(rpc), address))
            else:
                fields.setdefault(name, value)
        numbers = {}
        for name in ("buckets", "virtual_nodes", "replicas"):
            text = fields.get(name, "")
            if not text.isascii() or not text.isdigit() or len(text) > 12:
                raise ValueError(f"{name} is not a number: {text!r}")
            numbers[name] = int(text)
        return RingDescription(
            fields.get("ring", ""),
            numbers["buckets"],
            numbers["virtual_nodes"],
            numbers["replicas"],
            tuple(members),
        )
    except ValueError as error:
        raise ProtocolError(
            f"{node} described its ring in a way docs/dynamo-api.md does not allow: {error}",
            reply=repr(reply.fields[:8]).encode()[:200],
            framing_lost=False,
        ) from None

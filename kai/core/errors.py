"""Kai's error hierarchy: every error says what the caller should do next.

Protocol errors carry the exact reply bytes and whether framing is lost; RPC errors carry a
numeric code and whether the peer was reached at all (if not, another replica may answer).
This module imports nothing from the rest of Kai.
"""

from __future__ import annotations

from typing import ClassVar


class KaiError(Exception):
    """Base class of every error Kai raises on purpose."""


class ConfigError(KaiError):
    """A configuration key or value is wrong; the message names it. Fix the config and restart."""


class StorageError(KaiError):
    """The local storage engine failed (for example, the data directory is locked or corrupt)."""


class TooManySiblings(KaiError):
    """A write would leave more versions of one key than the hard cap allows.

    The client should resolve the siblings (a `gets`/`cas` round trip) before writing again.
    """


class CoordinatorError(KaiError):
    """A read or write could not meet its quorum; the client sees `SERVER_ERROR`.

    A failed write may still have landed on some replicas (the Dynamo contract).
    """

    #: Text after ``SERVER_ERROR`` in the memcached reply.
    reply_text: str = "unavailable"


class QuorumTimeout(CoordinatorError):
    """Fewer than R (or W) replicas answered before the request timeout."""

    reply_text = "timeout"


class QuorumUnavailable(CoordinatorError):
    """Too few replicas are reachable to ever meet R (or W)."""

    reply_text = "not enough replicas"


class RpcError(KaiError):
    """An internal RPC failed.

    Attributes:
        code: numeric error code, stable on the wire (see :meth:`for_code`).
        unreachable: True when the call never reached a Kai peer that could run it (the
            connection failed or was lost, the peer does not share our secret, or it does
            not speak Kai RPC): count the peer as down, and ask another replica if one is
            needed. False when the error is the peer's own answer: it is up, and asking
            again will get the same answer.
    """

    code: ClassVar[int] = 1
    unreachable: ClassVar[bool] = False
    _by_code: ClassVar[dict[int, type[RpcError]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        RpcError._by_code[cls.code] = cls

    @classmethod
    def for_code(cls, code: int, message: str) -> RpcError:
        """Rebuild the error a peer sent, falling back to a plain :class:`RpcError`."""
        return cls._by_code.get(code, RpcError)(message)


class RpcConnectionError(RpcError):
    """The connection to the peer could not be made or was lost. Retry, maybe elsewhere.

    If it was lost after the request was sent, the call may or may not have run there.
    """

    code = 2
    unreachable = True


class RpcAuthenticationError(RpcError):
    """The peer does not share our cluster secret. Retrying it will not help; fix the config."""

    code = 3
    unreachable = True


class RpcProtocolError(RpcError):
    """The peer sent bytes that are not valid Kai RPC; the connection is closed."""

    code = 4
    unreachable = True


class RpcMethodNotFound(RpcError):
    """The peer has no such method (for example, an older version)."""

    code = 5


class RpcRemoteError(RpcError):
    """The remote handler raised; the message says what happened there."""

    code = 6


class RpcBadRequest(RpcError):
    """The parameters were not acceptable to the remote handler."""

    code = 7


# A forwarded write can fail on the primary in ways the client must hear about exactly as if
# it had been coordinated where it arrived; these carry them across the wire.


class RpcQuorumTimeout(RpcError):
    """The primary coordinating a forwarded write did not get W acks in time."""

    code = 40


class RpcQuorumUnavailable(RpcError):
    """The primary coordinating a forwarded write cannot reach W replicas."""

    code = 41


class RpcTooManySiblings(RpcError):
    """The forwarded write would leave too many siblings; resolve them first."""

    code = 42

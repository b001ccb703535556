"""Mutual HMAC-SHA256 challenge-response that opens every Kai RPC connection (sans-IO).

Both ends prove they hold the cluster secret before any RPC message is accepted. This
module must never do I/O, import trio, or generate randomness itself: callers pass nonces
from :func:`os.urandom` (tests pass fixed ones). It never accepts a proof compared with
``==``; only :func:`hmac.compare_digest`.

The exchange, each message one MessagePack array of at most
:data:`MAX_HANDSHAKE_MESSAGE_SIZE` bytes::

    server -> client  ["kai-hello", version, server_nonce]
    client -> server  ["kai-auth", version, client_nonce, client_proof]
    server -> client  ["kai-welcome", server_proof]        or ["kai-reject", reason]

    client_proof = HMAC-SHA256(secret, b"kai-client" + server_nonce + client_nonce)
    server_proof = HMAC-SHA256(secret, b"kai-server" + client_nonce + server_nonce)

The distinct labels and nonce orders stop a peer from reflecting one side's proof back as
the other's; fresh nonces on both sides stop replays from earlier sessions. Neither side
sends anything else until it has verified the other, so an impostor learns nothing and a
client never sends a request to an unauthenticated server.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

import msgpack

from kai.core.errors import RpcAuthenticationError, RpcProtocolError

#: The RPC protocol version both ends must speak.
PROTOCOL_VERSION: Final = 1
#: Length of each side's random challenge, in bytes.
NONCE_SIZE: Final = 32
#: Length of an HMAC-SHA256 proof, in bytes.
PROOF_SIZE: Final = 32
#: No handshake message may be longer than this; longer input is a protocol error.
MAX_HANDSHAKE_MESSAGE_SIZE: Final = 256

_HELLO: Final = "kai-hello"
_AUTH: Final = "kai-auth"
_WELCOME: Final = "kai-welcome"
_REJECT: Final = "kai-reject"
_CLIENT_LABEL: Final = b"kai-client"
_SERVER_LABEL: Final = b"kai-server"

#: What the server sends before closing a connection whose proof was wrong.
REJECTION: Final = msgpack.packb([_REJECT, "authentication failed: the cluster secrets differ"])


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The proof a client sends: HMAC-SHA256(secret, "kai-client" + server + client nonce)."""
    return hmac.digest(secret, _CLIENT_LABEL + server_nonce + client_nonce, hashlib.sha256)


def server_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The proof a server sends: HMAC-SHA256(secret, "kai-server" + client + server nonce)."""
    return hmac.digest(secret, _SERVER_LABEL + client_nonce + server_nonce, hashlib.sha256)


def _check_inputs(secret: object, nonce: object) -> None:
    if not isinstance(secret, bytes) or not secret:
        raise ValueError("the cluster secret must be non-empty bytes")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise ValueError(f"a nonce must be {NONCE_SIZE} bytes")


class _HandshakeReader:
    """Splits handshake input into MessagePack arrays, keeping whatever follows.

    Bounded: at most :data:`MAX_HANDSHAKE_MESSAGE_SIZE` bytes are examined per message.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_array(self) -> list[object] | None:
        """The next complete message, or ``None`` if it has not fully arrived."""
        if not self._buffer:
            return None
        window = bytes(self._buffer[:MAX_HANDSHAKE_MESSAGE_SIZE])
        unpacker = msgpack.Unpacker(
            raw=False, max_buffer_size=MAX_HANDSHAKE_MESSAGE_SIZE, max_array_len=8, max_map_len=0
        )
        unpacker.feed(window)
        try:
            obj = unpacker.unpack()
        except msgpack.OutOfData:
            if len(window) >= MAX_HANDSHAKE_MESSAGE_SIZE:
                raise RpcProtocolError(
                    f"handshake message longer than {MAX_HANDSHAKE_MESSAGE_SIZE} bytes"
                ) from None
            return None
        except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
            raise RpcProtocolError(f"undecodable handshake message: {exc}") from exc
        del self._buffer[: unpacker.tell()]
        if type(obj) is not list or not obj:
            raise RpcProtocolError(f"a handshake message must be a non-empty array: {obj!r:.80}")
        return obj

    def take_rest(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


def _expect(message: list[object], tag: str, length: int) -> None:
    if message[0] != tag or len(message) != length:
        raise RpcProtocolError(f"expected a {tag!r} handshake message, got {message!r:.120}")


def _expect_bytes(value: object, size: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise RpcProtocolError(f"{what} must be {size} bytes")
    return value


def _expect_version(value: object) -> None:
    if value != PROTOCOL_VERSION or type(value) is not int:
        raise RpcProtocolError(
            f"peer speaks RPC protocol version {value!r}; this node speaks {PROTOCOL_VERSION}"
        )


class ServerHandshake:
    """The accepting side of the handshake.

    Send :meth:`hello`, then feed received bytes to :meth:`receive_data` and send what it
    returns until :attr:`authenticated` is true. If it raises
    :class:`RpcAuthenticationError`, send :data:`REJECTION` and close; if it raises
    :class:`RpcProtocolError`, just close. Either way no RPC message from this peer may be
    processed.
    """

    def __init__(self, secret: bytes, server_nonce: bytes) -> None:
        """Prepare a handshake.

        Args:
            secret: the cluster secret.
            server_nonce: :data:`NONCE_SIZE` fresh random bytes (``os.urandom``).
        """
        _check_inputs(secret, server_nonce)
        self._secret = secret
        self._server_nonce = server_nonce
        self._reader = _HandshakeReader()
        self._failed = False
        self.authenticated = False

    def hello(self) -> bytes:
        """The first message to send: the protocol version and the server's challenge."""
        packed: bytes = msgpack.packb([_HELLO, PROTOCOL_VERSION, self._server_nonce])
        return packed

    def receive_data(self, data: bytes | bytearray) -> bytes:
        """Process bytes from the client.

        Returns:
            Bytes to send (the welcome message once the client is verified), else ``b""``.

        Raises:
            RpcAuthenticationError: the client's proof is wrong (a different secret, or a
                replay from another session).
            RpcProtocolError: the input is not a valid handshake message.
            RuntimeError: called after the handshake finished or failed.
        """
        if self.authenticated or self._failed:
            raise RuntimeError("the handshake is already over")
        self._reader.feed(data)
        try:
            message = self._reader.next_array()
            if message is None:
                return b""
            _expect(message, _AUTH, 4)
            _expect_version(message[1])
            client_nonce = _expect_bytes(message[2], NONCE_SIZE, "the client nonce")
            proof = _expect_bytes(message[3], PROOF_SIZE, "the client proof")
            expected = client_proof(self._secret, self._server_nonce, client_nonce)
            if not hmac.compare_digest(proof, expected):
                raise RpcAuthenticationError("client proof is wrong: the cluster secrets differ")
            if client_nonce == self._server_nonce:
                raise RpcAuthenticationError("client echoed the server nonce")
        except (RpcAuthenticationError, RpcProtocolError):
            self._failed = True
            raise
        self.authenticated = True
        welcome: bytes = msgpack.packb(
            [_WELCOME, server_proof(self._secret, self._server_nonce, client_nonce)]
        )
        return welcome

    def trailing_data(self) -> bytes:
        """Bytes that arrived after the client's proof; feed them to the RPC framing."""
        if not self.authenticated:
            raise RuntimeError("the handshake has not succeeded")
        return self._reader.take_rest()


class ClientHandshake:
    """The connecting side of the handshake.

    Feed received bytes to :meth:`receive_data` and send what it returns until
    :attr:`authenticated` is true; only then send RPC messages. Any exception means the
    server is not a member of this cluster (or not Kai at all): close the connection.
    """

    def __init__(self, secret: bytes, client_nonce: bytes) -> None:
        """Prepare a handshake.

        Args:
            secret: the cluster secret.
            client_nonce: :data:`NONCE_SIZE` fresh random bytes (``os.urandom``).
        """
        _check_inputs(secret, client_nonce)
        self._secret = secret
        self._client_nonce = client_nonce
        self._server_nonce: bytes | None = None
        self._reader = _HandshakeReader()
        self._failed = False
        self.authenticated = False

    def receive_data(self, data: bytes | bytearray) -> bytes:
        """Process bytes from the server.

        Returns:
            Bytes to send (the client's proof after the server's hello), else ``b""``.

        Raises:
            RpcAuthenticationError: the server's proof is wrong, or it rejected ours.
            RpcProtocolError: the input is not a valid handshake message.
            RuntimeError: called after the handshake finished or failed.
        """
        if self.authenticated or self._failed:
            raise RuntimeError("the handshake is already over")
        self._reader.feed(data)
        try:
            return self._advance()
        except (RpcAuthenticationError, RpcProtocolError):
            self._failed = True
            raise

    def _advance(self) -> bytes:
        outgoing = b""
        while not self.authenticated:
            message = self._reader.next_array()
            if message is None:
                break
            if self._server_nonce is None:
                _expect(message, _HELLO, 3)
                _expect_version(message[1])
                server_nonce = _expect_bytes(message[2], NONCE_SIZE, "the server nonce")
                if server_nonce == self._client_nonce:
                    raise RpcAuthenticationError("server echoed the client nonce")
                self._server_nonce = server_nonce
                proof = client_proof(self._secret, server_nonce, self._client_nonce)
                outgoing += msgpack.packb([_AUTH, PROTOCOL_VERSION, self._client_nonce, proof])
                continue
            if message[0] == _REJECT:
                reason = message[1] if len(message) == 2 and isinstance(message[1], str) else ""
                raise RpcAuthenticationError(
                    f"server rejected this node: {reason:.120}"
                    if reason
                    else f"server rejected this node: {message[1:]!r:.120}"
                )
            _expect(message, _WELCOME, 2)
            proof = _expect_bytes(message[1], PROOF_SIZE, "the server proof")
            expected = server_proof(self._secret, self._server_nonce, self._client_nonce)
            if not hmac.compare_digest(proof, expected):
                raise RpcAuthenticationError("server proof is wrong: the cluster secrets differ")
            self.authenticated = True
        return outgoing

    def trailing_data(self) -> bytes:
        """Bytes that arrived after the server's welcome; feed them to the RPC framing."""
        if not self.authenticated:
            raise RuntimeError("the handshake has not succeeded")
        return self._reader.take_rest()

"""MessagePack-RPC framing for Kai's internal RPC, as a sans-IO state machine.

This module turns bytes into :class:`Request`, :class:`Response` and :class:`Notification`
records and back. It must never do I/O or import trio: the trio shells in
:mod:`kai.rpc.server` and :mod:`kai.rpc.client` feed it bytes and send what it encodes.

Wire format (one MessagePack array per message, no extra length prefix)::

    request       [0, msgid, method, params]
    response      [1, msgid, error, result]     error is nil or [code, message]
    notification  [2, method, params]

Strings are UTF-8 ``str`` and binary payloads stay ``bytes`` (``use_bin_type=True`` when
packing, ``raw=False`` when unpacking). Arrays inside payloads decode as lists; maps may have
any hashable keys.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Sequence
from typing import Final, Literal, TypeAlias

import attrs
import msgpack

from kai.core.errors import RpcBadRequest, RpcError, RpcProtocolError

#: Largest encoded message (in bytes) either side accepts. A peer that sends a larger one has
#: lost framing and is disconnected; :meth:`RpcConnection.encode_request` refuses to build one.
#: 64 MiB leaves room for the largest item (1 MiB by default) in any batch the coordinator or
#: the transfer code sends, while bounding the memory one connection can pin.
MAX_MESSAGE_SIZE: Final = 64 * 1024 * 1024

#: Largest number of elements in one array or map. The unpacker preallocates containers from
#: their header, so without this bound a 5-byte header could demand gigabytes of memory.
MAX_CONTAINER_LENGTH: Final = 1024 * 1024

#: Message ids are unsigned 32-bit integers, as in MessagePack-RPC.
MAX_MSGID: Final = 2**32 - 1

REQUEST: Final = 0
RESPONSE: Final = 1
NOTIFICATION: Final = 2


class _Signal(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


#: Returned by :meth:`RpcConnection.next_message` when a whole message has not arrived yet.
NEED_DATA: Final = _Signal.NEED_DATA
#: Returned by :meth:`RpcConnection.next_message` after a clean end of stream.
CLOSED: Final = _Signal.CLOSED


def _check_msgid(msgid: object) -> None:
    if type(msgid) is not int or not 0 <= msgid <= MAX_MSGID:
        raise ValueError(f"msgid must be an int in [0, {MAX_MSGID}], got {msgid!r}")


def _check_method(method: object) -> None:
    if type(method) is not str or not method:
        raise ValueError(f"method must be a non-empty str, got {method!r}")


@attrs.frozen
class Request:
    """A call that expects a :class:`Response` with the same ``msgid``.

    Attributes:
        msgid: the caller's id for this call, unique among its outstanding calls.
        method: the handler name.
        params: positional arguments for the handler.
    """

    msgid: int
    method: str
    params: tuple[object, ...]

    def __attrs_post_init__(self) -> None:
        _check_msgid(self.msgid)
        _check_method(self.method)
        if type(self.params) is not tuple:
            raise TypeError(f"params must be a tuple, got {type(self.params).__name__}")


@attrs.frozen
class Response:
    """The answer to the :class:`Request` with the same ``msgid``.

    Attributes:
        msgid: the id of the request this answers.
        error: ``None`` on success, else ``(code, message)`` as in :class:`RpcError`.
        result: the handler's return value (``None`` when ``error`` is set).
    """

    msgid: int
    error: tuple[int, str] | None
    result: object

    def __attrs_post_init__(self) -> None:
        _check_msgid(self.msgid)
        error: object = self.error
        if error is not None and (
            type(error) is not tuple
            or len(error) != 2
            or type(error[0]) is not int
            or type(error[1]) is not str
        ):
            raise ValueError(f"error must be None or (code: int, message: str), got {error!r}")

    def unwrap(self) -> object:
        """Return the result, or raise the error the peer sent.

        Raises:
            RpcError: the subclass matching the error code (see :meth:`RpcError.for_code`).
        """
        if self.error is not None:
            raise RpcError.for_code(*self.error)
        return self.result


@attrs.frozen
class Notification:
    """A one-way message: the peer runs the handler and sends nothing back.

    Attributes:
        method: the handler name.
        params: positional arguments for the handler.
    """

    method: str
    params: tuple[object, ...]

    def __attrs_post_init__(self) -> None:
        _check_method(self.method)
        if type(self.params) is not tuple:
            raise TypeError(f"params must be a tuple, got {type(self.params).__name__}")


Message: TypeAlias = Request | Response | Notification


def _message_from_wire(obj: object) -> Message:
    """Validate one decoded MessagePack object and build its record.

    Raises:
        TypeError, ValueError: ``obj`` is not a well-formed message.
    """
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise ValueError(f"a message must be an array starting with an int kind, got {obj!r:.80}")
    kind = obj[0]
    if kind == REQUEST and len(obj) == 4:
        params = obj[3]
        if type(params) is not list:
            raise ValueError(f"request params must be an array, got {params!r:.80}")
        return Request(obj[1], obj[2], tuple(params))
    if kind == RESPONSE and len(obj) == 4:
        error = obj[2]
        if error is not None:
            if type(error) is not list:
                raise ValueError(f"response error must be nil or an array, got {error!r:.80}")
            error = tuple(error)
        return Response(obj[1], error, obj[3])
    if kind == NOTIFICATION and len(obj) == 3:
        params = obj[2]
        if type(params) is not list:
            raise ValueError(f"notification params must be an array, got {params!r:.80}")
        return Notification(obj[1], tuple(params))
    raise ValueError(f"unknown message kind {kind} with {len(obj)} elements")


class RpcConnection:
    """Both directions of one RPC connection, without I/O.

    Feed received bytes to :meth:`receive_data` and call :meth:`next_message` until it
    returns :data:`NEED_DATA`; send whatever the ``encode_*`` methods return. The buffer is
    bounded: at most ``max_message_size`` bytes of the message being parsed are held, and
    data received beyond that stays queued (by reference, uncopied) until the message ends.
    Parsing is incremental, so feeding a message in pieces costs time linear in its size.

    Once :meth:`next_message` raises :class:`RpcProtocolError`, framing is lost: every later
    call raises it again and the caller must close the connection.
    """

    def __init__(self, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        """Create the state machine.

        Args:
            max_message_size: largest encoded message accepted or produced, in bytes.
        """
        if max_message_size < 16:
            raise ValueError(f"max_message_size must be at least 16, got {max_message_size}")
        self.max_message_size = max_message_size
        container_limit = min(max_message_size, MAX_CONTAINER_LENGTH)
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=False,
            max_buffer_size=max_message_size,
            max_array_len=container_limit,
            max_map_len=container_limit,
        )
        self._packer = msgpack.Packer(use_bin_type=True)
        # Received data not yet handed to the unpacker.
        self._pending: collections.deque[bytes | memoryview] = collections.deque()
        # Bytes handed to the unpacker in total, and the stream offset where the message
        # being parsed starts; their difference is bounded by max_message_size.
        self._fed = 0
        self._message_start = 0
        self._eof = False
        self._error: RpcProtocolError | None = None

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes received from the peer; ``b""`` means the peer closed its side.

        ``bytes`` are queued by reference; a ``bytearray`` is copied first.

        Raises:
            RuntimeError: data arrived after end of stream was already reported.
        """
        if self._eof:
            if data:
                raise RuntimeError("received data after end of stream")
            return
        if data:
            self._pending.append(data if type(data) is bytes else bytes(data))
        else:
            self._eof = True

    def next_message(self) -> Message | Literal[_Signal.NEED_DATA, _Signal.CLOSED]:
        """Parse the next complete message, if one has arrived.

        Returns:
            A :class:`Request`, :class:`Response` or :class:`Notification`;
            :data:`NEED_DATA` if more bytes are needed; :data:`CLOSED` after a clean end of
            stream (every received message has been returned).

        Raises:
            RpcProtocolError: the bytes are not valid Kai RPC (wrong shape or types, a
                message over ``max_message_size``, or a stream that ends mid-message).
                Framing is lost; close the connection.
        """
        if self._error is not None:
            raise self._error
        while True:
            try:
                obj = self._unpacker.unpack()
            except msgpack.OutOfData:
                if self._feed_pending():
                    continue
                return self._out_of_data()
            except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
                raise self._fail(f"undecodable MessagePack: {exc}") from exc
            self._message_start = self._unpacker.tell()
            try:
                return _message_from_wire(obj)
            except (TypeError, ValueError) as exc:
                raise self._fail(f"malformed message: {exc}") from exc

    def _feed_pending(self) -> bool:
        """Move queued data into the unpacker, up to the current message's size limit."""
        room = self.max_message_size - (self._fed - self._message_start)
        if room <= 0 or not self._pending:
            return False
        chunk = self._pending[0]
        if len(chunk) <= room:
            self._pending.popleft()
        else:
            view = memoryview(chunk)
            self._pending[0] = view[room:]
            chunk = view[:room]
        try:
            self._unpacker.feed(chunk)
        except msgpack.BufferFull as exc:  # Unreachable given `room`; kept as a guard.
            raise self._fail(f"receive buffer full: {exc}") from exc
        self._fed += len(chunk)
        return True

    def _out_of_data(self) -> Literal[_Signal.NEED_DATA, _Signal.CLOSED]:
        partial = self._fed - self._message_start
        if partial >= self.max_message_size:
            raise self._fail(f"message exceeds the {self.max_message_size}-byte limit")
        if not self._eof:
            return NEED_DATA
        if partial:
            raise self._fail(f"stream ended inside a message ({partial} bytes received)")
        return CLOSED

    def _fail(self, reason: str) -> RpcProtocolError:
        self._error = RpcProtocolError(reason)
        self._pending.clear()
        return self._error

    def _pack(self, obj: object) -> bytes:
        try:
            data: bytes = self._packer.pack(obj)
        except (TypeError, ValueError, OverflowError) as exc:
            self._packer.reset()
            raise RpcBadRequest(f"cannot encode message as MessagePack: {exc}") from exc
        if len(data) > self.max_message_size:
            raise RpcBadRequest(
                f"encoded message is {len(data)} bytes; the limit is {self.max_message_size}"
            )
        return data

    def encode_request(self, msgid: int, method: str, params: Sequence[object]) -> bytes:
        """Encode ``[0, msgid, method, params]``.

        Raises:
            ValueError: ``msgid`` or ``method`` is out of range.
            RpcBadRequest: ``params`` cannot be encoded or the message would be too large;
                nothing was sent, and retrying the same call cannot help.
        """
        _check_msgid(msgid)
        _check_method(method)
        return self._pack((REQUEST, msgid, method, params))

    def encode_response(
        self, msgid: int, *, result: object = None, error: RpcError | None = None
    ) -> bytes:
        """Encode ``[1, msgid, error, result]``, with ``error`` as ``[code, message]``.

        Raises:
            ValueError: ``msgid`` is out of range.
            RpcBadRequest: ``result`` cannot be encoded or the message would be too large;
                send an error response instead.
        """
        _check_msgid(msgid)
        if error is None:
            return self._pack((RESPONSE, msgid, None, result))
        return self._pack((RESPONSE, msgid, (error.code, str(error)), None))

    def encode_notification(self, method: str, params: Sequence[object]) -> bytes:
        """Encode ``[2, method, params]``.

        Raises:
            ValueError: ``method`` is empty or not a str.
            RpcBadRequest: ``params`` cannot be encoded or the message would be too large.
        """
        _check_method(method)
        return self._pack((NOTIFICATION, method, params))

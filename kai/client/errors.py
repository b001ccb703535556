"""The errors :mod:`kai.client` raises, each saying what the caller can do next.

Every error is a :class:`KaiError` with two answers a caller needs before trying again:

- ``retryable``: the request certainly did not take effect (it was never sent, or the node
  refused it before doing anything) and trying again, on this node or another, may succeed.
- ``outcome_unknown``: the request may or may not have taken effect (it was sent and no
  answer came, or the node said the write quorum was not met: Dynamo keeps a write that
  landed on fewer than W replicas). Trying again is safe only if the operation is
  idempotent, i.e. doing it twice is the same as doing it once.

An error with neither (:class:`ClientError`) will fail the same way however often it is
sent: the request must change. This module imports nothing.
"""

from __future__ import annotations


class KaiError(Exception):
    """Base class of every error the client raises on purpose.

    Attributes:
        retryable: the request certainly did not take effect; trying again may succeed.
        outcome_unknown: the request may have taken effect; retry only if idempotent.
    """

    retryable: bool = False
    outcome_unknown: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConnectionFailed(KaiError):
    """No connection to the node could be made, or the request could not be sent on it.

    The node never got the whole request, so nothing happened: retryable, here or on
    another node.
    """

    retryable = True


class ConnectionLost(KaiError):
    """The connection broke after the request was sent and before its reply arrived.

    The node may have carried the request out: the outcome is unknown.
    """

    outcome_unknown = True


class Timeout(KaiError):
    """No complete reply came within the client's timeout.

    Attributes:
        sent: whether the request had been sent. If not, it certainly did not take effect
            (``retryable``); if so, the outcome is unknown.
    """

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent
        self.retryable = not sent
        self.outcome_unknown = sent


class ServerError(KaiError):
    """The node answered ``SERVER_ERROR``: typically a read or write quorum not met in time.

    A failed write may still have landed on some replicas (Dynamo's contract), so the
    outcome is unknown; a later read shows whether it did.

    Attributes:
        reply_text: the node's words after ``SERVER_ERROR``.
    """

    outcome_unknown = True

    def __init__(self, message: str, *, reply_text: str) -> None:
        super().__init__(message)
        self.reply_text = reply_text


class ClientError(KaiError):
    """The request is wrong and sending it again cannot help: change it.

    Raised before sending (a key, value, flags or TTL the protocol cannot carry) and when the
    node answered ``CLIENT_ERROR`` or ``ERROR`` (for instance a causal context it did not
    hand out, or a node that does not speak the meta commands).

    Attributes:
        reply: the node's reply line, or None if the client refused the request itself.
    """

    def __init__(self, message: str, *, reply: bytes | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class ProtocolError(KaiError):
    """The node's reply was not what the protocol allows for the request.

    The request may have been carried out (outcome unknown); the connection is closed
    and never reused.

    Attributes:
        reply: the offending bytes (a reply line, or the start of the bad input).
        framing_lost: True when the reply stream cannot be followed any more (the
            parser does not know where the next reply starts); False when one reply was
            framed correctly but its content made no sense.
    """

    outcome_unknown = True

    def __init__(self, message: str, *, reply: bytes, framing_lost: bool) -> None:
        super().__init__(message)
        self.reply = reply
        self.framing_lost = framing_lost

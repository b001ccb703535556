"""kai.client: a Python client of Kai's Dynamo API (docs/dynamo-api.md).

This package uses nothing of the Kai server but its ring (:mod:`kai.core.ring`).
"""

from kai.client.errors import (
    ClientError,
    ConnectionFailed,
    ConnectionLost,
    KaiError,
    ProtocolError,
    ServerError,
    Timeout,
)
from kai.client.records import Address, Context, Fetched, RingDescription, RingMember, Sibling

__all__ = [
    "Address",
    "ClientError",
    "ConnectionFailed",
    "ConnectionLost",
    "Context",
    "Fetched",
    "KaiError",
    "ProtocolError",
    "RingDescription",
    "RingMember",
    "ServerError",
    "Sibling",
    "Timeout",
]

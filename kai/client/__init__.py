"""kai.client: a Python client of Kai's Dynamo API (docs/dynamo-api.md), blocking and trio.

Reads return every sibling of a key with the read's causal context; writes and deletes go
"in the context" of a read and supersede exactly what it saw; ``update`` does the whole
read-merge-change-write cycle with retries. Each request goes straight to a primary of its
key, from the ring the client reads off any node.

    from kai.client import Client

    with Client(["127.0.0.1:11211"]) as client:
        fetched = client.get("cart:1")
        client.put("cart:1", b"book", context=fetched.context)

This package uses nothing of the Kai server but its ring (:mod:`kai.core.ring`).
"""

from kai.client.blocking import Client
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
from kai.client.trio_client import AsyncClient

__all__ = [
    "Address",
    "AsyncClient",
    "Client",
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

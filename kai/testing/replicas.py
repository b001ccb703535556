"""Reading one node's own replica over its RPC port, for system tests and tools.

A quorum read repairs what it finds stale, so a test that checks whether healing happened by
itself must look at each replica alone: :func:`read_replica` asks one node's
``replica_read`` for its stored records, and never writes anything anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from kai.rpc.client import RpcClient

#: Keys asked for in one ``replica_read`` call.
READ_BATCH = 500


async def read_replica_async(
    host: str, rpc_port: int, secret: bytes, keys: Sequence[bytes]
) -> list[bytes | None]:
    """The record each of ``keys`` has on that node's own replica (None when absent)."""
    records: list[bytes | None] = []
    async with RpcClient(host, rpc_port, secret) as rpc:
        while len(records) < len(keys):
            batch = list(keys[len(records) : len(records) + READ_BATCH])
            answer = await rpc.call("replica_read", batch)
            if not isinstance(answer, list) or not 1 <= len(answer) <= len(batch):
                raise ValueError(f"replica_read answered {answer!r:.200}")
            records.extend(answer)  # a prefix when the answer reached its size budget
    return records


def read_replica(
    host: str, rpc_port: int, secret: bytes, keys: Sequence[bytes], *, timeout: float = 30
) -> list[bytes | None]:
    """:func:`read_replica_async` from synchronous code, bounded by ``timeout`` seconds."""

    async def read() -> list[bytes | None]:
        with trio.fail_after(timeout):
            return await read_replica_async(host, rpc_port, secret, keys)

    return trio.run(read)

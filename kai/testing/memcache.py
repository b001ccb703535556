"""Drive a memcached command executor with raw protocol bytes, without sockets (for tests)."""

from __future__ import annotations

from kai.core.memcache import protocol
from kai.core.pending import resolve
from kai.memcache.commands import CommandExecutor


async def execute_raw(
    executor: CommandExecutor, raw: bytes, *, max_item_size: int = 1 << 20
) -> bytes:
    """Parse ``raw`` (one or more commands) and return the concatenated replies."""
    parser = protocol.MemcacheParser(max_item_size=max_item_size)
    parser.receive_data(raw)
    replies: list[bytes] = []
    while True:
        event = parser.next_event()
        if event is protocol.NEED_DATA or event is protocol.CLOSED:
            return b"".join(replies)
        assert not isinstance(event, type)
        replies.append(await resolve(executor.execute(event)))

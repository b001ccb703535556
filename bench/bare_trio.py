"""The ceiling of the approach: a bare trio memcached server that only keeps a dict.

It speaks just enough of the text protocol for the benchmark (get, set, version) and
does nothing else: no storage, no clocks, no stats. Kai's single-node throughput is compared
with it to show how much of the cost is trio and the socket path itself.

Run: .venv/bin/python -m bench.bare_trio PORT
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

DATA: dict[bytes, bytes] = {}


async def handle(stream: trio.SocketStream) -> None:
    buffer = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        replies = []
        while True:
            end = buffer.find(b"\r\n")
            if end < 0:
                break
            parts = buffer[:end].split()
            if parts and parts[0] == b"set" and len(parts) >= 5:
                size = int(parts[4])
                if len(buffer) < end + 2 + size + 2:
                    break
                DATA[parts[1]] = buffer[end + 2 : end + 2 + size]
                buffer = buffer[end + 2 + size + 2 :]
                replies.append(b"STORED\r\n")
                continue
            buffer = buffer[end + 2 :]
            if parts and parts[0] == b"get":
                for key in parts[1:]:
                    value = DATA.get(key)
                    if value is not None:
                        replies.append(b"VALUE %s 0 %d\r\n%s\r\n" % (key, len(value), value))
                replies.append(b"END\r\n")
            elif parts and parts[0] == b"version":
                replies.append(b"VERSION 1.6.21-bare\r\n")
            else:
                replies.append(b"ERROR\r\n")
        if replies:
            await stream.send_all(b"".join(replies))


async def serve(port: int) -> None:
    await trio.serve_tcp(handle, port, host="127.0.0.1")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A bare trio memcached server (get, set, version) on 127.0.0.1.",
        epilog="example: python -m bench.bare_trio 11311",
    )
    parser.add_argument("port", type=int, help="TCP port to listen on")
    args = parser.parse_args(argv)
    trio.run(serve, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())

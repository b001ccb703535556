"""CPU cost of one internal RPC call, caller and callee in separate processes, over loopback.

Run: .venv/bin/python -m bench.rpc [--concurrency 10] [--duration 5] [--size 1024]

A server process serves ``blob`` (answers ``size`` bytes, like a ``replica_read`` of one
value) and ``blob_async`` (the same from a handler that waits: a ``Pending`` step awaited
as a task of its own); the client process runs
``concurrency`` tasks that call it back to back for ``duration`` seconds through the same
RPC client the coordinator uses, then a second round through the coordinator's fan-out
(``PeerCaller.fan_out`` of one call). It prints calls/s and the CPU microseconds each side
spent per call (process time / calls), which is what limits a cluster on a two-core machine.
Nothing here is a timed assertion; compare figures from one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import trio

from bench._servers import module_command, module_env
from kai.cluster.fanout import PeerCaller
from kai.core.pending import waits
from kai.core.ring import NodeId
from kai.rpc.client import RpcClient
from kai.rpc.server import serve_rpc
from kai.rpc.transport import RpcTransport

HOST = "127.0.0.1"
SECRET = b"bench-rpc-secret-0123456789abcdef"


async def serve(size: int) -> None:
    """Serve until stdin closes; print the port, then on exit the CPU seconds used."""
    blob = b"v" * size

    def blob_now(key: bytes) -> bytes:
        return blob

    @waits
    async def blob_async(key: bytes) -> bytes:
        return blob

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            serve_rpc, HOST, 0, SECRET, {"blob": blob_now, "blob_async": blob_async}
        )
        print(listeners[0].socket.getsockname()[1], flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if line.strip() == "cpu":
                print(f"{time.process_time():.6f}", flush=True)
            elif not line:
                nursery.cancel_scope.cancel()
                return


async def load(port: int, method: str, concurrency: int, duration: float, fan_out: bool) -> int:
    """Call ``method`` from ``concurrency`` tasks until ``duration`` passes; total calls."""
    calls = 0
    peer = NodeId(HOST, port)
    async with trio.open_nursery() as nursery:
        client = RpcClient(HOST, port, SECRET, nursery=nursery)
        transport = RpcTransport(SECRET, nursery)
        caller = PeerCaller(
            transport, nursery, on_success=lambda node: None, on_failure=lambda node: None
        )
        await client.call(method, b"k")
        await transport.call(peer, method, b"k")
        stop_at = trio.current_time() + duration

        async def worker() -> None:
            nonlocal calls
            while trio.current_time() < stop_at:
                if fan_out:
                    answers = caller.fan_out([(peer, method, (b"k",))], stop_at + 5)
                    answer = await answers.receive()
                    answers.close()
                    assert answer is not None, "every call is answered"
                    assert answer.ok, answer
                else:
                    await client.call(method, b"k")
                calls += 1

        async with trio.open_nursery() as workers:
            for _ in range(concurrency):
                workers.start_soon(worker)
        nursery.cancel_scope.cancel()
    return calls


def measure(args: argparse.Namespace) -> None:
    server = subprocess.Popen(
        module_command("bench.rpc", "--serve", "--size", str(args.size)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=module_env(),
    )
    assert server.stdin is not None
    assert server.stdout is not None
    try:
        port = int(server.stdout.readline())
        print(
            f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; {args.concurrency} "
            f"concurrent callers, {args.size}-byte results, {args.duration} s per round"
        )
        print(f"{'round':<22} {'calls/s':>9} {'client us/call':>15} {'server us/call':>15}")
        for label, method, fan_out in (
            ("call, inline handler", "blob", False),
            ("call, waiting handler", "blob_async", False),
            ("fan-out of one call", "blob", True),
        ):
            server.stdin.write("cpu\n")
            server.stdin.flush()
            server_before = float(server.stdout.readline())
            client_before = time.process_time()
            started = time.perf_counter()
            calls = trio.run(load, port, method, args.concurrency, args.duration, fan_out)
            elapsed = time.perf_counter() - started
            client_cpu = time.process_time() - client_before
            server.stdin.write("cpu\n")
            server.stdin.flush()
            server_cpu = float(server.stdout.readline()) - server_before
            print(
                f"{label:<22} {calls / elapsed:>9,.0f} {client_cpu / calls * 1e6:>15.1f} "
                f"{server_cpu / calls * 1e6:>15.1f}"
            )
    finally:
        server.stdin.close()
        server.wait(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="example: python -m bench.rpc --concurrency 50 --duration 3",
    )
    parser.add_argument("--concurrency", type=int, default=10, help="concurrent callers (10)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round (5)")
    parser.add_argument("--size", type=int, default=1024, help="result bytes (1024)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        trio.run(serve, args.size)
    else:
        measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Machine instructions per request of a whole kai node, counted by valgrind's callgrind.

Run: .venv/bin/python -m bench.instructions [--requests N] [--kind set|get] [--tree DIR]

A kai node (LevelDB, real sockets, the listener, the executor, the coordinator of a ring of
one) runs under ``valgrind --tool=callgrind``; one client connection sends requests one at a
time, each waiting for its reply, as an unpipelined memcached client does. The node runs
twice: once with the preload alone and once with ``--requests`` more requests; the difference
divided by ``--requests`` is what one request costs, start-up and shutdown cancelled out.

Instruction counts do not depend on what else the machine is doing, so two versions of kai
compare on a shared, noisy machine where ops/s do not (``--tree`` runs another checkout,
e.g. a ``git worktree`` of an older commit). They measure CPU work only: waiting, cache
misses and system-call latency are not in them. valgrind is optional; without it this
tool says so and exits with status 2. A run takes about a minute (valgrind slows Python
some fifty times).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from kai.testing.process import free_port

HOST = "127.0.0.1"
#: Keys the preload writes and the measured requests cycle through.
KEYS = 1000
#: Bytes of each value.
VALUE_SIZE = 100
#: Seconds the node may take to start under valgrind, and to finish after SIGTERM.
START_TIMEOUT = 300.0
STOP_TIMEOUT = 120.0

_COLLECTED = re.compile(rb"Collected\s*:\s*(\d+)")


def _connect(port: int, deadline: float) -> socket.socket:
    while True:
        try:
            return socket.create_connection((HOST, port), timeout=60)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # poll interval of a deadline-bounded wait for the node to listen


def _exchange(sock: socket.socket, reader: BinaryIO, request: bytes, end: bytes) -> None:
    sock.sendall(request)
    reply = b""
    while not reply.endswith(end):
        line = reader.readline()
        if not line:
            raise ConnectionError("the node closed the connection")
        reply += line


def drive(port: int, requests: int, kind: str) -> None:
    """Preload the keys, then send ``requests`` requests of ``kind`` one at a time."""
    sock = _connect(port, time.monotonic() + START_TIMEOUT)
    with sock, sock.makefile("rb") as reader:
        value = b"v" * VALUE_SIZE
        keys = [b"key:%028d" % index for index in range(KEYS)]
        for key in keys:
            _exchange(sock, reader, b"set %s 0 0 %d\r\n%s\r\n" % (key, VALUE_SIZE, value), b"\r\n")
        for index in range(requests):
            key = keys[index % KEYS]
            if kind == "set":
                request = b"set %s 0 0 %d\r\n%s\r\n" % (key, VALUE_SIZE, value)
                _exchange(sock, reader, request, b"STORED\r\n")
            else:
                _exchange(sock, reader, b"get %s\r\n" % key, b"END\r\n")


def count(tree: Path, requests: int, kind: str, settings: Sequence[str] = ()) -> int:
    """Instructions a node in ``tree`` executes for the preload plus ``requests`` requests,
    with ``settings`` (TOML lines) in its configuration file."""
    with tempfile.TemporaryDirectory(prefix="kai-instructions-") as scratch:
        port, rpc_port = free_port(HOST), free_port(HOST)
        config = Path(scratch) / "kai.toml"
        config.write_text("".join(f"{setting}\n" for setting in settings))
        argv = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "kai",
            "--data-dir",
            str(Path(scratch) / "data"),
            "--listen",
            f"{HOST}:{port}",
            "--rpc",
            f"{HOST}:{rpc_port}",
            "--config",
            str(config),
        ]
        env = dict(os.environ, PYTHONPATH=str(tree))
        node = subprocess.Popen(
            argv, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            drive(port, requests, kind)
        finally:
            node.terminate()
            _out, err = node.communicate(timeout=STOP_TIMEOUT)
        found = _COLLECTED.search(err)
        if found is None:
            raise RuntimeError(f"callgrind reported no count:\n{err.decode(errors='replace')}")
        return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="measured requests (5000)")
    parser.add_argument("--kind", choices=("set", "get"), default="set")
    parser.add_argument(
        "--tree",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the checkout whose kai runs (this one)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a node setting as a TOML line, e.g. anti_entropy=false (repeatable)",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        raise SystemExit(2)
    base = count(args.tree, 0, args.kind, args.setting)
    loaded = count(args.tree, args.requests, args.kind, args.setting)
    per_request = (loaded - base) / args.requests
    print(f"{args.kind}: {per_request:,.0f} instructions/request ({args.tree})")


if __name__ == "__main__":
    main()

"""``kai-admin``: ask a running node about itself over the authenticated RPC port.

A thin adapter: parse flags, load the cluster secret, make one RPC call under a deadline,
print the answer as text or JSON. Never touches a node's data directory other than reading
the secret file.

Examples:
    kai-admin status
    kai-admin --node 127.0.0.1:11012 --json stats
    kai-admin locate user:42
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from kai.core.config import Address
from kai.core.errors import KaiError, RpcError
from kai.rpc.client import RpcClient
from kai.rpc.secret import load_secret

#: Seconds a single admin call may take, connection included.
CALL_TIMEOUT = 10.0

# name -> (help, example, rpc method); commands whose method is None are not available yet.
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "status": ("the node's identity, version, uptime, quorum, items", "kai-admin status", "status"),
    "members": ("the cluster's members and their status", "kai-admin members", "members"),
    "ring": ("ring parameters and partitions per node", "kai-admin ring", "ring"),
    "locate": (
        "where KEY lives: partition, preference list, each replica's versions (dot and context)",
        "kai-admin locate user:42",
        "locate",
    ),
    "stats": ("the node's memcached-style statistics", "kai-admin --json stats", "stats"),
    "join": (
        "make the node join the cluster of SEED (an RPC HOST:PORT)",
        "kai-admin --node 127.0.0.1:11012 join 127.0.0.1:11011",
        "join",
    ),
    "leave": (
        "hand the node's data off, then retire it (not available yet)",
        "kai-admin leave",
        None,
    ),
    "remove": (
        "evict a dead NODE and re-replicate from the survivors (not available yet)",
        "kai-admin remove 127.0.0.1:11013",
        None,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``kai-admin`` command line."""
    parser = argparse.ArgumentParser(
        prog="kai-admin",
        description="Inspect and manage Kai nodes over their authenticated RPC port.",
        epilog="examples:\n  kai-admin status\n  kai-admin --json stats\n  kai-admin locate key1\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--node",
        default="127.0.0.1:11011",
        metavar="HOST:PORT",
        help="RPC address (127.0.0.1:11011)",
    )
    parser.add_argument(
        "--secret-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="cluster secret ($KAI_SECRET_FILE, else ./kai-data/cluster.secret)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, example, _method) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=help_text,
            description=f"{help_text}.\n\nexample:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "locate":
            sub.add_argument("key", help="the key, as a memcached client would send it")
        elif name == "join":
            sub.add_argument("seed", metavar="SEED", help="RPC HOST:PORT of a cluster member")
        elif name == "remove":
            sub.add_argument("target", metavar="NODE", help="RPC HOST:PORT of the node to evict")
    return parser


def _secret_path(args: argparse.Namespace) -> Path:
    if args.secret_file is not None:
        return Path(args.secret_file)
    from_env = os.environ.get("KAI_SECRET_FILE")
    return Path(from_env) if from_env else Path("kai-data") / "cluster.secret"


async def call_node(address: Address, secret: bytes, method: str, *params: object) -> object:
    """One authenticated RPC call to a node, bounded by :data:`CALL_TIMEOUT`."""
    with trio.fail_after(CALL_TIMEOUT):
        async with RpcClient(address.host, address.port, secret) as client:
            return await client.call(method, *params)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _render_text(command: str, result: Any) -> str:
    if command == "members":
        return "\n".join(
            f"{m['node']}  {m['status']}  {'up' if m.get('reachable') else 'down'}" for m in result
        )
    if command == "locate":
        lines = [
            f"key {result['key']}",
            f"partition {result['partition']}",
            f"preference list {' '.join(result['preference_list'])} (N={result['n']})",
        ]
        for replica in result["replicas"]:
            if not replica["holds"]:
                lines.append(f"  {replica['node']}: -")
                continue
            for version in replica["versions"]:
                actor, counter = version["dot"]
                context = ",".join(
                    f"{seen}:{upto}" for seen, upto in sorted(version["context"].items())
                )
                kind = "tombstone" if version["tombstone"] else f"{version['bytes']} bytes"
                lines.append(
                    f"  {replica['node']}: dot {actor}:{counter} context [{context}] {kind}"
                )
        return "\n".join(lines)
    if isinstance(result, dict):
        return "\n".join(f"{key} {_flat(value)}" for key, value in result.items())
    return str(result)


def _flat(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    if isinstance(value, dict):
        return " ".join(f"{key}={item}" for key, item in value.items())
    return str(value)


def main(argv: Sequence[str] | None = None, *, out: Callable[[str], object] | None = None) -> int:
    """Entry point of ``kai-admin``; returns the exit status."""
    write = out if out is not None else (lambda text: sys.stdout.write(text + "\n"))
    args = build_parser().parse_args(argv)
    _help, _example, method = COMMANDS[args.command]
    if method is None:
        sys.stderr.write(
            f"kai-admin {args.command}: not available in this version: moving a node's data "
            "off the ring (leave, remove) comes with ownership transfer\n"
        )
        return 2
    try:
        address = Address.parse(args.node, name="--node")
        secret = load_secret(_secret_path(args))
        params: tuple[object, ...] = ()
        if args.command == "locate":
            params = (args.key.encode(),)
        elif args.command == "join":
            params = (args.seed,)
        result = trio.run(call_node, address, secret, method, *params)
    except trio.TooSlowError:
        sys.stderr.write(f"kai-admin: {args.node} did not answer within {CALL_TIMEOUT:g}s\n")
        return 1
    except (KaiError, RpcError) as error:
        sys.stderr.write(f"kai-admin: {args.node}: {error}\n")
        return 1
    result = _jsonable(result)
    write(
        json.dumps(result, indent=2, sort_keys=True)
        if args.json
        else _render_text(args.command, result)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``kai-admin``: ask a running node about itself over the authenticated RPC port.

A thin adapter: parse flags, load the cluster secret, make one RPC call under a deadline,
print the answer as text or JSON. Never touches a node's data directory other than reading
the secret file.

Examples:
    kai-admin status
    kai-admin --node 127.0.0.1:11012 stats --json
    kai-admin locate user:42
    kai-admin --node 127.0.0.1:11014 join 127.0.0.1:11011   # staged on 127.0.0.1:11014
    kai-admin --node 127.0.0.1:11014 plan                   # what would move, how much
    kai-admin --node 127.0.0.1:11014 commit

Exit status: see :data:`EXIT_CODES` (also printed at the end of ``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import trio

from kai import __version__
from kai.core.config import Address
from kai.core.errors import (
    ConfigError,
    KaiError,
    RpcAuthenticationError,
    RpcError,
    RpcMethodNotFound,
)
from kai.core.memcache.requests import KEY_MAX_LENGTH, is_valid_key
from kai.rpc.client import RpcClient
from kai.rpc.secret import load_secret

#: Seconds a single admin call may take, connection included.
CALL_TIMEOUT = 10.0
#: Seconds a call that asks other nodes in turn (staging, plan, commit) may take.
CHANGE_TIMEOUT = 30.0
#: Moves a text plan lists (``--json`` lists every one).
PLAN_LINES = 50

#: Commands that take ``--commit`` (stage and commit in one command).
STAGING_COMMANDS: Final = ("join", "leave", "remove", "replace")

#: The command succeeded.
EXIT_OK: Final = 0
#: The node answered with an error: the operation failed there.
EXIT_FAILED: Final = 1
#: The command line is wrong (argparse's own status for usage errors).
EXIT_USAGE: Final = 2
#: The node could not be reached or authenticated (also: no usable secret file here).
EXIT_UNREACHABLE: Final = 3
#: The command is not available in this version (of kai-admin, or of the node asked).
EXIT_NOT_AVAILABLE: Final = 4

#: Exit status -> what it means; scripts depend on these numbers, so never renumber them.
EXIT_CODES: Final = {
    EXIT_OK: "success",
    EXIT_FAILED: "the node answered with an error (the operation failed)",
    EXIT_USAGE: "usage error (bad flags, address or key)",
    EXIT_UNREACHABLE: "cannot reach or authenticate to the node (or no usable secret file)",
    EXIT_NOT_AVAILABLE: "not available in this version",
}

# name -> (help, example, rpc method); commands whose method is None are not available yet.
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "status": ("the node's identity, version, uptime, quorum, items", "kai-admin status", "status"),
    "members": ("the cluster's members and their status", "kai-admin members", "members"),
    "ring": ("ring parameters and partitions per node", "kai-admin ring", "ring"),
    "locate": (
        "where KEY lives: partition, preference list (the N primaries), fallbacks, each "
        "primary's versions (dot and context)",
        "kai-admin locate user:42",
        "locate",
    ),
    "stats": ("the node's memcached-style statistics", "kai-admin --json stats", "stats"),
    "join": (
        "stage the node joining the cluster of SEED (an RPC HOST:PORT); the node must hold "
        "no data and be on its own. Changes are staged on the node asked: run plan and "
        "commit there. --commit joins at once",
        "kai-admin --node 127.0.0.1:11014 join 127.0.0.1:11011",
        "stage_join",
    ),
    "leave": (
        "stage the node leaving: its partitions are copied to their next owners, then it is "
        "left and deletes them. --commit leaves at once",
        "kai-admin --node 127.0.0.1:11013 leave",
        "stage_leave",
    ),
    "remove": (
        "stage another member, NODE (usually a dead one), leaving: its partitions are copied "
        "from the other owners that are up. --commit removes it at once",
        "kai-admin remove 127.0.0.1:11013",
        "stage_remove",
    ),
    "replace": (
        "stage member OLD leaving and NEW (a running node that holds no data and is on its "
        "own) joining in its place. --commit replaces at once",
        "kai-admin replace 127.0.0.1:11013 127.0.0.1:11016",
        "stage_replace",
    ),
    "plan": (
        "the staged changes and what committing them would move: partitions, from, to, keys "
        "and bytes; then the transition under way, if any",
        "kai-admin plan",
        "plan",
    ),
    "commit": (
        "apply the staged changes (gossip carries them; the nodes copy the partitions, then "
        "finalize) and print the plan committed",
        "kai-admin commit",
        "commit",
    ),
    "clear": (
        "drop every staged change without applying it",
        "kai-admin clear",
        "clear_staged",
    ),
    "transfers": (
        "the node's transfers (hint handoffs, partition copies): kind, partition, from, to, "
        "state, keys and "
        "bytes done/total, rate, time left; then the last finished ones",
        "kai-admin transfers --json",
        "transfers",
    ),
    "cancel-transfer": (
        "stop the running transfer ID (as `transfers` lists it) after its current batch; "
        "offered again later, it goes on from its last acknowledged batch",
        "kai-admin cancel-transfer hints:127.0.0.1:11013",
        "cancel_transfer",
    ),
    "aae-status": (
        "anti-entropy: exchanges, keys repaired, hash trees ready, and when each partition "
        "this node is a primary of was last compared, and with whom",
        "kai-admin aae-status --json",
        "aae_status",
    ),
}


def _exit_status_epilog() -> str:
    return "exit status:\n" + "".join(
        f"  {code}  {meaning}\n" for code, meaning in EXIT_CODES.items()
    )


def _common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--node, --secret-file and --json, accepted before and after the subcommand.

    The subcommands' copies default to SUPPRESS, so an option given before the
    subcommand is not overwritten by the subcommand's default.
    """

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--node",
        default=default("127.0.0.1:11011"),
        metavar="HOST:PORT",
        help="RPC address (127.0.0.1:11011)",
    )
    parser.add_argument(
        "--secret-file",
        type=Path,
        default=default(None),
        metavar="FILE",
        help="cluster secret ($KAI_SECRET_FILE, else ./kai-data/cluster.secret)",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON instead of text"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``kai-admin`` command line."""
    parser = argparse.ArgumentParser(
        prog="kai-admin",
        description="Inspect and manage Kai nodes over their authenticated RPC port.",
        epilog="examples:\n  kai-admin status\n  kai-admin stats --json\n"
        "  kai-admin --node 127.0.0.1:11012 locate key1\n"
        "  kai-admin --node 127.0.0.1:11014 join 127.0.0.1:11011\n"
        "  kai-admin --node 127.0.0.1:11014 plan\n"
        "  kai-admin --node 127.0.0.1:11014 commit\n\n" + _exit_status_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kai-admin {__version__}")
    _common_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, example, _method) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=help_text,
            description=f"{help_text}.\n\nexample:\n  {example}",
            epilog=_exit_status_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common_options(sub, defaults=False)
        if name == "locate":
            sub.add_argument("key", help="the key, as a memcached client would send it")
        elif name == "join":
            sub.add_argument("seed", metavar="SEED", help="RPC HOST:PORT of a cluster member")
        elif name == "cancel-transfer":
            sub.add_argument("transfer_id", metavar="ID", help="the transfer's id")
        elif name == "remove":
            sub.add_argument("target", metavar="NODE", help="RPC HOST:PORT of the node to evict")
        elif name == "replace":
            sub.add_argument("old", metavar="OLD", help="RPC HOST:PORT of the member to retire")
            sub.add_argument("new", metavar="NEW", help="RPC HOST:PORT of the node to add")
        if name in STAGING_COMMANDS:
            sub.add_argument(
                "--commit",
                action="store_true",
                help="commit this change at once (other staged changes stay staged)",
            )
    return parser


def _secret_path(args: argparse.Namespace) -> Path:
    if args.secret_file is not None:
        return Path(args.secret_file)
    from_env = os.environ.get("KAI_SECRET_FILE")
    return Path(from_env) if from_env else Path("kai-data") / "cluster.secret"


async def call_node(address: Address, secret: bytes, method: str, *params: object) -> object:
    """One authenticated RPC call to a node (the caller bounds it)."""
    async with RpcClient(address.host, address.port, secret) as client:
        return await client.call(method, *params)


def _timeout_of(command: str) -> float:
    """Seconds ``command``'s call may take, connection included."""
    return CHANGE_TIMEOUT if command in (*STAGING_COMMANDS, "plan", "commit") else CALL_TIMEOUT


async def _call_within(
    seconds: float, address: Address, secret: bytes, method: str, *params: object
) -> object:
    with trio.fail_after(seconds):
        return await call_node(address, secret, method, *params)


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
            f"preference list (N={result['n']}): {' '.join(result['preference_list'])}",
        ]
        if result.get("fallbacks"):
            lines.append(f"fallbacks: {' '.join(result['fallbacks'])}")
        for replica in result["replicas"]:
            if "error" in replica:
                lines.append(f"  {replica['node']}: unknown ({replica['error']})")
                continue
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
    if command in STAGING_COMMANDS or command == "commit":
        return _render_change(result)
    if command == "plan":
        return _render_plan(result)
    if command == "clear":
        cleared = [_change_text(change) for change in result["cleared"]]
        return "\n".join(f"dropped: {text}" for text in cleared) or "nothing was staged"
    if command == "transfers":
        return _render_transfers(result)
    if command == "aae-status":
        return _render_aae(result)
    if isinstance(result, dict):
        return "\n".join(f"{key} {_flat(value)}" for key, value in result.items())
    return str(result)


def _change_text(change: Any) -> str:
    if change["action"] == "join":
        return f"join {change['node']} to the cluster of {change['seed']}"
    if change["action"] == "replace":
        return f"replace {change['node']} with {change['replacement']}"
    return f"{change['action']} {change['node']}"


def _render_change(result: Any) -> str:
    """A staged change (what is staged now), or a commit (what it moves)."""
    if not result["committed"]:
        staged = result["staged"]
        return "\n".join(
            [
                f"staged: {_change_text(result['change'])}",
                f"{len(staged)} change{'' if len(staged) == 1 else 's'} staged on "
                f"{result['node']}: see `kai-admin --node {result['node']} plan`, then apply "
                f"with `kai-admin --node {result['node']} commit`",
            ]
        )
    lines = [f"committed: {_change_text(change)}" for change in result["staged"]]
    lines += [
        f"ring after: {' '.join(result['next_ring'])}",
        f"{result['partitions_moving']} partitions move ({result['copies']} copies); follow "
        "them with `kai-admin status` (phase, copies pending) and `kai-admin transfers`",
    ]
    lines += [f"warning: {warning}" for warning in result["warnings"]]
    return "\n".join(lines)


def _size(value: Any) -> str:
    return "?" if value is None else str(value)


def _render_plan(result: Any) -> str:
    lines: list[str] = []
    if result["staged"]:
        lines.append("staged changes:")
        lines += [f"  {_change_text(change)}" for change in result["staged"]]
        unknown = result["sizes_unknown"]
        lines += [
            f"ring now:   {' '.join(result['current_ring'])}",
            f"ring after: {' '.join(result['next_ring'])}",
            f"{result['partitions_moving']} partitions move ({result['copies']} copies, "
            f"N={result['n']}): {result['keys']} keys, {result['bytes']} bytes"
            + (f" ({unknown} of unknown size)" if unknown else ""),
        ]
        moves = result["moves"]
        if moves:
            width = max(len(str(move["from"])) for move in moves)
            lines.append(f"  {'partition':>9}  {'from':<{width}}  {'to':<21}  {'keys':>8}  bytes")
            for move in moves[:PLAN_LINES]:
                lines.append(
                    f"  {move['partition']:>9}  {move['from']!s:<{width}}  {move['to']:<21}  "
                    f"{_size(move['keys']):>8}  {_size(move['bytes'])}"
                )
            if len(moves) > PLAN_LINES:
                lines.append(f"  … and {len(moves) - PLAN_LINES} more (--json lists them all)")
    else:
        lines.append("nothing staged")
    transition = result["transition"]
    if transition is not None:
        lines.append(
            f"transition under way: {transition['phase']}, {transition['copies_missing']} of "
            f"{transition['copies']} copies missing"
        )
    if result["staged"]:
        refusal = result["refusal"]
        lines.append(
            f"commit would be refused: {refusal}"
            if refusal
            else "apply with `kai-admin commit`, or drop with `kai-admin clear`"
        )
    return "\n".join(lines)


def _render_transfers(result: Any) -> str:
    lines = [f"hints pending {result['hints_pending']}"]
    if not result["transfers"]:
        lines.append("no transfers")
    for t in result["transfers"]:
        what, partition = t["kind"], t["partition"]
        if partition is not None:  # an ownership copy is "partition 7", not twice that
            what = f"{'' if what == 'partition' else what + ' '}partition {partition}"
        left = "" if t["eta_seconds"] is None else f", {t['eta_seconds']} s left"
        lines.append(
            f"{what} {t['from']} -> {t['to']} {t['state']}: "
            f"{t['keys_done']}/{t['keys_total']} keys, {t['bytes_done']}/{t['bytes_total']} "
            f"bytes, {t['keys_per_second']} keys/s{left}"
            + (f" ({t['error']})" if t["error"] else "")
        )
    return "\n".join(lines)


def _render_aae(result: Any) -> str:
    partitions = result["partitions"]
    compared = [p for p in partitions if p["seconds_since_compared"] is not None]
    oldest = result["seconds_since_oldest_comparison"]
    lines = [
        f"anti-entropy {'on' if result['enabled'] else 'off'}: {result['exchanges']} exchanges "
        f"({result['exchanges_failed']} failed), {result['keys_repaired']} keys repaired, "
        f"{result['bytes']} bytes",
        f"hash trees ready: {result['trees_ready']} partitions"
        + ("" if result["building"] is None else f" (building partition {result['building']})"),
        f"partitions compared: {len(compared)} of {len(partitions)} this node is a primary of"
        + ("" if oldest is None else f"; the oldest comparison was {oldest:.1f} s ago"),
    ]
    for p in partitions:
        when = p["seconds_since_compared"]
        seen = "never compared" if when is None else f"compared {when:.1f} s ago with {p['peer']}"
        lines.append(
            f"  partition {p['partition']}: {p['keys']} keys, {seen}, {p['keys_repaired']} repaired"
        )
    return "\n".join(lines)


def _flat(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    if isinstance(value, dict):
        return " ".join(f"{key}={item}" for key, item in value.items())
    return str(value)


def _fail(status: int, text: str) -> int:
    """Print ``text`` as one ``kai-admin: ...`` line on stderr; return ``status``."""
    sys.stderr.write(f"kai-admin: {' '.join(text.split())}\n")
    return status


def main(argv: Sequence[str] | None = None, *, out: Callable[[str], object] | None = None) -> int:
    """Entry point of ``kai-admin``; returns the exit status (see :data:`EXIT_CODES`)."""
    write = out if out is not None else (lambda text: sys.stdout.write(text + "\n"))
    args = build_parser().parse_args(argv)
    _help, _example, method = COMMANDS[args.command]
    if method is None:
        return _fail(EXIT_NOT_AVAILABLE, f"{args.command}: not available in this version")
    try:
        address = Address.parse(args.node, name="--node")
    except ConfigError as error:
        return _fail(EXIT_USAGE, str(error))
    params: tuple[object, ...] = ()
    if args.command == "locate":
        key = os.fsencode(args.key)
        if not is_valid_key(key):
            return _fail(
                EXIT_USAGE,
                f"locate: {args.key[:60]!r} is not a key a memcached client can send: a key is "
                f"1 to {KEY_MAX_LENGTH} bytes with no space or control character",
            )
        params = (key,)
    elif args.command == "join":
        params = (args.seed, args.commit)
    elif args.command == "leave":
        params = (args.commit,)
    elif args.command == "remove":
        params = (args.target, args.commit)
    elif args.command == "replace":
        params = (args.old, args.new, args.commit)
    elif args.command == "cancel-transfer":
        params = (args.transfer_id,)
    timeout = _timeout_of(args.command)
    secret_path = _secret_path(args)
    try:
        secret = load_secret(secret_path)
        result = trio.run(_call_within, timeout, address, secret, method, *params)
    except ConfigError as error:  # no usable secret file: we cannot authenticate
        return _fail(EXIT_UNREACHABLE, str(error))
    except trio.TooSlowError:
        return _fail(EXIT_UNREACHABLE, f"{args.node} did not answer within {timeout:g}s")
    except RpcAuthenticationError:
        return _fail(
            EXIT_UNREACHABLE,
            f"authentication failed: {args.node} does not share the cluster secret in "
            f"{secret_path} (copy the secret file from a node of the cluster, or point "
            "--secret-file at it)",
        )
    except RpcMethodNotFound:
        return _fail(
            EXIT_NOT_AVAILABLE,
            f"{args.command}: not available on {args.node} (it runs an older version of Kai)",
        )
    except RpcError as error:
        if error.unreachable:
            return _fail(EXIT_UNREACHABLE, f"cannot reach {args.node}: {error}")
        return _fail(EXIT_FAILED, f"{args.node} answered {args.command} with an error: {error}")
    except KaiError as error:
        return _fail(EXIT_FAILED, f"{args.command} failed: {error}")
    result = _jsonable(result)
    write(
        json.dumps(result, indent=2, sort_keys=True)
        if args.json
        else _render_text(args.command, result)
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""``kai``: start a node. A thin adapter: flags -> frozen Config -> logging -> trio.run.

Examples:
    kai                                   # one node: memcached on 127.0.0.1:11211, data in ./kai-data
    kai --config kai.toml --log-level debug
    kai --listen 127.0.0.1:11212 --rpc 127.0.0.1:11012 --data-dir ./n2 --seed 127.0.0.1:11011
    kai --metrics 127.0.0.1:9150          # and Prometheus metrics at http://127.0.0.1:9150/metrics
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Final

import trio

from kai import __version__
from kai.core.config import LOG_FORMATS, LOG_LEVELS, Config, config_from_mapping, load_config_file
from kai.core.errors import ConfigError, KaiError
from kai.logs import log_handler
from kai.node import Node

logger = logging.getLogger("kai")


def build_parser() -> argparse.ArgumentParser:
    """The ``kai`` command line."""
    parser = argparse.ArgumentParser(
        prog="kai",
        description=(
            "Run a Kai node: a Dynamo-style key-value store that speaks the memcached text "
            "protocol. With no options it serves one node on 127.0.0.1:11211 with its data in "
            "./kai-data. Flags override the config file."
        ),
        epilog=(
            "examples:\n"
            "  kai\n"
            "  kai --config kai.toml\n"
            "  kai --listen 127.0.0.1:11212 --rpc 127.0.0.1:11012 --data-dir n2 "
            "--seed 127.0.0.1:11011\n"
            "  kai --metrics 127.0.0.1:9150\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where data, the actor id and the secret live (./kai-data)",
    )
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="memcached listener (default 127.0.0.1:11211)"
    )
    parser.add_argument(
        "--rpc",
        metavar="HOST:PORT",
        help="internal RPC listener; its IPv4 address and port identify the node (127.0.0.1:11011)",
    )
    parser.add_argument(
        "--seed",
        action="append",
        metavar="HOST:PORT",
        help="RPC address of a node of the cluster to join (repeatable)",
    )
    parser.add_argument("--quorum", metavar="N,R,W", help="replicas, read and write quorum (3,2,2)")
    parser.add_argument(
        "--secret-file", metavar="FILE", help="cluster secret (default <data-dir>/cluster.secret)"
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="logging level (info)")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text lines, or one JSON object per line for log collectors (text)",
    )
    parser.add_argument(
        "--max-connections", type=int, metavar="N", help="memcached client connections (1024)"
    )
    parser.add_argument(
        "--store",
        choices=("leveldb", "memory"),
        help="storage engine (leveldb; memory is volatile)",
    )
    parser.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics over HTTP at /metrics (off; a bare port is 127.0.0.1)",
    )
    parser.add_argument("--version", action="version", version=f"kai {__version__}")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file (if any) with the flags applied on top."""
    config = load_config_file(args.config) if args.config is not None else Config()
    flags: dict[str, object] = {}
    for name in (
        "data_dir",
        "listen",
        "rpc",
        "quorum",
        "secret_file",
        "log_level",
        "log_format",
        "store",
        "metrics",
    ):
        value = getattr(args, name)
        if value is not None:
            flags[name] = value
    if args.seed:
        flags["seeds"] = list(args.seed)
    if args.max_connections is not None:
        flags["max_connections"] = args.max_connections
    return config_from_mapping(flags, base=config)


def raise_file_limit(wanted: int) -> None:
    """Raise the open-file soft limit so ``wanted`` connections fit, as memcached does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        logger.warning("open-file limit %d is below what %d connections need", soft, wanted)


async def run(config: Config) -> None:
    """Run a node until SIGTERM or SIGINT, then shut it down cleanly; SIGHUP is logged only."""
    node = Node(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_shut_down_on_signal, signals, node)
            try:
                await node.run()
            finally:
                nursery.cancel_scope.cancel()


async def _shut_down_on_signal(signals: AsyncIterator[int], node: Node) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            # As memcached: a hang-up does not stop the server. Kai has no log file to reopen
            # (it logs to stderr) and reads its configuration only at start.
            logger.warning(
                "received SIGHUP: ignored, still serving (nothing to reload: settings are"
                " read at start, so restart the node to change them)"
            )
            continue
        logger.info("received %s", signal.Signals(signum).name)
        node.shut_down()


def _kai_errors(error: BaseException) -> list[KaiError]:
    """The KaiErrors an exception (group) consists of, or [] if anything else is in it."""
    if isinstance(error, KaiError):
        return [error]
    if isinstance(error, BaseExceptionGroup):
        found = [_kai_errors(inner) for inner in error.exceptions]
        if all(found):
            return [item for items in found for item in items]
    return []


def _report_config_error(config: Config, error: ConfigError) -> None:
    """One line on stderr, ``kai: ...`` as for a bad flag, or a JSON log line in JSON mode."""
    if config.log_format == "json":
        logger.error("%s", error)
    else:
        sys.stderr.write(f"kai: {error}\n")


#: Collection thresholds while serving: CPython's (700, 10) for the young generations, but a
#: full collection only after 100 collections of the middle one instead of 10.
GC_THRESHOLDS: Final = (700, 10, 100)


def tune_garbage_collector() -> None:
    """Keep the start-up objects out of every later collection, and run full ones rarely.

    The modules, classes and functions of kai and its libraries live as long as the process;
    without the freeze every full collection walks them again, in the middle of serving
    requests. ``gc.collect()`` first, so no garbage is frozen with them.

    A full collection still walks every tracked object made since, mostly the cache's
    decoded versions, and its pause shows up in the slowest requests of a loaded node. With
    :data:`GC_THRESHOLDS` full collections come about ten times less often; in exchange,
    cyclic garbage that has reached the oldest generation waits longer to be freed. The
    measurements are in docs/performance.md.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kai``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except KaiError as error:
        sys.stderr.write(f"kai: {error}\n")
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), handlers=[log_handler(config.log_format, sys.stderr)]
    )
    if config.log_format == "json":
        logging.captureWarnings(True)  # a stray warning must not break the one-object lines
    raise_file_limit(config.max_connections + 256)
    tune_garbage_collector()
    try:
        trio.run(run, config)
    except BaseException as error:
        errors = _kai_errors(error)
        if not errors:
            raise
        mistakes = [item for item in errors if isinstance(item, ConfigError)]
        if len(mistakes) == len(errors):
            # An operator mistake found at start (a port in use, a missing secret): one line
            # and status 2, as for a bad flag.
            for mistake in mistakes:
                _report_config_error(config, mistake)
            return 2
        for item in errors:
            logger.error("%s", item)
        return 1
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

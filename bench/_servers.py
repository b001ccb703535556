"""Starting the servers the scenarios measure: kai nodes and clusters, memcached, bare trio.

Every server listens on a free loopback port and every wait polls a condition with a deadline.
Whoever starts a server stops it: the functions here hand back what they started, also the
part of a cluster that was running when starting the rest failed.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from kai.testing.process import KaiProcess, MemcachedProcess, ServerProcess, free_port

HOST = "127.0.0.1"
REPO_DIR = Path(__file__).resolve().parent.parent
#: Seconds to wait for the first node's secret file.
SECRET_TIMEOUT = 10.0
#: Seconds one ``stats`` request may take.
STATS_TIMEOUT = 5.0


def module_command(module: str, *args: str) -> list[str]:
    """The argv that runs ``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def module_env() -> dict[str, str]:
    """The environment for a child run with :func:`module_command`: the repository first on
    its ``PYTHONPATH``, so ``bench`` imports whatever directory the child starts in."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(REPO_DIR), env.get("PYTHONPATH", "")) if part
    )
    return env


def start_server(name: str, scratch: Path, kai_args: Sequence[str] = ()) -> ServerProcess:
    """Start ``memcached`` (-t 1), ``bare-trio`` or ``kai`` (a fresh data directory under
    ``scratch``, plus ``kai_args``) on a free loopback port; the caller stops it."""
    server: ServerProcess
    if name == "memcached":
        server = MemcachedProcess(port=free_port(), threads=1)
    elif name == "bare-trio":
        port = free_port()
        argv = module_command("bench.bare_trio", str(port))
        server = ServerProcess(argv, host=HOST, port=port, env=module_env())
    elif name == "kai":
        data_dir = Path(tempfile.mkdtemp(prefix="kai-node-", dir=scratch))
        server = KaiProcess(data_dir, port=free_port(), extra_args=kai_args)
    else:
        raise ValueError(f"unknown server {name!r}")
    server.start()
    return server


def parse_quorum(text: str) -> tuple[int, int, int]:
    """``N,R,W`` as three integers with 1 <= R, W <= N (raise ValueError otherwise)."""
    parts = text.split(",")
    if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"expected N,R,W (three integers), got {text!r}")
    n, r, w = (int(part) for part in parts)
    if n < 1 or not (1 <= r <= n and 1 <= w <= n):
        raise ValueError(f"need 1 <= R, W <= N, got {text!r}")
    return n, r, w


def effective_quorum(text: str, members: int) -> str:
    """The quorum a cluster of ``members`` nodes uses: each of N, R, W capped at ``members``."""
    return ",".join(str(min(value, members)) for value in parse_quorum(text))


def node_config(quorum: str, membership_interval: int) -> str:
    """The TOML every node of a cluster is started with."""
    return f'quorum = "{quorum}"\nmembership_interval = {membership_interval}\n'


def memcache_stats(port: int) -> dict[str, str]:
    """A server's general ``stats`` as name -> value (values may contain spaces)."""
    deadline = time.monotonic() + STATS_TIMEOUT
    with socket.create_connection((HOST, port), timeout=STATS_TIMEOUT) as sock:
        sock.sendall(b"stats\r\n")
        reply = b""
        while not reply.endswith((b"END\r\n", b"ERROR\r\n")):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    fields = {}
    for line in reply.decode("utf-8", "replace").split("\r\n"):
        if line.startswith("STAT "):
            name, _, value = line[5:].partition(" ")
            fields[name] = value
    return fields


def members_seen_by(node: KaiProcess) -> set[str]:
    """The RPC addresses a node lists in ``kai_curr_nodes`` (empty if it does not answer)."""
    try:
        return set(memcache_stats(node.port).get("kai_curr_nodes", "").split())
    except OSError:
        return set()


def wait_for_file(path: Path, timeout: float) -> bytes:
    """The contents of ``path`` once it exists and is non-empty (raise after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (data := path.read_bytes()):
            return data
        time.sleep(0.05)  # poll interval of a deadline-bounded wait
    raise TimeoutError(f"{path} did not appear in {timeout:g} s")


def write_secret(path: Path, secret: bytes) -> None:
    """Write a cluster secret readable by its owner only (mode 0600 from the start)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(secret)


def start_cluster(size: int, base: Path, config: str, nodes: list[KaiProcess]) -> None:
    """Start ``size`` nodes under ``base``, appending each to ``nodes`` (the caller stops them).

    Node 1 creates the cluster secret; every other node gets a copy before it starts and
    joins with node 1's RPC address as its seed.
    """
    first = KaiProcess(base / "n1", port=free_port(), rpc_port=free_port(), config=config)
    nodes.append(first)
    first.start()
    secret = wait_for_file(first.data_dir / "cluster.secret", SECRET_TIMEOUT)
    for index in range(2, size + 1):
        node = seeded_node(base / f"n{index}", secret, config, first.rpc_port)
        nodes.append(node)
        node.start()


def seeded_node(data_dir: Path, secret: bytes, config: str, seed_rpc_port: int) -> KaiProcess:
    """A node (not started) on a fresh ``data_dir`` holding ``secret``, with the node at
    ``seed_rpc_port`` as its seed: started, it joins that node's cluster."""
    data_dir.mkdir(parents=True)
    write_secret(data_dir / "cluster.secret", secret)
    return KaiProcess(
        data_dir,
        port=free_port(),
        rpc_port=free_port(),
        config=config,
        extra_args=["--seed", f"{HOST}:{seed_rpc_port}"],
    )


def wait_until_formed(nodes: Sequence[KaiProcess], timeout: float) -> float:
    """Poll until every node lists every member; the seconds it took (raise on timeout)."""
    everyone = {f"{HOST}:{node.rpc_port}" for node in nodes}
    started = time.monotonic()
    deadline = started + timeout
    waiting = list(nodes)
    seen: set[str] = set()
    while waiting:
        for node in nodes:
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"node {node.rpc_port} exited with {node.process.returncode}")
        seen = members_seen_by(waiting[0])
        if seen == everyone:
            waiting.pop(0)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"cluster did not form in {timeout:g} s: node {waiting[0].rpc_port} sees "
                f"{sorted(seen) or 'nothing'}, expected {sorted(everyone)}"
            )
        time.sleep(0.05)  # poll interval of a deadline-bounded wait
    return time.monotonic() - started

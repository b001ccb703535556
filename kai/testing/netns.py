"""Real network partitions for system tests: one Linux network namespace per node.

:class:`NetnsLab` gives each of N nodes a network namespace of its own, with a veth pair into
a bridge in the root namespace and an address in a private /24 that exists only on that
bridge. The root side of the bridge has an address too, so the test process (which stays in
the root namespace) reaches every node's ports. :meth:`NetnsLab.partition` cuts groups of
nodes apart with iptables DROP rules inside the namespaces (they work whether or not bridged
traffic passes the root namespace's iptables, see ``br_netfilter``), and :meth:`NetnsLab.heal`
removes them.

It must never leave anything behind: leaving the ``with`` block, however it is left (a failed
assertion, an error halfway through the setup, KeyboardInterrupt), kills every process still
inside a namespace and removes every veth, namespace, bridge and root iptables rule it made.
It needs root, ``ip`` (iproute2) and ``iptables``; :func:`available` says whether it can run
here, and why not. Every command is ``subprocess.run([...], check=True)`` behind
:func:`run`, whose error names the command and what it printed.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

logger = logging.getLogger(__name__)

#: Linux's limit on an interface name's length (IFNAMSIZ - 1).
MAX_INTERFACE_NAME: Final = 15
#: The first two octets of the private /24s a lab picks from (10.213.1.0/24 ... 10.213.254.0/24).
SUBNET_BASE: Final = "10.213"
#: The host part of the root namespace's address on the bridge.
GATEWAY_HOST: Final = 254
#: The iptables chain, in every namespace, that holds the partition's DROP rules.
PARTITION_CHAIN: Final = "KAI-PARTITION"
#: Seconds any one setup or cleanup command may take.
COMMAND_TIMEOUT: Final = 30.0
#: Seconds to wait for killed processes to leave a namespace.
KILL_TIMEOUT: Final = 10.0
#: Set to 1 when bridged IPv4 traffic passes the root namespace's iptables (br_netfilter).
BRIDGE_NF_CALL_IPTABLES: Final = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


class NetnsError(RuntimeError):
    """A namespace command failed; the message has the command, its exit code and output."""


def run(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run ``argv`` (no shell) and return its stdout; raise :class:`NetnsError` if it fails."""
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=True
        )
    except subprocess.CalledProcessError as exc:
        output = (exc.stderr or exc.stdout or "").strip()
        raise NetnsError(
            f"`{' '.join(argv)}` exited with {exc.returncode}: {output or 'no output'}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"`{' '.join(argv)}` did not finish in {timeout} s") from exc
    except OSError as exc:
        raise NetnsError(f"`{' '.join(argv)}` could not run: {exc}") from exc
    return result.stdout


# --- pure helpers ---------------------------------------------------------------------------


def lab_names(run_id: int, size: int) -> tuple[str, list[str], list[str], list[str]]:
    """The bridge, namespaces, root-side veths and namespace-side veths of a lab.

    Unique per ``run_id`` (the pid by default); every interface name fits in 15 characters.

    Raises:
        ValueError: the names would be too long (too large a ``run_id`` or ``size``).
    """
    tag = f"k{run_id}"
    bridge = f"{tag}br"
    namespaces = [f"kai-{run_id}-n{index + 1}" for index in range(size)]
    root_sides = [f"{tag}h{index + 1}" for index in range(size)]
    node_sides = [f"{tag}p{index + 1}" for index in range(size)]
    longest = max([bridge, *root_sides, *node_sides], key=len)
    if len(longest) > MAX_INTERFACE_NAME:
        raise ValueError(f"interface name {longest!r} is over {MAX_INTERFACE_NAME} characters")
    return bridge, namespaces, root_sides, node_sides


def pick_subnet(run_id: int, in_use: str, *, base: str = SUBNET_BASE) -> str:
    """A ``base.X`` prefix (of ``base.X.0/24``) that does not appear in ``in_use``.

    ``in_use`` is what ``ip -o -4 addr show`` and ``ip -4 route show`` print; the search
    starts at a third octet derived from ``run_id`` so that concurrent runs spread out.

    Raises:
        NetnsError: every /24 under ``base`` is taken.
    """
    start = run_id % 254
    for offset in range(254):
        third = (start + offset) % 254 + 1
        prefix = f"{base}.{third}"
        if f"{prefix}." not in in_use:
            return prefix
    raise NetnsError(f"every {base}.X.0/24 is in use on this machine; remove a stale lab")


def drop_rules(addresses: Sequence[str], groups: Sequence[Collection[int]]) -> list[list[str]]:
    """The DROP rules that cut ``groups`` of nodes apart, as ``[node, iptables args...]``.

    Node ``i`` (an index into ``addresses``) gets, for every node of another group, a rule
    dropping what comes from it and one dropping what goes to it. Every node must be in
    exactly one group.

    Raises:
        ValueError: a node is in no group, in two, or is not a node at all.
    """
    group_of: dict[int, int] = {}
    for group_index, group in enumerate(groups):
        for node in group:
            if not 0 <= node < len(addresses):
                raise ValueError(f"node {node} is not one of the {len(addresses)} nodes")
            if node in group_of:
                raise ValueError(f"node {node} is in two groups")
            group_of[node] = group_index
    missing = sorted(set(range(len(addresses))) - set(group_of))
    if missing:
        raise ValueError(f"nodes {missing} are in no group: list every node in one")
    rules: list[list[str]] = []
    for node, other in itertools.permutations(range(len(addresses)), 2):
        if group_of[node] != group_of[other]:
            peer = addresses[other]
            rules.append([str(node), "-A", PARTITION_CHAIN, "-s", peer, "-j", "DROP"])
            rules.append([str(node), "-A", PARTITION_CHAIN, "-d", peer, "-j", "DROP"])
    return rules


_LAB_NAME = re.compile(r"kai-(\d+)-(?:n\d+|probe)|k(\d+)(?:br|pb|h\d+|p\d+)")


def lab_run_id(name: str) -> int | None:
    """The run id in the name of a lab's namespace or bridge, or None if it is not a lab's."""
    match = _LAB_NAME.fullmatch(name)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


# --- availability ---------------------------------------------------------------------------


@functools.cache
def available() -> tuple[bool, str]:
    """Whether a lab can run here, and if not, why (a reason to skip a test with).

    Checks that this is root, that ``ip`` and ``iptables`` are installed, and that a
    namespace with its own iptables and a bridge can really be made (then removes them).
    """
    if os.geteuid() != 0:
        return False, "network namespaces need root (run the system tests as root)"
    missing = [name for name in ("ip", "iptables") if shutil.which(name) is None]
    if missing:
        return False, (
            f"not found on PATH: {', '.join(missing)} (Debian packages: iproute2, iptables)"
        )
    probe = f"kai-{os.getpid()}-probe"
    bridge = f"k{os.getpid()}pb"
    try:
        run(["ip", "netns", "add", probe])
        run(["ip", "netns", "exec", probe, "iptables", "-w", "-S"])
        run(["ip", "link", "add", bridge, "type", "bridge"])
    except NetnsError as exc:
        return False, f"cannot make a network namespace here: {exc}"
    finally:
        for argv in (["ip", "link", "del", bridge], ["ip", "netns", "del", probe]):
            with contextlib.suppress(NetnsError):
                run(argv)
    return True, ""


# --- the lab --------------------------------------------------------------------------------


class NetnsLab:
    """``size`` network namespaces on one bridge, which can be partitioned and healed.

    Use it as a context manager; node ``i`` (from 0) lives in ``namespaces[i]`` with the
    address ``addresses[i]``; run a process there with the argv prefix :meth:`wrapper`.
    The test process reaches every address through the bridge (``gateway`` is its address).
    """

    def __init__(self, size: int, *, run_id: int | None = None) -> None:
        if not 1 <= size <= 200:
            raise ValueError(f"a lab has 1 to 200 nodes, not {size}")
        self.size = size
        self.run_id = os.getpid() if run_id is None else run_id
        self.bridge, self.namespaces, self._root_sides, self._node_sides = lab_names(
            self.run_id, size
        )
        self.prefix = ""
        self.addresses: list[str] = []
        self.gateway = ""
        self.partitioned = False
        #: What setup made, so that cleanup removes exactly that (filled as it goes).
        self._made_namespaces: list[str] = []
        self._made_links: list[str] = []
        self._made_bridge = False
        self._root_rules: list[list[str]] = []

    def wrapper(self, node: int) -> list[str]:
        """The argv prefix that runs a command inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[node]]

    # --- setup --------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        problems = self.close()
        if problems and exc_type is None:
            raise NetnsError("could not clean up: " + "; ".join(problems))

    def _set_up(self) -> None:
        remove_stale_labs()
        in_use = run(["ip", "-o", "-4", "addr", "show"]) + run(["ip", "-4", "route", "show"])
        self.prefix = pick_subnet(self.run_id, in_use)
        self.addresses = [f"{self.prefix}.{index + 1}" for index in range(self.size)]
        self.gateway = f"{self.prefix}.{GATEWAY_HOST}"

        self._made_bridge = True  # set first: a half-made bridge is removed too
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        if _bridged_traffic_meets_iptables():
            # The root namespace's FORWARD policy (DROP on hosts with Docker) would otherwise
            # decide whether nodes reach one another.
            rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
            self._root_rules.append(rule)
            run(["iptables", "-w", "-I", *rule])

        for index, namespace in enumerate(self.namespaces):
            root_side, node_side = self._root_sides[index], self._node_sides[index]
            self._made_namespaces.append(namespace)
            run(["ip", "netns", "add", namespace])
            self._made_links.append(root_side)
            run(["ip", "link", "add", root_side, "type", "veth", "peer", "name", node_side])
            run(["ip", "link", "set", root_side, "master", self.bridge])
            run(["ip", "link", "set", root_side, "up"])
            run(["ip", "link", "set", node_side, "netns", namespace])
            inside = ["ip", "-n", namespace]
            run([*inside, "link", "set", "lo", "up"])
            run([*inside, "addr", "add", f"{self.addresses[index]}/24", "dev", node_side])
            run([*inside, "link", "set", node_side, "up"])
            iptables = [*self.wrapper(index), "iptables", "-w"]
            run([*iptables, "-N", PARTITION_CHAIN])
            run([*iptables, "-A", "INPUT", "-j", PARTITION_CHAIN])
            run([*iptables, "-A", "OUTPUT", "-j", PARTITION_CHAIN])
        logger.info(
            "netns lab %s: bridge %s at %s, nodes %s",
            self.run_id,
            self.bridge,
            self.gateway,
            " ".join(self.addresses),
        )

    # --- partitions ---------------------------------------------------------------------------

    def partition(self, groups: Sequence[Collection[int]]) -> None:
        """Cut the nodes into ``groups`` (node indexes; each node in exactly one group):
        packets between nodes of different groups are dropped both ways. Replaces any
        earlier partition. The test process still reaches every node.
        """
        rules = drop_rules(self.addresses, groups)
        self.heal()
        self.partitioned = True
        for node, *rule in rules:
            run([*self.wrapper(int(node)), "iptables", "-w", *rule])
        logger.info("netns lab %s: partitioned into %s", self.run_id, groups)

    def isolate(self, node: int) -> None:
        """Cut node ``node`` off from every other node."""
        self.partition([[node], [other for other in range(self.size) if other != node]])

    def heal(self) -> None:
        """Remove every DROP rule: all nodes reach one another again."""
        for index in range(self.size):
            run([*self.wrapper(index), "iptables", "-w", "-F", PARTITION_CHAIN])
        if self.partitioned:
            logger.info("netns lab %s: healed", self.run_id)
        self.partitioned = False

    def drop_rules_in_force(self) -> list[str]:
        """The DROP rules now in the namespaces, as ``iptables -S`` lines (for messages)."""
        lines = []
        for index, namespace in enumerate(self.namespaces):
            listed = run([*self.wrapper(index), "iptables", "-w", "-S", PARTITION_CHAIN])
            lines += [f"{namespace}: {line}" for line in listed.splitlines() if "DROP" in line]
        return lines

    # --- cleanup ------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Kill what runs in the namespaces, remove everything the lab made; the problems.

        Every step is tried whatever happened before; something already gone is not a
        problem. Safe to call more than once. A KeyboardInterrupt meanwhile is held until
        the cleanup is done.
        """
        problems: list[str] = []
        with _interrupts_deferred():
            for namespace in self._made_namespaces:
                problems += _kill_processes_in(namespace)
            for link in self._made_links:
                problems += _remove(["ip", "link", "del", link], f"/sys/class/net/{link}")
            for namespace in self._made_namespaces:
                problems += _remove(["ip", "netns", "del", namespace], f"/run/netns/{namespace}")
            if self._made_bridge:
                problems += _remove(
                    ["ip", "link", "del", self.bridge], f"/sys/class/net/{self.bridge}"
                )
            for rule in self._root_rules:
                problems += _remove_root_rule(rule)
        self._made_namespaces, self._made_links, self._root_rules = [], [], []
        self._made_bridge = False
        self.partitioned = False
        for problem in problems:
            logger.warning("netns lab %s cleanup: %s", self.run_id, problem)
        return problems


def remove_stale_labs() -> list[str]:
    """Remove what labs of runs that no longer exist left (a run that got SIGKILL cannot
    clean up); returns the problems. A lab whose run id is a live pid is left alone."""
    names = [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line]
    names += os.listdir("/sys/class/net")
    rules = _forward_rules_by_bridge()
    names = list(dict.fromkeys([*names, *rules]))
    stale = {
        run_id for run_id in map(lab_run_id, names) if run_id is not None and not _pid_alive(run_id)
    }
    if not stale:
        return []
    problems: list[str] = []
    with _interrupts_deferred():
        for name in names:
            if lab_run_id(name) not in stale:
                continue
            logger.warning("removing %s, left by a netns lab whose run is gone", name)
            if os.path.exists(f"/run/netns/{name}"):
                problems += _kill_processes_in(name)
                problems += _remove(["ip", "netns", "del", name], f"/run/netns/{name}")
            else:
                problems += _remove(["ip", "link", "del", name], f"/sys/class/net/{name}")
        for bridge, bridge_rules in rules.items():
            if lab_run_id(bridge) in stale:
                for rule in bridge_rules:
                    logger.warning("removing the rule %s of a dead netns lab", " ".join(rule))
                    problems += _remove_root_rule(rule)
    return problems


def _forward_rules_by_bridge() -> dict[str, list[list[str]]]:
    """The root namespace's FORWARD rules that name an input interface, by that interface."""
    if shutil.which("iptables") is None:
        return {}  # no iptables: no lab ever made a rule
    found: dict[str, list[list[str]]] = {}
    for line in run(["iptables", "-w", "-S", "FORWARD"]).splitlines():
        words = line.split()
        if words[:1] == ["-A"] and "-i" in words[:-1]:
            found.setdefault(words[words.index("-i") + 1], []).append(words[1:])
    return found


def _remove_root_rule(rule: list[str]) -> list[str]:
    """Delete an iptables rule of the root namespace unless it is already gone."""
    try:
        run(["iptables", "-w", "-C", *rule])
    except NetnsError:
        return []  # not there (or never made)
    try:
        run(["iptables", "-w", "-D", *rule])
    except NetnsError as exc:
        return [str(exc)]
    return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bridged_traffic_meets_iptables() -> bool:
    try:
        return BRIDGE_NF_CALL_IPTABLES.read_text().strip() == "1"
    except OSError:
        return False  # br_netfilter is not loaded: bridged frames skip iptables


def _remove(argv: list[str], exists: str) -> list[str]:
    """Run a removal command unless what it removes (the path ``exists``) is already gone."""
    if not os.path.exists(exists):
        return []
    try:
        run(argv)
    except NetnsError as exc:
        if os.path.exists(exists):
            return [str(exc)]
    return []


def _kill_processes_in(namespace: str) -> list[str]:
    """SIGKILL every process in ``namespace`` and wait (bounded) until none is left."""
    if not os.path.exists(f"/run/netns/{namespace}"):
        return []
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        try:
            pids = [int(pid) for pid in run(["ip", "netns", "pids", namespace]).split()]
        except NetnsError as exc:
            return [str(exc)]
        pids = [pid for pid in pids if not _is_zombie(pid)]
        if not pids:
            return []
        if time.monotonic() >= deadline:
            return [f"processes {pids} still in {namespace} after SIGKILL"]
        for pid in pids:
            logger.warning("killing pid %d, still running in %s", pid, namespace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)  # poll interval of a deadline-bounded wait


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and only waits to be reaped (it holds no namespace)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone already
    return stat.rpartition(")")[2].split()[0] in {"Z", "X"}


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (KeyboardInterrupt) until the block is done; re-raise it then."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: object) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt

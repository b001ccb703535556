"""The RPC methods ``kai-admin`` calls: status, stats, members, ring, locate, transfers; and,
from :mod:`kai.admin.changes`, the staged membership changes.

Reads the node's state and asks replicas over the transport; never changes data.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Final

import trio

from kai import __version__
from kai.admin.changes import MembershipChanges
from kai.core.errors import RpcBadRequest, RpcError
from kai.core.memcache.requests import is_valid_key
from kai.core.pending import waits
from kai.core.ring import NodeId
from kai.core.transition import PHASE_NAMES
from kai.core.versions import SiblingSet, decode_siblings
from kai.rpc.server import Handler

if TYPE_CHECKING:
    from kai.cluster.wiring import Cluster
    from kai.node import Node

#: Seconds ``locate`` waits for each replica.
LOCATE_TIMEOUT = 5.0

# A stats value that memcached's text protocol carries as a formatted number ("0.012000").
_NUMBER: Final = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _as_number(value: object) -> object:
    """``value`` as an int or a float if it is a number written as text, else unchanged."""
    if isinstance(value, str) and (match := _NUMBER.fullmatch(value)):
        return float(value) if match.group(1) else int(value)
    return value


def _describe(siblings: SiblingSet) -> list[dict[str, object]]:
    return [
        {
            "dot": [version.dot[0].hex(), version.dot[1]],
            "context": {actor.hex(): counter for actor, counter, _ in version.context.entries},
            "timestamp": version.timestamp,
            "tombstone": version.value is None,
            "bytes": len(version.value or b""),
        }
        for version in siblings
    ]


class AdminHandlers:
    """The admin RPC methods of one node."""

    def __init__(self, node: Node, cluster: Cluster) -> None:
        self.node = node
        self.cluster = cluster
        self.changes = MembershipChanges(cluster)

    def handlers(self) -> dict[str, Handler]:
        """Method name -> handler, for the RPC server."""
        return {
            **self.changes.handlers(),
            "status": self.status,
            "stats": self.stats,
            "members": self.members,
            "ring": self.ring,
            "locate": self.locate,
            "transfers": self.transfers,
            "aae_status": self.aae_status,
            "cancel_transfer": self.cancel_transfer,
            "ping": self.ping,
        }

    def ping(self) -> str:
        """Liveness probe for the failure detector."""
        return "pong"

    def status(self) -> dict[str, object]:
        """Identity, version, uptime, quorum, item counts, and the placement's phase
        (``settled``, ``copying`` or ``switched``) with the partition copies it waits for."""
        node, cluster = self.node, self.cluster
        replica = cluster.replica
        members = cluster.ring().nodes
        placement = cluster.placement()
        return {
            "node": str(cluster.self_node),
            "version": __version__,
            "uptime": int(time.time() - node.started_at),
            "members": [str(member) for member in members],
            "quorum": str(node.config.quorum),
            "effective_quorum": str(node.config.quorum.capped(len(members))),
            "store": node.config.store,
            "data_dir": str(node.config.data_dir.resolve()),
            "actor": replica.actor.hex(),
            "items": replica.items,
            "bytes": replica.item_bytes,
            "connections": node.stats.curr_connections,
            "phase": PHASE_NAMES[placement.phase],
            "copies_pending": len(placement.missing),
            "staged_changes": len(self.changes.staged),
        }

    def transfers(self) -> dict[str, object]:
        """The hints this node keeps, its running transfers and the last finished ones."""
        cluster = self.cluster
        return {
            "hints_pending": cluster.coordinator.hints.pending,
            "transfers": cluster.transfers.status(),
        }

    def cancel_transfer(self, transfer_id: object) -> dict[str, object]:
        """Cancel a running transfer by its id; whether one was running."""
        if not isinstance(transfer_id, str):
            raise RpcBadRequest("cancel_transfer takes the transfer's id as a string")
        return {"id": transfer_id, "cancelled": self.cluster.transfers.cancel(transfer_id)}

    def aae_status(self) -> dict[str, object]:
        """Anti-entropy's state, with the seconds since each partition was last compared."""
        status = self.cluster.anti_entropy.status()
        now = time.time()
        partitions = status["partitions"]
        assert isinstance(partitions, list)
        ages = []
        for entry in partitions:
            compared = entry["last_compared"]
            entry["seconds_since_compared"] = None if compared is None else now - compared
            ages.append(entry["seconds_since_compared"])
        known = [age for age in ages if age is not None]
        never = len(known) < len(ages)
        status["seconds_since_oldest_comparison"] = None if never or not known else max(known)
        status["enabled"] = self.node.config.anti_entropy
        return status

    def stats(self) -> dict[str, object]:
        """The memcached-style ``stats`` fields; the numbers among them as numbers."""
        assert self.node.executor is not None
        return {name: _as_number(value) for name, value in self.node.executor.report.general()}

    def members(self) -> list[dict[str, object]]:
        """Every member in the gossiped view, with its status and local reachability."""
        cluster = self.cluster
        view = cluster.membership.view
        return [
            {
                "node": str(member.node),
                "status": member.status,
                "version": member.version,
                "reachable": member.node == cluster.self_node
                or cluster.detector.is_up(member.node),
            }
            for member in view.members
        ]

    def ring(self) -> dict[str, object]:
        """Ring parameters and how many partitions each node is a primary for."""
        ring = self.cluster.ring()
        n = self.node.config.quorum.capped(len(ring.nodes)).n
        owned = {str(node): 0 for node in ring.nodes}
        for partition in range(ring.buckets):
            for node in ring.primaries(partition, n):
                owned[str(node)] += 1
        return {
            "buckets": ring.buckets,
            "virtual_nodes": ring.virtual_nodes,
            "n": n,
            "nodes": [str(node) for node in ring.nodes],
            "partitions_per_node": owned,
        }

    @waits
    async def locate(self, key: object) -> dict[str, object]:
        """Where ``key`` lives: its N primaries (the preference list), the fallbacks after
        them, and what each primary holds."""
        if not isinstance(key, bytes) or not is_valid_key(key):
            raise RpcBadRequest("locate takes a key a memcached client could send, as bytes")
        cluster = self.cluster
        ring = cluster.ring()
        partition = ring.partition_for_key(key)
        n = self.node.config.quorum.capped(len(ring.nodes)).n
        every_member = ring.preference_list(partition)
        primaries, fallbacks = every_member[:n], every_member[n:]
        replicas: list[dict[str, object]] = [{} for _ in primaries]

        async def ask(index: int, node: NodeId) -> None:
            entry: dict[str, object] = {"node": str(node)}
            try:
                if node == cluster.self_node:
                    siblings = cluster.replica.read(key)
                else:
                    with trio.fail_after(LOCATE_TIMEOUT):
                        reply = await cluster.transport.call(node, "replica_read", [key])
                    if not isinstance(reply, list) or len(reply) != 1:
                        raise ValueError(f"unexpected replica_read reply {reply!r}")
                    record = reply[0]
                    siblings = decode_siblings(record) if isinstance(record, bytes) else ()
                entry["holds"] = bool(siblings)
                entry["versions"] = _describe(siblings)
            except (RpcError, trio.TooSlowError, ValueError) as error:
                entry["holds"] = False
                entry["error"] = f"{type(error).__name__}: {error}"
            replicas[index] = entry

        async with trio.open_nursery() as nursery:
            for index, node in enumerate(primaries):
                nursery.start_soon(ask, index, node)
        return {
            "key": key,
            "partition": partition,
            "preference_list": [str(node) for node in primaries],
            "fallbacks": [str(node) for node in fallbacks],
            "n": n,
            "replicas": replicas,
        }

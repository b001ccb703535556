"""Where the client sends each request: to a primary of its key, as Dynamo's clients do.

The ring comes from ``stats kai_ring`` (docs/dynamo-api.md): a key's primaries are
``Ring(nodes, buckets, virtual_nodes).primaries_of(key, replicas)``, the very function the
nodes coordinate with, so a request sent to one is coordinated there with no forwarding hop.
The order nodes are tried in for a key is its preference list (primaries first, then the
nodes that would stand in for them), with the nodes that failed lately moved to the end.
Without a ring (before the first answer, or when no node can describe it) requests go to
the seeds, which forward them.

Pure: no I/O, no clock of its own (every time is passed in), no randomness. Every change
replaces an immutable value, so threads may share one router (at worst a failure mark set
at the same instant by two threads is lost, and the node is tried once more).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Final

import attrs

from kai.client.records import Address, RingDescription, RingMember
from kai.core.ring import NodeId, Ring

logger = logging.getLogger(__name__)

#: Seconds a node that failed is tried only after every other one.
FAILED_FOR: Final = 5.0
#: Seconds before asking for the ring again when no node could describe it, or while
#: another caller is asking.
RING_RETRY_AFTER: Final = 1.0


@attrs.frozen(slots=True)
class _Routing:
    """A ring description with the ring built from it."""

    description: RingDescription
    ring: Ring
    addresses: dict[NodeId, Address]


def ring_of(description: RingDescription) -> Ring:
    """The ring a description describes, with the node ids as given."""
    return Ring(
        (member.node for member in description.members),
        buckets=description.buckets,
        virtual_nodes=description.virtual_nodes,
    )


class Router:
    """The ring a node described, and which nodes failed lately.

    Args:
        seeds: memcached addresses to ask for the ring, and to send to without one.
        refresh_interval: seconds between asking for the ring again.
        failed_for: seconds a node that failed is tried last.
    """

    def __init__(
        self,
        seeds: Sequence[Address],
        *,
        refresh_interval: float = 10.0,
        failed_for: float = FAILED_FOR,
    ) -> None:
        if not seeds:
            raise ValueError("give at least one node's memcached address, such as 127.0.0.1:11211")
        if not refresh_interval > 0 or not failed_for >= 0:
            raise ValueError(
                f"need refresh_interval > 0 and failed_for >= 0, got {refresh_interval} "
                f"and {failed_for}"
            )
        self.seeds: tuple[Address, ...] = tuple(dict.fromkeys(seeds))
        self.refresh_interval = refresh_interval
        self.failed_for = failed_for
        self._routing: _Routing | None = None
        self._next_refresh = -math.inf
        self._failed_until: dict[Address, float] = {}

    # --- the ring -----------------------------------------------------------------------------

    @property
    def description(self) -> RingDescription | None:
        """The ring last described, or None before any node did."""
        routing = self._routing
        return routing.description if routing is not None else None

    def claim_refresh(self, now: float) -> bool:
        """Whether the caller should ask for the ring now.

        Before the first description every caller asks; later one caller at a time does:
        the next claim succeeds only after :data:`RING_RETRY_AFTER`, or once
        :meth:`ring_described` or :meth:`ring_unavailable` reset the schedule.
        """
        if now < self._next_refresh:
            return False
        if self._routing is not None:
            self._next_refresh = now + RING_RETRY_AFTER
        return True

    def ring_sources(self, now: float) -> tuple[Address, ...]:
        """Where to ask for the ring: the ring's nodes, then the seeds; failed ones last."""
        routing = self._routing
        known = routing.addresses.values() if routing is not None else ()
        return self._healthy_first(dict.fromkeys((*known, *self.seeds)), now)

    def ring_described(self, description: RingDescription, now: float) -> None:
        """Route by ``description`` from now on; ask again after ``refresh_interval``."""
        routing = self._routing
        if routing is None or routing.description != description:
            if routing is None or routing.description.fingerprint != description.fingerprint:
                logger.info(
                    "ring %s: %s",
                    description.fingerprint,
                    " ".join(str(member.node) for member in description.members) or "no nodes",
                )
            self._routing = _Routing(
                description,
                ring_of(description),
                {m.node: m.address for m in description.members if m.address is not None},
            )
        self._next_refresh = now + self.refresh_interval

    def ring_unavailable(self, now: float) -> None:
        """No node described the ring: keep the last one, ask again soon."""
        self._next_refresh = now + min(self.refresh_interval, RING_RETRY_AFTER)

    # --- choosing nodes -----------------------------------------------------------------------

    def primaries(self, key: bytes) -> tuple[RingMember, ...]:
        """``key``'s primaries on the ring (none before a ring was described)."""
        routing = self._routing
        if routing is None or not routing.description.members:
            return ()
        by_node = {member.node: member for member in routing.description.members}
        return tuple(
            by_node[node] for node in routing.ring.primaries_of(key, routing.description.replicas)
        )

    def candidates(self, key: bytes | None, now: float) -> tuple[Address, ...]:
        """Every node to try for a request about ``key``, best first.

        ``key``'s primaries in preference-list order, then the rest of its preference list
        (the nodes that stand in for primaries), each node that failed in the last
        ``failed_for`` seconds moved to the end; nodes whose address is not known are left
        out. Without a ring (or a key) the ring's nodes or, failing those, the seeds.
        """
        routing = self._routing
        if routing is None or not routing.addresses:
            return self._healthy_first(self.seeds, now)
        ring = routing.ring
        if key is None:
            order: Iterable[NodeId] = ring.nodes
        else:
            primaries = ring.primaries_of(key, routing.description.replicas)
            preference = ring.preference_list(ring.partition_for_key(key))
            order = dict.fromkeys((*primaries, *preference))
        addresses = routing.addresses
        return self._healthy_first((addresses[node] for node in order if node in addresses), now)

    def node_failed(self, address: Address, now: float) -> None:
        """``address`` could not be reached or did not answer: try it last for a while, and
        ask for the ring again at the next request (the node may have left)."""
        if address not in self._failed_until:
            logger.info("node %s failed; trying others first for %.1f s", address, self.failed_for)
        self._failed_until = {**self._failed_until, address: now + self.failed_for}
        self._next_refresh = min(self._next_refresh, now)

    def node_answered(self, address: Address) -> None:
        """``address`` answered: it is not failed any more."""
        if address in self._failed_until:
            self._failed_until = {
                failed: until for failed, until in self._failed_until.items() if failed != address
            }

    def is_failed(self, address: Address, now: float) -> bool:
        """Whether ``address`` failed in the last ``failed_for`` seconds."""
        return self._failed_until.get(address, -math.inf) > now

    def _healthy_first(self, addresses: Iterable[Address], now: float) -> tuple[Address, ...]:
        ordered = tuple(addresses)
        failed_until = self._failed_until
        if not failed_until:
            return ordered
        healthy = tuple(a for a in ordered if failed_until.get(a, -math.inf) <= now)
        return healthy + tuple(a for a in ordered if failed_until.get(a, -math.inf) > now)

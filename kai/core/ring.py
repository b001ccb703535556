"""The consistent-hash ring, compatible with the original Kai (pure: no I/O, no trio).

Every node computes, from the member list alone, which members hold a key (zero-hop
routing), so this module must give every node the same answer for the same members: it must
never depend on the order members were learnt in, on the clock, on randomness, or on any
I/O. It must never import trio, plyvel or anything that does I/O.

The scheme is Dynamo's strategy 2, as in Kai's ``kai_hash``:

- Key hash = first 32 bits (big-endian) of MD5(key); partition (Kai's "bucket") =
  ``hash // (2**32 // buckets)``. Partitions are equal ranges of the ring that never move.
- Each member owns ``virtual_nodes`` tokens: token *i* is the first 32 bits of
  MD5(IPv4 4 bytes + port 16-bit BE + *i* 16-bit BE), for *i* = 1..virtual_nodes.
- A partition's preference list starts at the first token strictly after the partition's
  start, walks clockwise with wrap-around and skips members already listed. The first N
  members are the partition's primaries; the rest are fallbacks for sloppy quorum.

Two members may own the same token value. Kai left the order of such tokens to its ets
table; here tokens are sorted by ``(token, node)``, so on a collision the member that sorts
first (by host string, then port; see `NodeId`) is met first on the clockwise walk.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
from collections.abc import Iterable, Iterator

import attrs

HASH_SPACE = 2**32

#: The largest ``virtual_nodes`` value: the token index is encoded in 16 bits.
MAX_VIRTUAL_NODES = 2**16 - 1


def key_hash(key: bytes) -> int:
    """The 32-bit ring position of ``key``: the first four bytes of its MD5, big-endian."""
    return int.from_bytes(hashlib.md5(key).digest()[:4], "big")


def partition_of(hash_value: int, buckets: int) -> int:
    """The partition (Kai's "bucket") that a ring position falls in."""
    return hash_value // (HASH_SPACE // buckets)


def _check_ipv4_host(_instance: object, _attribute: object, host: str) -> None:
    try:
        canonical = str(ipaddress.IPv4Address(host))
    except ValueError:
        canonical = None
    if canonical != host:
        raise ValueError(f"node host must be an IPv4 dotted quad such as '10.0.0.1', not {host!r}")


def _check_port(_instance: object, _attribute: object, port: int) -> None:
    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"node port must be an integer from 1 to 65535, not {port!r}")


@attrs.frozen(order=True, cache_hash=True)
class NodeId:
    """A ring member, identified by its IPv4 address and RPC port.

    Members order by host string, then port; that order decides ties between equal tokens.

    Attributes:
        host: The IPv4 address in canonical dotted-quad form, e.g. ``"127.0.0.1"``.
        port: The RPC port, 1..65535.

    Raises:
        ValueError: If ``host`` is not a canonical IPv4 dotted quad or ``port`` is out of range.
    """

    host: str = attrs.field(validator=[attrs.validators.instance_of(str), _check_ipv4_host])
    port: int = attrs.field(validator=[attrs.validators.instance_of(int), _check_port])

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """Parse ``"host:port"``, e.g. ``"127.0.0.1:11011"``.

        Args:
            text: An IPv4 dotted quad and a decimal port, separated by a colon.

        Returns:
            The member that ``text`` names.

        Raises:
            ValueError: If ``text`` is not of that form; the message shows the expected form.
        """
        host, colon, port_text = text.rpartition(":")
        if not colon or not port_text.isascii() or not port_text.isdecimal():
            raise ValueError(
                f"expected a node as 'IPv4:port' such as '127.0.0.1:11011', not {text!r}"
            )
        return cls(host, int(port_text))


def node_tokens(node: NodeId, virtual_nodes: int) -> tuple[int, ...]:
    """The ring positions that ``node`` owns, in token index order (not sorted).

    Args:
        node: The member.
        virtual_nodes: How many tokens each member owns, 1..65535.

    Returns:
        Token *i* (for *i* = 1..virtual_nodes) at index *i* - 1: the first 32 bits, big-endian,
        of MD5(IPv4 4 bytes + port 16-bit BE + *i* 16-bit BE), as Kai computes it.

    Raises:
        ValueError: If ``virtual_nodes`` is out of range.
    """
    _check_virtual_nodes(virtual_nodes)
    prefix = ipaddress.IPv4Address(node.host).packed + node.port.to_bytes(2, "big")
    return tuple(
        int.from_bytes(hashlib.md5(prefix + index.to_bytes(2, "big")).digest()[:4], "big")
        for index in range(1, virtual_nodes + 1)
    )


def _check_virtual_nodes(virtual_nodes: int) -> None:
    if isinstance(virtual_nodes, bool) or not 1 <= virtual_nodes <= MAX_VIRTUAL_NODES:
        raise ValueError(
            f"virtual_nodes must be an integer from 1 to {MAX_VIRTUAL_NODES}, not {virtual_nodes!r}"
        )


def _check_buckets(buckets: int) -> None:
    if isinstance(buckets, bool) or not 1 <= buckets <= HASH_SPACE or buckets & (buckets - 1) != 0:
        raise ValueError(f"buckets must be a power of two from 1 to 2**32, not {buckets!r}")


class Ring:
    """An immutable consistent-hash ring over a set of members.

    Preference lists are computed on first use and cached, so asking again for the same
    partition (once per request) costs a dict lookup. Rings compare equal when they have the
    same members, ``buckets`` and ``virtual_nodes``.

    Args:
        nodes: The members, in any order; duplicates count once.
        buckets: The number of partitions: a power of two, 1..2**32.
        virtual_nodes: Tokens per member, 1..65535.

    Raises:
        ValueError: If ``buckets`` or ``virtual_nodes`` is out of range.
    """

    __slots__ = (
        "_buckets",
        "_nodes",
        "_preference_lists",
        "_ring_nodes",
        "_tokens",
        "_virtual_nodes",
    )

    def __init__(
        self, nodes: Iterable[NodeId], *, buckets: int = 1024, virtual_nodes: int = 128
    ) -> None:
        _check_buckets(buckets)
        _check_virtual_nodes(virtual_nodes)
        self._buckets = buckets
        self._virtual_nodes = virtual_nodes
        self._nodes: tuple[NodeId, ...] = tuple(sorted(set(nodes)))
        entries = sorted(
            (token, node) for node in self._nodes for token in node_tokens(node, virtual_nodes)
        )
        # Two parallel tuples: tokens for bisect, and the member owning each token.
        self._tokens: tuple[int, ...] = tuple(token for token, _ in entries)
        self._ring_nodes: tuple[NodeId, ...] = tuple(node for _, node in entries)
        # Filled on first use; a dict, since ``buckets`` may be far larger than the set of
        # partitions a node ever asks about.
        self._preference_lists: dict[int, tuple[NodeId, ...]] = {}

    @property
    def nodes(self) -> tuple[NodeId, ...]:
        """The members, sorted."""
        return self._nodes

    @property
    def buckets(self) -> int:
        """The number of partitions."""
        return self._buckets

    @property
    def virtual_nodes(self) -> int:
        """The number of tokens each member owns."""
        return self._virtual_nodes

    @property
    def tokens(self) -> tuple[tuple[int, NodeId], ...]:
        """Every ``(token, member)`` on the ring, in clockwise order."""
        return tuple(zip(self._tokens, self._ring_nodes, strict=True))

    def __repr__(self) -> str:
        members = ", ".join(str(node) for node in self._nodes)
        return f"Ring([{members}], buckets={self._buckets}, virtual_nodes={self._virtual_nodes})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[tuple[NodeId, ...], int, int]:
        return (self._nodes, self._buckets, self._virtual_nodes)

    def partition_start(self, partition: int) -> int:
        """The ring position where ``partition`` begins.

        Raises:
            ValueError: If ``partition`` is not in ``range(buckets)``.
        """
        self._check_partition(partition)
        return partition * (HASH_SPACE // self._buckets)

    def partition_for_key(self, key: bytes) -> int:
        """The partition that ``key`` belongs to."""
        return partition_of(key_hash(key), self._buckets)

    def preference_list(self, partition: int) -> tuple[NodeId, ...]:
        """Every member, in the order they take responsibility for ``partition``.

        The walk starts at the first token strictly after the partition's start and goes
        clockwise with wrap-around, listing each member the first time one of its tokens is
        met. The first N entries are the partition's primaries, the rest its fallbacks.

        Args:
            partition: A partition number in ``range(buckets)``.

        Returns:
            A permutation of `nodes`; empty if the ring has no members.

        Raises:
            ValueError: If ``partition`` is out of range.
        """
        self._check_partition(partition)
        cached = self._preference_lists.get(partition)
        if cached is None:
            cached = tuple(self._walk(partition * (HASH_SPACE // self._buckets)))
            self._preference_lists[partition] = cached
        return cached

    def primaries(self, partition: int, n: int) -> tuple[NodeId, ...]:
        """The first ``min(n, len(nodes))`` members of ``partition``'s preference list.

        Raises:
            ValueError: If ``partition`` is out of range or ``n`` is less than 1.
        """
        if n < 1:
            raise ValueError(f"the replica count n must be at least 1, not {n!r}")
        return self.preference_list(partition)[:n]

    def primaries_of(self, key: bytes, n: int) -> tuple[NodeId, ...]:
        """The primaries of ``key``'s partition (see :meth:`primaries`).

        Raises:
            ValueError: If ``n`` is less than 1.
        """
        if len(self._nodes) == 1 and n >= 1:
            return self._nodes  # every partition's preference list is the one member
        return self.primaries(self.partition_for_key(key), n)

    def with_node(self, node: NodeId) -> Ring:
        """This ring with ``node`` added; this ring itself if ``node`` is already a member."""
        if node in self._nodes:
            return self
        return Ring((*self._nodes, node), buckets=self._buckets, virtual_nodes=self._virtual_nodes)

    def without_node(self, node: NodeId) -> Ring:
        """This ring with ``node`` removed; this ring itself if ``node`` is not a member."""
        if node not in self._nodes:
            return self
        return Ring(
            (member for member in self._nodes if member != node),
            buckets=self._buckets,
            virtual_nodes=self._virtual_nodes,
        )

    def check_invariants(self) -> None:
        """Check the ring's internal consistency; computes every preference list.

        Raises:
            AssertionError: If tokens are out of order, members repeat or are unsorted, a
                member's tokens are missing, or a preference list is not a permutation of
                the members.
        """
        assert list(self._nodes) == sorted(set(self._nodes)), "members unsorted or repeated"
        entries = list(zip(self._tokens, self._ring_nodes, strict=True))
        assert entries == sorted(entries), "tokens out of clockwise order"
        expected = sorted(
            (token, node)
            for node in self._nodes
            for token in node_tokens(node, self._virtual_nodes)
        )
        assert entries == expected, "tokens do not match the members"
        members = set(self._nodes)
        for partition in range(self._buckets):
            preference_list = self.preference_list(partition)
            assert len(preference_list) == len(members), f"partition {partition}: wrong length"
            assert set(preference_list) == members, f"partition {partition}: not the members"

    def _check_partition(self, partition: int) -> None:
        if not 0 <= partition < self._buckets:
            raise ValueError(f"partition must be in range(0, {self._buckets}), not {partition!r}")

    def _walk(self, start: int) -> Iterator[NodeId]:
        """Members in order of first appearance, walking clockwise from after ``start``."""
        remaining = len(self._nodes)
        if remaining == 0:
            return
        seen: set[NodeId] = set()
        first = bisect.bisect_right(self._tokens, start)
        count = len(self._ring_nodes)
        for step in range(count):
            node = self._ring_nodes[(first + step) % count]
            if node not in seen:
                seen.add(node)
                yield node
                remaining -= 1
                if remaining == 0:
                    return

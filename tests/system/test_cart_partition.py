"""Dynamo's shopping cart through a real partition: no acknowledged add is lost.

Three kai processes run in network namespaces of their own (:class:`kai.testing.netns.NetnsLab`,
as in test_partition_healing), N=3 R=2 W=2 with sloppy quorum on. Client threads in the root
namespace, which reaches every node, add distinct items to four shared carts through
``kai.client`` (``update`` with examples/shopping_cart.py's cart and union merge, a client each);
an add is acknowledged when ``update`` returned. Two carts have node 3 as their first primary
(where the client sends them), two node 1 or 2. While the adders run, node 3 is cut off from
the other two (iptables DROP both ways) for six seconds, then the cut is healed. During the
cut, writers that reach node 3 alone write one-item carts there in the empty context: node 3
stores each one and answers SERVER_ERROR, so its replicas diverge from the other two.

Once every replica of every cart holds the same record (each replica read alone over RPC,
so looking repairs nothing), every cart is read through the client: every acknowledged item
must be in it, and so must every item node 3 stored while cut off. Acknowledged adds are
counted per kind of cart before, during and after the cut, and each count must be large, so
the test cannot pass by adding nothing while it matters.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import attrs
import pytest

from kai.client import Client, Sibling
from kai.client.errors import KaiError
from kai.client.protocol import EMPTY_CONTEXT, WriteInContext, wire_key
from kai.core.ring import NodeId, Ring
from kai.testing.netns import NetnsLab

from .conftest import IO_TIMEOUT, RawConnection, wait_for
from .netns_cluster import PORT, RPC_PORT, NetnsCluster, running

pytestmark = pytest.mark.system
logger = logging.getLogger(__name__)

SYNC_INTERVAL_MS = 500
#: A node's request timeout is longer than the client's (1 s, its default, as a node's 5 s
#: default is longer too): a request sent to the cut-off node times out at the client, which
#: then tries other nodes first for a while, and the next ``update`` cycle goes there.
REQUEST_TIMEOUT_MS = 2000
CONFIG = f"""
quorum = "3,2,2"
request_timeout = {REQUEST_TIMEOUT_MS}
membership_interval = 200
sync_interval = {SYNC_INTERVAL_MS}
handoff_interval = 1000
buckets = 64
"""
#: Seconds the adders run before the cut, how long node 3 is cut off, and after the heal.
BEFORE_SECONDS = 2.0
PARTITION_SECONDS = 6.0
AFTER_SECONDS = 2.0
#: Carts whose first primary is node 3 (the node the cut isolates), and carts whose first
#: primary is node 1 or 2; and the client threads adding to each kind (all to the same few
#: carts, so that their writes race and leave siblings).
CARTS_PER_SIDE = 2
ADDERS_PER_SIDE = 3
#: The most adds one thread makes (its loop is bounded in count as well as in time).
ADDS_PER_ADDER = 2000
#: Writers on the cut-off side during the cut (a client that reaches node 3 only), and the
#: most writes each sends. Node 3 stores each one and answers SERVER_ERROR (W=2 cannot be
#: met), so its replicas of the carts diverge from the other two.
MINORITY_WRITERS = 2
MINORITY_WRITES = 200
#: What a minority write's failure is recorded as when node 3 answered SERVER_ERROR.
STORED_BY_NODE_3 = "SERVER_ERROR from node 3"
#: The fewest acknowledged adds to each kind of cart before, during and after the cut, for
#: the test to mean anything.
MIN_ADDS_PER_PHASE = 10
CONVERGENCE_TIMEOUT = 30.0


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"kai_example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The cart of examples/shopping_cart.py: its encoding and its union merge.
cart_example = load_example("shopping_cart")
encode_cart: Callable[[Iterable[str]], bytes] = cart_example.encode_cart
decode_cart: Callable[[bytes | None], frozenset[str]] = cart_example.decode_cart
union_of: Callable[[Sequence[Sibling]], bytes] = cart_example.merge_carts


def adding(item: str) -> Callable[[bytes | None], bytes]:
    """The change that adds ``item`` to a cart."""
    return lambda value: encode_cart(decode_cart(value) | {item})


@pytest.fixture
def cluster(lab: NetnsLab, tmp_path: Path) -> Iterator[NetnsCluster]:
    with running(lab, tmp_path, CONFIG) as nodes:
        yield nodes


@attrs.define
class Adds:
    """Every add an adder made: acknowledged ones with the time, failed ones with the error."""

    #: (cart, item, monotonic time the add returned, and when it began)
    acknowledged: list[tuple[str, str, float, float]] = attrs.Factory(list)
    #: (cart, item, monotonic time update raised, what it raised)
    failed: list[tuple[str, str, float, str]] = attrs.Factory(list)
    #: how often an adder's read found siblings to merge
    merges: int = 0
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def union_of(self, siblings: Sequence[Sibling]) -> bytes:
        """The union merge, counted."""
        with self.lock:
            self.merges += 1
        return union_of(siblings)


def add_items(
    nodes: Sequence[str], adder: str, carts: Sequence[str], adds: Adds, stop: threading.Event
) -> None:
    """Add items ``<adder>-<n>`` to the carts in turn until ``stop`` (at most
    ``ADDS_PER_ADDER``) with a client of its own; each add is recorded as acknowledged (the
    update returned) or failed (it raised: the item may or may not have been stored)."""
    with Client(nodes) as client:
        for index in range(ADDS_PER_ADDER):
            if stop.is_set():
                return
            cart, item = carts[index % len(carts)], f"{adder}-{index:05d}"
            began = time.monotonic()
            try:
                client.update(cart, adding(item), merge=adds.union_of, idempotent=True)
            except KaiError as exc:
                with adds.lock:
                    adds.failed.append((cart, item, time.monotonic(), type(exc).__name__))
                continue
            with adds.lock:
                adds.acknowledged.append((cart, item, time.monotonic(), began))


def write_on_minority_side(
    host: str, writer: int, carts: Sequence[str], adds: Adds, stop: threading.Event
) -> None:
    """Write one-item carts ``m<writer>-<n>`` to node ``host`` alone, in the empty context
    (a sibling of whatever the cart holds: the minority side cannot read with R=2), until
    ``stop`` (at most ``MINORITY_WRITES``). An ``HD`` is an acknowledged add; a
    ``SERVER_ERROR`` is recorded as a failed add that node 3 stored."""
    with RawConnection(PORT, host=host, timeout=IO_TIMEOUT) as connection:
        for index in range(MINORITY_WRITES):
            if stop.is_set():
                return
            cart, item = carts[index % len(carts)], f"m{writer}-{index:05d}"
            request = WriteInContext(wire_key(cart), encode_cart({item}), EMPTY_CONTEXT)
            sent = time.monotonic()
            try:
                reply = connection.request(request.encode())
            except OSError as exc:  # TimeoutError included
                reply = repr(exc).encode()
            with adds.lock:
                if reply.startswith(b"HD"):
                    adds.acknowledged.append((cart, item, time.monotonic(), sent))
                elif reply.startswith(b"SERVER_ERROR"):
                    adds.failed.append((cart, item, time.monotonic(), STORED_BY_NODE_3))
                else:
                    adds.failed.append((cart, item, time.monotonic(), f"unexpected {reply!r}"))
                    return


def carts_by_first_primary(ring: Ring, cut_off: NodeId) -> dict[str, list[str]]:
    """``CARTS_PER_SIDE`` cart keys whose first primary (where the client sends them) is
    ``cut_off``, and as many whose first primary is another node."""
    sides: dict[str, list[str]] = {"cut-node": [], "majority": []}
    for number in range(1000):
        key = f"cart:{number}"
        first = ring.primaries_of(key.encode(), 3)[0]
        side = sides["cut-node" if first == cut_off else "majority"]
        if len(side) < CARTS_PER_SIDE:
            side.append(key)
        if all(len(carts) == CARTS_PER_SIDE for carts in sides.values()):
            return sides
    raise AssertionError(f"no carts for both sides among 1000 keys on {ring}")


def missing_items(
    added: Sequence[tuple[str, str]], carts: dict[str, frozenset[str]]
) -> list[tuple[str, str]]:
    """The (cart, item) adds whose item is not in the cart as read."""
    return sorted((cart, item) for cart, item in added if item not in carts.get(cart, ()))


def test_no_acknowledged_add_is_lost_across_a_partition(
    lab: NetnsLab, cluster: NetnsCluster
) -> None:
    started = time.monotonic()
    cut_off = NodeId.parse(f"{lab.addresses[2]}:{RPC_PORT}")
    sides = carts_by_first_primary(cluster.ring(), cut_off)
    side_of = {cart: side for side, carts in sides.items() for cart in carts}
    adds = Adds()
    stop = threading.Event()
    minority_stop = threading.Event()
    threads = [
        threading.Thread(
            target=add_items,
            args=(cluster.memcached_addresses, f"{side}{number}", carts, adds, stop),
        )
        for side, carts in sides.items()
        for number in range(ADDERS_PER_SIDE)
    ]
    try:
        for thread in threads:
            thread.start()
        stop.wait(BEFORE_SECONDS)  # the adders run meanwhile
        lab.isolate(2)
        cut = time.monotonic()
        minority = [
            threading.Thread(
                target=write_on_minority_side,
                args=(lab.addresses[2], number, list(side_of), adds, minority_stop),
            )
            for number in range(MINORITY_WRITERS)
        ]
        threads += minority
        for thread in minority:
            thread.start()
        stop.wait(PARTITION_SECONDS)  # the partition's length: the adders run meanwhile
        minority_stop.set()
        for thread in minority:
            thread.join(timeout=30)
        lab.heal()
        healed = time.monotonic()
        stop.wait(AFTER_SECONDS)
    finally:
        stop.set()
        minority_stop.set()
        lab.heal()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a writer did not stop"
    stopped = time.monotonic()

    def phase(at: float) -> str:
        return "before" if at < cut else "during" if at < healed else "after"

    acknowledged = Counter((phase(at), side_of[cart]) for cart, _, at, _ in adds.acknowledged)
    failed = Counter((phase(at), error) for _, _, at, error in adds.failed)
    slowest: dict[tuple[str, str], float] = {}
    for cart, _, at, began in adds.acknowledged:
        key = (phase(at), side_of[cart])
        slowest[key] = max(slowest.get(key, 0.0), at - began)
    logger.info(
        "cut %.1f s; acknowledged adds (phase, carts): %s; the slowest of each (s): %s; "
        "failed adds: %s",
        healed - cut,
        dict(acknowledged),
        {key: round(seconds, 2) for key, seconds in slowest.items()},
        dict(failed),
    )
    unexpected = [entry for entry in adds.failed if entry[3].startswith("unexpected")]
    assert not unexpected, f"a write to node 3 got an unexpected reply: {unexpected[:5]}"
    stored_by_node_3 = [
        (cart, item) for cart, item, _, error in adds.failed if error == STORED_BY_NODE_3
    ]
    assert stored_by_node_3, f"node 3 stored no write during the cut: {failed}"
    assert adds.merges, "no add ever found siblings: nothing raced"
    for side in sides:
        for when in ("before", "during", "after"):
            assert acknowledged[when, side] >= MIN_ADDS_PER_PHASE, (
                f"too few adds to {side} carts acknowledged {when} the cut: {acknowledged}"
            )

    # Converged: each cart's record is the same on all three replicas (read one by one).
    keys = [cart.encode() for cart in side_of]

    def converged() -> bool:
        records = [cluster.replica(index, keys) for index in range(3)]
        return None not in records[0] and records[0] == records[1] == records[2]

    wait_for(converged, timeout=CONVERGENCE_TIMEOUT, what="every replica to agree")
    took = time.monotonic() - stopped

    with Client(cluster.memcached_addresses) as client:
        read = {cart: decode_cart(union_of(client.get(cart).siblings)) for cart in side_of}
    added = [(cart, item) for cart, item, _, _ in adds.acknowledged]
    lost = missing_items(added, read)
    assert not lost, f"{len(lost)} of {len(added)} acknowledged adds lost: {lost[:20]}"
    # The check above would see a lost item: one acknowledged add taken out of its cart.
    cart, item = added[-1]
    assert missing_items(added, {**read, cart: read[cart] - {item}}) == [(cart, item)]
    # What node 3 stored while it was cut off is kept too: the union merges its siblings.
    dropped = missing_items(stored_by_node_3, read)
    assert not dropped, f"{len(dropped)} writes node 3 stored during the cut lost: {dropped[:20]}"
    logger.info(
        "%d acknowledged adds and %d writes node 3 stored all present; %d other failed adds; "
        "%d merges of siblings; replicas agreed %.2f s after the writers stopped; the test "
        "took %.1f s",
        len(added),
        len(stored_by_node_3),
        len(adds.failed) - len(stored_by_node_3),
        adds.merges,
        took,
        time.monotonic() - started,
    )

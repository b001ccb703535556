"""kai.client's call plans against a fake cluster: routing, failover, retries, ``update``.

The plans are pure, so they are driven here by :class:`FakeCluster`, an in-memory stand-in
for three nodes: it reads each request with a Kai node's own parser, keeps siblings and
causal contexts as docs/dynamo-api.md describes (a write supersedes exactly the versions its
context covers), answers in the doc's bytes, and fails on command (refuse a connection,
hang until the deadline, lose the connection or miss the quorum after a write landed). Time
is virtual: the fake's clock moves only when a request hangs or the plan backs off.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Sequence
from typing import Literal

import attrs
import pytest

from kai.client.calls import (
    Backoff,
    CallPlans,
    Effect,
    Exchange,
    Plan,
    drive,
    may_try_elsewhere,
    worth_another_cycle,
)
from kai.client.errors import (
    ClientError,
    ConnectionFailed,
    ConnectionLost,
    KaiError,
    ServerError,
    Timeout,
)
from kai.client.framing import NEED_DATA, Reply, ReplyParser
from kai.client.liveness import idle_connection_is_usable
from kai.client.protocol import EMPTY_CONTEXT, DeleteInContext, ReadSiblings, wire_key
from kai.client.records import Address, Context, Fetched, Sibling
from kai.client.routing import RING_RETRY_AFTER, Router
from kai.core.memcache import replies
from kai.core.memcache.meta import MetaDelete, MetaGet, MetaSet
from kai.core.memcache.protocol import MemcacheParser
from kai.core.memcache.requests import Stats
from kai.core.ring import NodeId, Ring

Behaviour = Literal["answer", "refuse", "hang", "lose after write", "miss quorum", "no ring"]
TIMEOUT = 1.0
NODES = tuple(NodeId("127.0.0.1", 7001 + index) for index in range(3))
ADDRESSES = tuple(Address("127.0.0.1", 11001 + index) for index in range(3))
BY_ADDRESS = dict(zip(ADDRESSES, NODES, strict=True))
RING = Ring(NODES, buckets=64, virtual_nodes=16)


@attrs.define
class Version:
    number: int
    value: bytes | None  # None: a tombstone
    flags: int = 0


def token_of(numbers: Sequence[int]) -> bytes:
    return b"V" + b"_".join(b"%d" % number for number in sorted(numbers)) if numbers else b"AZA"


def numbers_of(token: bytes) -> set[int]:
    if token == b"AZA":
        return set()
    assert token.startswith(b"V"), token
    return {int(part) for part in token[1:].split(b"_")}


@attrs.define
class FakeCluster:
    """Three nodes sharing one store of versions; each node fails as it is told to."""

    clock: float = 0.0
    versions: dict[bytes, list[Version]] = attrs.Factory(dict)
    next_number: int = 1
    #: What each node does with its next requests (then ``usual``).
    scripts: dict[Address, list[Behaviour]] = attrs.Factory(dict)
    usual: dict[Address, Behaviour] = attrs.Factory(dict)
    #: (node, first line of the request) for each exchange; ("backoff", seconds) for waits.
    log: list[tuple[str, str]] = attrs.Factory(list)
    #: The nodes ``stats kai_ring`` lists, by memcached address.
    members: dict[Address, NodeId] = attrs.Factory(lambda: dict(BY_ADDRESS))

    def behaviour(self, address: Address) -> Behaviour:
        script = self.scripts.get(address)
        return script.pop(0) if script else self.usual.get(address, "answer")

    def perform(self, effect: Effect) -> object:
        if isinstance(effect, Backoff):
            self.log.append(("backoff", f"{effect.seconds:.6f}"))
            self.clock += effect.seconds
            return None
        assert isinstance(effect, Exchange)
        assert self.clock < effect.deadline, "a request sent after its deadline"
        self.log.append((str(effect.address), effect.request.split(b"\r\n")[0].decode()))
        behaviour = self.behaviour(effect.address)
        if behaviour == "refuse":
            raise ConnectionFailed(f"could not connect to {effect.address}")
        if behaviour == "hang":
            self.clock = effect.deadline
            raise Timeout(f"{effect.address} did not answer", sent=True)
        reply = self.answer(effect.request, behaviour)
        if behaviour == "lose after write":
            raise ConnectionLost(f"{effect.address} closed the connection")
        if behaviour == "miss quorum":
            reply = b"SERVER_ERROR timeout\r\n"
        return parse_one(reply)

    def answer(self, request: bytes, behaviour: Behaviour) -> bytes:
        parser = MemcacheParser()
        parser.receive_data(request)
        return self.answer_event(parser.next_event(), behaviour)

    def answer_event(self, event: object, behaviour: Behaviour = "answer") -> bytes:
        """The reply to one request as a node's parser read it."""
        if isinstance(event, Stats):
            if behaviour == "no ring":
                return b"ERROR\r\n"
            return replies.encode_stats(ring_fields(self.members))
        if isinstance(event, MetaGet):
            assert event.with_context
            versions = self.versions.get(event.key, [])
            block = b"".join(
                b"VA %d f%d t-1\r\n%b\r\n" % (len(version.value), version.flags, version.value)
                for version in reversed(versions)
                if version.value is not None
            )
            token = token_of([version.number for version in versions])
            return b"VA %d K%b\r\n%b\r\n" % (len(block), token, block)
        assert isinstance(event, MetaSet | MetaDelete), event
        assert event.context is not None
        if event.context == b"bogus":
            return b"CLIENT_ERROR bad causal context\r\n"
        covered = numbers_of(event.context)
        number, self.next_number = self.next_number, self.next_number + 1
        value = event.value if isinstance(event, MetaSet) else None
        flags = event.flags if isinstance(event, MetaSet) else 0
        kept = [v for v in self.versions.get(event.key, []) if v.number not in covered]
        self.versions[event.key] = [*kept, Version(number, value, flags)]
        return b"HD K%b\r\n" % token_of([number])

    def sent(self) -> list[str]:
        """The requests' commands, in order (``stats`` for ring reads)."""
        return [line.split(" ")[0] for node, line in self.log if node != "backoff"]


def ring_fields(members: dict[Address, NodeId]) -> list[tuple[str, object]]:
    fields: list[tuple[str, object]] = [
        ("ring", "abc"),
        ("buckets", 64),
        ("virtual_nodes", 16),
        ("replicas", min(3, len(members))),
    ]
    return fields + [("node", f"{node} {address}") for address, node in members.items()]


def parse_one(data: bytes) -> Reply:
    parser = ReplyParser()
    parser.receive_data(data)
    reply = parser.next_reply()
    assert reply is not NEED_DATA
    assert not isinstance(reply, type)
    return reply


def primaries(key: bytes) -> list[Address]:
    by_node = {node: address for address, node in BY_ADDRESS.items()}
    return [by_node[node] for node in RING.primaries_of(key, 3)]


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


def plans_of(cluster: FakeCluster, *, seed: int = 7, seeds: Sequence[Address] = ADDRESSES[:1]):
    router = Router(seeds, refresh_interval=10.0)
    return CallPlans(router, timeout=TIMEOUT, clock=lambda: cluster.clock, rng=random.Random(seed))


def run(cluster: FakeCluster, plan: Plan[object]) -> object:
    return drive(plan, cluster.perform)


# --- reads and writes -------------------------------------------------------------------------


def test_a_write_in_the_context_of_a_read_supersedes_what_it_saw(cluster: FakeCluster) -> None:
    plans = plans_of(cluster)
    first = run(cluster, plans.get("k"))
    assert first == Fetched((), Context(b"AZA"))
    assert isinstance(first, Fetched)
    written = run(cluster, plans.put("k", b"one", context=first.context, flags=3, ttl=0))
    assert written == Context(b"V1")
    read = run(cluster, plans.get("k"))
    assert isinstance(read, Fetched)
    assert read.siblings == (Sibling(b"one", 3, None),)
    run(cluster, plans.put("k", b"two", context=read.context, flags=0, ttl=0))
    again = run(cluster, plans.get("k"))
    assert isinstance(again, Fetched)
    assert again.values == (b"two",)
    run(cluster, plans.delete("k", context=again.context))
    gone = run(cluster, plans.get("k"))
    assert isinstance(gone, Fetched)
    assert gone.siblings == ()
    assert gone.context == Context(b"V3")  # the tombstone is covered: a write supersedes it


def test_a_write_without_a_context_becomes_a_sibling(cluster: FakeCluster) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.put("k", b"a", context=None, flags=0, ttl=0))
    run(cluster, plans.put("k", b"b", context=None, flags=0, ttl=0))
    read = run(cluster, plans.get("k"))
    assert isinstance(read, Fetched)
    assert read.values == (b"b", b"a")


def test_the_first_call_reads_the_ring_from_a_seed_then_goes_to_a_primary(
    cluster: FakeCluster,
) -> None:
    plans = plans_of(cluster, seeds=[ADDRESSES[2]])
    run(cluster, plans.get(b"user:1"))
    run(cluster, plans.put(b"user:2", b"v", context=None, flags=0, ttl=0))
    assert cluster.log == [
        (str(ADDRESSES[2]), "stats kai_ring"),
        (str(primaries(b"user:1")[0]), "mg user:1 K"),
        (str(primaries(b"user:2")[0]), "ms user:2 1 KAZA"),
    ]


def test_the_ring_is_read_again_every_refresh_interval(cluster: FakeCluster) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.get("k"))
    cluster.clock = 9.9
    run(cluster, plans.get("k"))
    cluster.clock = 10.0
    run(cluster, plans.get("k"))
    assert cluster.sent() == ["stats", "mg", "mg", "stats", "mg"]


def test_without_a_ring_requests_go_to_the_seeds(cluster: FakeCluster) -> None:
    cluster.usual = dict.fromkeys(ADDRESSES, "no ring")
    plans = plans_of(cluster, seeds=[ADDRESSES[1]])
    run(cluster, plans.get("k"))
    run(cluster, plans.get("k"))
    cluster.clock = RING_RETRY_AFTER
    run(cluster, plans.get("k"))
    assert cluster.log == [
        (str(ADDRESSES[1]), "stats kai_ring"),
        (str(ADDRESSES[1]), "mg k K"),
        (str(ADDRESSES[1]), "mg k K"),
        (str(ADDRESSES[1]), "stats kai_ring"),
        (str(ADDRESSES[1]), "mg k K"),
    ]


# --- failover ---------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["refuse", "lose after write", "miss quorum"])
def test_a_read_goes_on_to_the_next_primary_after_any_transient_error(
    cluster: FakeCluster, failure: Behaviour
) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.put("k", b"v", context=None, flags=0, ttl=0))
    first, second, _ = primaries(b"k")
    cluster.scripts[first] = [failure]
    cluster.log.clear()
    read = run(cluster, plans.get("k"))
    assert isinstance(read, Fetched)
    assert read.values == (b"v",)
    assert cluster.log == [(str(first), "mg k K"), (str(second), "mg k K")]


def test_a_node_that_failed_is_tried_last_and_the_ring_is_read_again(cluster: FakeCluster) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.get("warm-up"))
    first, second, _ = primaries(b"k")
    cluster.usual[first] = "refuse"
    run(cluster, plans.get("k"))
    cluster.log.clear()
    run(cluster, plans.get("k"))
    # The ring is read (not from the failed node), then the request skips the failed node.
    assert cluster.log[-1] == (str(second), "mg k K")
    assert [line for node, line in cluster.log[:-1]] == ["stats kai_ring"]
    assert cluster.log[0][0] != str(first)


def test_a_write_goes_to_another_node_only_when_it_certainly_did_not_take_effect(
    cluster: FakeCluster,
) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.get("warm-up"))
    first, second, _ = primaries(b"k")
    cluster.scripts[first] = ["refuse"]
    run(cluster, plans.put("k", b"v", context=None, flags=0, ttl=0))
    assert cluster.log[-2:] == [(str(first), "ms k 1 KAZA"), (str(second), "ms k 1 KAZA")]


@pytest.mark.parametrize(
    ("failure", "error"),
    [("hang", Timeout), ("lose after write", ConnectionLost), ("miss quorum", ServerError)],
)
def test_a_write_whose_outcome_is_unknown_is_not_sent_again(
    cluster: FakeCluster, failure: Behaviour, error: type[Exception]
) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.get("warm-up"))
    first = primaries(b"k")[0]
    cluster.scripts[first] = [failure]
    cluster.log.clear()
    with pytest.raises(error) as raised:
        run(cluster, plans.put("k", b"v", context=None, flags=0, ttl=0))
    assert raised.value.outcome_unknown  # type: ignore[attr-defined]
    assert not raised.value.retryable  # type: ignore[attr-defined]
    assert cluster.log == [(str(first), "ms k 1 KAZA")]


def test_when_every_node_refuses_the_error_is_retryable(cluster: FakeCluster) -> None:
    plans = plans_of(cluster, seeds=list(ADDRESSES))
    cluster.usual = dict.fromkeys(ADDRESSES, "refuse")
    with pytest.raises(ConnectionFailed) as raised:
        run(cluster, plans.put("k", b"v", context=None, flags=0, ttl=0))
    assert raised.value.retryable
    assert cluster.sent() == ["stats"] * 3 + ["ms"] * 3


def test_a_read_that_fails_everywhere_reports_the_error_of_a_node_that_answered(
    cluster: FakeCluster,
) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.get("warm-up"))
    first, second, third = primaries(b"k")
    cluster.usual = {first: "miss quorum", second: "refuse", third: "refuse"}
    with pytest.raises(ServerError, match="SERVER_ERROR timeout"):
        run(cluster, plans.get("k"))
    assert [node for node, _ in cluster.log[-3:]] == [str(first), str(second), str(third)]


def test_a_refusal_is_final_even_for_a_read(cluster: FakeCluster) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.get("warm-up"))
    cluster.log.clear()
    with pytest.raises(ClientError, match="bad causal context"):
        run(cluster, plans.delete("k", context=Context(b"bogus")))
    assert len(cluster.log) == 1


def test_the_timeout_bounds_the_whole_request(cluster: FakeCluster) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.get("warm-up"))
    cluster.usual = dict.fromkeys(ADDRESSES, "hang")
    cluster.log.clear()
    started = cluster.clock
    with pytest.raises(Timeout):
        run(cluster, plans.get("k"))
    assert cluster.clock == started + TIMEOUT
    assert len(cluster.log) == 1  # no time was left for another node


def test_a_ring_read_that_takes_the_whole_timeout_leaves_the_request_unsent(
    cluster: FakeCluster,
) -> None:
    plans = plans_of(cluster)
    cluster.scripts[ADDRESSES[0]] = ["hang"]
    with pytest.raises(Timeout, match="not sent") as raised:
        run(cluster, plans.get("k"))
    assert raised.value.retryable
    assert cluster.sent() == ["stats"]


# --- update -----------------------------------------------------------------------------------


def union(siblings: Sequence[Sibling]) -> bytes:
    items: set[bytes] = set()
    for sibling in siblings:
        items |= set(sibling.value.split(b","))
    return b",".join(sorted(items - {b""}))


def adding(item: bytes) -> Callable[[bytes | None], bytes]:
    return lambda current: union([Sibling(current or b""), Sibling(item)])


def test_update_merges_siblings_and_writes_one_value_in_the_reads_context(
    cluster: FakeCluster,
) -> None:
    plans = plans_of(cluster)
    seen: list[bytes | None] = []

    def change(current: bytes | None) -> bytes:
        seen.append(current)
        return adding(b"c")(current)

    run(cluster, plans.put("cart", b"a", context=None, flags=0, ttl=0))
    run(cluster, plans.put("cart", b"b", context=None, flags=0, ttl=0))
    written = run(
        cluster,
        plans.update(
            "cart", change, merge=union, attempts=3, backoff=0.05, idempotent=False, flags=0, ttl=0
        ),
    )
    assert written == b"a,b,c"
    assert seen == [b"a,b"]
    read = run(cluster, plans.get("cart"))
    assert isinstance(read, Fetched)
    assert read.values == (b"a,b,c",)


def test_update_of_a_key_with_no_value_hands_none_and_of_one_sibling_its_value(
    cluster: FakeCluster,
) -> None:
    plans = plans_of(cluster)
    seen: list[bytes | None] = []

    def change(current: bytes | None) -> bytes:
        seen.append(current)
        return (current or b"") + b"+"

    def never(siblings: Sequence[Sibling]) -> bytes:
        raise AssertionError("merge is for two siblings or more")

    for _ in range(2):
        run(
            cluster,
            plans.update(
                "k", change, merge=never, attempts=1, backoff=0, idempotent=False, flags=5, ttl=0
            ),
        )
    assert seen == [None, b"+"]
    read = run(cluster, plans.get("k"))
    assert isinstance(read, Fetched)
    assert read.siblings == (Sibling(b"++", 5, None),)


def expected_backoffs(seed: int, base: float, count: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        ("backoff", f"{base * 2**attempt * rng.uniform(0.5, 1.0):.6f}") for attempt in range(count)
    ]


def test_update_runs_the_cycle_again_after_a_retryable_error_with_backoff_and_jitter(
    cluster: FakeCluster,
) -> None:
    plans = plans_of(cluster, seeds=list(ADDRESSES), seed=99)
    run(cluster, plans.get("warm-up"))
    cluster.usual = dict.fromkeys(ADDRESSES, "refuse")
    cluster.log.clear()
    with pytest.raises(ConnectionFailed):
        run(
            cluster,
            plans.update(
                "k", adding(b"x"), merge=union, attempts=3, backoff=0.1, idempotent=False,
                flags=0, ttl=0,
            ),
        )  # fmt: skip
    assert [entry for entry in cluster.log if entry[0] == "backoff"] == expected_backoffs(
        99, 0.1, 2
    )
    cluster.usual = {}
    written = run(
        cluster,
        plans.update(
            "k", adding(b"x"), merge=union, attempts=3, backoff=0.1, idempotent=False,
            flags=0, ttl=0,
        ),
    )  # fmt: skip
    assert written == b"x"


def test_update_does_not_write_twice_when_a_write_may_have_landed_unless_idempotent(
    cluster: FakeCluster,
) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.get("warm-up"))
    first = primaries(b"k")[0]
    cluster.scripts[first] = ["answer", "miss quorum"]  # the read, then the write
    with pytest.raises(ServerError):
        run(
            cluster,
            plans.update(
                "k", adding(b"x"), merge=union, attempts=3, backoff=0.05, idempotent=False,
                flags=0, ttl=0,
            ),
        )  # fmt: skip
    assert cluster.sent()[-2:] == ["mg", "ms"]
    cluster.scripts[first] = ["answer", "lose after write"]
    written = run(
        cluster,
        plans.update(
            "k", adding(b"y"), merge=union, attempts=3, backoff=0.05, idempotent=True,
            flags=0, ttl=0,
        ),
    )  # fmt: skip
    assert written == b"x,y"  # the second cycle read the first one's write
    assert cluster.sent()[-5:] == ["mg", "ms", "stats", "mg", "ms"]


def test_update_reads_again_after_a_failed_read_even_when_not_idempotent(
    cluster: FakeCluster,
) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.get("warm-up"))
    cluster.scripts = {address: ["miss quorum"] for address in ADDRESSES}
    cluster.log.clear()
    written = run(
        cluster,
        plans.update(
            "k", adding(b"x"), merge=union, attempts=2, backoff=0, idempotent=False,
            flags=0, ttl=0,
        ),
    )  # fmt: skip
    assert written == b"x"
    first = str(primaries(b"k")[0])
    assert [line for _, line in cluster.log] == ["mg k K"] * 3 + [
        "0.000000",
        "mg k K",
        "ms k 1 KAZA",
    ]
    assert cluster.log[-1][0] == first


def test_a_merge_that_returns_no_bytes_is_a_type_error(cluster: FakeCluster) -> None:
    plans = plans_of(cluster)
    run(cluster, plans.put("k", b"a", context=None, flags=0, ttl=0))
    run(cluster, plans.put("k", b"b", context=None, flags=0, ttl=0))
    update = plans.update(
        "k", adding(b"x"), merge=lambda siblings: "text",
        attempts=3, backoff=0, idempotent=True, flags=0, ttl=0,
    )  # fmt: skip
    with pytest.raises(TypeError, match="merge must return bytes"):
        run(cluster, update)


@pytest.mark.parametrize(
    ("error", "read", "write", "idempotent_write"),
    [
        (ConnectionFailed("x"), True, True, True),
        (Timeout("x", sent=False), True, True, True),
        (Timeout("x", sent=True), True, False, True),
        (ConnectionLost("x"), True, False, True),
        (ServerError("x", reply_text="timeout"), True, False, True),
        (ClientError("x"), False, False, False),
    ],
)
def test_which_errors_are_worth_trying_again(
    error: KaiError, read: bool, write: bool, idempotent_write: bool
) -> None:
    assert may_try_elsewhere(ReadSiblings(wire_key("k")), error) is read
    assert may_try_elsewhere(DeleteInContext(wire_key("k"), EMPTY_CONTEXT), error) is write
    assert worth_another_cycle(error, writing=False, idempotent=False) is read
    assert worth_another_cycle(error, writing=True, idempotent=False) is write
    assert worth_another_cycle(error, writing=True, idempotent=True) is idempotent_write


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"attempts": 0}, ValueError),
        ({"attempts": True}, ValueError),
        ({"backoff": -1.0}, ValueError),
        ({"flags": -1}, ClientError),
        ({"ttl": -1}, ClientError),
    ],
)
def test_update_refuses_bad_settings_before_sending_anything(
    cluster: FakeCluster, settings: dict[str, object], error: type[Exception]
) -> None:
    plans = plans_of(cluster)
    arguments: dict[str, object] = {
        "attempts": 3,
        "backoff": 0.05,
        "idempotent": False,
        "flags": 0,
        "ttl": 0,
    }
    with pytest.raises(error):
        plans.update("k", adding(b"x"), merge=union, **{**arguments, **settings})
    assert cluster.log == []


# --- the driver and the shells' helper ---------------------------------------------------------


def test_an_exception_that_is_no_kai_error_ends_the_plan(cluster: FakeCluster) -> None:
    plans = plans_of(cluster)

    def broken(effect: Effect) -> object:
        raise RuntimeError("a bug in a shell")

    with pytest.raises(RuntimeError, match="a bug in a shell"):
        drive(plans.get("k"), broken)


def test_an_idle_connection_is_usable_until_its_peer_speaks_or_closes() -> None:
    for peer_does in ("sends", "closes"):
        mine, peer = socket.socketpair()
        with mine, peer:
            assert idle_connection_is_usable(mine.fileno())
            if peer_does == "sends":
                peer.sendall(b"HD\r\n")
            else:
                peer.close()
            assert not idle_connection_is_usable(mine.fileno())
    assert not idle_connection_is_usable(-1)

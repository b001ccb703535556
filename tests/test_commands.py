"""memcached semantics over the node's own coordinator, with an injected clock (no sockets).

The executor runs against the coordinator every node runs, here as a ring of one (a node of
one is a ring of one, as in Riak and the original Kai). A model of memcached's semantics
checks it on random request sequences.
"""

from __future__ import annotations

import random

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from kai.cluster.coordinator import Coordinator
from kai.core.config import Quorum
from kai.core.memcache import protocol
from kai.core.memcache.report import VERSION_REPLY, NodeInfo
from kai.core.pending import Pending
from kai.core.ring import NodeId, Ring
from kai.core.stats import NodeStats
from kai.core.updates import parse_counter
from kai.core.vclock import VClock
from kai.core.versions import Version
from kai.memcache.commands import CommandExecutor
from kai.memcache.dynamo import DynamoCommands
from kai.storage.memory import MemoryEngine
from kai.storage.replica import LocalReplica
from kai.testing.memcache import execute_raw
from kai.testing.network import FakeNetwork

NOW = 1_700_000_000.0
NODE = NodeId("127.0.0.1", 11011)


@attrs.define
class FakeClock:
    now: float = NOW

    def __call__(self) -> float:
        return self.now


@attrs.define
class Harness:
    executor: CommandExecutor
    replica: LocalReplica
    stats: NodeStats
    clock: FakeClock

    async def send(self, raw: bytes) -> bytes:
        """Parse ``raw`` (one or more commands) and return the concatenated replies."""
        return await execute_raw(self.executor, raw, max_item_size=1024)


def make_harness(
    nursery: trio.Nursery,
    *,
    all_siblings: bool = False,
    siblings_maximum: int = 100,
    members: tuple[NodeId, ...] = (NODE,),
) -> Harness:
    """An executor over a node's coordinator; ``members`` beyond this node never answer."""
    clock = FakeClock()
    stats = NodeStats()
    replica = LocalReplica(
        MemoryEngine(),
        actor=b"actor-1",
        buckets=1024,
        stats=stats,
        siblings_maximum=siblings_maximum,
        siblings_warning_threshold=min(25, siblings_maximum),
        wall_clock=clock,
        tombstone_grace=2e9,  # tests apply versions stamped near 1970: refuse none
    )
    network = FakeNetwork(random.Random(0), nursery=nursery)
    ring = Ring(members, buckets=1024, virtual_nodes=128)
    coordinator = Coordinator(
        self_node=NODE,
        replica=replica,
        transport=network.transport_for(NODE),
        ring=lambda: ring,
        quorum=Quorum(3, 2, 2),
        background=nursery,
        request_timeout=1.0,
    )
    info = NodeInfo(
        node="127.0.0.1:11011",
        quorum="1,1,1",
        buckets=1024,
        virtual_nodes=128,
        store="memory",
        max_connections=1024,
        max_item_size=1024,
        settings={"seeds": [], "sync_writes": False, "store": "memory"},
        started_at=NOW - 5,
    )
    executor = CommandExecutor(
        coordinator,
        stats,
        info,
        item_counts=lambda: (replica.items, replica.item_bytes),
        all_siblings=all_siblings,
        wall_clock=clock,
        extension=DynamoCommands(coordinator, stats, wall_clock=clock).execute,
    )
    return Harness(executor, replica, stats, clock)


@pytest.fixture
def h(nursery: trio.Nursery) -> Harness:
    return make_harness(nursery)


async def test_set_get_with_flags(h: Harness) -> None:
    assert await h.send(b"set k 4294967295 0 3\r\nabc\r\n") == b"STORED\r\n"
    assert await h.send(b"get k missing\r\n") == b"VALUE k 4294967295 3\r\nabc\r\nEND\r\n"
    assert (h.stats.get_hits, h.stats.get_misses, h.stats.cmd_get) == (1, 1, 2)


async def test_add_and_replace(h: Harness) -> None:
    assert await h.send(b"replace k 0 0 1\r\na\r\n") == b"NOT_STORED\r\n"
    assert await h.send(b"add k 0 0 1\r\na\r\n") == b"STORED\r\n"
    assert await h.send(b"add k 0 0 1\r\nb\r\n") == b"NOT_STORED\r\n"
    assert await h.send(b"replace k 0 0 1\r\nc\r\n") == b"STORED\r\n"
    assert await h.send(b"get k\r\n") == b"VALUE k 0 1\r\nc\r\nEND\r\n"


async def test_cas_conflicts(h: Harness) -> None:
    assert await h.send(b"cas k 0 0 1 1\r\na\r\n") == b"NOT_FOUND\r\n"
    await h.send(b"set k 0 0 1\r\na\r\n")
    token = int((await h.send(b"gets k\r\n")).split(b"\r\n")[0].split()[-1])
    await h.send(b"set k 0 0 1\r\nb\r\n")  # someone else writes
    assert await h.send(b"cas k 0 0 1 %d\r\nc\r\n" % token) == b"EXISTS\r\n"
    token = int((await h.send(b"gets k\r\n")).split(b"\r\n")[0].split()[-1])
    assert await h.send(b"cas k 0 0 1 %d\r\nc\r\n" % token) == b"STORED\r\n"
    assert await h.send(b"cas k 0 0 1 %d\r\nd\r\n" % token) == b"EXISTS\r\n"
    assert (h.stats.cas_hits, h.stats.cas_badval, h.stats.cas_misses) == (1, 2, 1)


async def test_append_prepend_keep_flags_and_expiry(h: Harness) -> None:
    assert await h.send(b"append k 0 0 1\r\nx\r\n") == b"NOT_STORED\r\n"
    await h.send(b"set k 7 100 5\r\nhello\r\n")
    assert await h.send(b"append k 9 0 6\r\n world\r\n") == b"STORED\r\n"
    assert await h.send(b"prepend k 9 0 1\r\n>\r\n") == b"STORED\r\n"
    assert await h.send(b"get k\r\n") == b"VALUE k 7 12\r\n>hello world\r\nEND\r\n"
    h.clock.now += 101
    assert await h.send(b"get k\r\n") == b"END\r\n"  # kept the original expiry


async def test_append_beyond_the_size_limit_is_refused(h: Harness) -> None:
    await h.send(b"set k 0 0 1000\r\n" + b"a" * 1000 + b"\r\n")
    reply = await h.send(b"append k 0 0 100\r\n" + b"b" * 100 + b"\r\n")
    assert reply == b"SERVER_ERROR out of memory storing object\r\n"


async def test_incr_wraps_and_decr_floors(h: Harness) -> None:
    assert await h.send(b"incr k 1\r\n") == b"NOT_FOUND\r\n"
    await h.send(b"set k 3 0 20\r\n18446744073709551615\r\n")
    assert await h.send(b"incr k 2\r\n") == b"1\r\n"
    assert await h.send(b"decr k 5\r\n") == b"0\r\n"
    await h.send(b"set k 0 0 2\r\n10\r\n")
    assert await h.send(b"decr k 1\r\n") == b"9\r\n"
    assert await h.send(b"get k\r\n") == b"VALUE k 0 1\r\n9\r\nEND\r\n"
    await h.send(b"set k 0 0 3\r\nabc\r\n")
    assert await h.send(b"incr k 1\r\n") == (
        b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    )


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (b"12", 12),
        (b" 12", 12),
        (b"12 ", 12),
        (b"", None),
        (b"-5", None),
        (b"12abc", None),
        (b"18446744073709551616", None),
        (b"18446744073709551615", 2**64 - 1),
    ],
)
def test_counter_parsing_follows_strtoull(stored: bytes, expected: int | None) -> None:
    assert parse_counter(stored) == expected


async def test_expiry_relative_absolute_negative(h: Harness) -> None:
    await h.send(b"set rel 0 10 1\r\na\r\n")
    await h.send(b"set abs 0 %d 1\r\nb\r\n" % int(NOW + 100))
    await h.send(b"set past 0 %d 1\r\nc\r\n" % int(NOW - 10))
    await h.send(b"set neg 0 -1 1\r\nd\r\n")
    assert await h.send(b"get rel abs past neg\r\n") == (
        b"VALUE rel 0 1\r\na\r\nVALUE abs 0 1\r\nb\r\nEND\r\n"
    )
    h.clock.now += 10
    assert await h.send(b"get rel abs\r\n") == b"VALUE abs 0 1\r\nb\r\nEND\r\n"
    assert h.stats.get_expired == 3  # past and neg, then rel


async def test_touch_and_gat(h: Harness) -> None:
    assert await h.send(b"touch k 10\r\n") == b"NOT_FOUND\r\n"
    await h.send(b"set k 0 10 1\r\na\r\n")
    assert await h.send(b"touch k 100\r\n") == b"TOUCHED\r\n"
    h.clock.now += 50
    assert await h.send(b"gat 0 k nokey\r\n") == b"VALUE k 0 1\r\na\r\nEND\r\n"
    h.clock.now += 1000
    assert await h.send(b"get k\r\n") == b"VALUE k 0 1\r\na\r\nEND\r\n"  # gat 0: never expires
    reply = await h.send(b"gats -1 k\r\n")
    assert reply.startswith(b"VALUE k 0 1 ")
    assert await h.send(b"get k\r\n") == b"END\r\n"
    assert h.stats.touch_hits == 3  # touch, gat, gats
    assert h.stats.touch_misses == 2  # touch on a missing key, gat of nokey


async def test_delete_writes_a_tombstone(h: Harness) -> None:
    assert await h.send(b"delete k\r\n") == b"NOT_FOUND\r\n"
    await h.send(b"set k 0 0 1\r\na\r\n")
    assert await h.send(b"delete k\r\n") == b"DELETED\r\n"
    assert await h.send(b"get k\r\n") == b"END\r\n"
    (tombstone,) = h.replica.read(b"k")
    assert tombstone.is_tombstone
    assert h.replica.items == 0


async def test_flush_all_now_and_delayed(h: Harness) -> None:
    await h.send(b"set a 0 0 1\r\n1\r\n")
    assert await h.send(b"flush_all\r\n") == b"OK\r\n"
    assert await h.send(b"get a\r\n") == b"END\r\n"
    h.clock.now += 1
    await h.send(b"set b 0 0 1\r\n2\r\n")
    assert await h.send(b"get b\r\n") == b"VALUE b 0 1\r\n2\r\nEND\r\n"  # written after the flush
    assert await h.send(b"flush_all 100\r\n") == b"OK\r\n"
    assert await h.send(b"get b\r\n") == b"VALUE b 0 1\r\n2\r\nEND\r\n"  # not yet
    h.clock.now += 100
    assert await h.send(b"get b\r\n") == b"END\r\n"
    assert h.stats.get_flushed >= 1
    assert await h.send(b"flush_all noreply\r\n") == b""


async def test_too_large_set_removes_the_old_value(h: Harness) -> None:
    await h.send(b"set k 0 0 1\r\na\r\n")
    reply = await h.send(b"set k 0 0 2000\r\n" + b"x" * 2000 + b"\r\nget k\r\n")
    assert reply == b"SERVER_ERROR object too large for cache\r\nEND\r\n"
    assert h.stats.store_too_large == 1


async def test_noreply_suppresses_every_reply(h: Harness) -> None:
    commands = (
        b"set k 0 0 1 noreply\r\na\r\nadd k 0 0 1 noreply\r\nb\r\n"
        b"replace k 0 0 1 noreply\r\n1\r\nincr k 5 noreply\r\ndecr k 1 noreply\r\n"
        b"append k 0 0 1 noreply\r\n0\r\ntouch k 0 noreply\r\ncas k 0 0 1 1 noreply\r\nx\r\n"
        b"delete nokey noreply\r\nincr k abc noreply\r\n"
    )
    assert await h.send(commands) == b""
    assert await h.send(b"get k\r\n") == b"VALUE k 0 2\r\n50\r\nEND\r\n"


async def test_concurrent_versions_view_and_resolution(nursery: trio.Nursery) -> None:
    h = make_harness(nursery, all_siblings=True)
    older = Version((b"x", 1), VClock(), int(NOW * 1e6), 1, 0, b"old")
    newer = Version((b"y", 1), VClock(), int(NOW * 1e6) + 5, 2, 0, b"new")
    assert h.replica.apply(b"k", (older, newer))
    reply = await h.send(b"gets k\r\n")
    lines = reply.split(b"\r\n")
    assert lines[0].startswith(b"VALUE k 2 3 ")
    assert lines[1] == b"new"
    assert lines[2].startswith(b"VALUE k 1 3 ")
    assert lines[3] == b"old"
    token = lines[0].split()[-1]
    assert lines[2].split()[-1] == token  # one cas for the whole sibling set
    assert h.stats.kai_unreconciled_get == 1
    assert await h.send(b"cas k 0 0 4 %s\r\nboth\r\n" % token) == b"STORED\r\n"
    assert [v.value for v in h.replica.read(b"k")] == [b"both"]


async def test_default_view_shows_the_newest_sibling(nursery: trio.Nursery) -> None:
    h = make_harness(nursery)
    older = Version((b"x", 1), VClock(), 10, 0, 0, b"old")
    newer = Version((b"y", 1), VClock(), 20, 0, 0, b"new")
    h.replica.apply(b"k", (older, newer))
    assert await h.send(b"get k\r\n") == b"VALUE k 0 3\r\nnew\r\nEND\r\n"


async def test_sibling_cap_refuses_the_write(nursery: trio.Nursery) -> None:
    h = make_harness(nursery, siblings_maximum=2)
    versions = tuple(Version((bytes([65 + i]), 1), VClock(), i, 0, 0, b"v") for i in range(2))
    h.replica.apply(b"k", versions)
    third = Version((b"Z", 1), VClock(), 9, 0, 0, b"v")
    with pytest.raises(Exception, match="siblings"):
        h.replica.apply(b"k", (third,))
    assert h.stats.kai_sibling_rejections == 1


async def test_unavailable_replicas_answer_server_error(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # Three members, and the other two are not there: W=2 can never be met.
    others = (NodeId("127.0.0.1", 11012), NodeId("127.0.0.1", 11013))
    h = make_harness(nursery, members=(NODE, *others))
    assert await h.send(b"set k 0 0 1\r\na\r\n") == b"SERVER_ERROR not enough replicas\r\n"
    assert await h.send(b"add k 0 0 1 noreply\r\na\r\n") == b""
    assert await h.send(b"get k\r\n") == b"SERVER_ERROR not enough replicas\r\n"
    assert h.stats.kai_quorum_failures == 3


async def test_stats_groups(h: Harness) -> None:
    await h.send(b"set k 0 0 1\r\na\r\nget k\r\n")
    general = await h.send(b"stats\r\n")
    fields = dict(line.split(b" ", 2)[1:] for line in general.split(b"\r\n")[:-2])
    assert fields[b"curr_items"] == b"1"
    assert fields[b"get_hits"] == b"1"
    assert fields[b"kai_curr_nodes"] == b"127.0.0.1:11011"
    assert fields[b"uptime"] == b"5"
    assert b"." in fields[b"rusage_user"]
    settings = await h.send(b"stats settings\r\n")
    assert b"STAT item_size_max 1024\r\n" in settings
    assert b"STAT kai_seeds -\r\n" in settings
    assert await h.send(b"stats reset\r\n") == b"RESET\r\n"
    assert h.stats.get_hits == 0
    assert await h.send(b"stats items\r\n") == b"END\r\n"
    assert await h.send(b"stats bogus\r\n") == b"ERROR\r\n"


# --- answering at once, and the model ---------------------------------------------------------

#: Requests over three keys (``c`` expires a second after each set of it).
MIX = [
    b"set a 0 0 1\r\nx\r\n",
    b"set b 5 0 3\r\nxyz\r\n",
    b"set a 1 0 2 noreply\r\nyy\r\n",
    b"set c 0 1 1\r\nz\r\n",
    b"set a 0 0 1\r\n7\r\n",
    b"get a\r\n",
    b"get c\r\n",
    b"get a b c\r\n",
    b"add c 0 0 1\r\nq\r\n",
    b"replace b 2 0 1\r\nr\r\n",
    b"append a 0 0 1\r\n1\r\n",
    b"prepend b 0 0 1\r\np\r\n",
    b"incr a 5\r\n",
    b"decr a 100\r\n",
    b"delete b\r\n",
    b"touch a 100\r\n",
    b"version\r\n",
    b"flush_all\r\n",
]


class MemcachedModel:
    """memcached's semantics for :data:`MIX`, as plainly as they can be written."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.items: dict[bytes, tuple[int, float, bytes]] = {}  # flags, expiry (0: never), value

    def _live(self, key: bytes) -> tuple[int, float, bytes] | None:
        item = self.items.get(key)
        if item is None or (item[1] and self.clock.now >= item[1]):
            return None
        return item

    def _expiry(self, exptime: int) -> float:
        # memcached's clock counts whole seconds.
        return int(self.clock.now) + exptime if exptime else 0

    def reply(self, request: protocol.Request | protocol.Invalid) -> bytes:
        now_live = self._live
        match request:
            case protocol.Get(keys=keys):
                parts = []
                for key in keys:
                    item = now_live(key)
                    if item is not None:
                        parts.append(
                            b"VALUE %s %d %d\r\n%s\r\n" % (key, item[0], len(item[2]), item[2])
                        )
                return b"".join(parts) + b"END\r\n"
            case protocol.Store(
                command=command, key=key, flags=flags, exptime=exptime, value=value
            ):
                live = now_live(key)
                if (command == "add" and live is not None) or (
                    command != "set" and command != "add" and live is None
                ):
                    reply = b"NOT_STORED\r\n"
                elif command in ("append", "prepend"):
                    assert live is not None
                    joined = live[2] + value if command == "append" else value + live[2]
                    self.items[key] = (live[0], live[1], joined)
                    reply = b"STORED\r\n"
                else:
                    self.items[key] = (flags, self._expiry(exptime), value)
                    reply = b"STORED\r\n"
                return b"" if request.noreply else reply
            case protocol.Arithmetic(key=key, delta=delta, incr=incr):
                live = now_live(key)
                if live is None:
                    return b"NOT_FOUND\r\n"
                number = parse_counter(live[2])
                if number is None:
                    return b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
                number = (number + delta) % 2**64 if incr else max(number - delta, 0)
                self.items[key] = (live[0], live[1], str(number).encode())
                return b"%d\r\n" % number
            case protocol.Delete(key=key):
                if now_live(key) is None:
                    return b"NOT_FOUND\r\n"
                del self.items[key]
                return b"DELETED\r\n"
            case protocol.Touch(key=key, exptime=exptime):
                live = now_live(key)
                if live is None:
                    return b"NOT_FOUND\r\n"
                self.items[key] = (live[0], self._expiry(exptime), live[2])
                return b"TOUCHED\r\n"
            case protocol.Version():
                return VERSION_REPLY
            case protocol.FlushAll():
                self.items.clear()
                return b"OK\r\n"
        raise AssertionError(f"the model does not know {request!r}")


def parse_one(raw: bytes) -> protocol.Request | protocol.Invalid:
    parser = protocol.MemcacheParser(max_item_size=1024)
    parser.receive_data(raw)
    event = parser.next_event()
    assert not isinstance(event, type)
    return event


#: What a node of one answers without waiting: gets, sets, version and flush_all. The
#: read-check-write commands take the key's lock, so they always hand back a pending step.
AT_ONCE = (protocol.Get, protocol.Version, protocol.FlushAll)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(MIX), st.integers(0, 2)), max_size=40))
def test_a_node_of_one_answers_as_memcached_does(steps: list[tuple[bytes, int]]) -> None:
    """The node's coordinator as a ring of one, against the model, on random sequences;
    the requests a node of one can answer at once are answered at once."""

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            h = make_harness(nursery)
            model = MemcachedModel(FakeClock())
            for raw, seconds in steps:
                h.clock.now += seconds
                model.clock.now = h.clock.now
                request = parse_one(raw)
                reply = h.executor.execute(request)
                at_once = isinstance(request, AT_ONCE) or (
                    isinstance(request, protocol.Store) and request.command == "set"
                )
                assert isinstance(reply, Pending) != at_once, raw
                if isinstance(reply, Pending):
                    reply = await reply
                assert reply == model.reply(request), raw
            nursery.cancel_scope.cancel()

    trio.run(run)


# --- item 4: key dump, item counts after flush_all, admin commands ---------------------------


async def test_cachedump_lists_this_nodes_live_keys(h: Harness) -> None:
    await h.send(b"set alpha 0 0 3\r\nabc\r\n")
    await h.send(b"set beta 0 100 5\r\nhello\r\n")
    await h.send(b"set gone 0 0 1\r\nx\r\n")
    await h.send(b"delete gone\r\n")
    await h.send(b"set brief 0 -1 1\r\nx\r\n")  # already expired
    reply = await h.send(b"stats cachedump 1 0\r\n")
    lines = reply.split(b"\r\n")
    assert lines[-2:] == [b"END", b""]
    assert sorted(lines[:-2]) == [
        b"ITEM alpha [3 b; 0 s]",
        b"ITEM beta [5 b; %d s]" % (int(h.clock.now) + 100),
    ]
    one = await h.send(b"stats cachedump 1 1\r\n")
    assert one.count(b"ITEM ") == 1
    assert one.endswith(b"\r\nEND\r\n")
    # memcdump asks every class 0..63: only class 1 holds Kai's items.
    assert await h.send(b"stats cachedump 0 0\r\n") == b"END\r\n"
    assert await h.send(b"stats cachedump 63 0\r\n") == b"END\r\n"
    assert await h.send(b"stats cachedump 64 0\r\n") == b"CLIENT_ERROR Illegal slab id\r\n"
    assert await h.send(b"stats cachedump 1\r\n") == b"CLIENT_ERROR bad command line\r\n"
    assert await h.send(b"stats cachedump x 0\r\n") == b"CLIENT_ERROR bad command line format\r\n"
    assert await h.send(b"stats cachedump 1 -1\r\n") == (
        b"CLIENT_ERROR bad command line format\r\n"
    )
    assert await h.send(b"flush_all\r\n") == b"OK\r\n"
    assert await h.send(b"stats cachedump 1 0\r\n") == b"END\r\n"


async def test_cachedump_scans_past_a_chunk(h: Harness) -> None:
    count = CommandExecutor.CACHEDUMP_CHUNK * 3
    for index in range(count):
        await h.send(b"set k%d 0 0 1\r\nx\r\n" % index)
    reply = await h.send(b"stats cachedump 1 0\r\n")
    assert reply.count(b"ITEM ") == count


async def test_item_counts_drop_when_a_flush_takes_effect(h: Harness) -> None:
    await h.send(b"set a 0 0 3\r\nabc\r\n")
    await h.send(b"set b 0 0 2\r\nxy\r\n")
    assert (h.replica.items, h.replica.item_bytes) == (2, 5)
    assert await h.send(b"flush_all\r\n") == b"OK\r\n"
    assert (h.replica.items, h.replica.item_bytes) == (0, 0)
    # Overwriting a flushed key counts it once; deleting a flushed one does not go below zero.
    await h.send(b"set a 0 0 1\r\nz\r\n")
    await h.send(b"delete b\r\n")
    assert (h.replica.items, h.replica.item_bytes) == (1, 1)
    # A delayed flush changes nothing until its time, then drops what it covers.
    assert await h.send(b"flush_all 10\r\n") == b"OK\r\n"
    await h.send(b"set c 0 0 4\r\nabcd\r\n")
    assert (h.replica.items, h.replica.item_bytes) == (2, 5)
    h.clock.now += 10
    assert (h.replica.items, h.replica.item_bytes) == (0, 0)
    h.clock.now += 1
    await h.send(b"set d 0 0 2\r\nde\r\n")
    await h.send(b"set a 0 0 2\r\nab\r\n")
    assert (h.replica.items, h.replica.item_bytes) == (2, 4)
    # A restart's recount agrees with the running counts.
    h.replica.count_items()
    assert (h.replica.items, h.replica.item_bytes) == (2, 4)
    stats = await h.send(b"stats\r\n")
    assert b"STAT curr_items 2\r\n" in stats
    assert b"STAT bytes 4\r\n" in stats


async def test_slabs_automove_shutdown_and_stats_sizes(h: Harness) -> None:
    assert await h.send(b"slabs automove 1\r\n") == b"OK\r\n"
    assert await h.send(b"slabs automove 1 noreply\r\n") == b""
    assert await h.send(b"slabs automove invalid\r\n") == (
        b"CLIENT_ERROR bad command line format\r\n"
    )
    assert await h.send(b"shutdown\r\n") == b"ERROR: shutdown not enabled\r\n"
    assert await h.send(b"stats sizes\r\n") == b"STAT sizes_status disabled\r\nEND\r\n"

"""memcached semantics over the coordinator, with an injected clock (no sockets, no sleeps)."""

from __future__ import annotations

import attrs
import pytest
import trio
from hypothesis import given, settings, strategies as st

from kai.coordinator import Coordinator, LocalCoordinator, ReadResult
from kai.core.errors import QuorumTimeout
from kai.core.memcache import protocol as mc
from kai.core.memcache.report import NodeInfo
from kai.core.stats import NodeStats
from kai.core.vclock import VClock
from kai.core.versions import Version
from kai.memcache.commands import CommandExecutor, parse_counter
from kai.storage.memory import MemoryEngine
from kai.storage.replica import LocalReplica, Payload
from kai.testing.memcache import execute_raw

NOW = 1_700_000_000.0


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


def make_harness(*, all_siblings: bool = False, siblings_maximum: int = 100) -> Harness:
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
    )
    coordinator = LocalCoordinator(replica, node_name="127.0.0.1:11011", wall_clock=clock)
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
    )
    return Harness(executor, replica, stats, clock)


@pytest.fixture
def h() -> Harness:
    return make_harness()


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


async def test_concurrent_versions_view_and_resolution() -> None:
    h = make_harness(all_siblings=True)
    older = Version(VClock.from_entries([(b"x", 1, 1)]), int(NOW * 1e6), b"x", 1, 0, b"old")
    newer = Version(VClock.from_entries([(b"y", 1, 1)]), int(NOW * 1e6) + 5, b"y", 2, 0, b"new")
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


async def test_default_view_shows_the_newest_sibling() -> None:
    h = make_harness()
    older = Version(VClock.from_entries([(b"x", 1, 1)]), 10, b"x", 0, 0, b"old")
    newer = Version(VClock.from_entries([(b"y", 1, 1)]), 20, b"y", 0, 0, b"new")
    h.replica.apply(b"k", (older, newer))
    assert await h.send(b"get k\r\n") == b"VALUE k 0 3\r\nnew\r\nEND\r\n"


async def test_sibling_cap_refuses_the_write() -> None:
    h = make_harness(siblings_maximum=2)
    versions = tuple(
        Version(VClock.from_entries([(bytes([65 + i]), 1, 1)]), i, b"a", 0, 0, b"v")
        for i in range(2)
    )
    h.replica.apply(b"k", versions)
    third = Version(VClock.from_entries([(b"Z", 1, 1)]), 9, b"a", 0, 0, b"v")
    with pytest.raises(Exception, match="siblings"):
        h.replica.apply(b"k", (third,))
    assert h.stats.kai_sibling_rejections == 1


async def test_unavailable_coordinator_answers_server_error() -> None:
    class Unavailable(LocalCoordinator):
        async def get(self, key: bytes) -> ReadResult:
            raise QuorumTimeout("no quorum")

        async def put(self, key: bytes, payload: Payload, *, context: VClock | None) -> Version:
            raise QuorumTimeout("no quorum")

    h = make_harness()
    coordinator: Coordinator = Unavailable(h.replica, node_name="n")
    h.executor.coordinator = coordinator
    assert await h.send(b"set k 0 0 1\r\na\r\n") == b"SERVER_ERROR timeout\r\n"
    assert await h.send(b"add k 0 0 1 noreply\r\na\r\n") == b""
    assert h.stats.kai_quorum_failures == 2


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


# --- answering at once ------------------------------------------------------------------------

#: Requests that are answered at once and requests that must wait, over three keys (``c``
#: expires a second after each set of it).
AT_ONCE_MIX = [
    b"set a 0 0 1\r\nx\r\n",
    b"set b 5 0 3\r\nxyz\r\n",
    b"set a 1 0 2 noreply\r\nyy\r\n",
    b"set c 0 1 1\r\nz\r\n",
    b"get a\r\n",
    b"gets b\r\n",
    b"get c\r\n",
    b"version\r\n",
    b"get a b c\r\n",
    b"add c 0 0 1\r\nq\r\n",
    b"incr a 1\r\n",
    b"delete b\r\n",
    b"touch a 100\r\n",
    b"flush_all\r\n",
]


def parse_one(raw: bytes) -> mc.Request | mc.Invalid:
    parser = mc.MemcacheParser(max_item_size=1024)
    parser.receive_data(raw)
    event = parser.next_event()
    assert not isinstance(event, type)
    return event


def counters(stats: NodeStats) -> dict[str, object]:
    """Every counter, and how many latencies each histogram recorded (not their values)."""
    fields = attrs.asdict(stats, recurse=False)
    for name in ("get_latency", "set_latency"):
        fields[name] = fields[name].total
    return fields


@pytest.mark.parametrize("all_siblings", [False, True])
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(AT_ONCE_MIX), st.integers(0, 2)), max_size=30))
def test_execute_now_answers_exactly_as_execute(
    all_siblings: bool, steps: list[tuple[bytes, int]]
) -> None:
    """Two nodes get the same requests: one through execute only, the other through
    execute_now wherever it answers. Replies, counters and stored versions stay equal, and a
    request execute_now declines leaves no trace."""
    waiting = make_harness(all_siblings=all_siblings)
    at_once = make_harness(all_siblings=all_siblings)

    async def run() -> None:
        for raw, seconds in steps:
            for harness in (waiting, at_once):
                harness.clock.now += seconds
            expected = await waiting.executor.execute(parse_one(raw))
            request = parse_one(raw)
            before = counters(at_once.stats)
            reply = at_once.executor.execute_now(request)
            if reply is None:
                assert counters(at_once.stats) == before
                reply = await at_once.executor.execute(request)
            assert reply == expected, raw
            assert counters(at_once.stats) == counters(waiting.stats)
        for key in (b"a", b"b", b"c"):
            assert at_once.replica.read(key) == waiting.replica.read(key)

    trio.run(run)


async def test_execute_now_takes_gets_and_sets_and_declines_the_rest(h: Harness) -> None:
    answered = [
        b"set k 0 0 1\r\nv\r\n",
        b"get k\r\n",
        b"gets k\r\n",
        b"get k j k\r\n",
        b"version\r\n",
    ]
    for raw in answered:
        assert h.executor.execute_now(parse_one(raw)) is not None, raw
    declined = [
        b"add j 0 0 1\r\nv\r\n",  # read, check, write under the key's lock
        b"cas k 0 0 1 1\r\nv\r\n",
        b"append k 0 0 1\r\nv\r\n",
        b"incr k 1\r\n",
        b"delete k\r\n",
        b"touch k 1\r\n",
        b"gat 1 k\r\n",
        b"flush_all\r\n",
        b"stats\r\n",
        b"verbosity 1\r\n",
        b"bogus\r\n",
    ]
    for raw in declined:
        assert h.executor.execute_now(parse_one(raw)) is None, raw


async def test_execute_now_declines_when_other_nodes_take_part(h: Harness) -> None:
    class Replicated(LocalCoordinator):
        def get_at_once(self, key: bytes) -> ReadResult | None:
            return None

        def put_at_once(
            self, key: bytes, payload: Payload, *, context: VClock | None
        ) -> Version | None:
            return None

    h.executor.coordinator = Replicated(h.replica, node_name="n")
    before = counters(h.stats)
    assert h.executor.execute_now(parse_one(b"set k 0 0 1\r\nv\r\n")) is None
    assert h.executor.execute_now(parse_one(b"get k\r\n")) is None
    assert h.executor.execute_now(parse_one(b"gets k j\r\n")) is None
    assert counters(h.stats) == before
    assert h.replica.read(b"k") == ()
    assert await h.send(b"set k 0 0 1\r\nv\r\nget k\r\n") == (
        b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"
    )

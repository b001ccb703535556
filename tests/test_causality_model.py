"""A model of causality over the in-process cluster: no acknowledged write is lost.

Hypothesis draws a whole program of steps and one trio run (virtual time) carries it out on
five nodes (N=3, R=2, W=2) over a network that delays, reorders, duplicates and maybe drops
messages, and that the program may partition and heal. Three clients share one key: each
reads it (``gets``, every sibling its own ``VALUE`` line) through any node and writes it
through any node, with the context it read (``cas`` with its token, or ``add`` when it saw
nothing) or without (``set``, ``delete``). Steps may run several clients' requests at once.
Every request uses the all-siblings view (``siblings = "all"``).

After every step the cluster's replicas are inspected directly: every acknowledged write must
still be held by some replica, or have been superseded by a write that was allowed to
supersede it. Which writes may supersede a write ``W`` (DESIGN §3, §6):

* a ``cas`` whose client had read ``W`` (its token is the digest of that read's context, and
  the coordinating primary writes with exactly that context, whenever the request lands);
* never an ``add``: it writes only when no live sibling is read, so it supersedes tombstones
  alone (a write whose tombstone it covers was superseded by that tombstone's delete);
* a ``set`` or ``delete`` unless its effect is known to be over before ``W`` was sent: it was
  answered before ``W`` was issued, and not with ``SERVER_ERROR`` (a failed write may land
  later, e.g. a forwarded ``set`` still waiting for its key's lock). A ``delete`` whose request
  the network may have duplicated is excused too: the copy decides under the key's lock after
  the original, on a later quorum read. (A duplicated ``set`` is not: both copies are stored
  before the original's answer can reach the client.)
* whether the superseding write was acknowledged or not (a failed write may have landed).

A write superseded by a chain (``W`` by ``W2``, ``W2`` by ``W3``) is excused by its first
link: a context only covers what its writer read, or what what it read had covered.

A second check holds the cluster to its own bookkeeping: a version some replica was seen
holding may vanish from every replica only when a held version's context covers its dot, and
a dot never names two different versions.

At the end the network is healed and made reliable, and quorum reads through every node run
(read repair) until all show the same siblings; the primaries must then hold exactly those,
among them every acknowledged write that nothing superseded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from kai.core.config import Quorum
from kai.core.ring import key_hash, partition_of
from kai.core.vclock import Dot
from kai.core.versions import Version, check_sibling_set, context_of, decode_siblings, merge
from kai.testing.cluster import InProcessCluster
from kai.testing.network import Faults

NODES = 5
CLIENTS = 3
KEY = b"k"
#: The key's primaries on the harness's ring (they depend only on the addresses and buckets).
PRIMARIES = (2, 3, 4)
#: The fewest and the most steps in one program.
MIN_STEPS = 10
MAX_STEPS = 30
#: Seconds a request waits for its answers (the harness's default).
REQUEST_TIMEOUT = 1.0
#: Virtual seconds the nodes may take to agree once the network is healed and reliable.
CONVERGENCE_DEADLINE = 60
#: Virtual seconds any one step may take; a request that hangs longer is a bug.
STEP_DEADLINE = 30
SERVER_ERROR = b"SERVER_ERROR"
#: The replies each command may give besides SERVER_ERROR.
REPLIES = {
    "cas": {b"STORED\r\n", b"EXISTS\r\n", b"NOT_FOUND\r\n"},
    "add": {b"STORED\r\n", b"NOT_STORED\r\n"},
    "set": {b"STORED\r\n"},
    "delete": {b"DELETED\r\n", b"NOT_FOUND\r\n"},
}

Kind = Literal["read", "write", "update", "set", "delete"]
Command = Literal["cas", "add", "set", "delete"]


# --- programs --------------------------------------------------------------------------------


@attrs.frozen
class Op:
    """One client's request through ``node``: ``read`` (a ``gets``), ``write`` (a ``cas``
    with the client's last token, or an ``add`` when its last read showed nothing), ``set``
    or ``delete``. An ``update`` is a ``read`` through ``node`` and then a ``write`` through
    ``then``, without a pause."""

    kind: Kind
    client: int
    node: int
    then: int = 0


@attrs.frozen
class Concurrently:
    """Requests of different clients, sent together; the step ends when all are answered
    (no requests: nothing happens)."""

    ops: tuple[Op, ...]


@attrs.frozen
class Advance:
    """Let virtual time pass: replication, read repair and late messages run."""

    seconds: float


@attrs.frozen
class Partition:
    """Cut the network between groups of node indexes."""

    groups: tuple[tuple[int, ...], ...]


@attrs.frozen
class Heal:
    """Remove the partition."""


Step = Concurrently | Advance | Partition | Heal

#: What a client sends: writes with the context read come more often than blind ones.
KINDS: tuple[Kind, ...] = ("read", "write", "update", "update", "update", "set", "delete")
#: Cut a primary off, split the primaries, or cut the other nodes (forwarders) off.
PARTITIONS = (
    ((0, 1, 2), (3, 4)),
    ((0,), (1, 2, 3, 4)),
    ((3,), (0, 1, 2, 4)),
    ((1, 2), (0, 3, 4)),
    ((0, 3), (1, 2, 4)),
)


@st.composite
def together(draw: st.DrawFn) -> Concurrently:
    """Each client takes part with probability 2/3 (shrinking leaves clients out)."""
    drawn = []
    for client in range(CLIENTS):
        if draw(st.integers(0, 2)):
            kind = draw(st.sampled_from(KINDS))
            node, then = draw(st.integers(0, NODES - 1)), draw(st.integers(0, NODES - 1))
            drawn.append(Op(kind, client, node, then))
    return Concurrently(tuple(drawn))


@st.composite
def steps(draw: st.DrawFn) -> Step:
    """Mostly requests; sometimes a pause, a partition or a heal."""
    choice = draw(st.integers(0, 9))
    if choice < 7:
        return draw(together())
    if choice == 7:
        return Advance(draw(st.sampled_from((0.01, 0.2, 1.0, 3.0))))
    if choice == 8:
        return Partition(draw(st.sampled_from(PARTITIONS)))
    return Heal()


programs = st.lists(steps(), min_size=MIN_STEPS, max_size=MAX_STEPS)
networks = st.builds(
    Faults,
    drop=st.sampled_from((0.0, 0.02)),
    duplicate=st.sampled_from((0.0, 0.1, 0.3)),
    delay=st.sampled_from(((0.0, 0.0), (0.0, 0.01), (0.0, 0.1))),
)


# --- the model -------------------------------------------------------------------------------


@attrs.frozen
class Read:
    """What a client's last ``gets`` showed: the live siblings' values and the cas unique."""

    values: frozenset[bytes]
    token: int | None


@attrs.define
class Attempt:
    """One write a client sent, whatever became of it.

    Attributes:
        command: the memcached command.
        value: the unique value written (None for a delete).
        read_values: what the client's read showed, for a ``cas`` (empty otherwise).
        issued_at: the model's event count when the request was sent.
        answered_at: the event count when the reply came (None while in flight).
        reply: the reply.
        maybe_duplicated: the network duplicated some message while it was in flight.
    """

    command: Command
    value: bytes | None
    read_values: frozenset[bytes]
    issued_at: int
    answered_at: int | None = None
    reply: bytes = b""
    maybe_duplicated: bool = True

    @property
    def acknowledged(self) -> bool:
        return self.reply == b"STORED\r\n"

    def done_before(self, write: Attempt) -> bool:
        """Whether every version this request could make exists before ``write`` was sent."""
        if self.answered_at is None or self.answered_at >= write.issued_at:
            return False
        if self.reply.startswith(SERVER_ERROR):
            return False  # a failed write may still land, later
        return self.command != "delete" or not self.maybe_duplicated

    def may_supersede(self, write: Attempt) -> bool:
        """Whether this request's version may legitimately supersede ``write``'s."""
        if self is write:
            return False
        if self.command == "cas":
            return write.value in self.read_values
        if self.command == "add":
            return False
        return not self.done_before(write)


class LostWrite(AssertionError):
    """An acknowledged write that no replica holds and no write was allowed to supersede."""


class CausalityModel:
    """The clients' view of the cluster: what each read last, and every write sent."""

    def __init__(self, cluster: InProcessCluster) -> None:
        self.cluster = cluster
        self.last_read: dict[int, Read] = {}
        self.attempts: list[Attempt] = []
        #: Every version a check saw some replica hold, by dot.
        self.seen_versions: dict[Dot, Version] = {}
        self.events = 0
        self._written = 0

    def _tick(self) -> int:
        self.events += 1
        return self.events

    @property
    def written_values(self) -> set[bytes]:
        return {attempt.value for attempt in self.attempts if attempt.value is not None}

    async def run(self, step: Step) -> None:
        cluster = self.cluster
        with trio.fail_after(STEP_DEADLINE):
            if isinstance(step, Concurrently):
                async with trio.open_nursery() as nursery:
                    for op in step.ops:
                        nursery.start_soon(self.request, op)
            elif isinstance(step, Advance):
                await trio.sleep(step.seconds)
            elif isinstance(step, Partition):
                cluster.partition(*step.groups)
            else:
                cluster.heal()

    async def request(self, op: Op) -> None:
        if op.kind in ("read", "update"):
            await self.read(op.client, op.node)
            if op.kind == "read":
                return
            op = attrs.evolve(op, kind="write", node=op.then)
        self._written += 1
        value = b"c%d-w%d" % (op.client, self._written)
        if op.kind == "set":
            attempt = Attempt("set", value, frozenset(), self._tick())
            raw = b"set %s 0 0 %d\r\n%s\r\n" % (KEY, len(value), value)
        elif op.kind == "delete":
            attempt = Attempt("delete", None, frozenset(), self._tick())
            raw = b"delete %s\r\n" % KEY
        else:
            seen = self.last_read.get(op.client)
            if seen is None or seen.token is None:
                attempt = Attempt("add", value, frozenset(), self._tick())
                raw = b"add %s 0 0 %d\r\n%s\r\n" % (KEY, len(value), value)
            else:
                attempt = Attempt("cas", value, seen.values, self._tick())
                raw = b"cas %s 0 0 %d %d\r\n%s\r\n" % (KEY, len(value), seen.token, value)
        self.attempts.append(attempt)
        duplicated = self.cluster.network.statistics()["duplicated"]
        reply = await self.cluster.request(op.node, raw, all_siblings=True)
        attempt.answered_at = self._tick()
        attempt.reply = reply
        attempt.maybe_duplicated = self.cluster.network.statistics()["duplicated"] > duplicated
        assert reply in REPLIES[attempt.command] or reply.startswith(SERVER_ERROR), (op, reply)

    async def read(self, client: int, node: int) -> Read | None:
        """``gets`` the key through ``node`` for ``client``; None when it failed."""
        reply = await self.cluster.request(node, b"gets %s\r\n" % KEY, all_siblings=True)
        if reply.startswith(SERVER_ERROR):
            self.last_read.pop(client, None)  # the client knows nothing it can cas with
            return None
        seen = parse_gets(reply)
        unknown = seen.values - self.written_values
        assert not unknown, f"a read showed values nobody wrote: {sorted(unknown)}"
        self.last_read[client] = seen
        return seen

    def held(self) -> dict[int, tuple[Version, ...]]:
        """Every node's stored sibling set of the key with the hints it keeps for it (a
        stand-in's write lives only in hints until the handoff), each checked for its
        invariants."""
        held = {}
        for index, node in enumerate(self.cluster.nodes):
            siblings = node.replica.read(KEY)
            check_sibling_set(siblings)
            hint = node.cluster.coordinator.hints.record_for(KEY)
            if hint is not None:
                siblings = merge(siblings, decode_siblings(hint))
            held[index] = siblings
        return held

    def lost_writes(self) -> list[Attempt]:
        """The acknowledged writes no replica holds that nothing may have superseded."""
        held_values = {version.value for siblings in self.held().values() for version in siblings}
        unknown = {value for value in held_values if value is not None} - self.written_values
        assert not unknown, f"replicas hold values nobody wrote: {sorted(unknown)!r}"
        return [
            write
            for write in self.attempts
            if write.acknowledged
            and write.value not in held_values
            and not any(other.may_supersede(write) for other in self.attempts)
        ]

    def lost_versions(self) -> list[Version]:
        """The versions some replica was seen holding (at this or an earlier check) that none
        holds now and no held version's context covers, and those whose dot a different
        version now holds (a dot names one write): the cluster's own bookkeeping must never
        drop a version nobody has seen (DESIGN §3)."""
        held = {version.dot: version for siblings in self.held().values() for version in siblings}
        lost = []
        for dot, version in held.items():
            earlier = self.seen_versions.setdefault(dot, version)
            if earlier != version:
                lost.append(earlier)
        lost += [
            version
            for dot, version in self.seen_versions.items()
            if dot not in held and not any(other.context.covers(dot) for other in held.values())
        ]
        return lost

    def check(self, where: str) -> None:
        """Raise :class:`LostWrite` if an acknowledged write or a seen version was lost."""
        lost_writes = self.lost_writes()
        lost_versions = self.lost_versions()
        if lost_writes or lost_versions:
            replicas = "\n".join(
                f"  node {index}: {[(v.dot, v.context.entries, v.value) for v in siblings]}"
                for index, siblings in self.held().items()
            )
            history = "\n".join(f"  {attempt}" for attempt in self.attempts)
            raise LostWrite(
                f"{where}: lost writes {[write.value for write in lost_writes]}, "
                f"lost versions {[(v.dot, v.value) for v in lost_versions]}\n"
                f"replicas:\n{replicas}\nwrites:\n{history}"
            )

    async def converge(self) -> Read:
        """Heal, make the network reliable, and read through every node until all show the
        same siblings twice in a row (read repair brings the replicas along; a conditional
        write still waiting for its key's lock may land meanwhile). Returns that read.

        Raises:
            trio.TooSlowError: the nodes did not agree within ``CONVERGENCE_DEADLINE``.
        """
        self.cluster.heal()
        self.cluster.network.set_faults(Faults())
        previous: list[Read] = []
        with trio.fail_after(CONVERGENCE_DEADLINE):
            while True:
                await trio.sleep(REQUEST_TIMEOUT)  # late messages land, read repair runs
                shown = []
                for node in range(NODES):
                    seen = await self.read(0, node)
                    assert seen is not None, f"a quorum read through node {node} failed"
                    shown.append(seen)
                if shown == previous and len(set(shown)) == 1:
                    return shown[0]
                previous = shown

    def check_converged(self, final: Read) -> None:
        """The primaries hold what the converged read shows: every acknowledged write that
        nothing superseded, and only values that were written."""
        for index in PRIMARIES:
            live = {version.value for version in self.cluster.nodes[index].replica.read(KEY)}
            assert live - {None} == final.values, (index, live, final)
        for write in self.attempts:
            if write.acknowledged and write.value not in final.values:
                assert any(other.may_supersede(write) for other in self.attempts), (
                    f"acknowledged {write} is not shown by a converged read: {final}"
                )


def parse_gets(reply: bytes) -> Read:
    """The values and the cas unique of a ``gets`` reply for :data:`KEY`."""
    values: list[bytes] = []
    tokens: set[int] = set()
    rest = reply
    while rest != b"END\r\n":
        header, rest = rest.split(b"\r\n", 1)
        fields = header.split()
        assert len(fields) == 5, reply
        assert fields[:2] == [b"VALUE", KEY], reply
        length = int(fields[3])
        assert rest[length : length + 2] == b"\r\n", reply
        values.append(rest[:length])
        rest = rest[length + 2 :]
        tokens.add(int(fields[4]))
    assert len(tokens) <= 1, f"siblings with different cas uniques: {reply!r}"
    assert len(values) == len(set(values)), f"a sibling shown twice: {reply!r}"
    return Read(frozenset(values), tokens.pop() if tokens else None)


async def run_program(program: Sequence[Step], faults: Faults, seed: int) -> None:
    async with InProcessCluster.running(
        NODES,
        quorum=Quorum(3, 2, 2),
        seed=seed,
        faults=faults,
        request_timeout_ms=int(REQUEST_TIMEOUT * 1000),
    ) as cluster:
        primaries = cluster.nodes[0].cluster.ring().primaries_of(KEY, 3)
        assert sorted(primaries) == sorted(cluster.node_id(index) for index in PRIMARIES)
        model = CausalityModel(cluster)
        for index, step in enumerate(program):
            await model.run(step)
            model.check(f"after step {index} ({step})")
        final = await model.converge()
        model.check("after converging")
        model.check_converged(final)


@settings(max_examples=60, deadline=None)
@given(program=programs, faults=networks, seed=st.integers(0, 2**16))
def test_no_acknowledged_write_is_lost(program: list[Step], faults: Faults, seed: int) -> None:
    trio.run(run_program, program, faults, seed, clock=trio.testing.MockClock(autojump_threshold=0))


# --- the checker itself ------------------------------------------------------------------------


async def test_the_checker_catches_a_lost_write(autojump_clock: trio.testing.MockClock) -> None:
    """A write acknowledged to a client, then superseded by a version whose writer never
    read it (forged here by hand), is reported although the cluster's contexts excuse it."""
    async with InProcessCluster.running(NODES, quorum=Quorum(3, 2, 2)) as cluster:
        model = CausalityModel(cluster)
        await model.run(Concurrently((Op("set", 0, 1),)))
        await model.run(Advance(1.0))
        model.check("after the set")
        (written,) = model.attempts
        assert written.acknowledged
        held = {version for siblings in model.held().values() for version in siblings}
        assert [version.value for version in held] == [written.value]
        now = int(cluster.wall_clock() * 1_000_000)  # older than the grace would be refused
        forged = Version((b"intruder", 1), context_of(held), timestamp=now)
        for node in cluster.nodes:
            node.replica.apply(KEY, (forged,))
        assert model.lost_versions() == []
        assert model.lost_writes() == [written]
        with pytest.raises(LostWrite, match="c0-w1"):
            model.check("after the forged delete")


async def test_the_checker_catches_a_lost_version(autojump_clock: trio.testing.MockClock) -> None:
    """A version every replica drops (here by hand) is reported even when a later ``set``
    excuses the write it held, and so is a dot handed out twice."""
    async with InProcessCluster.running(NODES, quorum=Quorum(3, 2, 2)) as cluster:
        model = CausalityModel(cluster)
        await model.run(Concurrently((Op("set", 0, 1),)))
        await model.run(Advance(1.0))
        model.check("after the first set")
        ((version, *_), *_) = (siblings for siblings in model.held().values() if siblings)
        partition = partition_of(key_hash(KEY), cluster.nodes[0].replica.buckets)
        for node in cluster.nodes:
            node.engine.delete(partition, KEY)
        assert model.lost_versions() == [version]
        # Node 4, a primary, coordinates this set: a new dot, a context that covers nothing.
        await model.run(Concurrently((Op("set", 1, 4),)))
        assert model.attempts[1].acknowledged
        assert model.lost_writes() == []
        assert model.lost_versions() == [version]
        with pytest.raises(LostWrite, match="lost versions"):
            model.check("after the second set")
        # Node 3 forgot its counter with its data: its next write reuses the first dot.
        assert version.dot == (cluster.nodes[3].replica.actor, 1)
        await model.run(Concurrently((Op("set", 2, 3),)))
        assert model.attempts[2].acknowledged
        assert model.lost_versions() == [version]


def test_what_may_supersede_a_write() -> None:
    """The excuses the checker accepts, one by one."""
    write = Attempt("cas", b"w", frozenset({b"r"}), issued_at=5, answered_at=6, reply=b"STORED\r\n")
    reader = Attempt("cas", b"x", frozenset({b"w"}), issued_at=7, answered_at=8)
    stranger = Attempt("cas", b"y", frozenset({b"r"}), issued_at=7, answered_at=8)
    assert reader.may_supersede(write)
    assert not stranger.may_supersede(write)  # sent later, but it had not read the write
    assert attrs.evolve(reader, reply=b"SERVER_ERROR timeout\r\n").may_supersede(write)
    assert not write.may_supersede(write)
    assert not Attempt("add", b"z", frozenset(), issued_at=7).may_supersede(write)
    early_set = Attempt("set", b"s", frozenset(), 3, answered_at=4, reply=b"STORED\r\n")
    assert not early_set.may_supersede(write)
    assert attrs.evolve(early_set, answered_at=5).may_supersede(write)  # overlapped it
    assert attrs.evolve(early_set, reply=b"SERVER_ERROR timeout\r\n").may_supersede(write)
    assert attrs.evolve(early_set, issued_at=7, answered_at=8).may_supersede(write)
    early_delete = Attempt("delete", None, frozenset(), 3, 4, b"DELETED\r\n", False)
    assert not early_delete.may_supersede(write)
    assert attrs.evolve(early_delete, maybe_duplicated=True).may_supersede(write)

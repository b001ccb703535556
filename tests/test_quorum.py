"""The read round against a plain model of quorum reads, on random answers and failures."""

from __future__ import annotations

from functools import reduce

from hypothesis import given, strategies as st

from kai.core.errors import QuorumTimeout, QuorumUnavailable
from kai.core.quorum import ReadRound
from kai.core.ring import NodeId
from kai.core.versions import SiblingSet, Version, merge

from .strategies import versions

NODES = [NodeId("127.0.0.1", 11011 + index) for index in range(5)]
KEYS = [b"a", b"b", b"c"]

#: A sibling set as replicas hold them: canonical (what the replica write rule leaves).
sibling_sets = st.lists(versions(), max_size=2).map(lambda found: merge((), tuple(found)))

#: One step: a node (maybe not a replica) answers with some sibling sets, or fails.
events = st.lists(
    st.tuples(
        st.sampled_from(NODES),
        st.one_of(
            st.lists(sibling_sets, max_size=3),
            st.sampled_from(["timeout", "unreachable"]),
        ),
    ),
    max_size=14,
)


class RoundModel:
    """Quorum reads as plainly as they can be said: per key, who answered what, who failed."""

    def __init__(self, keys: list[bytes], replicas: list[tuple[NodeId, ...]], r: int) -> None:
        self.keys = keys
        self.replicas = replicas
        self.required = [min(r, len(nodes)) for nodes in replicas]
        self.answers: list[dict[NodeId, SiblingSet]] = [{} for _ in keys]
        self.failed: list[set[NodeId]] = [set() for _ in keys]
        self.timed_out = [False for _ in keys]
        self.progress: dict[NodeId, int] = {}
        self.gone: set[NodeId] = set()
        self.first_lost: int | None = None

    def batch(self, node: NodeId) -> list[int]:
        return [index for index, nodes in enumerate(self.replicas) if node in nodes]

    def unanswered(self, node: NodeId) -> list[int]:
        return [] if node in self.gone else self.batch(node)[self.progress.get(node, 0) :]

    def record_reply(self, node: NodeId, sibling_sets: list[SiblingSet]) -> object:
        left = self.unanswered(node)
        if not left:
            return 0
        if len(sibling_sets) > len(left):
            return "ValueError"
        for index, siblings in zip(left, sibling_sets, strict=False):
            self.answers[index][node] = siblings
        self.progress[node] = self.progress.get(node, 0) + len(sibling_sets)
        return len(left) - len(sibling_sets)

    def record_failure(self, node: NodeId, timed_out: bool) -> None:
        for index in self.unanswered(node):
            self.failed[index].add(node)
            self.timed_out[index] = self.timed_out[index] or timed_out
            if self.first_lost is None and self.lost(index):
                self.first_lost = index
        self.gone.add(node)

    def met(self, index: int) -> bool:
        return len(self.answers[index]) >= self.required[index]

    def lost(self, index: int) -> bool:
        outstanding = len(self.replicas[index]) - len(self.answers[index]) - len(self.failed[index])
        return len(self.answers[index]) + outstanding < self.required[index]

    def decided(self) -> bool:
        return all(map(self.met, range(len(self.keys)))) or any(
            map(self.lost, range(len(self.keys)))
        )

    def merged(self, index: int) -> SiblingSet:
        return reduce(merge, self.answers[index].values(), ())


def observe(round_: ReadRound) -> tuple[object, ...]:
    error = round_.error()
    return (
        round_.decided,
        None if error is None else type(error),
        list(round_.merged),
        sorted(round_.stale_replicas(), key=str),
        [round_.unanswered(node) for node in NODES],
    )


def expect(model: RoundModel) -> tuple[object, ...]:
    count = len(model.keys)
    error: type | None = None
    unmet = [index for index in range(count) if not model.met(index)]
    if model.first_lost is not None or unmet:
        # The first key that lost its quorum, else the first that has not met it yet.
        index = model.first_lost if model.first_lost is not None else unmet[0]
        error = (
            QuorumTimeout if model.timed_out[index] or not model.lost(index) else QuorumUnavailable
        )
    merged = [model.merged(index) for index in range(count)]
    stale = [
        (index, node)
        for index in range(count)
        if merged[index]
        for node, siblings in model.answers[index].items()
        if siblings != merged[index]
    ]
    return (
        model.decided(),
        error,
        merged,
        sorted(stale, key=str),
        [model.unanswered(node) for node in NODES],
    )


@given(
    replicas=st.lists(
        st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True).map(tuple),
        min_size=1,
        max_size=len(KEYS),
    ),
    r=st.integers(min_value=1, max_value=4),
    steps=events,
)
def test_read_round_matches_the_model(
    replicas: list[tuple[NodeId, ...]],
    r: int,
    steps: list[tuple[NodeId, list[tuple[Version, ...]] | str]],
) -> None:
    keys = KEYS[: len(replicas)]
    round_ = ReadRound(keys, replicas, r)
    model = RoundModel(keys, replicas, r)
    assert observe(round_) == expect(model)
    for node, event in steps:
        if isinstance(event, str):
            round_.record_failure(node, timed_out=event == "timeout")
            model.record_failure(node, event == "timeout")
        else:
            try:
                got: object = round_.record_reply(node, event)
            except ValueError:
                got = "ValueError"
            assert got == model.record_reply(node, event)
        assert observe(round_) == expect(model)


@given(
    replicas=st.lists(
        st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True).map(tuple),
        min_size=1,
        max_size=len(KEYS),
    ),
    r=st.integers(min_value=1, max_value=4),
    stored=st.lists(sibling_sets, min_size=len(KEYS), max_size=len(KEYS)),
    steps=events,
)
def test_a_local_replica_read_as_the_round_is_made_counts_as_its_first_answer(
    replicas: list[tuple[NodeId, ...]],
    r: int,
    stored: list[SiblingSet],
    steps: list[tuple[NodeId, list[tuple[Version, ...]] | str]],
) -> None:
    keys = KEYS[: len(replicas)]
    local = NODES[0]
    held = dict(zip(KEYS, stored, strict=True))
    round_ = ReadRound(keys, replicas, r, local, lambda key: (held[key], None))
    asked = ReadRound(keys, replicas, r)
    asked.record_reply(
        local, [held[key] for key, nodes in zip(keys, replicas, strict=True) if local in nodes]
    )
    assert observe(round_) == observe(asked)
    for node, event in steps:
        outcomes: list[object] = []
        for each in (round_, asked):
            if isinstance(event, str):
                each.record_failure(node, timed_out=event == "timeout")
                continue
            try:
                outcomes.append(each.record_reply(node, event))
            except ValueError:
                outcomes.append("ValueError")
        assert len(set(outcomes)) <= 1
        assert observe(round_) == observe(asked)

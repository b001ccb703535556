"""The one-key read round behaves exactly as the general one given a single key."""

from __future__ import annotations

from hypothesis import given, strategies as st

from kai.core.quorum import KeyRound, ReadRound, Round
from kai.core.ring import NodeId
from kai.core.versions import Version

from .strategies import versions

NODES = [NodeId("127.0.0.1", 11011 + index) for index in range(6)]
KEY = b"k"

#: One step: a node (maybe not a replica) answers with some sibling sets, or fails.
events = st.lists(
    st.tuples(
        st.sampled_from(NODES),
        st.one_of(
            st.lists(st.lists(versions(), max_size=2).map(tuple), max_size=2),
            st.sampled_from(["timeout", "unreachable"]),
        ),
    ),
    max_size=12,
)


def observe(round_: Round) -> tuple[object, ...]:
    """Everything the coordinator reads from a round."""
    error = round_.error()
    return (
        round_.decided,
        None if error is None else (type(error), str(error)),
        list(round_.merged),
        list(round_.stale_replicas()),
        [round_.unanswered(node) for node in NODES],
        [round_.batch(node) for node in NODES],
        sorted(round_.nodes, key=str),
        list(round_.keys),
    )


def apply(round_: Round, node: NodeId, event: list[tuple[Version, ...]] | str) -> object:
    if isinstance(event, str):
        round_.record_failure(node, timed_out=event == "timeout")
        return None
    try:
        return round_.record_reply(node, event)
    except ValueError as exc:
        return ("ValueError", str(exc))


@given(
    replicas=st.lists(st.sampled_from(NODES), min_size=1, max_size=4, unique=True),
    r=st.integers(min_value=1, max_value=5),
    steps=events,
)
def test_key_round_matches_read_round_of_one_key(
    replicas: list[NodeId], r: int, steps: list[tuple[NodeId, list[tuple[Version, ...]] | str]]
) -> None:
    general = ReadRound([KEY], [tuple(replicas)], r)
    single = KeyRound(KEY, tuple(replicas), r)
    assert observe(single) == observe(general)
    for node, event in steps:
        assert apply(single, node, event) == apply(general, node, event)
        assert observe(single) == observe(general)

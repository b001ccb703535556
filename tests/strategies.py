"""Shared Hypothesis strategies for Kai's pure data model."""

from __future__ import annotations

import attrs
from hypothesis import strategies as st

from kai.core.vclock import VClock
from kai.core.versions import (
    Payload,
    SiblingSet,
    Version,
    context_of,
    merge,
    new_version,
)

ACTORS = [b"actor-a", b"actor-b", b"actor-c", b"actor-d"]

actors = st.sampled_from(ACTORS)


@st.composite
def clocks(draw: st.DrawFn, max_counter: int = 4) -> VClock:
    chosen = draw(st.sets(actors, max_size=len(ACTORS)))
    entries = [
        (actor, draw(st.integers(1, max_counter)), draw(st.integers(0, 10**6))) for actor in chosen
    ]
    return VClock.from_entries(entries)


@st.composite
def versions(draw: st.DrawFn) -> Version:
    """One well-formed version: its context never covers its own dot."""
    actor = draw(actors)
    counter = draw(st.integers(1, 6))
    context = draw(clocks())
    entries = [entry for entry in context.entries if entry[0] != actor]
    if counter > 1 and draw(st.booleans()):
        entries.append((actor, draw(st.integers(1, counter - 1)), 3))
    tombstone = draw(st.booleans()) and counter % 3 == 0
    return Version(
        (actor, counter),
        VClock.from_entries(entries),
        timestamp=draw(st.integers(0, 10**6)),
        flags=counter % 3,
        value=None if tombstone else bytes([counter]) + actor,
    )


@attrs.frozen
class History:
    """What a few replicas hold after writes and replication, as a cluster makes them.

    Attributes:
        states: each replica's sibling set at the end.
        written: every version written, in order.
        pruned: the versions the writes would have made with contexts pruned to 2 entries
            (the same writes, the same dots): what pruning would leave instead.
    """

    states: tuple[SiblingSet, ...]
    written: tuple[Version, ...]
    pruned: tuple[Version, ...]


@st.composite
def histories(draw: st.DrawFn, replicas: int = 3, max_steps: int = 10) -> History:
    """Replicas (one actor each) that take writes and exchange sibling sets.

    A write at a replica supersedes what its client read: the replica's own set merged with
    some others' (a quorum read), an older snapshot of such a read (a client that read a
    while ago), or only the replica's own set (a blind ``set``). Its dot moves past every
    counter of its actor the replica has seen. Replication merges one replica's whole set
    into another's, as ``replica_apply`` does.
    """
    states: list[SiblingSet] = [() for _ in range(replicas)]
    snapshots: list[SiblingSet] = [()]
    written: list[Version] = []
    pruned: list[Version] = []
    for step in range(draw(st.integers(0, max_steps))):
        here = draw(st.integers(0, replicas - 1))
        replicate = draw(st.booleans())
        if replicate and written:
            there = draw(st.integers(0, replicas - 1))
            states[there] = merge(states[there], states[here])
            continue
        how = draw(st.sampled_from(["quorum", "stale", "blind"]))
        if how == "quorum":
            read = states[here]
            for other in draw(st.sets(st.integers(0, replicas - 1))):
                read = merge(read, states[other])
            snapshots.append(read)
        elif how == "stale":
            read = draw(st.sampled_from(snapshots))
        else:
            read = states[here]
        actor = ACTORS[here]
        context = context_of(read)
        counter = max(context_of(states[here]).counter(actor), context.counter(actor)) + 1
        payload = Payload(0, 0, None if draw(st.booleans()) and step % 4 == 3 else b"%d" % step)
        timestamp = 1000 + step
        version, _ = new_version(payload, context, (actor, counter), timestamp, 100)
        small, _ = new_version(payload, context, (actor, counter), timestamp, 2)
        written.append(version)
        pruned.append(small)
        states[here] = merge(states[here], (version,))
    return History(tuple(states), tuple(written), tuple(pruned))


sibling_sets = histories().flatmap(lambda history: st.sampled_from(history.states))

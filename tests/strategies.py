"""Shared Hypothesis strategies for Kai's pure data model."""

from __future__ import annotations

import zlib

from hypothesis import strategies as st

from kai.core.vclock import VClock
from kai.core.versions import Version

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
    clock = draw(clocks())
    # A clock identifies one write: derive the payload from it so equal clocks mean equal
    # versions, as they do in a correct cluster.
    seed = zlib.crc32(repr([(a, c) for a, c, _ in clock.entries]).encode()) & 0xFFFF
    tombstone = draw(st.booleans()) and seed % 5 == 0
    return Version(
        clock=VClock.from_entries((a, c, 7 * c) for a, c, _ in clock.entries),
        timestamp=seed,
        actor=ACTORS[seed % len(ACTORS)],
        flags=seed % 3,
        expiry=0,
        value=None if tombstone else seed.to_bytes(2, "big"),
    )


sibling_lists = st.lists(versions(), max_size=6)

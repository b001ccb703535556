"""Causal-context tokens: every context round-trips, and no bytes decode to anything but a
valid context or :class:`BadContext`."""

from __future__ import annotations

import base64

import msgpack
import pytest
from hypothesis import given, strategies as st

from kai.core.contexts import MAX_ACTOR_BYTES, BadContext, decode_context, encode_context
from kai.core.vclock import VClock

contexts = st.dictionaries(
    st.binary(min_size=1, max_size=MAX_ACTOR_BYTES),
    st.tuples(st.integers(1, 2**64 - 1), st.integers(0, 2**64 - 1)),
    max_size=12,
).map(lambda entries: VClock.from_entries((a, c, t) for a, (c, t) in entries.items()))


@given(contexts)
def test_every_context_round_trips_through_a_token_that_fits_a_meta_flag(
    context: VClock,
) -> None:
    token = encode_context(context)
    assert token
    assert token.isascii()
    assert not set(token) & set(b" =\r\n")
    assert decode_context(token) == context


def test_the_empty_context_has_a_token_too() -> None:
    assert decode_context(encode_context(VClock())) == VClock()


@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_context_or_bad_context(token: bytes) -> None:
    try:
        context = decode_context(token)
    except BadContext:
        return
    assert decode_context(encode_context(context)) == context


def _token(payload: object, format_byte: int = 1) -> bytes:
    raw = bytes((format_byte,)) + msgpack.packb(payload, use_bin_type=True)
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"a" * 70_000,
        b"***",
        _token([], format_byte=9),
        _token({"a": 1}),
        _token([[b"a", 0, 1]]),  # counter 0
        _token([[b"b", 1, 1], [b"a", 1, 1]]),  # unsorted
        _token([[b"a", 1, 1], [b"a", 2, 1]]),  # repeated actor
        _token([[b"", 1, 1]]),  # empty actor
        _token([["a", 1, 1]]),  # actor as text
        _token([[b"a", 1]]),  # missing timestamp
        _token([[b"a" * 65, 1, 1]]),  # actor too long
        _token([[b"a", 1, 1]] * 1001),  # too many entries
    ],
)
def test_malformed_tokens_are_refused(token: bytes) -> None:
    with pytest.raises(BadContext):
        decode_context(token)

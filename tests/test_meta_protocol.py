"""Tests for the meta command parser (``mg ms md ma me mn``) and its records.

Every case is fed three ways (whole, byte by byte, followed by a pipelined ``version``), as
the classic parser's are; a property test checks that meta requests round-trip under any
chunking (tests/test_memcache_protocol.py feeds the parser any bytes, meta fragments among
them). Expected errors are memcached
1.6.18's, byte for byte (each was checked against it; the conformance tests check them
again against a running memcached).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kai.core.memcache import meta_parser
from kai.core.memcache.meta import (
    OPAQUE_TOKEN_MAX_LENGTH,
    MetaArithmetic,
    MetaDebug,
    MetaDelete,
    MetaGet,
    MetaNoop,
    MetaRequest,
    MetaSet,
    MetaValueTooLarge,
    shown_key,
)
from kai.core.memcache.meta_parser import decode_base64_key
from kai.core.memcache.protocol import NEED_DATA, Event, Get, Invalid, MemcacheParser, Store
from tests.test_memcache_protocol import (
    KEY_SAFE,
    check_three_ways,
    chunked,
    classic_keys,
    feed_all,
)


def error(text: bytes) -> Invalid:
    return Invalid(text + b"\r\n")


ERROR = error(b"ERROR")
BAD_FORMAT = error(b"CLIENT_ERROR bad command line format")
INVALID_FLAG = error(b"CLIENT_ERROR invalid flag")
DUPLICATE = error(b"CLIENT_ERROR duplicate flag")
BAD_TOKEN = error(b"CLIENT_ERROR bad token in command line format")
DECODING = error(b"CLIENT_ERROR error decoding key")
OPAQUE_LONG = error(b"CLIENT_ERROR opaque token too long")
INVALID_OR_DUPLICATE = error(b"CLIENT_ERROR invalid or duplicate flag")
BAD_CHUNK = error(b"CLIENT_ERROR bad data chunk")
LINE_TOO_LONG = Invalid(b"CLIENT_ERROR line too long\r\n", close=True)
KEY_250 = b"k" * 250
KEY_251 = b"k" * 251
OPAQUE_31 = b"o" * 31
NOOP = MetaNoop()


def case(data: bytes, *expected: Event, **limits: int) -> Any:
    return pytest.param(data, list(expected), limits, id=repr(data[:60]))


CASES = [
    # --- mg ---
    case(b"mg k\r\n", MetaGet(b"k")),
    case(b"mg k v\n", MetaGet(b"k", value=True)),
    case(
        b"mg k v f t c k s h l\r\n",
        MetaGet(b"k", "ftckshl", value=True),
    ),
    case(b"mg k s t\r\n", MetaGet(b"k", "st")),
    case(b"mg k t s\r\n", MetaGet(b"k", "ts")),
    case(b"mg  k   v  \r\n", MetaGet(b"k", value=True)),
    case(b"mg k q u\r\n", MetaGet(b"k", quiet=True, no_bump=True)),
    case(b"mg k O123 k\r\n", MetaGet(b"k", "Ok", opaque=b"123")),
    case(b"mg k O\r\n", MetaGet(b"k", "O", opaque=b"")),
    case(b"mg k O" + OPAQUE_31 + b"\r\n", MetaGet(b"k", "O", opaque=OPAQUE_31)),
    case(b"mg k O" + OPAQUE_31 + b"x\r\n", OPAQUE_LONG),
    case(b"mg k T30 t\r\n", MetaGet(b"k", "Tt", touch_exptime=30)),
    case(b"mg k t T-1\r\n", MetaGet(b"k", "tT", touch_exptime=-1)),
    case(b"mg k N30 R10\r\n", MetaGet(b"k", "N", vivify_exptime=30, recache_exptime=10)),
    # a flag that takes no token ignores what follows its letter, as memcached does
    case(b"mg k vq kv\r\n", MetaGet(b"k", "k", value=True)),
    # flags other commands use are accepted and ignored; P and L are proxy hints
    case(b"mg k F5 C9 MX J1 D2 I P Lfoo\r\n", MetaGet(b"k")),
    case(b"mg " + KEY_250 + b" v\r\n", MetaGet(KEY_250, value=True)),
    case(b"mg Zm9v b k v\r\n", MetaGet(b"foo", "k", base64_key=True, value=True)),
    case(b"mg Zm9v! b\r\n", MetaGet(b"foo", base64_key=True)),  # bytes off the alphabet
    case(b"mg AA== b\r\n", MetaGet(b"\x00", base64_key=True)),
    case(b"mg IA== b\r\n", MetaGet(b" ", base64_key=True)),  # any bytes, a space too
    case(b"mg\r\n", ERROR),
    case(b"mg \r\n", ERROR),
    case(b"mg " + KEY_251 + b" v\r\n", BAD_FORMAT),
    case(b"mg k\x01y v\r\n", BAD_FORMAT),  # Kai's key rule (memcached takes control bytes)
    case(b"mg k v v\r\n", DUPLICATE),
    case(b"mg k \xff\r\n", DUPLICATE),  # memcached's wording for a byte above 126
    case(b"mg k Y\r\n", INVALID_FLAG),
    # E (explicit cas) as memcached's later releases parse it (1.6.18 has no E)
    case(b"mg k E5 N30\r\n", MetaGet(b"k", "N", vivify_exptime=30, new_cas=5)),
    case(b"mg k E18446744073709551615\r\n", MetaGet(b"k", new_cas=2**64 - 1)),
    case(b"mg k E18446744073709551616\r\n", BAD_TOKEN),
    case(b"mg k Ex\r\n", BAD_TOKEN),
    case(b"mg k E\r\n", BAD_TOKEN),
    case(b"mg k E1 E2\r\n", DUPLICATE),
    case(b"mg k 1\r\n", INVALID_FLAG),
    case(b"mg k T\r\n", BAD_TOKEN),
    case(b"mg k Tx\r\n", BAD_TOKEN),
    case(b"mg k N\r\n", BAD_TOKEN),
    case(b"mg k R1.5\r\n", BAD_TOKEN),
    case(b"mg k T2147483648\r\n", BAD_TOKEN),
    case(b"mg k Fx\r\n", BAD_FORMAT),  # F's error has no message of its own
    case(b"mg k F4294967296\r\n", BAD_FORMAT),  # Kai: flags are 32 bits (memcached wraps)
    case(b"mg k Cx\r\n", BAD_TOKEN),
    case(b"mg k M\r\n", error(b"CLIENT_ERROR incorrect length for M token")),
    case(b"mg k Jx\r\n", error(b"CLIENT_ERROR invalid numeric initial value")),
    case(b"mg k Dx\r\n", error(b"CLIENT_ERROR invalid numeric delta value")),
    # precedence: an unknown or repeated flag stops at once; a bad token's error is the last
    case(b"mg k Tx Y\r\n", INVALID_FLAG),
    case(b"mg k Fx Tx\r\n", BAD_TOKEN),
    case(b"mg k Tx Fx\r\n", BAD_TOKEN),
    case(b"mg k Tx Dx\r\n", error(b"CLIENT_ERROR invalid numeric delta value")),
    case(b"mg ! b\r\n", DECODING),
    case(b"mg Zm9 b\r\n", DECODING),
    case(b"mg Zm9vYg= b\r\n", DECODING),
    case(b"mg A=== b\r\n", DECODING),
    case(
        b"mg k v k c f h l t s u O1 q P L T30 R5 N5\r\n",
        MetaGet(
            b"k",
            "kcfhltsOTN",
            opaque=b"1",
            value=True,
            quiet=True,
            no_bump=True,
            touch_exptime=30,
            vivify_exptime=5,
            recache_exptime=5,
        ),
    ),
    case(
        b"mg k v k c f h l t s u O1 q P L T30 R5 N5 x y\r\n",
        error(b"CLIENT_ERROR options flags are too long"),
    ),
    # K: a read with context takes b c k O q v (and the proxy hints), no token
    case(b"mg k K\r\n", MetaGet(b"k", "K", with_context=True)),
    case(
        b"mg k v c K k O9 q\r\n",
        MetaGet(b"k", "cKkO", opaque=b"9", value=True, quiet=True, with_context=True),
    ),
    case(b"mg k K t\r\n", INVALID_FLAG),
    case(b"mg k K T5\r\n", INVALID_FLAG),
    case(b"mg k K E5\r\n", INVALID_FLAG),
    case(b"mg k K u\r\n", INVALID_FLAG),
    case(b"mg k Kx\r\n", INVALID_FLAG),
    case(b"mg k K K\r\n", DUPLICATE),
    # --- ms ---
    case(b"ms k 2\r\nhi\r\n", MetaSet(b"k", b"hi")),
    case(b"ms k 0\r\n\r\n", MetaSet(b"k", b"")),
    case(b"ms k 2 \r\nhi\r\n", MetaSet(b"k", b"hi")),
    case(
        b"ms k 2 T100 F7 c k O5 q\r\nhi\r\n",
        MetaSet(b"k", b"hi", "ckO", opaque=b"5", quiet=True, flags=7, exptime=100),
    ),
    case(b"ms k 2 ME\r\nhi\r\n", MetaSet(b"k", b"hi", mode="E")),
    case(b"ms k 2 MA\r\nhi\r\n", MetaSet(b"k", b"hi", mode="A")),
    case(b"ms k 2 E42 C7 c\r\nhi\r\n", MetaSet(b"k", b"hi", "c", compare_cas=7, new_cas=42)),
    case(b"ms k 2 MP\r\nhi\r\n", MetaSet(b"k", b"hi", mode="P")),
    case(b"ms k 2 MR\r\nhi\r\n", MetaSet(b"k", b"hi", mode="R")),
    case(b"ms k 2 MS C7 I\r\nhi\r\n", MetaSet(b"k", b"hi", compare_cas=7, invalidate=True)),
    case(b"ms k 2 F4294967295\r\nhi\r\n", MetaSet(b"k", b"hi", flags=2**32 - 1)),
    case(b"ms k 2 v s t N5 D1 J1 h l u\r\nhi\r\n", MetaSet(b"k", b"hi")),  # ignored
    case(b"ms Zm9v 2 b k\r\nhi\r\n", MetaSet(b"foo", b"hi", "k", base64_key=True)),
    case(b"ms k 4\r\na\r\nb\r\n", MetaSet(b"k", b"a\r\nb")),
    # line errors: nothing swallowed, the data block is parsed as a command
    case(b"ms\r\n", ERROR),
    case(b"ms k\r\n", BAD_FORMAT),
    case(b"ms k S2\r\nhi\r\n", BAD_FORMAT, ERROR),
    case(b"ms k -1\r\nhi\r\n", BAD_FORMAT, ERROR),
    case(b"ms k 2x\r\nhi\r\n", BAD_FORMAT, ERROR),
    case(b"ms k 2147483646\r\nmn\r\n", BAD_FORMAT, NOOP),
    case(b"ms " + KEY_251 + b" 2\r\nhi\r\n", BAD_FORMAT, ERROR),
    case(
        b"ms k 2 k c O1 q P L T30 F5 I C1 b1 X X X X X X\r\nhi\r\nmn\r\n",
        error(b"CLIENT_ERROR options flags too long"),
        ERROR,
        NOOP,
    ),
    # flag errors: the data block is swallowed
    case(b"ms k 2 E-5\r\nhi\r\nmn\r\n", BAD_TOKEN, NOOP),
    case(b"ms k 2 q q\r\nhi\r\nmn\r\n", DUPLICATE, NOOP),
    case(b"ms k 2 Fx\r\nhi\r\nmn\r\n", BAD_FORMAT, NOOP),
    case(b"ms k 2 Tx\r\nhi\r\nmn\r\n", BAD_TOKEN, NOOP),
    case(b"ms k 2 C-1\r\nhi\r\nmn\r\n", BAD_TOKEN, NOOP),
    case(b"ms k 2 M\r\nhi\r\nmn\r\n", error(b"CLIENT_ERROR incorrect length for M token"), NOOP),
    case(b"ms k 2 MX\r\nhi\r\nmn\r\n", error(b"CLIENT_ERROR invalid mode for ms M token"), NOOP),
    case(b"ms k 2 Ms\r\nhi\r\nmn\r\n", error(b"CLIENT_ERROR invalid mode for ms M token"), NOOP),
    case(
        b"ms k 2 O" + OPAQUE_31 + b"x MX\r\nhi\r\nmn\r\n",
        error(b"CLIENT_ERROR invalid mode for ms M token"),  # the mode's error wins
        NOOP,
    ),
    case(b"ms k 2 O" + OPAQUE_31 + b"x\r\nhi\r\nmn\r\n", OPAQUE_LONG, NOOP),
    case(b"ms ! 2 b\r\nhi\r\nmn\r\n", DECODING, NOOP),
    # a bad chunk is answered even with q; its last bytes are parsed as commands
    case(b"ms k 2\r\nhiX\r\nmn\r\n", BAD_CHUNK, ERROR, NOOP),
    case(b"ms k 2 q\r\nhiX\r\nmn\r\n", BAD_CHUNK, ERROR, NOOP),
    # too large: swallowed, whatever the flags
    case(
        b"ms k 40\r\n" + b"x" * 40 + b"\r\nmn\r\n", MetaValueTooLarge(b"k"), NOOP, max_item_size=32
    ),
    case(
        b"ms Zm9v 40 b q ME\r\n" + b"x" * 40 + b"\r\nmn\r\n",
        MetaValueTooLarge(b"foo", base64_key=True),
        NOOP,
        max_item_size=32,
    ),
    case(b"ms k 32\r\n" + b"x" * 32 + b"\r\n", MetaSet(b"k", b"x" * 32), max_item_size=32),
    # K: a write in context, the token kept as sent
    case(
        b"ms k 2 Kabc F3 T9 k\r\nhi\r\n",
        MetaSet(b"k", b"hi", "Kk", flags=3, exptime=9, context=b"abc"),
    ),
    case(b"ms k 2 K MS\r\nhi\r\n", MetaSet(b"k", b"hi", "K", context=b"")),
    case(b"ms k 2 Kabc C5\r\nhi\r\nmn\r\n", INVALID_FLAG, NOOP),
    case(b"ms k 2 Kabc I\r\nhi\r\nmn\r\n", INVALID_FLAG, NOOP),
    case(b"ms k 2 Kabc N5\r\nhi\r\nmn\r\n", INVALID_FLAG, NOOP),
    case(b"ms k 2 Kabc ME\r\nhi\r\nmn\r\n", INVALID_FLAG, NOOP),
    case(b"ms k 2 Kabc E5\r\nhi\r\nmn\r\n", INVALID_FLAG, NOOP),
    case(
        b"ms k 40 Kabc\r\n" + b"x" * 40 + b"\r\n",
        MetaValueTooLarge(b"k", context=b"abc"),
        max_item_size=32,
    ),
    # --- md ---
    case(b"md k\r\n", MetaDelete(b"k")),
    case(
        b"md k q I T30 C5 k O1\r\n",
        MetaDelete(b"k", "kO", opaque=b"1", quiet=True, compare_cas=5, invalidate=True, exptime=30),
    ),
    case(b"md k v s f t N5 h l u\r\n", MetaDelete(b"k")),
    case(b"md Zm9vYmFy b k\r\n", MetaDelete(b"foobar", "k", base64_key=True)),
    case(b"md\r\n", ERROR),
    case(b"md " + KEY_251 + b"\r\n", BAD_FORMAT),
    case(b"md k Y\r\n", INVALID_OR_DUPLICATE),
    case(b"md k k k\r\n", INVALID_OR_DUPLICATE),
    case(b"md k Cx\r\n", INVALID_OR_DUPLICATE),
    case(b"md ! b\r\n", INVALID_OR_DUPLICATE),
    case(b"md k O" + OPAQUE_31 + b"x\r\n", OPAQUE_LONG),
    case(
        b"md k k O1 q P L T30 I C1 h l t s u f v N5 R1 x\r\n",
        error(b"CLIENT_ERROR options flags too long"),
    ),
    case(b"md k Kabc k q\r\n", MetaDelete(b"k", "Kk", quiet=True, context=b"abc")),
    case(b"md k Kabc I\r\n", INVALID_OR_DUPLICATE),
    case(b"md k Kabc T5\r\n", INVALID_OR_DUPLICATE),
    case(b"md k Kabc E5\r\n", INVALID_OR_DUPLICATE),
    case(b"md k I E7\r\n", MetaDelete(b"k", invalidate=True, new_cas=7)),
    case(b"md k Ex\r\n", INVALID_OR_DUPLICATE),
    # --- ma ---
    case(b"ma k\r\n", MetaArithmetic(b"k")),
    case(b"ma k N0 J10 v\r\n", MetaArithmetic(b"k", "N", initial=10, vivify_exptime=0, value=True)),
    case(b"ma k MD D100 v\r\n", MetaArithmetic(b"k", incr=False, delta=100, value=True)),
    case(b"ma k M- t c k O1\r\n", MetaArithmetic(b"k", "tckO", opaque=b"1", incr=False)),
    case(b"ma k M+\r\n", MetaArithmetic(b"k")),
    case(b"ma k MI\r\n", MetaArithmetic(b"k")),
    case(
        b"ma k D18446744073709551615 C3 t T5 q\r\n",
        MetaArithmetic(b"k", "tT", quiet=True, delta=2**64 - 1, touch_exptime=5, compare_cas=3),
    ),
    case(b"ma\r\n", ERROR),
    case(b"ma k Mi\r\n", error(b"CLIENT_ERROR invalid mode for ma M token")),
    case(b"ma k M\r\n", INVALID_OR_DUPLICATE),
    case(b"ma k D\r\n", INVALID_OR_DUPLICATE),
    case(b"ma k D-1\r\n", INVALID_OR_DUPLICATE),
    case(b"ma k D18446744073709551616\r\n", INVALID_OR_DUPLICATE),
    case(b"ma k t t\r\n", INVALID_OR_DUPLICATE),
    case(b"ma k K\r\n", INVALID_OR_DUPLICATE),  # no K on ma
    case(b"ma k E9 v\r\n", MetaArithmetic(b"k", new_cas=9, value=True)),
    case(b"ma k E-9\r\n", INVALID_OR_DUPLICATE),
    case(b"ma k O" + OPAQUE_31 + b"x\r\n", OPAQUE_LONG),
    # --- me, mn ---
    case(b"me k\r\n", MetaDebug(b"k")),
    case(b"me k x y\r\n", MetaDebug(b"k")),
    case(b"me Zm9vYmFy b\r\n", MetaDebug(b"foobar", base64_key=True)),
    case(b"me Zm9vYmFy b x\r\n", MetaDebug(b"foobar", base64_key=True)),
    case(b"me Zm9vYmFy x b\r\n", MetaDebug(b"Zm9vYmFy")),  # only a b right after the key
    case(b"me\r\n", BAD_FORMAT),
    case(b"me " + KEY_251 + b"\r\n", BAD_FORMAT),
    case(b"me ! b\r\n", BAD_FORMAT),
    case(b"mn\r\n", NOOP),
    case(b"mn q k\r\n", NOOP),
    case(b"mx\r\n", ERROR),
    # meta lines are limited as classic lines are
    case(b"mg " + b"k" * 2100, LINE_TOO_LONG),
    # mixed with classic commands on one connection
    case(
        b"mg k v q\r\nget k\r\nms k 1\r\nx\r\nset k 0 0 1\r\ny\r\nmn\r\n",
        MetaGet(b"k", value=True, quiet=True),
        Get((b"k",)),
        MetaSet(b"k", b"x"),
        Store("set", b"k", 0, 0, b"y"),
        NOOP,
    ),
]


@pytest.mark.parametrize(("data", "expected", "limits"), CASES)
def test_parse_three_ways(data: bytes, expected: list[Event], limits: dict[str, int]) -> None:
    check_three_ways(data, expected, **limits)


def test_meta_set_value_is_swallowed_without_being_buffered() -> None:
    parser = MemcacheParser(max_item_size=10)
    parser.receive_data(b"ms k 1000000 F1\r\n")
    parser.receive_data(b"x" * 500_000)
    assert parser.next_event() is NEED_DATA
    assert parser.buffered == 0
    parser.receive_data(b"x" * 500_000 + b"\r\nmn\r\n")
    assert parser.next_event() == MetaValueTooLarge(b"k")
    assert parser.next_event() == NOOP


# --- base64 keys -------------------------------------------------------------------------


@given(st.binary(min_size=1, max_size=187))
def test_base64_keys_decode_what_clients_encode(key: bytes) -> None:
    token = base64.b64encode(key)
    assert decode_base64_key(token) == key
    assert shown_key(key, True) == token


@given(st.binary(max_size=40))
def test_base64_decoder_never_raises_and_agrees_with_python_on_canonical_input(
    token: bytes,
) -> None:
    decoded = decode_base64_key(token)
    assert decoded is None or 1 <= len(decoded) <= len(token) * 3 // 4
    try:
        canonical = binascii.a2b_base64(token, strict_mode=True)
    except binascii.Error:
        return
    assert decoded == (canonical or None)


@pytest.mark.parametrize(
    ("token", "decoded"),
    [
        (b"Zm9v", b"foo"),
        (b"Zm9vYg==", b"foob"),
        (b"Zm9vYmE=", b"fooba"),
        (b"Zm 9v", b"foo"),  # a byte off the alphabet is skipped, as memcached does
        (b"AA==AAAA", b"\x00"),  # decoding stops after the first padded group
        (b"Zm9", None),
        (b"", None),
        (b"====", None),
        (b"A===", None),
        (b"!!!!", None),
    ],
)
def test_base64_decoder_follows_memcached(token: bytes, decoded: bytes | None) -> None:
    assert decode_base64_key(token) == decoded


# --- records refuse what the parser would never make ------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: MetaGet(b"bad key"),
        lambda: MetaGet(b""),
        lambda: MetaGet(b"k" * 251, base64_key=True),
        lambda: MetaGet(b"k", "tt"),
        lambda: MetaGet(b"k", "v"),  # not a return flag
        lambda: MetaGet(b"k", "O"),  # O without an opaque
        lambda: MetaGet(b"k", opaque=b"x"),  # an opaque without O
        lambda: MetaGet(b"k", "O", opaque=b"o" * OPAQUE_TOKEN_MAX_LENGTH),
        lambda: MetaGet(b"k", "T"),
        lambda: MetaGet(b"k", touch_exptime=5),
        lambda: MetaGet(b"k", "T", touch_exptime=2**31),
        lambda: MetaGet(b"k", "K"),
        lambda: MetaGet(b"k", "Kt", with_context=True),
        lambda: MetaGet(b"k", "K", no_bump=True, with_context=True),
        lambda: MetaSet(b"k", "x"),  # type: ignore[arg-type]
        lambda: MetaSet(b"k", b"", mode="X"),
        lambda: MetaSet(b"k", b"", flags=2**32),
        lambda: MetaSet(b"k", b"", compare_cas=-1),
        lambda: MetaSet(b"k", b"", "K"),
        lambda: MetaSet(b"k", b"", "K", context=b"t", compare_cas=1),
        lambda: MetaSet(b"k", b"", "K", context=b"t", mode="E"),
        lambda: MetaSet(b"k", b"", "K", context=b"t", new_cas=5),
        lambda: MetaSet(b"k", b"", new_cas=2**64),
        lambda: MetaGet(b"k", "K", with_context=True, new_cas=5),
        lambda: MetaGet(b"k", new_cas=-1),
        lambda: MetaDelete(b"k", "K", context=b"t", new_cas=5),
        lambda: MetaArithmetic(b"k", new_cas=2**64),
        lambda: MetaSet(b"k", b"", "K", context=b"a b"),
        lambda: MetaDelete(b"k", "K", context=b"t", invalidate=True),
        lambda: MetaDelete(b"k", "c"),
        lambda: MetaArithmetic(b"k", delta=2**64),
        lambda: MetaArithmetic(b"k", "N"),
        lambda: MetaArithmetic(b"k", "K"),
        lambda: MetaDebug(b"a b"),
        lambda: MetaValueTooLarge(b""),
    ],
)
def test_records_refuse_invalid_fields(build: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        build()


def test_binary_keys_may_hold_any_byte() -> None:
    assert MetaGet(b"\x00 \r\n", base64_key=True).key == b"\x00 \r\n"


# --- properties ----------------------------------------------------------------------------

binary_keys = st.binary(min_size=1, max_size=20)
int32s = st.integers(-(2**31), 2**31 - 1)
uint64s = st.integers(0, 2**64 - 1)
opaques = st.binary(max_size=OPAQUE_TOKEN_MAX_LENGTH - 1).map(lambda raw: raw.translate(KEY_SAFE))


@st.composite
def keyed(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {"key": draw(binary_keys), "base64_key": True}
    return {"key": draw(classic_keys), "base64_key": False}


def _returns(draw: st.DrawFn, letters: str) -> tuple[str, dict[str, Any]]:
    returns = "".join(draw(st.lists(st.sampled_from(letters), unique=True, max_size=6)))
    fields: dict[str, Any] = {}
    if "O" in returns:
        fields["opaque"] = draw(opaques)
    return returns, fields


@st.composite
def meta_gets(draw: st.DrawFn) -> MetaGet:
    returns, fields = _returns(draw, "cfhklOstTN")
    if "T" in returns:
        fields["touch_exptime"] = draw(int32s)
    if "N" in returns:
        fields["vivify_exptime"] = draw(int32s)
    return MetaGet(
        returns=returns,
        value=draw(st.booleans()),
        quiet=draw(st.booleans()),
        no_bump=draw(st.booleans()),
        recache_exptime=draw(st.none() | int32s),
        new_cas=draw(st.none() | uint64s),
        **fields,
        **draw(keyed()),
    )


@st.composite
def meta_sets(draw: st.DrawFn) -> MetaSet:
    returns, fields = _returns(draw, "ckO")
    return MetaSet(
        value=draw(st.binary(max_size=32)),
        returns=returns,
        quiet=draw(st.booleans()),
        flags=draw(st.integers(0, 2**32 - 1)),
        exptime=draw(int32s),
        mode=draw(st.sampled_from("EAPRS")),
        compare_cas=draw(st.none() | uint64s),
        new_cas=draw(st.none() | uint64s),
        invalidate=draw(st.booleans()),
        **fields,
        **draw(keyed()),
    )


@st.composite
def meta_deletes(draw: st.DrawFn) -> MetaDelete:
    returns, fields = _returns(draw, "kO")
    return MetaDelete(
        returns=returns,
        quiet=draw(st.booleans()),
        compare_cas=draw(st.none() | uint64s),
        new_cas=draw(st.none() | uint64s),
        invalidate=draw(st.booleans()),
        exptime=draw(st.none() | int32s),
        **fields,
        **draw(keyed()),
    )


@st.composite
def meta_arithmetics(draw: st.DrawFn) -> MetaArithmetic:
    returns, fields = _returns(draw, "ctTNOk")
    if "T" in returns:
        fields["touch_exptime"] = draw(int32s)
    if "N" in returns:
        fields["vivify_exptime"] = draw(int32s)
    return MetaArithmetic(
        returns=returns,
        quiet=draw(st.booleans()),
        incr=draw(st.booleans()),
        delta=draw(uint64s),
        initial=draw(uint64s),
        compare_cas=draw(st.none() | uint64s),
        new_cas=draw(st.none() | uint64s),
        value=draw(st.booleans()),
        **fields,
        **draw(keyed()),
    )


meta_requests = st.one_of(
    meta_gets(),
    meta_sets(),
    meta_deletes(),
    meta_arithmetics(),
    st.builds(lambda fields: MetaDebug(**fields), keyed()),
    st.just(NOOP),
)


def encode_meta(request: MetaRequest) -> bytes:
    """Write a meta request as a client would (test-only inverse of the parser)."""
    if isinstance(request, MetaNoop):
        return b"mn\r\n"
    key = shown_key(request.key, request.base64_key)
    if isinstance(request, MetaDebug):
        return b"me %b%b\r\n" % (key, b" b" if request.base64_key else b"")
    assert not isinstance(request, MetaValueTooLarge)  # not a line a client sends
    tokens = []
    for letter in request.returns:
        if letter == "O":
            assert request.opaque is not None
            tokens.append(b"O" + request.opaque)
        elif letter in "TN":
            assert isinstance(request, MetaGet | MetaArithmetic)
            exptime = request.touch_exptime if letter == "T" else request.vivify_exptime
            assert exptime is not None
            tokens.append(b"%b%d" % (letter.encode(), exptime))
        else:
            tokens.append(letter.encode())
    if request.base64_key:
        tokens.append(b"b")
    if request.quiet:
        tokens.append(b"q")
    if request.new_cas is not None:
        tokens.append(b"E%d" % request.new_cas)
    match request:
        case MetaGet():
            tokens += [b"v"] * request.value + [b"u"] * request.no_bump
            if request.recache_exptime is not None:
                tokens.append(b"R%d" % request.recache_exptime)
            return b" ".join([b"mg", key, *tokens]) + b"\r\n"
        case MetaSet():
            tokens += [
                b"F%d" % request.flags,
                b"T%d" % request.exptime,
                b"M" + request.mode.encode(),
            ]
            if request.compare_cas is not None:
                tokens.append(b"C%d" % request.compare_cas)
            tokens += [b"I"] * request.invalidate
            line = b" ".join([b"ms", key, b"%d" % len(request.value), *tokens])
            return line + b"\r\n" + request.value + b"\r\n"
        case MetaDelete():
            if request.compare_cas is not None:
                tokens.append(b"C%d" % request.compare_cas)
            if request.exptime is not None:
                tokens.append(b"T%d" % request.exptime)
            tokens += [b"I"] * request.invalidate
            return b" ".join([b"md", key, *tokens]) + b"\r\n"
        case MetaArithmetic():
            tokens += [b"MI" if request.incr else b"MD", b"D%d" % request.delta]
            tokens += [b"J%d" % request.initial] + [b"v"] * request.value
            if request.compare_cas is not None:
                tokens.append(b"C%d" % request.compare_cas)
            return b" ".join([b"ma", key, *tokens]) + b"\r\n"
    raise AssertionError(request)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(meta_requests, max_size=6), data=st.data())
def test_meta_requests_round_trip(batch: list[MetaRequest], data: st.DataObject) -> None:
    lines = [encode_meta(request) for request in batch]
    # memcached takes at most 19 tokens on a line; the generator may make more.
    fitting = [
        (request, line)
        for request, line in zip(batch, lines, strict=True)
        if len(line.split(b"\r\n")[0].split()) <= 19
    ]
    stream = b"".join(line for _, line in fitting)
    parser = MemcacheParser(max_item_size=32)
    assert feed_all(parser, data.draw(chunked(stream))) == [request for request, _ in fitting]


def test_meta_set_header_waits_for_its_value() -> None:
    parser = MemcacheParser()
    parser.receive_data(b"ms k 3 T5\r\nab")
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"c\r\n")
    assert parser.next_event() == MetaSet(b"k", b"abc", exptime=5)


def test_parse_functions_are_what_the_parser_calls() -> None:
    assert meta_parser.parse_noop([b"mn"]) == NOOP
    assert attrs.evolve(MetaSet(b"k", b""), value=b"x").value == b"x"

"""memcached 1.6's meta commands, byte for byte, checked against real memcached and against kai.

Every test takes the ``server`` fixture, so it runs twice: against ``memcached -t 1`` (which
proves the expectation is what memcached 1.6.18 really answers) and against a kai node.
Where a number depends on the server (cas uniques, ``la``, ``size``, a TTL that may have
ticked by a second) the test checks its form, not its value. Every key is unique to its test.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

import pytest

from tests.system.conftest import RawConnection, Server
from tests.system.test_conformance import counter_deltas

pytestmark = pytest.mark.system

KeyFactory = Callable[[], str]
#: A value too large for both servers (memcached -I 1m, kai's max_item_size 1 MiB).
TOO_LARGE = 2_000_000


def new_key(unique_key: KeyFactory) -> bytes:
    return unique_key().encode()


def exchange(raw: RawConnection, data: bytes, expected: bytes) -> None:
    """Send ``data``; the reply must be exactly ``expected``."""
    raw.send(data)
    assert raw.read_exact(len(expected)) == expected


def exchange_like(raw: RawConnection, data: bytes, *patterns: bytes) -> list[bytes]:
    """Send ``data``; each reply line (CRLF excluded) must match its pattern in full."""
    raw.send(data)
    lines = [raw.read_line() for _ in patterns]
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line[:-2]), (line, pattern)
    return lines


def other_than(cas: bytes) -> bytes:
    """A cas unique that is not ``cas`` (and still fits 64 bits)."""
    return b"%d" % (int(cas) ^ 1)


def cas_in(line: bytes) -> bytes:
    found = re.search(rb" c(\d+)", line)
    assert found is not None, line
    return found.group(1)


TTL_100 = rb"t(99|100)"
TTL_30 = rb"t(29|30)"


# --- mg and ms ------------------------------------------------------------------------------


def test_explicit_cas_which_memcached_1_6_18_has_not(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    """``E`` (explicit cas) came after memcached 1.6.18, which refuses it: Kai's answers are
    the ones later releases document (``ms`` stores with the cas given, ``mg`` with ``N``
    creates with it, ``md I`` and ``ma`` write it; the flag's token is a number)."""
    key = new_key(unique_key)
    if not server.is_kai:
        exchange(raw, b"mg %b E5\r\n" % key, b"CLIENT_ERROR invalid flag\r\n")
        exchange(raw, b"ms %b 2 E5\r\nhi\r\nmn\r\n" % key, b"CLIENT_ERROR invalid flag\r\nMN\r\n")
        return
    exchange(raw, b"ms %b 2 E5 c\r\nhi\r\n" % key, b"HD c5\r\n")
    exchange(raw, b"mg %b c v\r\n" % key, b"VA 2 c5\r\nhi\r\n")
    exchange(raw, b"gets %b\r\n" % key, b"VALUE %b 0 2 5\r\nhi\r\nEND\r\n" % key)
    exchange(raw, b"ms %b 2 C4 E6\r\nho\r\n" % key, b"EX\r\n")
    exchange(raw, b"ms %b 2 C5 E6 c\r\nho\r\n" % key, b"HD c6\r\n")
    exchange(raw, b"md %b I E7\r\nmg %b c\r\n" % (key, key), b"HD\r\nHD c7 X W\r\n")
    exchange(raw, b"md %b q\r\nma %b N0 J3 E8 c v\r\n" % (key, key), b"VA 1 c8\r\n3\r\n")
    exchange(raw, b"md %b q\r\nmg %b N30 E9 c\r\n" % (key, key), b"HD c9 W\r\n")
    exchange(raw, b"mg %b Ex\r\n" % key, b"CLIENT_ERROR bad token in command line format\r\n")
    exchange(
        raw,
        b"ms %b 2 E-1\r\nhi\r\nmn\r\n" % key,
        b"CLIENT_ERROR bad token in command line format\r\nMN\r\n",
    )
    exchange(raw, b"md %b E-1\r\n" % key, b"CLIENT_ERROR invalid or duplicate flag\r\n")


def test_set_then_get_answers_flags_in_request_order(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key = new_key(unique_key)
    exchange(raw, b"ms %b 2 T100 F7\r\nhi\r\n" % key, b"HD\r\n")
    k = re.escape(key)
    exchange_like(
        raw,
        b"mg %b v f t c k s\r\n" % key,
        rb"VA 2 f7 " + TTL_100 + rb" c\d+ k" + k + rb" s2",
        b"hi",
    )
    exchange_like(raw, b"mg %b s k t f\r\n" % key, rb"HD s2 k" + k + b" " + TTL_100 + b" f7")
    exchange(raw, b"mg %b\r\n" % key, b"HD\r\n")
    exchange(raw, b"mg %b q\r\n" % key, b"HD\r\n")  # q hides a miss only
    exchange(raw, b"mg %b v q\r\n" % key, b"VA 2\r\nhi\r\n")
    exchange(raw, b"mg %b vq kv\r\n" % key, b"VA 2 k%b\r\nhi\r\n" % key)  # one letter each
    raw.assert_quiet()


def test_misses_pipelined_in_quiet_mode_end_with_mn(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key, missing = new_key(unique_key), new_key(unique_key)
    exchange(raw, b"mg %b v\r\n" % missing, b"EN\r\n")
    exchange(raw, b"mg %b v k O12\r\n" % missing, b"EN k%b O12\r\n" % missing)
    exchange(raw, b"ms %b 2\r\nhi\r\n" % key, b"HD\r\n")
    pipeline = b"mg %b v q\r\nmg %b v q k\r\nmg %b v q O1\r\nmn\r\n" % (missing, key, missing)
    exchange(raw, pipeline, b"VA 2 k%b\r\nhi\r\nMN\r\n" % key)
    exchange(raw, b"mn\r\nmn foo bar\r\n", b"MN\r\nMN\r\n")
    raw.assert_quiet()


def test_opaque_tokens(server: Server, raw: RawConnection, unique_key: KeyFactory) -> None:
    key = new_key(unique_key)
    exchange(raw, b"ms %b 2 O1 k\r\nhi\r\n" % key, b"HD O1 k%b\r\n" % key)
    longest = b"O" + b"o" * 31
    exchange(raw, b"mg %b %b k\r\n" % (key, longest), b"HD %b k%b\r\n" % (longest, key))
    exchange(raw, b"mg %b O\r\n" % key, b"HD O\r\n")
    too_long = b"CLIENT_ERROR opaque token too long\r\n"
    exchange(raw, b"mg %b %bo\r\n" % (key, longest), too_long)
    exchange(raw, b"md %b %bo\r\n" % (key, longest), too_long)
    exchange(raw, b"ms %b 2 %bo\r\nhi\r\nmn\r\n" % (key, longest), too_long + b"MN\r\n")
    exchange(raw, b"mg %b v\r\n" % key, b"VA 2\r\nhi\r\n")
    raw.assert_quiet()


ERROR_LINES = [
    (b"mg\r\n", b"ERROR\r\n"),
    (b"ms\r\n", b"ERROR\r\n"),
    (b"md\r\n", b"ERROR\r\n"),
    (b"ma\r\n", b"ERROR\r\n"),
    (b"mx {key}\r\n", b"ERROR\r\n"),
    (b"me\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"ms {key}\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"mg " + b"k" * 251 + b" v\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"md " + b"k" * 251 + b"\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"me " + b"k" * 251 + b"\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"mg {key} v v\r\n", b"CLIENT_ERROR duplicate flag\r\n"),
    (b"mg {key} \xff\r\n", b"CLIENT_ERROR duplicate flag\r\n"),
    (b"mg {key} Y\r\n", b"CLIENT_ERROR invalid flag\r\n"),
    (b"mg {key} 1\r\n", b"CLIENT_ERROR invalid flag\r\n"),
    (b"mg {key} T\r\n", b"CLIENT_ERROR bad token in command line format\r\n"),
    (b"mg {key} Nx\r\n", b"CLIENT_ERROR bad token in command line format\r\n"),
    (b"mg {key} R1.5\r\n", b"CLIENT_ERROR bad token in command line format\r\n"),
    (b"mg {key} C-1\r\n", b"CLIENT_ERROR bad token in command line format\r\n"),
    (b"mg {key} Fx\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"mg {key} Fx Tx\r\n", b"CLIENT_ERROR bad token in command line format\r\n"),
    (b"mg {key} Tx Dx\r\n", b"CLIENT_ERROR invalid numeric delta value\r\n"),
    (b"mg {key} Tx Y\r\n", b"CLIENT_ERROR invalid flag\r\n"),
    (b"mg {key} Jx\r\n", b"CLIENT_ERROR invalid numeric initial value\r\n"),
    (b"mg {key} M\r\n", b"CLIENT_ERROR incorrect length for M token\r\n"),
    (b"mg ! b\r\n", b"CLIENT_ERROR error decoding key\r\n"),
    (b"mg Zm9 b\r\n", b"CLIENT_ERROR error decoding key\r\n"),
    (
        b"mg {key} v k c f h l t s u O1 q P L T30 R5 N5 x y\r\n",
        b"CLIENT_ERROR options flags are too long\r\n",
    ),
    (
        b"md {key} k O1 q P L T30 I C1 h l t s u f v N5 R1 x\r\n",
        b"CLIENT_ERROR options flags too long\r\n",
    ),
    (b"md {key} Y\r\n", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"md {key} q q\r\n", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"md ! b\r\n", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"ma {key} D-1\r\n", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"ma {key} M\r\n", b"CLIENT_ERROR invalid or duplicate flag\r\n"),
    (b"ma {key} Mi\r\n", b"CLIENT_ERROR invalid mode for ma M token\r\n"),
    (b"me ! b\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    # ms errors in its flags swallow the data block; errors in its line do not
    (b"ms {key} 2 Y5\r\nhi\r\n", b"CLIENT_ERROR invalid flag\r\n"),
    (b"ms {key} 2 q q\r\nhi\r\n", b"CLIENT_ERROR duplicate flag\r\n"),
    (b"ms {key} 2 Fx\r\nhi\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    (b"ms {key} 2 Tx\r\nhi\r\n", b"CLIENT_ERROR bad token in command line format\r\n"),
    (b"ms {key} 2 M\r\nhi\r\n", b"CLIENT_ERROR incorrect length for M token\r\n"),
    (b"ms {key} 2 MX\r\nhi\r\n", b"CLIENT_ERROR invalid mode for ms M token\r\n"),
    (b"ms {key} 2 Ms\r\nhi\r\n", b"CLIENT_ERROR invalid mode for ms M token\r\n"),
    (b"ms ! 2 b\r\nhi\r\n", b"CLIENT_ERROR error decoding key\r\n"),
    (b"ms {key} S2\r\nhi\r\n", b"CLIENT_ERROR bad command line format\r\nERROR\r\n"),
    (b"ms {key} -1\r\nhi\r\n", b"CLIENT_ERROR bad command line format\r\nERROR\r\n"),
    (b"ms " + b"k" * 251 + b" 2\r\nhi\r\n", b"CLIENT_ERROR bad command line format\r\nERROR\r\n"),
    (
        b"ms {key} 2 k c O1 q P L T30 F5 I C1 b1 X X X X X X\r\nhi\r\n",
        b"CLIENT_ERROR options flags too long\r\nERROR\r\n",
    ),
    # a bad chunk is answered even in quiet mode; what follows it is parsed as a command
    (b"ms {key} 2\r\nhiX\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\n"),
    (b"ms {key} 2 q\r\nhiX\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\n"),
]


@pytest.mark.parametrize(
    ("line", "reply"), ERROR_LINES, ids=[repr(line[:40]) for line, _ in ERROR_LINES]
)
def test_error_lines(
    server: Server, raw: RawConnection, unique_key: KeyFactory, line: bytes, reply: bytes
) -> None:
    key = new_key(unique_key)
    exchange(raw, line.replace(b"{key}", key) + b"mn\r\n", reply + b"MN\r\n")
    exchange(raw, b"mg %b v\r\n" % key, b"EN\r\n")  # nothing was stored
    raw.assert_quiet()


def test_too_large_values_are_swallowed_and_drop_the_old_value(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    too_large = b"SERVER_ERROR object too large for cache\r\n"
    for mode in (b"", b" ME", b" MA"):
        key = new_key(unique_key)
        exchange(raw, b"ms %b 2\r\nhi\r\n" % key, b"HD\r\n")
        big = b"ms %b %d q k O1%b\r\n%b\r\nmn\r\n" % (key, TOO_LARGE, mode, b"x" * TOO_LARGE)
        exchange(raw, big, too_large + b"MN\r\n")
        exchange(raw, b"mg %b v\r\n" % key, b"EN\r\n")
    raw.assert_quiet()


def test_set_modes(server: Server, raw: RawConnection, unique_key: KeyFactory) -> None:
    key, missing = new_key(unique_key), new_key(unique_key)
    exchange(raw, b"ms %b 2 MR\r\nhi\r\n" % missing, b"NS\r\n")
    exchange(raw, b"ms %b 2 MA\r\nhi\r\n" % missing, b"NS\r\n")
    exchange(raw, b"ms %b 2 MP k\r\nhi\r\n" % missing, b"NS k%b\r\n" % missing)
    exchange(raw, b"ms %b 2 ME\r\nhi\r\n" % key, b"HD\r\n")
    exchange(raw, b"ms %b 2 ME q\r\nho\r\nmn\r\n" % key, b"NS\r\nMN\r\n")
    exchange(raw, b"ms %b 2 MA T5 F9\r\n!!\r\n" % key, b"HD\r\n")  # keeps flags and TTL
    exchange(raw, b"ms %b 2 MP\r\n<<\r\n" % key, b"HD\r\n")
    exchange(raw, b"mg %b v f t\r\n" % key, b"VA 6 f0 t-1\r\n<<hi!!\r\n")
    exchange(raw, b"ms %b 2 MR F5 T30\r\nrr\r\n" % key, b"HD\r\n")
    exchange_like(raw, b"mg %b v f t\r\n" % key, b"VA 2 f5 " + TTL_30, b"rr")
    exchange(raw, b"ms %b 2 MS q\r\nss\r\nmn\r\n" % key, b"MN\r\n")
    exchange(raw, b"mg %b v t\r\n" % key, b"VA 2 t-1\r\nss\r\n")
    exchange(raw, b"get %b\r\n" % key, b"VALUE %b 0 2\r\nss\r\nEND\r\n" % key)
    raw.assert_quiet()


def test_set_with_cas_compare(server: Server, raw: RawConnection, unique_key: KeyFactory) -> None:
    key, missing = new_key(unique_key), new_key(unique_key)
    exchange(raw, b"ms %b 2 C5 c k\r\nhi\r\n" % missing, b"NF c0 k%b\r\n" % missing)
    exchange(raw, b"ms %b 2 MR C5\r\nhi\r\n" % missing, b"NF\r\n")
    (line,) = exchange_like(raw, b"ms %b 2 c\r\nhi\r\n" % key, rb"HD c\d+")
    cas = cas_in(line)
    exchange(raw, b"ms %b 2 C%b q\r\nho\r\nmn\r\n" % (key, other_than(cas)), b"EX\r\nMN\r\n")
    exchange(raw, b"ms %b 2 C0\r\nho\r\n" % key, b"EX\r\n")
    exchange(raw, b"ms %b 2 C0 I\r\nho\r\n" % key, b"EX\r\n")
    (line,) = exchange_like(raw, b"ms %b 2 C%b c\r\nho\r\n" % (key, cas), rb"HD c\d+")
    assert cas_in(line) != cas
    exchange(raw, b"ms %b 1 MA C%b\r\n!\r\n" % (key, cas), b"EX\r\n")  # an old cas
    exchange(raw, b"ms %b 1 MA C0\r\n!\r\n" % key, b"HD\r\n")  # 0: no check for append
    exchange(raw, b"ms %b 1 ME C1\r\n!\r\n" % key, b"NS\r\n")  # add ignores the cas
    exchange(raw, b"mg %b v\r\n" % key, b"VA 3\r\nho!\r\n")
    (line,) = exchange_like(raw, b"mg %b c\r\n" % key, rb"HD c\d+")
    exchange(raw, b"ms %b 2 C%b MR\r\nrr\r\n" % (key, cas_in(line)), b"HD\r\n")
    raw.assert_quiet()


def test_get_with_touch(server: Server, raw: RawConnection, unique_key: KeyFactory) -> None:
    key, missing = new_key(unique_key), new_key(unique_key)
    exchange(raw, b"ms %b 2 T100\r\nhi\r\n" % key, b"HD\r\n")
    exchange_like(raw, b"mg %b t T30 v\r\n" % key, b"VA 2 " + TTL_100, b"hi")  # t before T
    exchange_like(raw, b"mg %b T40 t\r\n" % key, rb"HD t(39|40)")
    exchange_like(raw, b"mg %b t\r\n" % key, rb"HD t(39|40)")
    exchange(raw, b"mg %b T30 v\r\n" % missing, b"EN\r\n")
    raw.assert_quiet()


# --- wins and stale items ---------------------------------------------------------------------


def test_vivify_on_miss_wins_then_others_see_z(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key = new_key(unique_key)
    exchange_like(raw, b"mg %b N30 t v s f\r\n" % key, b"VA 0 " + TTL_30 + b" s0 f0 W", b"")
    exchange_like(raw, b"mg %b N30 t v s f\r\n" % key, b"VA 0 " + TTL_30 + b" s0 f0 Z", b"")
    exchange(raw, b"mg %b v\r\n" % key, b"VA 0 Z\r\n\r\n")
    exchange(raw, b"get %b\r\n" % key, b"VALUE %b 0 0\r\n\r\nEND\r\n" % key)
    exchange(raw, b"ms %b 3\r\nnew\r\n" % key, b"HD\r\n")  # the winner recaches
    exchange(raw, b"mg %b N30 t v\r\n" % key, b"VA 3 t-1\r\nnew\r\n")
    quiet = new_key(unique_key)
    pipeline = b"mg %b N30 q v k\r\nmn\r\n" % quiet
    exchange(raw, pipeline, b"VA 0 k%b W\r\n\r\nMN\r\n" % quiet)
    exchange(raw, pipeline, b"VA 0 k%b Z\r\n\r\nMN\r\n" % quiet)
    ordered = new_key(unique_key)
    exchange(raw, b"mg %b t N30\r\n" % ordered, b"HD t-1 W\r\n")  # t before N: no TTL yet
    exchange_like(raw, b"mg %b t\r\n" % ordered, b"HD " + TTL_30 + b" Z")
    raw.assert_quiet()


def test_recache_wins_before_expiry_and_keeps_the_cas(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key = new_key(unique_key)
    exchange(raw, b"ms %b 3 T100\r\nabc\r\n" % key, b"HD\r\n")
    exchange_like(raw, b"mg %b R30 t\r\n" % key, b"HD " + TTL_100)
    (line,) = exchange_like(raw, b"mg %b R200 c\r\n" % key, rb"HD c\d+ W")
    cas = cas_in(line)
    exchange(raw, b"mg %b R200 c\r\n" % key, b"HD c%b Z\r\n" % cas)
    exchange(raw, b"mg %b v\r\n" % key, b"VA 3 Z\r\nabc\r\n")
    exchange(raw, b"ms %b 3 C%b\r\nnew\r\n" % (key, cas), b"HD\r\n")  # the win kept the cas
    exchange(raw, b"mg %b v\r\n" % key, b"VA 3\r\nnew\r\n")
    exchange(raw, b"mg %b R0\r\nmg %b R999\r\n" % (key, key), b"HD\r\nHD\r\n")  # no TTL: no win
    raw.assert_quiet()


def test_invalidate_then_one_client_wins_and_the_next_sees_z(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key = new_key(unique_key)
    exchange(raw, b"ms %b 3 T100\r\nabc\r\n" % key, b"HD\r\n")
    (line,) = exchange_like(raw, b"mg %b c\r\n" % key, rb"HD c\d+")
    cas = cas_in(line)
    exchange(raw, b"md %b I T30\r\n" % key, b"HD\r\n")
    (line, _data) = exchange_like(
        raw, b"mg %b c t v\r\n" % key, rb"VA 3 c\d+ " + TTL_30 + b" X W", b"abc"
    )
    stale_cas = cas_in(line)
    assert stale_cas != cas  # md I gives the item a new cas
    exchange_like(
        raw, b"mg %b c t v\r\n" % key, b"VA 3 c" + stale_cas + b" " + TTL_30 + b" Z X", b"abc"
    )
    exchange(raw, b"get %b\r\n" % key, b"VALUE %b 0 3\r\nabc\r\nEND\r\n" % key)  # still served
    exchange(raw, b"md %b I q\r\nmn\r\n" % key, b"MN\r\n")  # a new win, the TTL kept
    exchange_like(raw, b"mg %b t v\r\n" % key, b"VA 3 " + TTL_30 + b" X W", b"abc")
    exchange(raw, b"ms %b 3 C%b\r\nxyz\r\n" % (key, stale_cas), b"EX\r\n")  # md I bumped it
    exchange(raw, b"ms %b 3\r\nnew\r\n" % key, b"HD\r\n")
    exchange(raw, b"mg %b v\r\n" % key, b"VA 3\r\nnew\r\n")
    raw.assert_quiet()


def test_set_with_an_outdated_cas_and_invalidate_stores_a_stale_value(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key = new_key(unique_key)
    (line,) = exchange_like(raw, b"ms %b 3 T100 c\r\nold\r\n" % key, rb"HD c\d+")
    outdated = cas_in(line)
    exchange(raw, b"ms %b 3 T100\r\ncur\r\n" % key, b"HD\r\n")
    exchange(raw, b"mg %b R200\r\n" % key, b"HD W\r\n")
    exchange(raw, b"ms %b 3 C%b\r\nnew\r\n" % (key, outdated), b"EX\r\n")
    exchange(raw, b"ms %b 3 C%b I T5 F2\r\nnew\r\n" % (key, outdated), b"HD\r\n")
    # stored as stale, with the item's TTL (T ignored) and its win already handed out
    exchange_like(raw, b"mg %b v t f\r\n" % key, b"VA 3 " + TTL_100 + b" f2 Z X", b"new")
    (line,) = exchange_like(raw, b"mg %b c\r\n" % key, rb"HD c\d+ Z X")
    exchange(raw, b"ms %b 3 C%b I\r\nnow\r\n" % (key, cas_in(line)), b"HD\r\n")  # current: fresh
    exchange(raw, b"mg %b v\r\n" % key, b"VA 3\r\nnow\r\n")
    raw.assert_quiet()


# --- md ----------------------------------------------------------------------------------------


def test_delete(server: Server, raw: RawConnection, unique_key: KeyFactory) -> None:
    key = new_key(unique_key)
    exchange(raw, b"md %b q\r\nmn\r\n" % key, b"NF\r\nMN\r\n")
    exchange(raw, b"md %b k O5\r\n" % key, b"NF k%b O5\r\n" % key)
    exchange(raw, b"md %b I\r\n" % key, b"NF\r\n")
    (line,) = exchange_like(raw, b"ms %b 2 c\r\nhi\r\n" % key, rb"HD c\d+")
    cas = cas_in(line)
    exchange(raw, b"md %b C%b q\r\n" % (key, other_than(cas)), b"EX\r\n")
    exchange(raw, b"md %b C%b O1 k\r\n" % (key, cas), b"HD O1 k%b\r\n" % key)
    exchange(raw, b"mg %b\r\n" % key, b"EN\r\n")
    exchange(raw, b"ms %b 2\r\nhi\r\n" % key, b"HD\r\n")
    exchange(raw, b"md %b T30 v s\r\n" % key, b"HD\r\n")  # T without I: just a delete
    exchange(raw, b"md %b q\r\nmg %b\r\n" % (key, key), b"NF\r\nEN\r\n")
    raw.assert_quiet()


# --- ma ----------------------------------------------------------------------------------------


def test_arithmetic(server: Server, raw: RawConnection, unique_key: KeyFactory) -> None:
    key, missing = new_key(unique_key), new_key(unique_key)
    exchange(raw, b"ma %b v\r\n" % key, b"NF\r\n")
    exchange(raw, b"ma %b N0 J10 v\r\n" % key, b"VA 2\r\n10\r\n")
    exchange(raw, b"ma %b v\r\n" % key, b"VA 2\r\n11\r\n")
    exchange(raw, b"ma %b MD D100 v\r\n" % key, b"VA 1\r\n0\r\n")  # no underflow
    exchange(raw, b"ma %b M- v t k O1\r\n" % key, b"VA 1 t-1 k%b O1\r\n0\r\n" % key)
    exchange(
        raw, b"ma %b M+ D18446744073709551615 v\r\n" % key, b"VA 20\r\n18446744073709551615\r\n"
    )
    exchange(raw, b"ma %b MI D2 v\r\n" % key, b"VA 1\r\n1\r\n")  # overflow wraps
    exchange(raw, b"ma %b\r\n" % key, b"HD\r\n")
    exchange(raw, b"ma %b q\r\nma %b q v\r\nmn\r\n" % (key, key), b"MN\r\n")
    exchange(raw, b"ma %b q v k O5\r\nmn\r\n" % missing, b"NF k%b O5\r\nMN\r\n" % missing)
    exchange(raw, b"ma %b J7 v\r\n" % missing, b"NF\r\n")  # J needs N
    raw.assert_quiet()


def test_arithmetic_vivify_ttl_cas_and_non_numeric(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    quiet, counter, text, empty = (new_key(unique_key) for _ in range(4))
    exchange(raw, b"ma %b N0 q\r\nmn\r\n" % quiet, b"HD\r\nMN\r\n")  # a creation is not hidden
    exchange(raw, b"ma %b N0 q\r\nmn\r\n" % quiet, b"MN\r\n")
    exchange_like(raw, b"ma %b N100 J7 v t\r\n" % counter, b"VA 1 " + TTL_100, b"7")
    exchange_like(raw, b"ma %b v t T5\r\n" % counter, b"VA 1 " + TTL_100, b"8")  # t before T
    exchange_like(raw, b"ma %b v t\r\n" % counter, rb"VA 1 t(4|5)", b"9")
    (line,) = exchange_like(raw, b"mg %b c\r\n" % counter, rb"HD c\d+")
    cas = cas_in(line)
    exchange(raw, b"ma %b C%b v\r\n" % (counter, other_than(cas)), b"EX\r\n")
    (line, _number) = exchange_like(
        raw, b"ma %b C%b v c\r\n" % (counter, cas), rb"VA 2 c\d+", b"10"
    )
    assert cas_in(line) != cas
    exchange(raw, b"ma %b C0 v\r\n" % counter, b"VA 2\r\n11\r\n")  # 0: no check
    exchange(raw, b"ms %b 3\r\nabc\r\nms %b 0\r\n\r\n" % (text, empty), b"HD\r\nHD\r\n")
    non_numeric = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    exchange(raw, b"ma %b v q\r\nma %b\r\n" % (text, empty), non_numeric * 2)
    raw.assert_quiet()


# --- base64 keys, me, h and l -------------------------------------------------------------------


def test_base64_keys(server: Server, raw: RawConnection, unique_key: KeyFactory) -> None:
    key = new_key(unique_key)
    encoded = base64.b64encode(key)
    exchange(raw, b"ms %b 2 b\r\nhi\r\n" % encoded, b"HD\r\n")
    exchange(raw, b"mg %b b v k\r\n" % encoded, b"VA 2 k%b b\r\nhi\r\n" % encoded)
    exchange(raw, b"mg %b v k b\r\n" % encoded, b"VA 2 k%b b\r\nhi\r\n" % encoded)
    exchange(raw, b"get %b\r\n" % key, b"VALUE %b 0 2\r\nhi\r\nEND\r\n" % key)  # the same key
    exchange(raw, b"mg %b v\r\n" % encoded, b"EN\r\n")  # without b, another key
    binary = b"\x00\x01 \r\n" + key[:20]
    token = base64.b64encode(binary)
    exchange(raw, b"ms %b 1 b k\r\nx\r\n" % token, b"HD k%b b\r\n" % token)
    exchange(raw, b"mg %b b s v\r\n" % token, b"VA 1 s1\r\nx\r\n")
    exchange(
        raw,
        b"ma %b b k N0\r\n" % token,
        b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
    )
    exchange(raw, b"md %b b k\r\n" % token, b"HD k%b b\r\n" % token)
    exchange(raw, b"md %b b k\r\n" % token, b"NF k%b b\r\n" % token)
    exchange(raw, b"mg %b b k O7\r\n" % token, b"EN k%b b O7\r\n" % token)
    raw.assert_quiet()


def test_debug(server: Server, raw: RawConnection, unique_key: KeyFactory) -> None:
    key, missing = new_key(unique_key), new_key(unique_key)
    exchange(raw, b"me %b\r\n" % missing, b"EN\r\n")
    exchange(raw, b"ms %b 2 T100 F7\r\nhi\r\n" % key, b"HD\r\n")
    k = re.escape(key)
    item = rb" la=\d+ cas=\d+ fetch=%b cls=\d+ size=\d+"
    exchange_like(raw, b"me %b\r\n" % key, rb"ME " + k + rb" exp=-(99|100)" + item % b"no")
    exchange(raw, b"mg %b u\r\n" % key, b"HD\r\n")  # u does not count as a fetch
    exchange_like(raw, b"me %b x y\r\n" % key, rb"ME " + k + rb" exp=-(99|100)" + item % b"no")
    exchange(raw, b"mg %b\r\n" % key, b"HD\r\n")
    exchange_like(raw, b"me %b\r\n" % key, rb"ME " + k + rb" exp=-(99|100)" + item % b"yes")
    encoded = base64.b64encode(missing)
    exchange(raw, b"ms %b 1 b\r\n0\r\n" % encoded, b"HD\r\n")
    exchange_like(raw, b"me %b b\r\n" % encoded, rb"ME \S+ exp=-1" + item % b"no")
    raw.assert_quiet()


def test_hit_before_and_last_access(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key = new_key(unique_key)
    exchange(raw, b"ms %b 2\r\nhi\r\n" % key, b"HD\r\n")
    exchange_like(raw, b"mg %b h l u\r\n" % key, rb"HD h0 l\d+")
    exchange_like(raw, b"mg %b l h\r\n" % key, rb"HD l\d+ h0")  # u did not count
    exchange(raw, b"mg %b h\r\n" % key, b"HD h1\r\n")
    exchange(raw, b"mg %b h v\r\n" % key, b"VA 2 h1\r\nhi\r\n")
    exchange(raw, b"ms %b 2\r\nho\r\n" % key, b"HD\r\n")
    exchange(raw, b"mg %b h\r\n" % key, b"HD h0\r\n")  # a new item
    raw.assert_quiet()


# --- mixed with classic commands, counted as memcached counts them ----------------------------


def test_meta_and_classic_commands_mixed_on_one_connection(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key, counter = new_key(unique_key), new_key(unique_key)
    pipeline = (
        b"set %b 5 0 2\r\nhi\r\n"
        b"mg %b v f q\r\n"
        b"ms %b 2 MA\r\n!!\r\n"
        b"get %b\r\n"
        b"set %b 0 0 1\r\n7\r\n"
        b"ma %b v\r\n"
        b"incr %b 2\r\n"
        b"mg %b v\r\n"
        b"delete %b\r\n"
        b"md %b q\r\n"
        b"mn\r\n"
    ) % (key, key, key, key, counter, counter, counter, counter, key, key)
    expected = (
        b"STORED\r\n"
        b"VA 2 f5\r\nhi\r\n"
        b"HD\r\n"
        b"VALUE %b 5 4\r\nhi!!\r\nEND\r\n"
        b"STORED\r\n"
        b"VA 1\r\n8\r\n"
        b"10\r\n"
        b"VA 2\r\n10\r\n"
        b"DELETED\r\n"
        b"NF\r\n"
        b"MN\r\n"
    ) % key
    exchange(raw, pipeline, expected)
    raw.assert_quiet()


COUNTED = (
    "cmd_get",
    "get_hits",
    "get_misses",
    "cmd_set",
    "cmd_touch",
    "touch_hits",
    "delete_hits",
    "delete_misses",
    "incr_hits",
    "incr_misses",
    "decr_hits",
    "decr_misses",
    "cas_hits",
    "cas_misses",
    "cas_badval",
    "store_too_large",
)


@pytest.mark.parametrize(
    ("requests", "moved"),
    [
        (b"mg {missing} v\r\n", {"cmd_get": 1, "get_misses": 1}),
        (b"mg {missing} T30\r\n", {"cmd_get": 1, "get_misses": 1}),
        (b"mg {key} v\r\nmg {key} u\r\n", {"cmd_get": 2, "get_hits": 2}),
        (b"mg {key} T30\r\n", {"cmd_touch": 1, "touch_hits": 1}),
        (b"mg {missing} N30\r\nmg {missing} N30\r\n", {"cmd_get": 2, "get_hits": 2}),
        (b"ms {key} 1\r\na\r\nms {key} 1 ME\r\na\r\n", {"cmd_set": 2}),
        (b"ms {key} 1 C1\r\na\r\n", {"cmd_set": 1, "cas_badval": 1}),
        (b"ms {missing} 1 C1\r\na\r\n", {"cmd_set": 1, "cas_misses": 1}),
        (b"ms {key} 1 C1 MA\r\na\r\n", {"cmd_set": 1}),
        (b"ms {key} 1 Y\r\na\r\n", {}),
        (b"ms {key} %d\r\n%b\r\n" % (TOO_LARGE, b"a" * TOO_LARGE), {"store_too_large": 1}),
        (b"md {missing}\r\nmd {key} C1\r\n", {"delete_misses": 2}),
        (b"md {key} I\r\n", {}),
        (b"md {key}\r\n", {"delete_hits": 1}),
        (b"ma {missing}\r\nma {missing} MD\r\n", {"incr_misses": 1, "decr_misses": 1}),
        (b"ma {missing} N0\r\nma {missing} C1\r\n", {}),
        (b"ma {counter}\r\nma {counter} MD\r\n", {"incr_hits": 1, "decr_hits": 1}),
        (b"me {key}\r\nme {missing}\r\n", {}),
    ],
)
def test_meta_commands_move_memcacheds_counters(
    server: Server,
    raw: RawConnection,
    unique_key: KeyFactory,
    requests: bytes,
    moved: dict[str, int],
) -> None:
    key, missing, counter = new_key(unique_key), new_key(unique_key), new_key(unique_key)
    exchange(raw, b"ms %b 1\r\nx\r\nms %b 1\r\n5\r\n" % (key, counter), b"HD\r\nHD\r\n")
    data = requests.replace(b"{key}", key).replace(b"{missing}", missing)
    data = data.replace(b"{counter}", counter)

    def send() -> None:
        raw.send(data + b"mn\r\n")
        raw.read_until(b"MN\r\n")

    deltas = counter_deltas(raw, send)
    assert {name: deltas.get(name, 0) for name in COUNTED} == {
        name: moved.get(name, 0) for name in COUNTED
    }

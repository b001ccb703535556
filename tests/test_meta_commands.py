"""memcached 1.6's meta commands over the node's own coordinator, with an injected clock.

The executor runs on the coordinator every node runs (a ring of one, as tests/test_commands.py
does), and on an in-process five-node cluster in virtual time for the races: of two clients
through two nodes, one gets the win. Expected replies are memcached 1.6.18's (the
conformance tests check them against a running memcached); cas uniques are Kai's digests,
so tests take them from earlier replies.
"""

from __future__ import annotations

import re

import attrs
import msgpack
import pytest
import trio
import trio.testing

from kai.core import versions
from kai.core.accesses import AccessLog
from kai.core.errors import RpcBadRequest
from kai.core.memcache.meta import MetaDelete, MetaGet, MetaSet
from kai.core.pending import Step
from kai.core.updates import META_COMMANDS, MetaUpdate, Outcome, Update, decide
from kai.core.vclock import VClock
from kai.core.versions import (
    MARKED_RECORD_FORMAT,
    RECORD_FORMAT,
    STALE,
    WIN_SENT,
    Payload,
    Version,
    cas_unique,
    context_of,
    decode_siblings,
    encode_siblings,
    merge,
)
from kai.core.wire import siblings_from_wire, update_from_wire, update_to_wire
from kai.memcache.meta_commands import Extension, MetaExecutor
from kai.testing.cluster import InProcessCluster
from tests.test_cluster_causality import roles
from tests.test_commands import NOW, Harness, make_harness


@pytest.fixture
def h(nursery: trio.Nursery) -> Harness:
    return make_harness(nursery)


def cas_of(reply: bytes) -> int:
    found = re.search(rb" c(\d+)", reply)
    assert found is not None, reply
    return int(found.group(1))


def stored(h: Harness, key: bytes) -> tuple[Version, ...]:
    return h.replica.read(key)


# --- mg / ms ---------------------------------------------------------------------------------


async def test_set_then_get_returns_flags_in_request_order(h: Harness) -> None:
    assert await h.send(b"ms mk 2 T100 F7\r\nhi\r\n") == b"HD\r\n"
    reply = await h.send(b"mg mk v f t c k s\r\n")
    cas = cas_of(reply)
    assert reply == b"VA 2 f7 t100 c%d kmk s2\r\nhi\r\n" % cas
    assert await h.send(b"mg mk s k t f\r\n") == b"HD s2 kmk t100 f7\r\n"
    # the cas of mg is the cas of gets
    assert (await h.send(b"gets mk\r\n")).split(b"\r\n")[0] == b"VALUE mk 7 2 %d" % cas
    h.clock.now += 30
    assert await h.send(b"mg mk t\r\n") == b"HD t70\r\n"


async def test_misses_and_quiet_mode(h: Harness) -> None:
    assert await h.send(b"mg nokey v\r\n") == b"EN\r\n"
    assert await h.send(b"mg nokey v k O7\r\n") == b"EN knokey O7\r\n"
    await h.send(b"ms mk 2\r\nhi\r\n")
    pipeline = b"mg nokey v q\r\nmg mk v q k\r\nmg mk q\r\nmn\r\n"
    assert await h.send(pipeline) == b"VA 2 kmk\r\nhi\r\nHD\r\nMN\r\n"
    assert (h.stats.cmd_get, h.stats.get_hits, h.stats.get_misses) == (5, 2, 3)


async def test_opaque_and_base64_keys_are_echoed(h: Harness) -> None:
    assert await h.send(b"ms AAEg 2 b k c O9\r\nhi\r\n") == (
        b"HD kAAEg b c%d O9\r\n" % cas_unique(b"\x00\x01 ", context_of(stored(h, b"\x00\x01 ")))
    )
    assert await h.send(b"mg AAEg b v k O1\r\n") == b"VA 2 kAAEg b O1\r\nhi\r\n"
    assert await h.send(b"mg AAEg v\r\n") == b"EN\r\n"  # not the same key unless b
    assert await h.send(b"md AAEg b q\r\nmg AAEg b k\r\n") == b"EN kAAEg b\r\n"


async def test_set_modes(h: Harness) -> None:
    assert await h.send(b"ms k 2 MR\r\nhi\r\n") == b"NS\r\n"
    assert await h.send(b"ms k 2 MA\r\nhi\r\n") == b"NS\r\n"
    assert await h.send(b"ms k 2 ME\r\nhi\r\n") == b"HD\r\n"
    assert await h.send(b"ms k 2 ME\r\nho\r\n") == b"NS\r\n"
    assert await h.send(b"ms k 2 MA T5 F9\r\n!!\r\n") == b"HD\r\n"
    assert await h.send(b"ms k 2 MP\r\n<<\r\n") == b"HD\r\n"
    assert await h.send(b"mg k v f t\r\n") == b"VA 6 f0 t-1\r\n<<hi!!\r\n"
    assert await h.send(b"ms k 2 MR F5 T10\r\nrr\r\n") == b"HD\r\n"
    assert await h.send(b"mg k v f t\r\n") == b"VA 2 f5 t10\r\nrr\r\n"
    assert await h.send(b"ms k 2 MS\r\nss\r\n") == b"HD\r\n"
    assert h.stats.cmd_set == 8


async def test_set_with_cas(h: Harness) -> None:
    assert await h.send(b"ms k 2 C5 c k\r\nhi\r\n") == b"NF c0 kk\r\n"
    reply = await h.send(b"ms k 2 c\r\nhi\r\n")
    cas = cas_of(reply)
    assert await h.send(b"ms k 2 C%d q\r\nho\r\nmn\r\n" % (cas + 1)) == b"EX\r\nMN\r\n"
    assert await h.send(b"ms k 2 C0\r\nho\r\n") == b"EX\r\n"  # 0 never matches
    reply = await h.send(b"ms k 2 C%d c\r\nho\r\n" % cas)
    assert reply.startswith(b"HD c")
    assert cas_of(reply) != cas
    assert (h.stats.cas_misses, h.stats.cas_badval, h.stats.cas_hits) == (1, 2, 1)
    # append takes C too, and C0 means no check there; add ignores it
    assert await h.send(b"ms k 1 MA C%d\r\n!\r\n" % cas) == b"EX\r\n"
    assert await h.send(b"ms k 1 MA C0\r\n!\r\n") == b"HD\r\n"
    assert await h.send(b"ms k 1 ME C1\r\n!\r\n") == b"NS\r\n"
    assert await h.send(b"mg k v\r\n") == b"VA 3\r\nho!\r\n"
    assert (h.stats.cas_misses, h.stats.cas_badval, h.stats.cas_hits) == (1, 2, 1)


async def test_set_errors_and_large_values(h: Harness) -> None:
    assert await h.send(b"ms k 2 Y5\r\nhi\r\nmn\r\n") == b"CLIENT_ERROR invalid flag\r\nMN\r\n"
    assert await h.send(b"ms k S2\r\nhi\r\n") == (
        b"CLIENT_ERROR bad command line format\r\nERROR\r\n"
    )
    await h.send(b"ms k 2\r\nhi\r\n")
    too_large = b"ms k 2000 q ME\r\n" + b"x" * 2000 + b"\r\nmn\r\n"
    assert await h.send(too_large) == b"SERVER_ERROR object too large for cache\r\nMN\r\n"
    assert await h.send(b"mg k v\r\n") == b"EN\r\n"  # dropped, in any mode, as memcached does
    assert h.stats.store_too_large == 1
    # append beyond the item size limit
    await h.send(b"ms k 1000\r\n" + b"x" * 1000 + b"\r\n")
    assert await h.send(b"ms k 100 MA\r\n" + b"y" * 100 + b"\r\n") == (
        b"SERVER_ERROR out of memory storing object\r\n"
    )


async def test_touch_on_get(h: Harness) -> None:
    await h.send(b"ms k 2 T100\r\nhi\r\n")
    assert await h.send(b"mg k t T30 v\r\n") == b"VA 2 t100\r\nhi\r\n"  # t before T: the old
    assert await h.send(b"mg k T40 t\r\n") == b"HD t40\r\n"
    assert await h.send(b"mg k t\r\n") == b"HD t40\r\n"
    assert (h.stats.cmd_touch, h.stats.touch_hits, h.stats.cmd_get) == (2, 2, 1)
    assert await h.send(b"mg nokey T30\r\n") == b"EN\r\n"  # a miss counts as a get
    assert (h.stats.cmd_touch, h.stats.get_misses) == (2, 1)
    h.clock.now += 41
    assert await h.send(b"mg k v\r\n") == b"EN\r\n"


# --- wins, stale items --------------------------------------------------------------------


async def test_vivify_on_miss_wins_once(h: Harness) -> None:
    assert await h.send(b"mg k N30 t v s f\r\n") == b"VA 0 t30 s0 f0 W\r\n\r\n"
    assert await h.send(b"mg k N30 t v s f\r\n") == b"VA 0 t30 s0 f0 Z\r\n\r\n"
    assert await h.send(b"get k\r\n") == b"VALUE k 0 0\r\n\r\nEND\r\n"
    assert await h.send(b"ms k 3\r\nnew\r\n") == b"HD\r\n"  # recached: no more Z
    assert await h.send(b"mg k N30 t v\r\n") == b"VA 3 t-1\r\nnew\r\n"
    (version,) = stored(h, b"k")
    assert version.mark == 0
    assert (h.stats.cmd_get, h.stats.get_hits) == (4, 4)


async def test_vivify_applies_t_and_n_in_request_order(h: Harness) -> None:
    assert await h.send(b"mg a t N30\r\n") == b"HD t-1 W\r\n"
    assert await h.send(b"mg a t\r\n") == b"HD t30 Z\r\n"
    assert await h.send(b"mg b N30 t T50\r\n") == b"HD t30 W\r\n"
    assert await h.send(b"mg b t\r\n") == b"HD t50 Z\r\n"
    assert await h.send(b"mg c N10 q v k\r\nmn\r\n") == b"VA 0 kc W\r\n\r\nMN\r\n"


async def test_recache_wins_before_expiry_and_keeps_the_cas(h: Harness) -> None:
    await h.send(b"ms k 3 T100\r\nabc\r\n")
    assert await h.send(b"mg k R30 t\r\n") == b"HD t100\r\n"
    cas = cas_of(await h.send(b"mg k c\r\n"))
    assert await h.send(b"mg k R200 t c\r\n") == b"HD t100 c%d W\r\n" % cas
    assert await h.send(b"mg k R200 t c\r\n") == b"HD t100 c%d Z\r\n" % cas
    assert await h.send(b"mg k v\r\n") == b"VA 3 Z\r\nabc\r\n"
    # a win does not change the cas: the winner's ms with it succeeds
    assert await h.send(b"ms k 3 C%d\r\nnew\r\n" % cas) == b"HD\r\n"
    assert await h.send(b"mg k v\r\n") == b"VA 3\r\nnew\r\n"
    # R0 and items without expiry never win
    assert await h.send(b"mg k R0\r\nmg k R999\r\n") == b"HD\r\nHD\r\n"


async def test_invalidate_marks_stale_then_one_client_wins(h: Harness) -> None:
    await h.send(b"ms k 3 T100\r\nabc\r\n")
    cas = cas_of(await h.send(b"mg k c\r\n"))
    assert await h.send(b"md k I T30\r\n") == b"HD\r\n"
    reply = await h.send(b"mg k c t v\r\n")
    stale_cas = cas_of(reply)
    assert stale_cas != cas  # md I bumps the cas
    assert reply == b"VA 3 c%d t30 X W\r\nabc\r\n" % stale_cas
    assert await h.send(b"mg k c t v\r\n") == b"VA 3 c%d t30 Z X\r\nabc\r\n" % stale_cas
    assert await h.send(b"get k\r\n") == b"VALUE k 0 3\r\nabc\r\nEND\r\n"  # still served
    # invalidating again hands out a new win, and keeps the TTL without T
    assert await h.send(b"md k I q\r\nmn\r\n") == b"MN\r\n"
    assert await h.send(b"mg k t v\r\n") == b"VA 3 t30 X W\r\nabc\r\n"
    assert h.stats.delete_hits == 0
    # a set recaches: no more marks
    assert await h.send(b"ms k 3\r\nnew\r\nmg k v\r\n") == b"HD\r\nVA 3\r\nnew\r\n"


async def test_set_with_an_outdated_cas_and_invalidate_stores_stale(h: Harness) -> None:
    await h.send(b"ms k 3 T100\r\nold\r\n")
    outdated = cas_of(await h.send(b"mg k c\r\n"))
    await h.send(b"ms k 3 T100\r\ncur\r\n")
    assert await h.send(b"mg k R200\r\n") == b"HD W\r\n"
    assert await h.send(b"ms k 3 C%d\r\nnew\r\n" % outdated) == b"EX\r\n"
    h.clock.now += 10
    assert await h.send(b"ms k 3 C%d I T5 F2\r\nnew\r\n" % outdated) == b"HD\r\n"
    # stored, marked stale, with the item's TTL and its win (T is ignored, as memcached does)
    assert await h.send(b"mg k v t f\r\n") == b"VA 3 t90 f2 Z X\r\nnew\r\n"
    assert await h.send(b"ms k 3 C0 I\r\nnew\r\n") == b"EX\r\n"
    (version,) = stored(h, b"k")
    assert version.mark == STALE | WIN_SENT


# --- E: explicit cas ---------------------------------------------------------------------------


async def test_explicit_cas_is_the_cas_of_every_command_until_a_write_without_it(
    h: Harness,
) -> None:
    assert await h.send(b"ms k 2 E42 c\r\nhi\r\n") == b"HD c42\r\n"
    assert await h.send(b"mg k c v\r\n") == b"VA 2 c42\r\nhi\r\n"
    assert await h.send(b"gets k\r\n") == b"VALUE k 0 2 42\r\nhi\r\nEND\r\n"
    assert await h.send(b"me k\r\n") == b"ME k exp=-1 la=0 cas=42 fetch=yes cls=1 size=62\r\n"
    assert await h.send(b"ms k 2 C41\r\nno\r\n") == b"EX\r\n"
    assert await h.send(b"ms k 2 C42 E43 c\r\nyo\r\n") == b"HD c43\r\n"
    assert await h.send(b"cas k 0 0 2 42\r\nno\r\n") == b"EXISTS\r\n"
    assert await h.send(b"cas k 0 0 2 43\r\nzz\r\n") == b"STORED\r\n"
    # a write without E: Kai's own cas again (the digest of the new state)
    own = cas_of(await h.send(b"mg k c\r\n"))
    assert own not in (42, 43)
    assert own == cas_unique(b"k", context_of(stored(h, b"k")))
    # E0 asks for no cas of its own
    reply = await h.send(b"ms k 2 E0 c\r\nhi\r\n")
    assert cas_of(reply) == cas_unique(b"k", context_of(stored(h, b"k")))
    # every mode takes E; a write that is not stored changes nothing
    assert await h.send(b"ms k 1 MA E44 c\r\n!\r\n") == b"HD c44\r\n"
    assert await h.send(b"ms k 1 ME E45 c\r\n!\r\n") == b"NS c0\r\n"
    assert await h.send(b"mg k c v\r\n") == b"VA 3 c44\r\nhi!\r\n"


async def test_explicit_cas_of_deletes_counters_and_created_items(h: Harness) -> None:
    assert await h.send(b"ma n N0 J5 E7 c v\r\n") == b"VA 1 c7\r\n5\r\n"
    assert await h.send(b"ma n E8 c v\r\n") == b"VA 1 c8\r\n6\r\n"
    assert cas_of(await h.send(b"ma n c v\r\n")) != 8
    # md I E: the stale item's cas; the win handed out on it keeps that cas
    await h.send(b"ms s 3\r\nabc\r\n")
    assert await h.send(b"md s I E9\r\n") == b"HD\r\n"
    assert await h.send(b"mg s c v\r\n") == b"VA 3 c9 X W\r\nabc\r\n"
    assert await h.send(b"mg s c\r\n") == b"HD c9 Z X\r\n"
    # mg: E gives its cas to the item it creates or touches, and to nothing else
    assert await h.send(b"mg v N30 E11 c\r\n") == b"HD c11 W\r\n"
    assert await h.send(b"mg v E12 c\r\n") == b"HD c11 Z\r\n"
    assert await h.send(b"mg v T60 E13 c\r\n") == b"HD c13 Z\r\n"
    # E with a write in context is refused: that write's cas is its context's
    assert await h.send(b"ms v 2 KAZA E5\r\nhi\r\n") == b"CLIENT_ERROR invalid flag\r\n"


async def test_explicit_cas_is_stored_with_the_version(h: Harness) -> None:
    await h.send(b"ms k 2 E42\r\nhi\r\n")
    record = h.replica.engine.get(h.replica.partition(b"k"), b"k")
    assert record is not None
    assert record[0] == MARKED_RECORD_FORMAT
    (version,) = decode_siblings(record)
    assert version.cas == 42
    assert version.mark == 0


def test_explicit_cas_is_the_cas_of_a_key_only_while_its_version_is_alone() -> None:
    alone = Version((b"a", 1), VClock(), 10, 0, 0, b"v", cas=42)
    assert versions.cas_of(b"k", (alone,)) == 42
    sibling = Version((b"b", 1), VClock(), 11, 0, 0, b"w")
    both = merge((alone,), (sibling,))
    assert versions.cas_of(b"k", both) == cas_unique(b"k", context_of(both))
    assert versions.cas_of(b"k", (sibling,)) == cas_unique(b"k", context_of((sibling,)))


def test_explicit_cas_is_applied_to_what_a_meta_command_writes_not_to_a_win() -> None:
    live = Version((b"a", 1), VClock(), int(NOW * 1e6), 0, int(NOW) + 10, b"v", STALE, 5)
    win = Update("meta_get", meta=MetaUpdate(new_cas=9))
    decision = decide(win, b"k", (live,), now=NOW, flushed_before=0)
    assert decision.write == Payload(mark=STALE | WIN_SENT, same_write=live)
    set_with_e = Update("meta_set", value=b"x", meta=MetaUpdate(new_cas=9))
    written = decide(set_with_e, b"k", (live,), now=NOW, flushed_before=0).write
    assert written is not None
    assert written.cas == 9
    classic = decide(Update("replace", value=b"x"), b"k", (live,), now=NOW, flushed_before=0)
    assert classic.write is not None
    assert classic.write.cas == 0


# --- md ---------------------------------------------------------------------------------------


async def test_delete(h: Harness) -> None:
    assert await h.send(b"md k q\r\nmn\r\n") == b"NF\r\nMN\r\n"
    assert await h.send(b"md k k O5\r\n") == b"NF kk O5\r\n"
    cas = cas_of(await h.send(b"ms k 2 c\r\nhi\r\n"))
    assert await h.send(b"md k C%d q\r\n" % (cas + 1)) == b"EX\r\n"
    assert await h.send(b"md k q\r\nmn\r\n") == b"MN\r\n"
    assert await h.send(b"mg k\r\n") == b"EN\r\n"
    assert (h.stats.delete_hits, h.stats.delete_misses) == (1, 3)
    cas = cas_of(await h.send(b"ms k 2 c\r\nhi\r\n"))
    assert await h.send(b"md k C%d k\r\n" % cas) == b"HD kk\r\n"
    assert await h.send(b"md k T30\r\nmg k\r\n") == b"NF\r\nEN\r\n"  # T alone: a delete


# --- ma ---------------------------------------------------------------------------------------


async def test_arithmetic(h: Harness) -> None:
    assert await h.send(b"ma cnt v\r\n") == b"NF\r\n"
    assert await h.send(b"ma cnt N0 J10 v\r\n") == b"VA 2\r\n10\r\n"
    assert await h.send(b"ma cnt v\r\n") == b"VA 2\r\n11\r\n"
    assert await h.send(b"ma cnt MD D100 v\r\n") == b"VA 1\r\n0\r\n"  # decr stops at 0
    assert await h.send(b"ma cnt M+ D18446744073709551615 v\r\n") == (
        b"VA 20\r\n18446744073709551615\r\n"
    )
    assert await h.send(b"ma cnt MI D2 v\r\n") == b"VA 1\r\n1\r\n"  # incr wraps
    assert await h.send(b"ma cnt q\r\nma cnt q v\r\nmn\r\n") == b"MN\r\n"
    assert await h.send(b"mg cnt v\r\n") == b"VA 1\r\n3\r\n"
    assert await h.send(b"ma nocnt q v k O5\r\nmn\r\n") == b"NF knocnt O5\r\nMN\r\n"
    assert (h.stats.incr_hits, h.stats.incr_misses, h.stats.decr_hits) == (5, 2, 1)


async def test_arithmetic_vivify_ttl_cas_and_errors(h: Harness) -> None:
    assert await h.send(b"ma q1 N0 q\r\nmn\r\n") == b"HD\r\nMN\r\n"  # creation is not hidden
    assert await h.send(b"ma q1 N0 q\r\nmn\r\n") == b"MN\r\n"
    assert await h.send(b"ma c N100 J7 v t\r\n") == b"VA 1 t100\r\n7\r\n"
    assert await h.send(b"ma c v t T5\r\n") == b"VA 1 t100\r\n8\r\n"  # t before T: the old
    assert await h.send(b"ma c v t\r\n") == b"VA 1 t5\r\n9\r\n"
    assert await h.send(b"ma o t N30\r\n") == b"HD t-1\r\n"
    assert await h.send(b"ma o t T40\r\n") == b"HD t30\r\n"
    cas = cas_of(await h.send(b"mg c c\r\n"))
    assert await h.send(b"ma c C%d v\r\n" % (cas + 1)) == b"EX\r\n"
    reply = await h.send(b"ma c C%d v c\r\n" % cas)
    assert reply == b"VA 2 c%d\r\n10\r\n" % cas_of(reply)
    assert await h.send(b"ma c C0 v\r\n") == b"VA 2\r\n11\r\n"  # 0: no check
    await h.send(b"ms s 3\r\nabc\r\nms e 0\r\n\r\n")
    non_numeric = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    assert await h.send(b"ma s v q\r\nma e\r\n") == non_numeric * 2


async def test_arithmetic_keeps_the_marks_as_memcached_changes_numbers_in_place(
    h: Harness,
) -> None:
    await h.send(b"ms k 1\r\n5\r\nmd k I\r\n")
    assert await h.send(b"ma k v\r\n") == b"VA 1\r\n6\r\n"
    assert await h.send(b"mg k v\r\n") == b"VA 1 X W\r\n6\r\n"


# --- h, l, me ---------------------------------------------------------------------------------


async def test_hit_before_and_last_access_are_this_nodes(h: Harness) -> None:
    await h.send(b"ms k 2\r\nhi\r\n")
    h.clock.now += 7
    assert await h.send(b"mg k h l\r\n") == b"HD h0 l7\r\n"  # never served: since the write
    h.clock.now += 3
    assert await h.send(b"mg k h l u\r\n") == b"HD h1 l3\r\n"
    h.clock.now += 2
    assert await h.send(b"mg k h l\r\n") == b"HD h1 l5\r\n"  # u did not count
    assert await h.send(b"mg k T60 h\r\nmg k h\r\n") == b"HD h1\r\nHD h1\r\n"
    await h.send(b"ms k 2\r\nho\r\n")
    assert await h.send(b"mg k h l\r\n") == b"HD h0 l0\r\n"  # a new write starts over
    assert await h.send(b"mg n N30 h l\r\n") == b"HD h0 l0 W\r\n"


async def test_debug(h: Harness) -> None:
    assert await h.send(b"me k\r\n") == b"EN\r\n"
    await h.send(b"ms k 2 T100 F7\r\nhi\r\nms Zm9vYmFy 1 b\r\n0\r\n")
    cas = cas_of(await h.send(b"mg k c\r\n"))
    h.clock.now += 4
    assert await h.send(b"me k\r\n") == (
        b"ME k exp=-96 la=4 cas=%d fetch=yes cls=1 size=66\r\n" % cas
    )
    reply = await h.send(b"me Zm9vYmFy b\r\n")
    assert re.fullmatch(rb"ME Zm9vYmFy exp=-1 la=4 cas=\d+ fetch=no cls=1 size=66\r\n", reply)
    assert await h.send(b"me k\r\nmn\r\n") == (
        b"ME k exp=-96 la=4 cas=%d fetch=yes cls=1 size=66\r\nMN\r\n" % cas
    )


def test_access_log_is_bounded() -> None:
    log = AccessLog(capacity=3)
    versions = [Version((b"a", index + 1), VClock(), int(NOW * 1e6)) for index in range(5)]
    for index, version in enumerate(versions):
        log.served(b"k%d" % index, version, NOW)
        log.check_invariants()
    assert len(log) == 3
    assert log.before(b"k0", versions[0], NOW + 5) == (False, 5)  # forgotten: since the write
    assert log.before(b"k4", versions[4], NOW + 5) == (True, 5)
    log.served(b"k2", versions[2], NOW + 6)  # most recent again
    log.served(b"k5", versions[0], NOW + 6)
    assert log.before(b"k2", versions[2], NOW + 6) == (True, 0)
    assert log.before(b"k3", versions[3], NOW + 6) == (False, 6)
    with pytest.raises(ValueError, match="capacity"):
        AccessLog(0)


# --- the K extension -------------------------------------------------------------------------


def with_extension(h: Harness, extension: Extension | None) -> None:
    """Serve ``h``'s meta requests with ``extension`` (None: no K, as memcached)."""
    h.executor.meta = MetaExecutor(
        h.executor.coordinator,
        h.stats,
        max_item_size=1024,
        extension=extension,
        wall_clock=h.clock,
    )


async def test_k_requests_are_refused_as_memcached_does_without_an_extension(
    h: Harness,
) -> None:
    with_extension(h, None)
    assert await h.send(b"mg k K\r\n") == b"CLIENT_ERROR invalid flag\r\n"
    assert await h.send(b"ms k 2 Kabc\r\nhi\r\nmn\r\n") == b"CLIENT_ERROR invalid flag\r\nMN\r\n"
    assert await h.send(b"md k Kabc\r\n") == b"CLIENT_ERROR invalid or duplicate flag\r\n"
    assert await h.send(b"ms k 2000 Kabc\r\n" + b"x" * 2000 + b"\r\n") == (
        b"CLIENT_ERROR invalid flag\r\n"
    )
    assert await h.send(b"mg k v\r\n") == b"EN\r\n"  # nothing was written


async def test_k_requests_go_to_the_extension(h: Harness) -> None:
    seen: list[object] = []

    def extension(request: MetaGet | MetaSet | MetaDelete) -> Step[bytes]:
        seen.append(request)
        return b"HD Ktoken\r\n"

    with_extension(h, extension)
    await h.send(b"ms k 2\r\nhi\r\n")
    assert await h.send(b"mg k K v\r\nms k 2 Kabc\r\nho\r\nmd k Kxyz q\r\n") == (
        b"HD Ktoken\r\n" * 3
    )
    assert seen == [
        MetaGet(b"k", "K", value=True, with_context=True),
        MetaSet(b"k", b"ho", "K", context=b"abc"),
        MetaDelete(b"k", "K", quiet=True, context=b"xyz"),
    ]
    # too large in context: refused, and nothing is dropped
    assert await h.send(b"ms k 2000 Kabc\r\n" + b"x" * 2000 + b"\r\nmg k v\r\n") == (
        b"SERVER_ERROR object too large for cache\r\nVA 2\r\nhi\r\n"
    )


# --- marks are stored with the version --------------------------------------------------------


async def test_marks_are_stored_in_the_record_and_read_back(h: Harness) -> None:
    await h.send(b"ms plain 2\r\nhi\r\nms k 2\r\nhi\r\nmd k I\r\nmg k\r\n")
    record = h.replica.engine.get(h.replica.partition(b"k"), b"k")
    assert record is not None
    assert record[0] == MARKED_RECORD_FORMAT
    (version,) = decode_siblings(record)
    assert version.mark == STALE | WIN_SENT
    plain = h.replica.engine.get(h.replica.partition(b"plain"), b"plain")
    assert plain is not None
    assert plain[0] == RECORD_FORMAT  # unmarked records are unchanged


def test_record_formats() -> None:
    base = Version((b"actor", 1), VClock(((b"other", 2, 5),)), 10, 3, 0, b"v")
    assert encode_siblings((base,))[0] == RECORD_FORMAT
    marked = base._replace(mark=WIN_SENT)
    record = encode_siblings((base._replace(dot=(b"actor", 2)), marked))
    assert record[0] == MARKED_RECORD_FORMAT
    assert decode_siblings(record) == (base._replace(dot=(b"actor", 2)), marked)
    with_cas = base._replace(cas=2**64 - 1)
    record = encode_siblings((with_cas,))
    assert record[0] == MARKED_RECORD_FORMAT
    assert decode_siblings(record) == (with_cas,)
    # format 3 as the release before explicit cas wrote it: eight fields, no cas
    fields = [b"actor", 1, base.context.entries, 10, 3, 0, b"v", WIN_SENT]
    older = bytes((MARKED_RECORD_FORMAT,)) + msgpack.packb([fields], use_bin_type=True)
    assert decode_siblings(older) == (marked,)
    for wrong in (fields[:7], [*fields, 0, 0]):
        with pytest.raises(ValueError, match="8 or 9 fields"):
            decode_siblings(bytes((MARKED_RECORD_FORMAT,)) + msgpack.packb([wrong]))


@pytest.mark.parametrize("cas", [-1, "42", 1.5, True, None])
def test_a_peers_record_with_a_malformed_explicit_cas_is_refused(cas: object) -> None:
    fields = [b"actor", 1, (), 10, 0, 0, b"v", 0]
    good = bytes((MARKED_RECORD_FORMAT,)) + msgpack.packb([[*fields, 42]], use_bin_type=True)
    assert siblings_from_wire(good)[0].cas == 42
    bad = bytes((MARKED_RECORD_FORMAT,)) + msgpack.packb([[*fields, cas]], use_bin_type=True)
    with pytest.raises(RpcBadRequest):
        siblings_from_wire(bad)


def test_a_remarked_write_replaces_its_copies_wherever_they_merge() -> None:
    base = Version((b"actor", 1), VClock(), 10, 0, 0, b"v")
    marked = base._replace(mark=WIN_SENT)
    assert merge((base,), (marked,)) == (marked,)
    assert merge((marked,), (base,)) == (marked,)
    assert cas_unique(b"k", context_of((marked,))) == cas_unique(b"k", context_of((base,)))


def test_a_win_without_touch_is_the_same_write_with_a_mark() -> None:
    live = Version((b"actor", 1), VClock(), int(NOW * 1e6), 0, int(NOW) + 10, b"v", STALE)
    update = Update("meta_get", meta=MetaUpdate(recache_before=0))
    decision = decide(update, b"k", (live,), now=NOW, flushed_before=0)
    assert decision.outcome is Outcome.WON
    assert decision.write == Payload(mark=STALE | WIN_SENT, same_write=live)
    already = live._replace(mark=STALE | WIN_SENT)
    assert decide(update, b"k", (already,), now=NOW, flushed_before=0).outcome is Outcome.FOUND


def test_meta_updates_cross_the_wire() -> None:
    classic = Update("cas", 1, 2, b"v", 3)
    assert len(update_to_wire(classic)) == 8  # unchanged for the classic commands
    assert update_from_wire(update_to_wire(classic)) == classic
    for command in sorted(META_COMMANDS):
        update = Update(
            command,
            cas=9,
            meta=MetaUpdate("A", True, True, True, True, 5, 6, 7, False, 2**64 - 1),
        )
        assert update_from_wire(update_to_wire(update)) == update
        # the release before E sent nine meta fields: no explicit cas
        older = update_to_wire(update)
        meta_fields = older[8]
        assert isinstance(meta_fields, list)
        older[8] = meta_fields[:9]
        without_e = MetaUpdate("A", True, True, True, True, 5, 6, 7, False)
        assert update_from_wire(older) == attrs.evolve(update, meta=without_e)
    broken = update_to_wire(Update("meta_set", meta=MetaUpdate()))
    with pytest.raises(RpcBadRequest):
        update_from_wire(broken[:8])  # a meta command without its flags
    with pytest.raises(RpcBadRequest):
        update_from_wire([*update_to_wire(classic), [0] * 9])  # a classic one with them
    broken[8] = ["X", False, False, False, False, 0, 0, 0, True]
    with pytest.raises(RpcBadRequest):
        update_from_wire(broken)
    broken[8] = ["S", False, False, False, False, 0, 0, 0, True, -1]  # a cas below 0
    with pytest.raises(RpcBadRequest):
        update_from_wire(broken)


# --- races through a cluster -----------------------------------------------------------------


async def both(cluster: InProcessCluster, through: list[int], request: bytes) -> list[bytes]:
    """Send ``request`` through each node at the same moment; the replies in that order."""
    replies = [b""] * len(through)

    async def send(position: int, index: int) -> None:
        replies[position] = await cluster.request(index, request)

    async with trio.open_nursery() as nursery:
        for position, index in enumerate(through):
            nursery.start_soon(send, position, index)
    return replies


async def test_two_clients_vivifying_through_two_nodes_one_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"hot"
    async with InProcessCluster.running(5) as cluster:
        _primaries, (x, y) = roles(cluster, key)
        replies = await both(cluster, [x, y], b"mg hot N30 v\r\n")
        assert sorted(replies) == [b"VA 0 W\r\n\r\n", b"VA 0 Z\r\n\r\n"]
        assert await cluster.request(x, b"mg hot v\r\n") == b"VA 0 Z\r\n\r\n"
        assert await cluster.request(y, b"ms hot 5\r\nvalue\r\n") == b"HD\r\n"
        assert await cluster.request(x, b"mg hot v\r\n") == b"VA 5\r\nvalue\r\n"


async def test_two_clients_reading_a_stale_item_through_two_nodes_one_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"hot"
    async with InProcessCluster.running(5) as cluster:
        primaries, (x, y) = roles(cluster, key)
        assert await cluster.request(x, b"ms hot 3\r\nold\r\nmd hot I\r\n") == b"HD\r\nHD\r\n"
        replies = await both(cluster, [x, y, primaries[1]], b"mg hot v\r\n")
        assert sorted(replies) == [b"VA 3 X W\r\nold\r\n", *[b"VA 3 Z X\r\nold\r\n"] * 2]
        await trio.sleep(1)  # replication, in virtual time
        for index in primaries:
            (version,) = cluster.nodes[index].replica.read(key)
            assert version.mark == STALE | WIN_SENT, index


async def test_two_clients_recaching_through_two_nodes_one_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"hot"
    async with InProcessCluster.running(5) as cluster:
        primaries, (x, y) = roles(cluster, key)
        await cluster.request(x, b"ms hot 3 T100\r\nabc\r\n")
        replies = await both(cluster, [x, y], b"mg hot R200 v\r\n")
        assert sorted(replies) == [b"VA 3 W\r\nabc\r\n", b"VA 3 Z\r\nabc\r\n"]
        # the marks reach a node that coordinated nothing, after a restart of it too
        await trio.sleep(1)
        cluster.crash(primaries[2])
        await cluster.start_node(primaries[2])
        (version,) = cluster.nodes[primaries[2]].replica.read(key)
        assert version.win_sent


async def test_an_explicit_cas_reaches_every_replica_and_every_node_shows_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"shared"
    async with InProcessCluster.running(5) as cluster:
        primaries, (x, y) = roles(cluster, key)
        assert await cluster.request(x, b"ms shared 2 E77 c\r\nhi\r\n") == b"HD c77\r\n"
        for index in range(5):
            assert await cluster.request(index, b"mg shared c\r\n") == b"HD c77\r\n", index
        await trio.sleep(1)  # replication, in virtual time
        for index in primaries:
            (version,) = cluster.nodes[index].replica.read(key)
            assert version.cas == 77, index
        # of two cas with that token through two nodes, one stores
        replies = await both(cluster, [x, y], b"cas shared 0 0 2 77\r\nyo\r\n")
        assert sorted(replies) == [b"EXISTS\r\n", b"STORED\r\n"]

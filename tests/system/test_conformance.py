"""memcached text-protocol conformance, checked against real memcached and against kai.

Every test that takes the ``server`` fixture runs twice: against ``memcached -t 1`` (which
proves the expectation is what memcached really does) and against a kai node. Tests that take
``kai_server`` check Kai-only behaviour (Kai's ``stats`` keys, its exact item size limit).
Clients are pymemcache with no serde (values are raw bytes) and raw sockets for byte-exact
checks. Every key is unique to its test, so the order of the tests does not matter.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable

import pytest
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError, MemcacheServerError

from kai.testing.process import KaiProcess
from tests.system.conftest import (
    RawConnection,
    Server,
    make_client,
    require_binaries,
    wait_for,
)

pytestmark = pytest.mark.system

KeyFactory = Callable[[], str]

#: Fields libmemcached copies out of ``stats`` (src/libmemcached/stats.cc).
LIBMEMCACHED_STATS = (
    "pid",
    "uptime",
    "time",
    "version",
    "pointer_size",
    "rusage_user",
    "rusage_system",
    "curr_items",
    "total_items",
    "bytes",
    "curr_connections",
    "total_connections",
    "connection_structures",
    "cmd_get",
    "cmd_set",
    "get_hits",
    "get_misses",
    "evictions",
    "bytes_read",
    "bytes_written",
    "limit_maxbytes",
    "threads",
)
#: memcached's other counters that Kai reports too.
OTHER_COUNTERS = (
    "delete_hits",
    "delete_misses",
    "incr_hits",
    "incr_misses",
    "decr_hits",
    "decr_misses",
    "cas_hits",
    "cas_misses",
    "cas_badval",
    "touch_hits",
    "touch_misses",
    "cmd_flush",
    "cmd_touch",
    "rejected_connections",
)
#: Kai's own ``stats`` keys.
KAI_STATS = (
    "kai_node",
    "kai_quorum",
    "kai_buckets",
    "kai_virtual_nodes",
    "kai_store",
    "kai_curr_nodes",
    "kai_unreconciled_get",
)
LATENCY_STATS = [
    f"kai_{op}_latency_{name}_ms" for op in ("get", "set") for name in ("p50", "p99", "p999", "max")
]


def stat_lines(raw: RawConnection, command: bytes = b"stats") -> list[tuple[str, str]]:
    """``stats [group]`` as (name, value) pairs in the server's order."""
    reply = raw.request(command + b"\r\n", terminator=b"END\r\n")
    lines = reply.split(b"\r\n")
    assert lines[-2:] == [b"END", b""], reply[-200:]
    pairs = []
    for line in lines[:-2]:
        label, name, value = line.decode().split(" ", 2)
        assert label == "STAT", line
        pairs.append((name, value))
    return pairs


def stats_of(raw: RawConnection) -> dict[str, str]:
    return dict(stat_lines(raw))


def counter_deltas(raw: RawConnection, action: Callable[[], object]) -> dict[str, int]:
    """How much each integer stat moved while ``action`` ran."""
    before = stats_of(raw)
    action()
    after = stats_of(raw)
    return {
        name: int(after[name]) - int(before[name])
        for name in after
        if name in before and after[name].isdigit() and before[name].isdigit()
    }


def value_block(key: str, flags: int, data: bytes) -> bytes:
    return b"VALUE %s %d %d\r\n%s\r\n" % (key.encode(), flags, len(data), data)


# --- basics -------------------------------------------------------------------------------------


def test_version(server: Server, client: Client, raw: RawConnection) -> None:
    assert client.version().startswith(b"1.6")
    assert raw.request(b"version\r\n").startswith(b"VERSION 1.6")
    # 1.6 ignores extra tokens (memccapable relies on it).
    assert raw.request(b"version foo bar\r\n").startswith(b"VERSION 1.6")


def test_unknown_and_malformed_commands(server: Server, raw: RawConnection) -> None:
    assert raw.request(b"bogus\r\n") == b"ERROR\r\n"
    assert raw.request(b"SET k 0 0 1\r\n") == b"ERROR\r\n"
    assert raw.request(b"get\r\n") == b"ERROR\r\n"
    assert raw.request(b"set k 0 0\r\n") == b"ERROR\r\n"
    raw.assert_quiet()


@pytest.mark.parametrize("flags", [0, 1, 2**16, 2**32 - 1])
def test_set_get_flags_round_trip(
    server: Server, raw: RawConnection, unique_key: KeyFactory, flags: int
) -> None:
    key = unique_key()
    assert raw.request(b"set %s %d 0 5\r\nhello\r\n" % (key.encode(), flags)) == b"STORED\r\n"
    reply = raw.request(b"get %s\r\n" % key.encode(), terminator=b"END\r\n")
    assert reply == value_block(key, flags, b"hello") + b"END\r\n"


def test_binary_value_and_empty_value(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    binary, empty = unique_key(), unique_key()
    data = bytes(range(256)) + b"\r\nEND\r\n" + bytes(range(256))
    assert client.set(binary, data) is True
    assert client.get(binary) == data
    assert raw.request(b"set %s 0 0 0\r\n\r\n" % empty.encode()) == b"STORED\r\n"
    assert raw.request(b"get %s\r\n" % empty.encode(), terminator=b"END\r\n") == (
        value_block(empty, 0, b"") + b"END\r\n"
    )


def test_get_miss_and_multi_get(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    first, second, missing = unique_key(), unique_key(), unique_key()
    assert raw.request(b"get %s\r\n" % missing.encode()) == b"END\r\n"
    assert client.get(missing) is None
    assert client.set(first, b"1", flags=3) is True
    assert client.set(second, b"22") is True
    reply = raw.request(f"get {first} {missing} {second}\r\n".encode(), terminator=b"END\r\n")
    assert reply == value_block(first, 3, b"1") + value_block(second, 0, b"22") + b"END\r\n"
    assert client.get_many([first, missing, second]) == {first: b"1", second: b"22"}


def test_gets_and_cas(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key, missing = unique_key(), unique_key()
    assert client.set(key, b"v1") is True
    value, token = client.gets(key)
    assert value == b"v1"
    assert int(token) > 0
    # The same token twice in a row: unchanged item, unchanged token.
    assert client.gets(key) == (b"v1", token)
    # The right token stores, and the token changes.
    assert client.cas(key, b"v2", token) is True
    value, token2 = client.gets(key)
    assert value == b"v2"
    assert token2 != token
    # The old token is stale: EXISTS, value unchanged.
    assert raw.request(b"cas %s 0 0 2 %s\r\nv3\r\n" % (key.encode(), token)) == b"EXISTS\r\n"
    assert client.get(key) == b"v2"
    # Another client writes in between: EXISTS.
    other = make_client(server.port)
    try:
        assert other.set(key, b"other") is True
    finally:
        other.close()
    assert raw.request(b"cas %s 0 0 2 %s\r\nv4\r\n" % (key.encode(), token2)) == b"EXISTS\r\n"
    assert client.get(key) == b"other"
    # A missing key: NOT_FOUND.
    assert raw.request(b"cas %s 0 0 1 12345\r\nx\r\n" % missing.encode()) == b"NOT_FOUND\r\n"
    assert client.get(missing) is None
    # gets shows the cas unique on the wire.
    reply = raw.request(b"gets %s\r\n" % key.encode(), terminator=b"END\r\n")
    header, data, end, _ = reply.split(b"\r\n")
    assert header.split()[:4] == [b"VALUE", key.encode(), b"0", b"5"]
    assert header.split()[4].isdigit()
    assert (data, end) == (b"other", b"END")


def test_add_and_replace(server: Server, client: Client, unique_key: KeyFactory) -> None:
    key = unique_key()
    assert client.replace(key, b"nope") is False
    assert client.get(key) is None
    assert client.add(key, b"first", flags=4) is True
    assert client.add(key, b"second") is False
    assert client.get(key) == b"first"
    assert client.replace(key, b"third") is True
    assert client.get(key) == b"third"


def test_append_and_prepend(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key, missing = unique_key(), unique_key()
    assert client.set(key, b"middle", flags=5) is True
    assert client.append(key, b">") is True
    assert client.prepend(key, b"<") is True
    # append/prepend ignore the flags they are given.
    assert raw.request(b"append %s 99 0 1\r\n!\r\n" % key.encode()) == b"STORED\r\n"
    reply = raw.request(b"get %s\r\n" % key.encode(), terminator=b"END\r\n")
    assert reply == value_block(key, 5, b"<middle>!") + b"END\r\n"
    assert client.append(missing, b"x") is False
    assert client.prepend(missing, b"x") is False
    assert client.get(missing) is None


def test_delete(server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory) -> None:
    key = unique_key()
    assert client.set(key, b"doomed") is True
    assert raw.request(b"delete %s\r\n" % key.encode()) == b"DELETED\r\n"
    assert client.get(key) is None
    assert raw.request(b"delete %s\r\n" % key.encode()) == b"NOT_FOUND\r\n"
    assert raw.request(b"delete\r\n") == b"ERROR\r\n"


def test_incr_and_decr(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key, missing, text = unique_key(), unique_key(), unique_key()
    assert client.set(key, b"10") is True
    assert client.incr(key, 5) == 15
    assert client.decr(key, 3) == 12
    assert client.get(key) == b"12"
    assert client.incr(missing, 1) is None
    assert client.decr(missing, 1) is None
    assert raw.request(b"incr %s 1\r\n" % missing.encode()) == b"NOT_FOUND\r\n"
    assert client.set(text, b"abc") is True
    assert raw.request(b"incr %s 1\r\n" % text.encode()) == (
        b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    )
    assert raw.request(b"decr %s 1\r\n" % text.encode()).startswith(b"CLIENT_ERROR ")
    assert raw.request(b"incr %s abc\r\n" % key.encode()) == (
        b"CLIENT_ERROR invalid numeric delta argument\r\n"
    )
    assert client.get(text) == b"abc"
    raw.assert_quiet()


def test_incr_wraps_at_2_to_the_64(server: Server, client: Client, unique_key: KeyFactory) -> None:
    key = unique_key()
    assert client.set(key, str(2**64 - 1).encode()) is True
    assert client.incr(key, 1) == 0
    assert client.set(key, str(2**64 - 2).encode()) is True
    assert client.incr(key, 5) == 3
    # protocol.txt: a number that loses length MAY be space-padded (memcached pads in place).
    assert client.get(key).rstrip(b" ") == b"3"


def test_decr_floors_at_zero(server: Server, client: Client, unique_key: KeyFactory) -> None:
    key = unique_key()
    assert client.set(key, b"5") is True
    assert client.decr(key, 3) == 2
    assert client.decr(key, 100) == 0
    assert client.decr(key, 1) == 0
    assert client.get(key) == b"0"


def test_incr_keeps_flags_and_grows_the_value(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key = unique_key()
    assert raw.request(b"set %s 9 0 2\r\n99\r\n" % key.encode()) == b"STORED\r\n"
    assert raw.request(b"incr %s 1\r\n" % key.encode()) == b"100\r\n"
    reply = raw.request(b"get %s\r\n" % key.encode(), terminator=b"END\r\n")
    assert reply == value_block(key, 9, b"100") + b"END\r\n"


def test_touch_gat_and_gats(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key, missing = unique_key(), unique_key()
    assert client.set(key, b"hi", flags=6) is True
    assert client.touch(key, 100) is True
    assert client.touch(missing, 100) is False
    assert raw.request(b"touch %s 100\r\n" % key.encode()) == b"TOUCHED\r\n"
    assert raw.request(b"touch %s 100\r\n" % missing.encode()) == b"NOT_FOUND\r\n"
    reply = raw.request(f"gat 100 {key} {missing}\r\n".encode(), terminator=b"END\r\n")
    assert reply == value_block(key, 6, b"hi") + b"END\r\n"
    reply = raw.request(f"gats 0 {key}\r\n".encode(), terminator=b"END\r\n")
    header, data, end, _ = reply.split(b"\r\n")
    assert header.split()[:4] == [b"VALUE", key.encode(), b"6", b"2"]
    _, token = client.gets(key)
    assert header.split()[4] == token
    assert (data, end) == (b"hi", b"END")
    assert raw.request(f"gat 0 {missing}\r\n".encode()) == b"END\r\n"
    # A negative exptime through gat returns the value and expires the item.
    reply = raw.request(f"gat -1 {key}\r\n".encode(), terminator=b"END\r\n")
    assert reply == value_block(key, 6, b"hi") + b"END\r\n"
    assert client.get(key) is None


def test_touch_with_negative_exptime_expires(
    server: Server, client: Client, unique_key: KeyFactory
) -> None:
    key = unique_key()
    assert client.set(key, b"v") is True
    assert client.touch(key, -1) is True
    assert client.get(key) is None


# --- expiry -------------------------------------------------------------------------------------


def test_exptime_relative_expires(server: Server, client: Client, unique_key: KeyFactory) -> None:
    key, lasting = unique_key(), unique_key()
    assert client.set(key, b"brief", expire=1) is True
    assert client.set(lasting, b"lasting", expire=100) is True
    wait_for(lambda: client.get(key) is None, timeout=5, what=f"{key} to expire")
    assert client.get(lasting) == b"lasting"


def test_exptime_absolute(server: Server, client: Client, unique_key: KeyFactory) -> None:
    live, dead = unique_key(), unique_key()
    now = int(time.time())
    assert client.set(live, b"future", expire=now + 100) is True
    assert client.set(dead, b"past", expire=now - 10) is True
    assert client.get(live) == b"future"
    assert client.get(dead) is None


def test_exptime_negative_misses_immediately(
    server: Server, client: Client, unique_key: KeyFactory
) -> None:
    key = unique_key()
    assert client.set(key, b"old") is True
    assert client.set(key, b"gone", expire=-1) is True
    assert client.get(key) is None
    assert client.add(key, b"again") is True  # an expired item does not block add
    assert client.get(key) == b"again"


# --- flush_all ----------------------------------------------------------------------------------


def test_flush_all_immediate(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    before, after = unique_key(), unique_key()
    assert client.set(before, b"x") is True
    assert raw.request(b"flush_all\r\n") == b"OK\r\n"
    assert client.get(before) is None
    assert client.set(after, b"y") is True
    assert client.get(after) == b"y"
    assert raw.request(b"flush_all abc\r\n") == b"CLIENT_ERROR invalid exptime argument\r\n"


def test_flush_all_noreply(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key = unique_key()
    assert client.set(key, b"x") is True
    raw.send(b"flush_all noreply\r\n")
    raw.assert_quiet()
    assert client.get(key) is None


def test_flush_all_far_delay_hides_nothing_yet(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    before, after = unique_key(), unique_key()
    assert client.set(before, b"x") is True
    try:
        assert raw.request(b"flush_all 86400\r\n") == b"OK\r\n"
        assert client.set(after, b"y") is True
        assert client.get(before) == b"x"
        assert client.get(after) == b"y"
    finally:
        # An immediate flush supersedes the pending one, so later tests never meet it.
        assert raw.request(b"flush_all\r\n") == b"OK\r\n"


def test_flush_all_with_delay(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key, later = unique_key(), unique_key()
    assert client.set(key, b"x") is True
    assert raw.request(b"flush_all 3\r\n") == b"OK\r\n"
    assert client.get(key) == b"x"  # not yet: memcached needs at least 1 s to get there
    wait_for(lambda: client.get(key) is None, timeout=6, what="the delayed flush")

    def set_survives() -> bool:
        assert client.set(later, b"y") is True
        return bool(client.get(later) == b"y")

    # memcached keeps time in whole seconds: an item stored in the very second the flush
    # takes effect is flushed too, so wait (bounded) for the first one that survives.
    wait_for(set_survives, timeout=3, interval=0.1, what="a write after the flush to survive")


# --- noreply ------------------------------------------------------------------------------------


def test_noreply_on_every_command(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key, added, counter, doomed, missing = (unique_key() for _ in range(5))
    k, a, c, d, m = (name.encode() for name in (key, added, counter, doomed, missing))
    steps: list[tuple[bytes, Callable[[], bool]]] = [
        (b"set %s 3 0 5 noreply\r\nhello\r\n" % k, lambda: client.get(key) == b"hello"),
        (b"add %s 0 0 1 noreply\r\nx\r\n" % k, lambda: client.get(key) == b"hello"),
        (b"add %s 0 0 1 noreply\r\nx\r\n" % a, lambda: client.get(added) == b"x"),
        (b"replace %s 0 0 5 noreply\r\nworld\r\n" % k, lambda: client.get(key) == b"world"),
        (b"replace %s 0 0 1 noreply\r\nx\r\n" % m, lambda: client.get(missing) is None),
        (b"append %s 0 0 1 noreply\r\n!\r\n" % k, lambda: client.get(key) == b"world!"),
        (b"prepend %s 0 0 1 noreply\r\n<\r\n" % k, lambda: client.get(key) == b"<world!"),
        (b"append %s 0 0 1 noreply\r\n!\r\n" % m, lambda: client.get(missing) is None),
        (b"cas %s 0 0 1 1 noreply\r\nx\r\n" % m, lambda: client.get(missing) is None),
        (b"set %s 0 0 1 noreply\r\n5\r\n" % c, lambda: client.get(counter) == b"5"),
        (b"incr %s 10 noreply\r\n" % c, lambda: client.get(counter) == b"15"),
        (b"decr %s 3 noreply\r\n" % c, lambda: client.get(counter) == b"12"),
        (b"incr %s 1 noreply\r\n" % m, lambda: client.get(missing) is None),
        (b"touch %s 100 noreply\r\n" % c, lambda: client.get(counter) == b"12"),
        (b"set %s 0 0 1 noreply\r\nd\r\n" % d, lambda: client.get(doomed) == b"d"),
        (b"delete %s noreply\r\n" % d, lambda: client.get(doomed) is None),
        (b"delete %s noreply\r\n" % m, lambda: client.get(missing) is None),
        (b"verbosity 0 noreply\r\n", lambda: True),
        # Errors are silenced too, once the line parsed far enough to see noreply.
        (b"set %s 0 0 abc noreply\r\n" % m, lambda: client.get(missing) is None),
    ]
    for command, check in steps:
        raw.send(command)
        raw.assert_quiet()
        assert check(), f"after {command!r}"
    # cas noreply with the right token stores silently.
    _, token = client.gets(key)
    raw.send(b"cas %s 0 0 3 %s noreply\r\nnew\r\n" % (k, token))
    raw.assert_quiet()
    assert client.get(key) == b"new"


def test_noreply_pipelined_with_replies(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key = unique_key().encode()
    raw.send(
        b"set %s 0 0 1 noreply\r\na\r\nget %s\r\nappend %s 0 0 1 noreply\r\nb\r\nget %s\r\n"
        % (key, key, key, key)
    )
    assert raw.read_until(b"END\r\n") == b"VALUE %s 0 1\r\na\r\nEND\r\n" % key
    assert raw.read_until(b"END\r\n") == b"VALUE %s 0 2\r\nab\r\nEND\r\n" % key
    raw.assert_quiet()


# --- size limits, many keys, pipelining ---------------------------------------------------------


def test_value_at_the_size_limit_and_one_byte_over(server: Server, raw: RawConnection) -> None:
    key = b"L"  # one byte: memcached's limit depends on the key length
    limit = server.max_value_one_byte_key
    data = bytes(i % 251 for i in range(limit))
    assert raw.request(b"set %s 0 0 %d\r\n%s\r\n" % (key, limit, data)) == b"STORED\r\n"
    reply = raw.request(b"get %s\r\n" % key, terminator=b"END\r\n")
    assert reply == b"VALUE L 0 %d\r\n%s\r\nEND\r\n" % (limit, data)
    over = limit + 1
    reply = raw.request(b"set %s 0 0 %d\r\n%s\r\n" % (key, over, b"z" * over))
    assert reply == b"SERVER_ERROR object too large for cache\r\n"
    # The data block was swallowed: the connection is in sync and still usable.
    raw.assert_quiet()
    # As in memcached, a refused set also drops the value the key had.
    assert raw.request(b"get %s\r\n" % key) == b"END\r\n"
    assert raw.request(b"set %s 0 0 2\r\nok\r\n" % key) == b"STORED\r\n"
    assert (
        raw.request(b"get %s\r\n" % key, terminator=b"END\r\n") == b"VALUE L 0 2\r\nok\r\nEND\r\n"
    )


def test_kai_stores_exactly_max_item_size(kai_server: Server, unique_key: KeyFactory) -> None:
    key = unique_key()
    client = make_client(kai_server.port)
    try:
        data = b"k" * (1024 * 1024)
        assert client.set(key, data) is True
        assert client.get(key) == data
        with pytest.raises(MemcacheServerError, match="object too large for cache"):
            client.set(key, data + b"k")
        assert client.version().startswith(b"1.6")
    finally:
        client.close()


def test_multi_get_5000_keys(server: Server, client: Client, unique_key: KeyFactory) -> None:
    values = {unique_key(): b"value-%d" % index for index in range(5000)}
    assert client.set_many(values) == []
    found = client.get_many(list(values))
    assert len(found) == 5000
    assert found == values


def test_pipelined_commands_reply_in_order(
    server: Server, raw: RawConnection, unique_key: KeyFactory
) -> None:
    keys = [unique_key().encode() for _ in range(200)]
    batch = b"".join(
        b"set %s %d 0 %d\r\n%s\r\n" % (key, i, len(key), key) for i, key in enumerate(keys)
    )
    batch += b"".join(b"get %s\r\n" % key for key in keys)
    batch += b"".join(b"incr %s 1\r\n" % key for key in keys[:3])
    batch += b"delete %s\r\nget %s\r\nversion\r\n" % (keys[0], keys[0])
    raw.send(batch)
    for _ in keys:
        assert raw.read_line() == b"STORED\r\n"
    for i, key in enumerate(keys):
        assert raw.read_until(b"END\r\n") == b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (
            key,
            i,
            len(key),
            key,
        )
    for _ in keys[:3]:
        assert raw.read_line() == (
            b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
        )
    assert raw.read_line() == b"DELETED\r\n"
    assert raw.read_line() == b"END\r\n"
    assert raw.read_line().startswith(b"VERSION ")


def test_long_key_limit(server: Server, client: Client, raw: RawConnection) -> None:
    longest = "k" * 250
    assert client.set(longest, b"v") is True
    assert client.get(longest) == b"v"
    too_long = b"k" * 251
    assert raw.request(b"get %s\r\n" % too_long) == b"CLIENT_ERROR bad command line format\r\n"
    # The rejected storage line does not swallow its data: the data line is a bad command.
    assert raw.request(b"set %s 0 0 1\r\nx\r\n" % too_long) == (
        b"CLIENT_ERROR bad command line format\r\n"
    )
    assert raw.read_line() == b"ERROR\r\n"
    raw.assert_quiet()
    with pytest.raises(MemcacheClientError):
        client.set("k" * 251, b"v")


# --- stats, verbosity, quit ---------------------------------------------------------------------


def test_stats(server: Server, raw: RawConnection) -> None:
    stats = stats_of(raw)
    assert int(stats["pid"]) == server.process.pid
    assert stats["version"].startswith("1.6")
    assert int(stats["curr_connections"]) >= 1
    assert raw.request(b"stats noreply\r\n").startswith((b"ERROR", b"CLIENT_ERROR"))
    raw.assert_quiet()


def test_stat_names_are_unique(server: Server, raw: RawConnection) -> None:
    names = [name for name, _ in stat_lines(raw)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert duplicates == []


def test_stats_settings(server: Server, raw: RawConnection) -> None:
    settings = dict(stat_lines(raw, b"stats settings"))
    assert int(settings["maxconns"]) > 0
    assert int(settings["item_size_max"]) == 1024 * 1024


def test_stats_reset(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key = unique_key()
    assert client.set(key, b"v") is True
    assert client.get(key) == b"v"
    assert int(stats_of(raw)["get_hits"]) >= 1
    assert raw.request(b"stats reset\r\n") == b"RESET\r\n"
    stats = stats_of(raw)
    assert int(stats["get_hits"]) == 0
    assert int(stats["cmd_set"]) == 0
    assert int(stats["curr_items"]) >= 1  # items are not counters


def test_counters_move(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    key, missing = unique_key(), unique_key()

    def traffic() -> None:
        assert client.set(key, b"1") is True
        assert client.get(key) == b"1"
        assert client.get(key) == b"1"
        assert client.get(missing) is None
        assert client.incr(key, 1) == 2
        assert client.incr(missing, 1) is None
        assert client.decr(key, 1) == 1
        assert client.decr(missing, 1) is None
        _, token = client.gets(key)
        assert client.cas(key, b"2", token) is True
        assert client.cas(key, b"3", token) is False
        assert client.cas(missing, b"3", b"1") is None
        assert client.touch(key, 100) is True
        assert client.touch(missing, 100) is False
        assert client.delete(key) is True
        assert client.delete(key) is False
        assert client.flush_all() is True

    deltas = counter_deltas(raw, traffic)
    expected = {
        "get_hits": 3,
        "get_misses": 1,
        "incr_hits": 1,
        "incr_misses": 1,
        "decr_hits": 1,
        "decr_misses": 1,
        "cas_hits": 1,
        "cas_badval": 1,
        "cas_misses": 1,
        "touch_hits": 1,
        "touch_misses": 1,
        "cmd_touch": 2,
        "delete_hits": 1,
        "delete_misses": 1,
        "cmd_flush": 1,
    }
    assert {name: deltas.get(name) for name in expected} == expected
    assert deltas["cmd_get"] == 4  # two get hits, one gets hit, one get miss
    assert deltas["cmd_set"] == 4  # the set and the three cas commands
    assert deltas["bytes_read"] > 0
    assert deltas["bytes_written"] > 0


def test_verbosity(server: Server, raw: RawConnection) -> None:
    assert raw.request(b"verbosity 1\r\n") == b"OK\r\n"
    assert raw.request(b"verbosity 0\r\n") == b"OK\r\n"
    assert raw.request(b"verbosity\r\n") == b"ERROR\r\n"
    raw.send(b"verbosity 0 noreply\r\n")
    raw.assert_quiet()


def test_quit_closes_without_reply(server: Server, raw: RawConnection) -> None:
    assert raw.request(b"version\r\n").startswith(b"VERSION ")
    raw.send(b"quit\r\n")
    assert raw.read_to_close() == b""


def test_pymemcache_quit_and_reconnect(server: Server, unique_key: KeyFactory) -> None:
    key = unique_key()
    client = make_client(server.port)
    try:
        assert client.set(key, b"v") is True
        client.quit()
        assert client.get(key) == b"v"  # pymemcache reconnects
    finally:
        client.close()


# --- administrative commands and key dumps (issue item 4) --------------------------------------


def test_http_request_line_closes_without_a_byte(server: Server) -> None:
    with RawConnection(server.port) as raw:
        raw.send(b"GET / HTTP/1.0\r\n")
        assert raw.read_to_close() == b""


def test_slabs_automove_and_verbosity_arguments(server: Server, raw: RawConnection) -> None:
    bad_format = b"CLIENT_ERROR bad command line format\r\n"
    assert raw.request(b"slabs automove invalid\r\n") == bad_format
    assert raw.request(b"slabs automove -1\r\n") == bad_format
    assert raw.request(b"slabs automove 3\r\n") == b"ERROR\r\n"
    assert raw.request(b"slabs automove\r\n") == b"ERROR\r\n"
    assert raw.request(b"slabs automove 0\r\n") == b"OK\r\n"
    assert raw.request(b"verbosity invalid\r\n") == bad_format
    assert raw.request(b"verbosity -1\r\n") == bad_format
    assert raw.request(b"verbosity 1 2\r\n") == b"OK\r\n"
    assert raw.request(b"verbosity 0\r\n") == b"OK\r\n"
    raw.send(b"slabs automove 0 noreply\r\nslabs automove invalid noreply\r\n")
    raw.send(b"verbosity invalid noreply\r\n")
    raw.assert_quiet()


def test_shutdown_is_not_enabled(server: Server, raw: RawConnection) -> None:
    for command in (b"shutdown\r\n", b"shutdown graceful\r\n", b"shutdown noreply\r\n"):
        assert raw.request(command) == b"ERROR: shutdown not enabled\r\n"
    raw.assert_quiet()
    assert int(stats_of(raw)["pid"]) == server.process.pid  # still the same process


def test_stats_sizes_is_disabled(server: Server, raw: RawConnection) -> None:
    assert raw.request(b"stats sizes\r\n", terminator=b"END\r\n") == (
        b"STAT sizes_status disabled\r\nEND\r\n"
    )


def test_flush_all_empties_curr_items_and_bytes(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    keys = [unique_key() for _ in range(3)]
    for key in keys:
        assert client.set(key, b"0123456789") is True
    before = stats_of(raw)
    assert int(before["curr_items"]) >= 3
    assert int(before["bytes"]) >= 30
    assert raw.request(b"flush_all\r\n") == b"OK\r\n"

    def emptied() -> bool:
        after = stats_of(raw)
        return (after["curr_items"], after["bytes"]) == ("0", "0")

    # Kai drops the counts when the flush takes effect; memcached 1.6.18 when its LRU crawler
    # reclaims the flushed items, within a second or two.
    wait_for(emptied, timeout=10, interval=0.1, what="curr_items and bytes to drop to 0")
    assert client.set(keys[0], b"v") is True
    assert stats_of(raw)["curr_items"] == "1"


def cachedump_lines(raw: RawConnection, key: str) -> list[bytes]:
    """The ``ITEM`` lines naming ``key`` in every class ``stats cachedump`` knows (1..63)."""
    found = []
    for item_class in range(1, 64):
        reply = raw.request(b"stats cachedump %d 0\r\n" % item_class, terminator=b"END\r\n")
        found += [
            line for line in reply.split(b"\r\n") if line.startswith(b"ITEM %b " % key.encode())
        ]
    return found


def test_stats_cachedump(
    server: Server, client: Client, raw: RawConnection, unique_key: KeyFactory
) -> None:
    lasting, brief, deleted = unique_key(), unique_key(), unique_key()
    expires = int(time.time()) + 1000
    assert client.set(lasting, b"abc", flags=5) is True
    assert client.set(brief, b"hello", expire=expires) is True
    assert client.set(deleted, b"x") is True
    assert client.delete(deleted) is True
    # memcached leaves out of the dump what was stored in the second of an earlier flush_all.
    wait_for(
        lambda: cachedump_lines(raw, lasting) == [b"ITEM %b [3 b; 0 s]" % lasting.encode()],
        timeout=5,
        interval=0.2,
        what=f"{lasting} in the dump",
    )
    (line,) = cachedump_lines(raw, brief)
    # memcached keeps the expiry relative to its start, in whole seconds.
    match = re.fullmatch(rb"ITEM \S+ \[5 b; (\d+) s\]", line)
    assert match is not None, line
    assert abs(int(match.group(1)) - expires) <= 1
    assert cachedump_lines(raw, deleted) == []
    assert raw.request(b"stats cachedump 64 0\r\n") == b"CLIENT_ERROR Illegal slab id\r\n"
    assert raw.request(b"stats cachedump 1\r\n") == b"CLIENT_ERROR bad command line\r\n"
    assert raw.request(b"stats cachedump x 0\r\n") == b"CLIENT_ERROR bad command line format\r\n"
    raw.assert_quiet()


def test_memcdump_lists_the_keys(server: Server, client: Client, unique_key: KeyFactory) -> None:
    require_binaries("memcdump")
    keys = {unique_key() for _ in range(5)}
    for key in keys:
        assert client.set(key, b"value") is True

    def dumped() -> bool:
        result = subprocess.run(
            ["memcdump", f"--servers={server.host}:{server.port}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return keys <= set(result.stdout.split())

    # As above: memcached may leave out keys stored in the second of an earlier flush_all.
    wait_for(dumped, timeout=5, interval=0.2, what="memcdump to list the keys")


# --- Kai-only stats -----------------------------------------------------------------------------


def test_kai_stats_fields(kai_server: Server) -> None:
    with RawConnection(kai_server.port) as raw:
        stats = stats_of(raw)
    missing = [
        name
        for name in (*LIBMEMCACHED_STATS, *OTHER_COUNTERS, *KAI_STATS, *LATENCY_STATS)
        if name not in stats
    ]
    assert missing == []
    assert int(stats["pid"]) == kai_server.process.pid
    assert stats["pointer_size"] in {"32", "64"}
    for name in ("rusage_user", "rusage_system"):
        assert re.fullmatch(r"\d+\.\d{6}", stats[name]), (name, stats[name])
    assert abs(int(stats["time"]) - time.time()) < 5
    assert stats["kai_store"] == "leveldb"
    nodes = stats["kai_curr_nodes"].split()
    assert nodes == [stats["kai_node"]]
    assert isinstance(kai_server.process, KaiProcess)
    assert stats["kai_node"] == f"127.0.0.1:{kai_server.process.rpc_port}"
    assert re.fullmatch(r"\d+,\d+,\d+", stats["kai_quorum"]), stats["kai_quorum"]
    n, r, w = (int(part) for part in stats["kai_quorum"].split(","))
    assert 1 <= r <= n
    assert 1 <= w <= n
    assert int(stats["kai_buckets"]) > 0
    assert int(stats["kai_virtual_nodes"]) > 0
    for name in LATENCY_STATS:
        assert float(stats[name]) >= 0.0, name


def test_kai_items_and_latency_move(kai_server: Server, unique_key: KeyFactory) -> None:
    client = make_client(kai_server.port)
    keys = [unique_key() for _ in range(10)]
    try:
        with RawConnection(kai_server.port) as raw:

            def traffic() -> None:
                for key in keys:
                    assert client.set(key, b"0123456789") is True
                    assert client.get(key) == b"0123456789"

            deltas = counter_deltas(raw, traffic)
            stats = stats_of(raw)
    finally:
        client.close()
    assert deltas["curr_items"] == 10
    assert deltas["total_items"] == 10
    assert deltas["bytes"] >= 100
    assert deltas["cmd_set"] == 10
    assert deltas["get_hits"] == 10
    for op in ("get", "set"):
        percentiles = [
            float(stats[f"kai_{op}_latency_{name}_ms"]) for name in ("p50", "p99", "p999", "max")
        ]
        assert percentiles == sorted(percentiles), op
        assert percentiles[-1] > 0.0, op


def test_kai_connection_counters(kai_server: Server) -> None:
    with RawConnection(kai_server.port) as raw:
        # Earlier tests' connections may still be closing: wait until only this one is left.
        wait_for(
            lambda: stats_of(raw)["curr_connections"] == "1",
            timeout=10,
            what="earlier connections to close",
        )
        before = stats_of(raw)
        extra = [RawConnection(kai_server.port) for _ in range(3)]
        try:
            for connection in extra:
                connection.assert_quiet()
            during = stats_of(raw)
        finally:
            for connection in extra:
                connection.close()
    assert int(during["curr_connections"]) == 4
    assert int(during["total_connections"]) - int(before["total_connections"]) == 3

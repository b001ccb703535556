"""The Dynamo API over memcached (``K`` on mg/ms/md), through the node's command executor.

Runs on the executor every node runs, over a ring of one with an injected clock (see
tests/test_commands.py): raw request bytes in, exact reply bytes out. Two writes in one
read's context become siblings; a write in the context of a read of both resolves them.
"""

from __future__ import annotations

import re

import pytest
import trio

from kai.core.contexts import decode_context, encode_context
from kai.core.vclock import VClock
from tests.test_commands import NOW, Harness, make_harness

EMPTY = encode_context(VClock())
_READ = re.compile(rb"VA (\d+) K(\S+)((?: \S+)*)\r\n")
_ENTRY = re.compile(rb"VA (\d+) f(\d+) t(-?\d+)\r\n")


@pytest.fixture
def h(nursery: trio.Nursery) -> Harness:
    return make_harness(nursery)


def parse_read(reply: bytes) -> tuple[bytes, list[tuple[bytes, int, int]], bytes]:
    """(token, [(value, flags, ttl), ...], the other return flags) of an ``mg K`` reply,
    checked to be exactly one reply."""
    match = _READ.match(reply)
    assert match is not None, reply
    size, token, others = int(match[1]), match[2], match[3]
    block = reply[match.end() : match.end() + size]
    assert reply[match.end() + size :] == b"\r\n", reply
    siblings = []
    while block:
        entry = _ENTRY.match(block)
        assert entry is not None, block
        length = int(entry[1])
        value = block[entry.end() : entry.end() + length]
        assert block[entry.end() + length : entry.end() + length + 2] == b"\r\n"
        siblings.append((value, int(entry[2]), int(entry[3])))
        block = block[entry.end() + length + 2 :]
    return token, siblings, others.strip()


async def read(h: Harness, key: bytes) -> tuple[bytes, list[bytes]]:
    token, siblings, _ = parse_read(await h.send(b"mg %b K\r\n" % key))
    return token, sorted(value for value, _, _ in siblings)


async def write(h: Harness, key: bytes, token: bytes, value: bytes) -> bytes:
    reply = await h.send(b"ms %b %d K%b\r\n%b\r\n" % (key, len(value), token, value))
    match = re.fullmatch(rb"HD K(\S+)\r\n", reply)
    assert match is not None, reply
    return match[1]


async def test_a_key_never_written_reads_as_no_siblings_and_the_empty_context(
    h: Harness,
) -> None:
    assert await h.send(b"mg nothing K\r\n") == b"VA 0 K%b\r\n\r\n" % EMPTY
    assert (h.stats.cmd_get, h.stats.get_misses) == (1, 1)


async def test_writes_in_one_context_are_siblings_and_a_write_in_both_contexts_resolves(
    h: Harness,
) -> None:
    assert await h.send(b"set cart 0 0 1\r\na\r\n") == b"STORED\r\n"
    token, values = await read(h, b"cart")
    assert values == [b"a"]
    await write(h, b"cart", token, b"a,b")
    await write(h, b"cart", token, b"a,c")
    both, values = await read(h, b"cart")
    assert values == [b"a,b", b"a,c"]  # neither concurrent write is lost
    written = await write(h, b"cart", both, b"a,b,c")
    after, values = await read(h, b"cart")
    assert values == [b"a,b,c"]
    # The token a write answers covers what it wrote: writing in it supersedes that.
    assert decode_context(written) == decode_context(after)
    await write(h, b"cart", written, b"a,b,c,d")
    assert (await read(h, b"cart"))[1] == [b"a,b,c,d"]
    # A classic get shows one of them; a set (no K) supersedes everything.
    assert await h.send(b"get cart\r\n") == b"VALUE cart 0 7\r\na,b,c,d\r\nEND\r\n"


async def test_a_write_in_the_empty_context_is_a_sibling_of_everything(h: Harness) -> None:
    assert await h.send(b"set k 0 0 3\r\nold\r\n") == b"STORED\r\n"
    await write(h, b"k", EMPTY, b"new")
    assert (await read(h, b"k"))[1] == [b"new", b"old"]


async def test_siblings_come_newest_first_with_their_flags_and_ttl(h: Harness) -> None:
    token, _ = await read(h, b"k")
    assert (await h.send(b"ms k 3 K%b F7 T100\r\none\r\n" % token)).startswith(b"HD K")
    h.clock.now = NOW + 10
    assert (await h.send(b"ms k 3 K%b\r\ntwo\r\n" % token)).startswith(b"HD K")
    _, siblings, _ = parse_read(await h.send(b"mg k K v\r\n"))
    assert siblings == [(b"two", 0, -1), (b"one", 7, 90)]


async def test_a_delete_in_context_leaves_concurrent_writes_and_its_token_covers_the_tombstone(
    h: Harness,
) -> None:
    token, _ = await read(h, b"k")
    first = await write(h, b"k", token, b"one")
    await write(h, b"k", token, b"two")  # concurrent with "one"
    deleted = await h.send(b"md k K%b\r\n" % first)
    assert deleted.startswith(b"HD K")
    after, values = await read(h, b"k")
    assert values == [b"two"]
    assert await h.send(b"md k K%b q\r\n" % after) == b""  # q hides HD
    empty, values = await read(h, b"k")
    assert values == []
    assert decode_context(empty) != VClock()  # it covers the tombstones
    await write(h, b"k", empty, b"fresh")
    assert (await read(h, b"k"))[1] == [b"fresh"]
    assert len(h.replica.read(b"k")) == 1  # the tombstones were superseded


async def test_return_flags_come_back_in_request_order(h: Harness) -> None:
    token, _ = await read(h, b"k")
    reply = await h.send(b"ms k 1 O9 K%b k c\r\nx\r\n" % token)
    match = re.fullmatch(rb"HD O9 K(\S+) kk c(\d+)\r\n", reply)
    assert match is not None, reply
    got, siblings, others = parse_read(await h.send(b"mg k K c O1 k\r\n"))
    assert others == b"c%b O1 kk" % match[2]  # the same cas unique as the write's
    assert siblings == [(b"x", 0, -1)]
    assert got == match[1]  # the write's token is the context of a read of it alone
    # base64 keys: the key comes back in base64, followed by b.
    reply = await h.send(b"mg aw== b k K\r\n")  # "k" in base64
    assert re.fullmatch(rb"VA 16 kaw== b K\S+\r\nVA 1 f0 t-1\r\nx\r\n\r\n", reply), reply


async def test_quiet_reads_still_answer_and_pipelines_keep_their_order(h: Harness) -> None:
    token, _ = await read(h, b"k")
    replies = await h.send(b"ms k 1 K%b q\r\nx\r\nmg k K q O1\r\nmn\r\n" % token)
    read_reply, noop = replies.rsplit(b"MN\r\n", 1)[0], replies.endswith(b"MN\r\n")
    assert noop
    _, siblings, others = parse_read(read_reply)
    assert (siblings, others) == ([(b"x", 0, -1)], b"O1")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"mg k K%b\r\n" % b"x",
        b"ms k 1 K!!!\r\nx\r\n",
        b"md k KAAAA\r\n",
    ],
)
async def test_malformed_tokens_and_flag_combinations_are_client_errors(
    h: Harness, request_bytes: bytes
) -> None:
    reply = await h.send(request_bytes)
    assert reply.startswith(b"CLIENT_ERROR "), reply
    assert await h.send(b"mg k K\r\n") == b"VA 0 K%b\r\n\r\n" % EMPTY  # nothing was written


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"mg k K f\r\n",
        b"mg k K t\r\n",
        b"mg k K T30\r\n",
        b"ms k 1 K%b C1\r\nx\r\n" % EMPTY,
        b"ms k 1 K%b ME\r\nx\r\n" % EMPTY,
        b"ms k 1 K%b I\r\nx\r\n" % EMPTY,
    ],
)
async def test_k_with_flags_it_cannot_honour_is_an_invalid_flag(
    h: Harness, request_bytes: bytes
) -> None:
    assert await h.send(request_bytes) == b"CLIENT_ERROR invalid flag\r\n"


@pytest.mark.parametrize("flag", [b"I", b"C1"])
async def test_a_delete_in_context_refuses_i_and_c_in_md_s_words(h: Harness, flag: bytes) -> None:
    reply = await h.send(b"md k K%b %b\r\n" % (EMPTY, flag))
    assert reply == b"CLIENT_ERROR invalid or duplicate flag\r\n"

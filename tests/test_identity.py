"""A node's identity is its RPC address: never an unspecified one, and kept by its data.

The config refuses ``0.0.0.0`` (and ``::``) as the RPC host, whichever setting names it. A
node started in-process on a real LevelDB data directory records the address it bound under
the metadata name ``node_id``, binds the same port again when asked for port 0, and refuses
any other address before it builds anything, leaving every stored entry as it was. The memory
engine starts empty, so it never refuses.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import plyvel
import pytest
import trio

from kai.__main__ import main as kai_main
from kai.core.config import Address, Config, config_from_mapping, load_config_file
from kai.core.errors import ConfigError, StorageError
from kai.node import NODE_ID_META, Node, NodeAddresses
from kai.storage import open_engine
from kai.storage.replica import load_or_create_actor
from kai.testing.process import free_port

HOST = "127.0.0.1"
#: Real-time guard for a node started and stopped on real sockets.
TIMEOUT = 30.0


def unspecified_refusal(setting: str, host: str = "0.0.0.0") -> str:
    return (
        f"{setting}: {host} cannot be the node's address: the RPC address is its identity and"
        f' other nodes cannot reach "{host}"; give the address peers should use to reach this'
        " node (its address on their network, or 127.0.0.1 for a node on its own); listen and"
        " metrics may be 0.0.0.0"
    )


def identity_refusal(data_dir: Path, old: str, new: str, *, replace_with: str | None = None) -> str:
    where = "the new address" if replace_with == "NEW" else new
    return (
        f"data directory {data_dir} belongs to node {old}, not {new}: start it with --rpc {old},"
        f" or move the node: start a fresh node (a new data directory) at {where} and run"
        f" `kai-admin replace {old} {replace_with or new}`"
    )


def node_config(
    data_dir: Path, *, rpc_port: int = 0, host: str = HOST, store: str = "leveldb"
) -> Config:
    return config_from_mapping(
        {
            "data_dir": str(data_dir),
            "listen": f"{HOST}:0",
            "rpc": f"{host}:{rpc_port}",
            "store": store,
            "anti_entropy": False,
        }
    )


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[NodeAddresses]:
    """A node started in-process; shut down (and its LevelDB closed) on exit."""
    node = Node(config)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            addresses: NodeAddresses = await nursery.start(node.run)
            try:
                yield addresses
            finally:
                node.shut_down()


async def memcache(address: tuple[str, int], request: bytes, end: bytes) -> bytes:
    """Send one memcached request and read its reply up to ``end``."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(request)
        reply = b""
        while not reply.endswith(end):
            chunk = await stream.receive_some()
            assert chunk, f"connection closed after {reply!r}"
            reply += chunk
        return reply


async def store(address: tuple[str, int], key: bytes, value: bytes) -> None:
    request = b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value)
    assert await memcache(address, request, b"\r\n") == b"STORED\r\n"


async def fetch(address: tuple[str, int], key: bytes) -> bytes:
    return await memcache(address, b"get %s\r\n" % key, b"END\r\n")


def another_free_port(than: int) -> int:
    """A free port that is not ``than`` (a port the OS may hand out again)."""
    while (port := free_port()) == than:
        pass
    return port


def stored_entries(data_dir: Path) -> dict[bytes, bytes]:
    """Every key and value in the data directory's LevelDB (records, metadata, hints)."""
    db = plyvel.DB(str(data_dir / "db"))
    try:
        return dict(db.iterator())
    finally:
        db.close()


def stored_identity(data_dir: Path) -> bytes | None:
    engine = open_engine("leveldb", data_dir)
    try:
        return engine.get_meta(NODE_ID_META)
    finally:
        engine.close()


# --- the config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"rpc": "0.0.0.0:11011"}, "rpc"),
        ({"rpc": "0.0.0.0:0"}, "rpc"),
        ({"hostname": "0.0.0.0"}, "hostname"),
        ({"hostname": "0.0.0.0", "rpc_port": 12011}, "hostname"),
    ],
)
def test_an_unspecified_rpc_host_is_refused_saying_why(
    settings: dict[str, object], setting: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_mapping(settings)
    assert str(refused.value) == unspecified_refusal(setting)
    with pytest.raises(ConfigError) as refused:
        Config(rpc=Address("0.0.0.0", 11011))
    assert str(refused.value) == unspecified_refusal("rpc")


@pytest.mark.parametrize("rpc", ["[::]:11011", ":::11011"])
def test_the_ipv6_unspecified_address_is_refused_too(rpc: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_mapping({"rpc": rpc})
    assert str(refused.value) == (
        "rpc: the host must be an IPv4 address (it places the node on the ring), got '::'"
    )


def test_a_config_file_naming_0_0_0_0_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "kai.toml"
    path.write_text('hostname = "0.0.0.0"\nrpc_port = 11011\n')
    with pytest.raises(ConfigError) as refused:
        load_config_file(path)
    assert str(refused.value) == f"config file {path}: {unspecified_refusal('hostname')}"


def test_listen_and_metrics_may_be_0_0_0_0() -> None:
    config = config_from_mapping({"listen": "0.0.0.0:11211", "metrics": "0.0.0.0:9150"})
    assert config.listen == Address("0.0.0.0", 11211)
    assert config.rpc == Address(HOST, 11011)


@pytest.mark.parametrize("how", ["flag", "file"])
def test_kai_refuses_rpc_0_0_0_0_in_one_line_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    data_dir = tmp_path / "data"
    if how == "flag":
        argv = ["--rpc", "0.0.0.0:11011"]
        expected = f"kai: {unspecified_refusal('rpc')}\n"
    else:
        path = tmp_path / "kai.toml"
        path.write_text('rpc = "0.0.0.0:11011"\n')
        argv = ["--config", str(path)]
        expected = f"kai: config file {path}: {unspecified_refusal('rpc')}\n"
    assert kai_main([*argv, "--data-dir", str(data_dir), "--listen", "0.0.0.0:11211"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", expected)
    assert not data_dir.exists()


# --- the data directory's identity -----------------------------------------------------------


async def test_the_first_start_records_the_rpc_port_it_bound(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with running(node_config(data_dir)) as addresses:
        host, port = addresses.rpc
        assert (host, port != 0) == (HOST, True)
    assert stored_identity(data_dir) == f"{HOST}:{port}".encode()


async def test_rpc_port_0_binds_the_remembered_port_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    async with running(node_config(data_dir)) as first:
        await store(first.memcache, b"kept", b"value")
    port = first.rpc[1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kai.node"):
        async with running(node_config(data_dir)) as again:
            assert again.rpc == first.rpc
            assert await fetch(again.memcache, b"kept") == b"VALUE kept 0 5\r\nvalue\r\nEND\r\n"
    assert f"rpc port 0: reusing port {port}, this data directory's identity" in caplog.messages
    # Asked for explicitly, the remembered address starts as well.
    async with running(node_config(data_dir, rpc_port=port)) as explicit:
        assert explicit.rpc == first.rpc
    assert stored_identity(data_dir) == f"{HOST}:{port}".encode()


@pytest.mark.parametrize("other", ["port", "host", "host and port 0"])
async def test_another_address_is_refused_before_anything_is_built_or_written(
    tmp_path: Path, other: str
) -> None:
    data_dir = tmp_path / "data"
    async with running(node_config(data_dir)) as first:
        await store(first.memcache, b"kept", b"value")
    old = f"{HOST}:{first.rpc[1]}"
    if other == "port":
        config = node_config(data_dir, rpc_port=another_free_port(first.rpc[1]))
        replace_with = None
    elif other == "host":
        config = node_config(data_dir, host="127.0.0.2", rpc_port=first.rpc[1])
        replace_with = None
    else:
        config = node_config(data_dir, host="127.0.0.2")
        replace_with = "NEW"
    entries = stored_entries(data_dir)
    secret = (data_dir / "cluster.secret").read_bytes()
    listing = sorted(path.name for path in data_dir.iterdir())

    node = Node(config)
    with trio.fail_after(TIMEOUT), pytest.raises(ConfigError) as refused:
        await node.run()
    assert str(refused.value) == identity_refusal(
        data_dir, old, str(config.rpc), replace_with=replace_with
    )
    # Refused before the replica, the cluster (gossip) or any listener existed.
    assert (node.replica, node.cluster, node.executor) == (None, None, None)
    assert stored_entries(data_dir) == entries
    assert (data_dir / "cluster.secret").read_bytes() == secret
    assert sorted(path.name for path in data_dir.iterdir()) == listing

    async with running(node_config(data_dir, rpc_port=first.rpc[1])) as again:
        assert again.rpc == first.rpc
        assert await fetch(again.memcache, b"kept") == b"VALUE kept 0 5\r\nvalue\r\nEND\r\n"


async def test_a_remembered_port_in_use_says_where_it_came_from(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with running(node_config(data_dir)) as first:
        pass
    host, port = first.rpc
    entries = stored_entries(data_dir)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((host, port))
        taken.listen()
        node = Node(node_config(data_dir))
        with trio.fail_after(TIMEOUT), pytest.raises(ConfigError) as refused:
            await node.run()
    assert str(refused.value) == (
        f"cannot listen on {host}:{port} (rpc, --rpc): Address already in use (is another kai"
        f" or memcached running there?); port 0 reuses the port data directory {data_dir} was"
        " created with"
    )
    assert stored_entries(data_dir) == entries


async def test_the_memory_engine_never_refuses(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with running(node_config(data_dir, store="memory")) as first:
        pass
    other = another_free_port(first.rpc[1])
    async with running(node_config(data_dir, rpc_port=other, store="memory")) as second:
        assert second.rpc == (HOST, other)
    assert not (data_dir / "db").exists()


async def test_an_unreadable_identity_is_a_storage_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with running(node_config(data_dir)):
        pass
    engine = open_engine("leveldb", data_dir)
    try:
        engine.put_meta(NODE_ID_META, b"\xffnot-an-address")
    finally:
        engine.close()
    entries = stored_entries(data_dir)
    node = Node(node_config(data_dir))
    with trio.fail_after(TIMEOUT), pytest.raises(StorageError) as refused:
        await node.run()
    assert str(refused.value) == (
        f"data directory {data_dir}: its node identity (b'\\xffnot-an-address') is unreadable,"
        " so the database may be corrupt: restore it from a backup, or start a fresh node and"
        " move this one with `kai-admin replace OLD NEW`"
    )
    assert stored_entries(data_dir) == entries


async def test_a_data_directory_without_an_identity_takes_the_address_it_starts_with(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    engine = open_engine("leveldb", data_dir)
    try:
        actor = load_or_create_actor(engine)  # as a node did before identities were kept
    finally:
        engine.close()
    port = free_port()
    async with running(node_config(data_dir, rpc_port=port)) as addresses:
        assert addresses.rpc == (HOST, port)
    assert stored_identity(data_dir) == f"{HOST}:{port}".encode()
    assert stored_entries(data_dir)[b"mactor_id"] == actor

"""Tests for the RPC handshake (kai.core.rpc.auth) and the cluster secret file (kai.rpc.secret)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from kai.core.errors import ConfigError, RpcAuthenticationError, RpcProtocolError
from kai.core.rpc.auth import (
    MAX_HANDSHAKE_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    REJECTION,
    ClientHandshake,
    ServerHandshake,
    client_proof,
    server_proof,
)
from kai.rpc.secret import SECRET_SIZE, load_or_create_secret, load_secret

SECRET = b"s" * 32
OTHER_SECRET = b"o" * 32
SERVER_NONCE = bytes(range(32))
CLIENT_NONCE = bytes(range(100, 132))


def packb(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj)
    return data


def run_handshake(
    server: ServerHandshake, client: ClientHandshake, *, byte_by_byte: bool = False
) -> None:
    """Shuttle bytes between the two machines until both are authenticated."""

    def deliver(data: bytes, receiver: ServerHandshake | ClientHandshake) -> bytes:
        if not byte_by_byte:
            return receiver.receive_data(data)
        replies = [receiver.receive_data(data[i : i + 1]) for i in range(len(data))]
        return b"".join(replies)

    to_client = server.hello()
    while not (server.authenticated and client.authenticated):
        to_server = deliver(to_client, client)
        to_client = deliver(to_server, server) if to_server else b""
        if not to_client and not client.authenticated:
            raise AssertionError("handshake stalled")


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_same_secret_authenticates_both_sides(byte_by_byte: bool) -> None:
    server = ServerHandshake(SECRET, SERVER_NONCE)
    client = ClientHandshake(SECRET, CLIENT_NONCE)
    run_handshake(server, client, byte_by_byte=byte_by_byte)
    assert server.authenticated
    assert client.authenticated
    assert server.trailing_data() == b""
    assert client.trailing_data() == b""


def test_messages_are_deterministic_given_the_nonces() -> None:
    server = ServerHandshake(SECRET, SERVER_NONCE)
    client = ClientHandshake(SECRET, CLIENT_NONCE)
    hello = server.hello()
    assert hello == packb(["kai-hello", PROTOCOL_VERSION, SERVER_NONCE])
    auth = client.receive_data(hello)
    assert auth == packb(
        [
            "kai-auth",
            PROTOCOL_VERSION,
            CLIENT_NONCE,
            client_proof(SECRET, SERVER_NONCE, CLIENT_NONCE),
        ]
    )
    welcome = server.receive_data(auth)
    assert welcome == packb(["kai-welcome", server_proof(SECRET, SERVER_NONCE, CLIENT_NONCE)])
    assert client.receive_data(welcome) == b""
    assert client.authenticated


def test_proofs_are_hmac_sha256_with_distinct_labels() -> None:
    import hashlib
    import hmac

    assert (
        client_proof(SECRET, SERVER_NONCE, CLIENT_NONCE)
        == hmac.new(SECRET, b"kai-client" + SERVER_NONCE + CLIENT_NONCE, hashlib.sha256).digest()
    )
    assert (
        server_proof(SECRET, SERVER_NONCE, CLIENT_NONCE)
        == hmac.new(SECRET, b"kai-server" + CLIENT_NONCE + SERVER_NONCE, hashlib.sha256).digest()
    )
    assert client_proof(SECRET, SERVER_NONCE, CLIENT_NONCE) != server_proof(
        SECRET, CLIENT_NONCE, SERVER_NONCE
    )


def test_server_rejects_a_client_with_another_secret() -> None:
    server = ServerHandshake(SECRET, SERVER_NONCE)
    client = ClientHandshake(OTHER_SECRET, CLIENT_NONCE)
    auth = client.receive_data(server.hello())
    with pytest.raises(RpcAuthenticationError, match="secrets differ"):
        server.receive_data(auth)
    assert not server.authenticated
    with pytest.raises(RuntimeError):
        server.trailing_data()
    with pytest.raises(RuntimeError):
        server.receive_data(auth)
    # The rejection the server sends tells the client what went wrong.
    with pytest.raises(RpcAuthenticationError, match="rejected"):
        client.receive_data(REJECTION)
    assert not client.authenticated


def test_client_rejects_a_server_with_another_secret() -> None:
    # An impostor server that accepts anything and answers with its own secret's proof.
    client = ClientHandshake(SECRET, CLIENT_NONCE)
    client.receive_data(packb(["kai-hello", PROTOCOL_VERSION, SERVER_NONCE]))
    forged = server_proof(OTHER_SECRET, SERVER_NONCE, CLIENT_NONCE)
    with pytest.raises(RpcAuthenticationError, match="secrets differ"):
        client.receive_data(packb(["kai-welcome", forged]))
    assert not client.authenticated


def test_replayed_client_proof_fails_against_a_fresh_server_nonce() -> None:
    recorded = ClientHandshake(SECRET, CLIENT_NONCE).receive_data(
        ServerHandshake(SECRET, SERVER_NONCE).hello()
    )
    fresh_server = ServerHandshake(SECRET, bytes(32))
    fresh_server.hello()
    with pytest.raises(RpcAuthenticationError):
        fresh_server.receive_data(recorded)


def test_replayed_server_proof_fails_against_a_fresh_client_nonce() -> None:
    server = ServerHandshake(SECRET, SERVER_NONCE)
    recorded_welcome = server.receive_data(
        ClientHandshake(SECRET, CLIENT_NONCE).receive_data(server.hello())
    )
    client = ClientHandshake(SECRET, bytes(32))
    client.receive_data(server.hello())
    with pytest.raises(RpcAuthenticationError):
        client.receive_data(recorded_welcome)


def test_reflected_client_proof_is_not_a_server_proof() -> None:
    client = ClientHandshake(SECRET, CLIENT_NONCE)
    auth = msgpack.unpackb(client.receive_data(ServerHandshake(SECRET, SERVER_NONCE).hello()))
    with pytest.raises(RpcAuthenticationError):
        client.receive_data(packb(["kai-welcome", auth[3]]))


def test_echoed_nonce_is_refused() -> None:
    client = ClientHandshake(SECRET, CLIENT_NONCE)
    with pytest.raises(RpcAuthenticationError, match="echoed"):
        client.receive_data(packb(["kai-hello", PROTOCOL_VERSION, CLIENT_NONCE]))


@pytest.mark.parametrize("flip", [0, 15, 31])
def test_tampered_client_proof_fails(flip: int) -> None:
    proof = bytearray(client_proof(SECRET, SERVER_NONCE, CLIENT_NONCE))
    proof[flip] ^= 1
    server = ServerHandshake(SECRET, SERVER_NONCE)
    with pytest.raises(RpcAuthenticationError):
        server.receive_data(packb(["kai-auth", PROTOCOL_VERSION, CLIENT_NONCE, bytes(proof)]))


@pytest.mark.parametrize(
    "message",
    [
        packb("hello"),
        packb(["kai-auth", PROTOCOL_VERSION, CLIENT_NONCE]),
        packb(["kai-auth", PROTOCOL_VERSION + 1, CLIENT_NONCE, bytes(32)]),
        packb(["kai-auth", PROTOCOL_VERSION, CLIENT_NONCE[:16], bytes(32)]),
        packb(["kai-auth", PROTOCOL_VERSION, CLIENT_NONCE, "proof"]),
        packb(["kai-welcome", bytes(32)]),
        b"\xc1",
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x92" + b"\xc5\xff\xff" + bytes(MAX_HANDSHAKE_MESSAGE_SIZE),  # Too long.
    ],
)
def test_server_refuses_malformed_client_messages(message: bytes) -> None:
    server = ServerHandshake(SECRET, SERVER_NONCE)
    with pytest.raises(RpcProtocolError):
        server.receive_data(message)
    assert not server.authenticated


def test_client_refuses_a_server_speaking_another_version() -> None:
    client = ClientHandshake(SECRET, CLIENT_NONCE)
    with pytest.raises(RpcProtocolError, match="version 2"):
        client.receive_data(packb(["kai-hello", 2, SERVER_NONCE]))


def test_bytes_after_the_handshake_are_kept_for_the_rpc_framing() -> None:
    server = ServerHandshake(SECRET, SERVER_NONCE)
    client = ClientHandshake(SECRET, CLIENT_NONCE)
    auth = client.receive_data(server.hello())
    welcome = server.receive_data(auth + b"early-rpc")
    assert server.trailing_data() == b"early-rpc"
    client.receive_data(welcome + b"response")
    assert client.trailing_data() == b"response"


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="secret"):
        ServerHandshake(b"", SERVER_NONCE)
    with pytest.raises(ValueError, match="nonce"):
        ClientHandshake(SECRET, b"short")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=2 * MAX_HANDSHAKE_MESSAGE_SIZE), st.integers(1, 64))
def test_arbitrary_bytes_never_authenticate(data: bytes, chunk_size: int) -> None:
    server = ServerHandshake(SECRET, SERVER_NONCE)
    client = ClientHandshake(SECRET, CLIENT_NONCE)
    for machine in (server, client):
        try:
            for start in range(0, len(data), chunk_size):
                machine.receive_data(data[start : start + chunk_size])
        except (RpcProtocolError, RpcAuthenticationError):
            pass
        assert not machine.authenticated


# --- The cluster secret file ------------------------------------------------------------


def test_missing_secret_is_created_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "cluster.secret"
    secret = load_or_create_secret(path)
    assert len(secret) == SECRET_SIZE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == secret
    assert [p.name for p in path.parent.iterdir()] == ["cluster.secret"]  # No temporaries.


def test_existing_secret_is_reloaded_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    first = load_or_create_secret(path)
    assert load_or_create_secret(path) == first
    assert load_secret(path) == first


def test_created_secret_is_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        path = tmp_path / "cluster.secret"
        load_or_create_secret(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_group_or_world_readable_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    path.write_bytes(b"k" * 32)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"0644.*chmod 600"):
        load_or_create_secret(path)
    with pytest.raises(ConfigError, match=str(path)):
        load_secret(path)


@pytest.mark.parametrize("content", [b"", b"short"])
def test_empty_or_short_secret_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "cluster.secret"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        load_or_create_secret(path)


def test_load_secret_never_creates(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    with pytest.raises(ConfigError, match=rf"{path}.*does not exist"):
        load_secret(path)
    assert not path.exists()


def test_secret_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=str(path)):
        load_or_create_secret(path)

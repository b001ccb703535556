"""A web-session store on Kai with ``kai.client``: sessions that expire unless they are used.

A session is a small map of fields (the user, the last page, a theme...), msgpack-encoded,
each field stored with the time it was set: ``{name: [unix_ms, value]}``. It is written with
a TTL, so an idle session expires by itself; every request that uses the session writes it
again in the context of its read, which refreshes the TTL (a sliding expiry). Logging out
deletes the session in the context of a read.

The merge: two requests of one session (two tabs) may write concurrently and leave two
siblings. They are merged field by field, keeping for each field the value set last (the
larger timestamp; a tie goes to the larger value, so that every client merges alike). Last
writer wins is right for a session's fields, which are independent and replace one another
(where a shopping cart's items add up, see shopping_cart.py). Its cost: the web servers'
clocks decide what "last" is, so a server whose clock is behind can lose a field to an older
value of another; a session tolerates that.

Start a node first (``kai``), then run::

    python examples/session_store.py --node 127.0.0.1:11211
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from kai.client import Client, Context, Sibling

#: Seconds an idle session lives.
SESSION_TTL = 1800
#: Seconds the demo waits at most for a short session to expire.
EXPIRY_WAIT = 5.0

#: A session as stored: field name -> [unix time in ms when it was set, value].
Fields = dict[str, list[Any]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode_session(fields: Fields) -> bytes:
    return msgpack.packb(fields)  # type: ignore[no-any-return]


def decode_session(value: bytes) -> Fields:
    decoded = msgpack.unpackb(value)
    if not isinstance(decoded, dict):
        raise ValueError(f"not a session: {value[:40]!r}")
    return decoded


def merge_sessions(siblings: Sequence[Sibling]) -> Fields:
    """Concurrent versions of a session merged: per field, the value set last."""
    merged: Fields = {}
    for sibling in siblings:
        for name, entry in decode_session(sibling.value).items():
            held = merged.get(name)
            if held is None or _newer(entry, held):
                merged[name] = entry
    return merged


def _newer(entry: list[Any], other: list[Any]) -> bool:
    """Whether ``entry`` was set after ``other``; on equal times, the larger value wins."""
    (stamp, value), (other_stamp, other_value) = entry, other
    if stamp != other_stamp:
        return bool(stamp > other_stamp)
    return bool(msgpack.packb(value) > msgpack.packb(other_value))


@dataclass(frozen=True)
class Session:
    """A session as read: its values (siblings merged), the seconds it has left (None:
    it never expires) and the context of the read, to write in."""

    values: dict[str, object]
    ttl_left: int | None
    context: Context


class SessionStore:
    """Sessions under ``session:<id>`` keys, each written with a TTL of ``ttl`` seconds."""

    def __init__(self, client: Client, *, ttl: int = SESSION_TTL) -> None:
        self.client = client
        self.ttl = ttl

    def create(self, values: Mapping[str, object], *, ttl: int | None = None) -> str:
        """A new session holding ``values``; its id."""
        session_id = secrets.token_urlsafe(16)
        stamp = now_ms()
        fields: Fields = {name: [stamp, value] for name, value in values.items()}
        self.client.put(self._key(session_id), encode_session(fields), ttl=ttl or self.ttl)
        return session_id

    def read(self, session_id: str) -> Session | None:
        """The session, or None when it expired or was deleted."""
        fetched = self.client.get(self._key(session_id))
        if not fetched.siblings:
            return None
        merged = merge_sessions(fetched.siblings)
        left = [sibling.ttl for sibling in fetched.siblings if sibling.ttl is not None]
        values = {name: entry[1] for name, entry in merged.items()}
        return Session(values, max(left, default=None), fetched.context)

    def touch(self, session_id: str, changes: Mapping[str, object] | None = None) -> bool:
        """Use the session: set ``changes`` (if any) and give it a full TTL again, written in
        the context of the read, so it supersedes every sibling it merged. False when the
        session is gone (it expired or was deleted)."""
        key = self._key(session_id)
        fetched = self.client.get(key)
        if not fetched.siblings:
            return False
        fields = merge_sessions(fetched.siblings)
        stamp = now_ms()
        for name, value in (changes or {}).items():
            fields[name] = [stamp, value]
        self.client.put(key, encode_session(fields), context=fetched.context, ttl=self.ttl)
        return True

    def delete(self, session_id: str) -> None:
        """Log out: a tombstone in the context of a read. It supersedes what the read saw; a
        request that wrote the session concurrently (unseen by the read) survives it."""
        key = self._key(session_id)
        self.client.delete(key, context=self.client.get(key).context)

    @staticmethod
    def _key(session_id: str) -> str:
        return f"session:{session_id}"


def demo(client: Client) -> None:
    store = SessionStore(client)
    session = store.create({"user": "alice", "page": "/home"})
    found = store.read(session)
    assert found is not None
    print("login ->", found.values["user"], "on", found.values["page"])
    left = found.ttl_left
    print("expires within the session ttl ->", left is not None and 0 < left <= SESSION_TTL)

    store.touch(session, {"page": "/cart"})
    found = store.read(session)
    assert found is not None
    print("after a request -> page", found.values["page"])

    # Two tabs read the session and write it concurrently in that read's context: both
    # versions are kept as siblings, and a read merges them field by field.
    fetched = client.get(f"session:{session}")
    for name, value in (("page", "/checkout"), ("theme", "dark")):
        fields = merge_sessions(fetched.siblings)
        fields[name] = [now_ms(), value]
        client.put(
            f"session:{session}", encode_session(fields), context=fetched.context, ttl=SESSION_TTL
        )
    print("siblings after two tabs ->", len(client.get(f"session:{session}").siblings))
    found = store.read(session)
    assert found is not None
    print("merged -> page", found.values["page"], "theme", found.values["theme"])
    store.touch(session)
    print("siblings after the next request ->", len(client.get(f"session:{session}").siblings))

    # An idle session expires by itself (waited for with a deadline).
    short = store.create({"user": "bob"}, ttl=1)
    deadline = time.monotonic() + EXPIRY_WAIT
    while store.read(short) is not None and time.monotonic() < deadline:
        time.sleep(0.2)  # poll interval of a deadline-bounded wait
    print("an idle session expired ->", store.read(short) is None)

    store.delete(session)
    print("after logout ->", store.read(session))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A web-session store on Kai: TTLs, refresh on use, delete in context.",
        epilog="example: python examples/session_store.py --node 127.0.0.1:11211",
    )
    parser.add_argument(
        "--node",
        action="append",
        help="a node's memcached address, host:port (repeatable; default 127.0.0.1:11211)",
    )
    args = parser.parse_args(argv)
    with Client(args.node or ["127.0.0.1:11211"]) as client:
        demo(client)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

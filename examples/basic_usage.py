"""Use Kai from Python with an ordinary memcached client (pymemcache).

Start a node first (`kai`), then run: python examples/basic_usage.py [HOST:PORT]
"""

from __future__ import annotations

import sys

from pymemcache.client.base import Client


def main(address: str = "127.0.0.1:11211") -> None:
    host, _, port = address.rpartition(":")
    client = Client((host, int(port)), connect_timeout=5, timeout=5)
    try:
        # Plain set/get, with flags and an expiry (seconds).
        client.set("greeting", b"hello", expire=300)
        print("get greeting ->", client.get("greeting"))

        # A multi-get of many keys in one request.
        client.set_many({f"user:{i}": str(i).encode() for i in range(100)})
        found = client.get_many([f"user:{i}" for i in range(100)])
        print("get_many ->", len(found), "keys")

        # Optimistic concurrency: gets returns a cas token; cas succeeds only if nobody
        # wrote the key since. In a cluster the token also carries the causal context, so a
        # cas write resolves concurrent versions into one.
        value, token = client.gets("greeting")
        print("cas with the fresh token ->", client.cas("greeting", value + b", world", token))
        print("cas with the stale token ->", client.cas("greeting", b"lost", token))
        print("get greeting ->", client.get("greeting"))

        # Counters.
        client.set("visits", b"0")
        client.incr("visits", 5)
        print("incr visits ->", client.get("visits"))

        # Deletes leave a tombstone; the key reads as missing.
        client.delete("greeting")
        print("after delete ->", client.get("greeting"))
    finally:
        client.close()


if __name__ == "__main__":
    main(*sys.argv[1:2])

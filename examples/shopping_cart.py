"""The shopping cart of Amazon's Dynamo paper, on Kai with ``kai.client``.

A cart is a set of item ids stored as one value: the ids sorted, one per line (UTF-8). Every
change is a read-modify-write in the context of the read (``Client.update``). When two
changes race (two browser tabs, or the two sides of a network partition) both are kept, as
siblings, and the next change merges them by taking the union of the carts: an item that
was added is never lost.

The paper's known anomaly comes with that merge: a removal is only a cart without the item,
so its union with a concurrent sibling that still holds the item puts the item back ("deleted
items can resurface"). This example keeps the simple merge and shows the anomaly at the end;
a cart that must never resurrect a removed item has to record removals too (an observed-
remove set), which is beyond a short example.

Start a node first (``kai``), then run::

    python examples/shopping_cart.py --node 127.0.0.1:11211
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Iterable, Sequence

from kai.client import Client, Sibling


def encode_cart(items: Iterable[str]) -> bytes:
    """A cart as stored: its item ids, sorted, one per line."""
    return "\n".join(sorted(set(items))).encode()


def decode_cart(value: bytes | None) -> frozenset[str]:
    """The item ids of a stored cart (no value, or an empty one, is an empty cart)."""
    return frozenset(line for line in (value or b"").decode().split("\n") if line)


def merge_carts(siblings: Sequence[Sibling]) -> bytes:
    """Concurrent versions of a cart merged into one: every item any of them holds.

    The union never loses an added item, and for the same reason it brings back an item
    that one sibling removed while another, written concurrently, still held it.
    """
    items: set[str] = set()
    for sibling in siblings:
        items |= decode_cart(sibling.value)
    return encode_cart(items)


def add_item(client: Client, cart: str, item: str) -> frozenset[str]:
    """Add ``item`` to ``cart``; the cart as written.

    Adding to a set is idempotent, so the client may retry even when it cannot tell whether
    a failed attempt was stored (a write that missed its quorum may still have landed).
    """
    written = client.update(
        cart,
        lambda value: encode_cart(decode_cart(value) | {item}),
        merge=merge_carts,
        idempotent=True,
    )
    return decode_cart(written)


def remove_item(client: Client, cart: str, item: str) -> frozenset[str]:
    """Remove ``item`` from ``cart``; the cart as written.

    Under the union merge a removal that races a concurrent change of the same cart may be
    undone: the other sibling still holds the item (the anomaly the module describes).
    """
    written = client.update(
        cart,
        lambda value: encode_cart(decode_cart(value) - {item}),
        merge=merge_carts,
        idempotent=True,
    )
    return decode_cart(written)


def read_cart(client: Client, cart: str) -> tuple[frozenset[str], int]:
    """The cart's items (its siblings merged) and how many siblings it has now."""
    fetched = client.get(cart)
    return decode_cart(merge_carts(fetched.siblings)), len(fetched.siblings)


def show(items: Iterable[str]) -> str:
    return ", ".join(sorted(items)) or "(empty)"


def demo(client: Client, cart: str) -> None:
    """Add and remove items, race two tabs, and show the removal anomaly."""
    add_item(client, cart, "book")
    print("cart ->", show(add_item(client, cart, "pen")))

    # Two tabs read the same version and each adds an item in that version's context: both
    # writes are kept, as siblings, because neither has seen the other.
    seen = client.get(cart)
    for item in ("lamp", "mug"):
        tab_view = decode_cart(merge_carts(seen.siblings)) | {item}
        client.put(cart, encode_cart(tab_view), context=seen.context)
    items, siblings = read_cart(client, cart)
    print("siblings after two tabs ->", siblings)
    print("both tabs' items kept ->", show(items))

    # The next change reads both siblings, merges them and supersedes them with one version.
    add_item(client, cart, "cable")
    items, siblings = read_cart(client, cart)
    print("after the next change ->", show(items), f"({siblings} sibling)")

    print("after removing pen ->", show(remove_item(client, cart, "pen")))

    # The anomaly: one tab removes the mug while another, from the same read, adds a stapler.
    seen = client.get(cart)
    before = decode_cart(merge_carts(seen.siblings))
    client.put(cart, encode_cart(before - {"mug"}), context=seen.context)
    client.put(cart, encode_cart(before | {"stapler"}), context=seen.context)
    items, _ = read_cart(client, cart)
    print("a removal raced an add ->", show(items))
    print("the removed mug came back ->", "mug" in items)

    # Checking out empties the cart: a delete in the context of a read supersedes it all.
    client.delete(cart, context=client.get(cart).context)
    items, siblings = read_cart(client, cart)
    print("after checkout ->", show(items), f"({siblings} siblings)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The Dynamo paper's shopping cart on Kai.",
        epilog="example: python examples/shopping_cart.py --node 127.0.0.1:11211",
    )
    parser.add_argument(
        "--node",
        action="append",
        help="a node's memcached address, host:port (repeatable; default 127.0.0.1:11211)",
    )
    parser.add_argument("--cart", help="the cart's key (default: a fresh one for each run)")
    args = parser.parse_args(argv)
    cart = args.cart or f"cart:{uuid.uuid4().hex}"
    with Client(args.node or ["127.0.0.1:11211"]) as client:
        demo(client, cart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

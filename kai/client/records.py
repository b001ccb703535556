"""The client's records: what a read returns, causal contexts, node addresses, the ring.

Every record is frozen and checks its fields when it is made, so a malformed reply can never
turn into a record (the parser reports a :class:`~kai.client.errors.ProtocolError` instead).
Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from kai.core.ring import NodeId

#: Largest client flags value (memcached's flags are unsigned 32-bit).
FLAGS_MAX: Final = 2**32 - 1
#: Longest context token accepted: a command line, token included, is at most 2048 bytes.
TOKEN_MAX_LENGTH: Final = 2048

_URLSAFE_BASE64: Final = re.compile(rb"[A-Za-z0-9_-]+")


def is_whole_number(value: object) -> bool:
    """Whether ``value`` is an int (and not a bool, which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_token(_instance: object, _attribute: object, token: bytes) -> None:
    if not isinstance(token, bytes):
        raise TypeError(f"a context token is bytes, not {type(token).__name__}")
    if not 0 < len(token) <= TOKEN_MAX_LENGTH or _URLSAFE_BASE64.fullmatch(token) is None:
        raise ValueError(
            "a context token is 1 to 2048 bytes of URL-safe base64, as Kai hands it out; "
            f"got {token[:60]!r}"
        )


@attrs.frozen(slots=True)
class Context:
    """A causal context: what a read saw, as the opaque token Kai handed out.

    Pass it back with a write (``put``/``delete``) to supersede exactly what that read saw.
    Never build or change one; store :attr:`token` and wrap it again if it must travel
    (say, in a web form).
    """

    token: bytes = attrs.field(validator=_check_token)

    def __repr__(self) -> str:
        shown = self.token if len(self.token) <= 24 else self.token[:20] + b"..."
        return f"Context({shown.decode()})"


def _check_flags(_instance: object, _attribute: object, flags: int) -> None:
    if not is_whole_number(flags) or not 0 <= flags <= FLAGS_MAX:
        raise ValueError(f"client flags are an integer from 0 to 2**32-1, not {flags!r}")


def _check_ttl(_instance: object, _attribute: object, ttl: int | None) -> None:
    if ttl is not None and (not is_whole_number(ttl) or ttl < 0):
        raise ValueError(f"a sibling's ttl is None or seconds >= 0, not {ttl!r}")


@attrs.frozen(slots=True)
class Sibling:
    """One live version of a key.

    Attributes:
        value: the bytes written.
        flags: the client flags written with it.
        ttl: seconds until it expires, or None if it never does.
    """

    value: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))
    flags: int = attrs.field(default=0, validator=_check_flags)
    ttl: int | None = attrs.field(default=None, validator=_check_ttl)


@attrs.frozen(slots=True)
class Fetched:
    """What a read found: the key's live siblings, newest first, and the read's context.

    No sibling means the key was never written, or deleted, or expired; the context still
    covers what was deleted or expired, so a write in it supersedes that too.
    """

    siblings: tuple[Sibling, ...] = attrs.field(
        validator=attrs.validators.deep_iterable(
            attrs.validators.instance_of(Sibling), attrs.validators.instance_of(tuple)
        )
    )
    context: Context = attrs.field(validator=attrs.validators.instance_of(Context))

    @property
    def values(self) -> tuple[bytes, ...]:
        """The siblings' values, newest first."""
        return tuple(sibling.value for sibling in self.siblings)


def _check_host(_instance: object, _attribute: object, host: str) -> None:
    if not host or any(character.isspace() for character in host):
        raise ValueError(f"a host is a non-empty name or address without spaces, not {host!r}")


def _check_port(_instance: object, _attribute: object, port: int) -> None:
    if not is_whole_number(port) or not 1 <= port <= 65535:
        raise ValueError(f"a port is an integer from 1 to 65535, not {port!r}")


@attrs.frozen(slots=True, order=True)
class Address:
    """Where a node serves memcached clients: ``host:port``."""

    host: str = attrs.field(validator=[attrs.validators.instance_of(str), _check_host])
    port: int = attrs.field(validator=_check_port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``"host:port"`` (``"[v6 address]:port"`` for IPv6), e.g. ``"127.0.0.1:11211"``.

        Raises:
            ValueError: ``text`` is not of that form; the message shows the form.
        """
        host, colon, port_text = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not colon or not host or not port_text.isascii() or not port_text.isdecimal():
            raise ValueError(
                f"expected a node's memcached address as 'host:port' such as "
                f"'127.0.0.1:11211', not {text!r}"
            )
        return cls(host, int(port_text))


@attrs.frozen(slots=True)
class RingMember:
    """A node of the ring: its id on the ring (its RPC address) and where it serves
    memcached clients (None while the node answering has not learnt it)."""

    node: NodeId = attrs.field(validator=attrs.validators.instance_of(NodeId))
    address: Address | None = attrs.field(
        validator=attrs.validators.optional(attrs.validators.instance_of(Address))
    )


def _check_buckets(_instance: object, _attribute: object, buckets: int) -> None:
    if not 1 <= buckets <= 2**32 or buckets & (buckets - 1):
        raise ValueError(f"buckets is a power of two from 1 to 2**32, not {buckets!r}")


def _check_unique_members(
    _instance: object, _attribute: object, members: tuple[RingMember, ...]
) -> None:
    nodes = [member.node for member in members]
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"a ring lists each node once, not {[str(n) for n in nodes]}")


@attrs.frozen(slots=True)
class RingDescription:
    """The ring as ``stats kai_ring`` describes it (docs/dynamo-api.md).

    Attributes:
        fingerprint: changes whenever the node list does.
        buckets: the number of partitions.
        virtual_nodes: tokens per node.
        replicas: N, the number of primaries of each key (capped at the node count: 0 only
            for a ring without nodes).
        members: the nodes, in the order given.
    """

    fingerprint: str = attrs.field(validator=attrs.validators.min_len(1))
    buckets: int = attrs.field(validator=_check_buckets)
    virtual_nodes: int = attrs.field(
        validator=[attrs.validators.ge(1), attrs.validators.le(2**16 - 1)]
    )
    replicas: int = attrs.field(validator=attrs.validators.ge(0))
    members: tuple[RingMember, ...] = attrs.field(
        validator=[
            attrs.validators.deep_iterable(
                attrs.validators.instance_of(RingMember), attrs.validators.instance_of(tuple)
            ),
            _check_unique_members,
        ]
    )

    def __attrs_post_init__(self) -> None:
        if not (0 < self.replicas <= len(self.members) or self.replicas == len(self.members) == 0):
            raise ValueError(
                f"replicas is N capped at the node count, from 1 to {len(self.members)}, "
                f"not {self.replicas}"
            )

"""Node configuration: a frozen record built from a TOML file and command-line overrides.

Pure code: parsing and validation only (no sockets, no trio). Every wrong key or value raises
:class:`~kai.core.errors.ConfigError` naming it. The original Kai's configuration names are
accepted as aliases (DESIGN §9); durations are in milliseconds, as in Kai.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from kai.core.errors import ConfigError

StoreKind = Literal["leveldb", "memory"]
SiblingView = Literal["newest", "all"]
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")


@attrs.frozen(slots=True)
class Address:
    """A TCP address, ``host:port``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, name: str) -> Address:
        """Parse ``host:port``; ``name`` is the setting, for the error message."""
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise ConfigError(f"{name}: expected HOST:PORT, got {text!r}")
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name}: port {port} is out of range 0..65535")
        return cls(host.strip("[]"), port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@attrs.frozen(slots=True)
class Quorum:
    """Replication factor N, read quorum R and write quorum W."""

    n: int
    r: int
    w: int

    def __attrs_post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"quorum: N must be at least 1, got {self.n}")
        for label, value in (("R", self.r), ("W", self.w)):
            if not 1 <= value <= self.n:
                raise ConfigError(f"quorum: {label} must be between 1 and N={self.n}, got {value}")

    @property
    def overlapping(self) -> bool:
        """Whether every read quorum meets every write quorum (R + W > N)."""
        return self.r + self.w > self.n

    def capped(self, members: int) -> Quorum:
        """This quorum with N, R and W capped at the number of cluster members."""
        members = max(members, 1)
        return Quorum(min(self.n, members), min(self.r, members), min(self.w, members))

    @classmethod
    def parse(cls, text: str, *, name: str = "quorum") -> Quorum:
        """Parse ``N,R,W``."""
        parts = text.split(",")
        if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
            raise ConfigError(f"{name}: expected N,R,W (three integers), got {text!r}")
        n, r, w = (int(part) for part in parts)
        return cls(n, r, w)

    def __str__(self) -> str:
        return f"{self.n},{self.r},{self.w}"


@attrs.frozen(slots=True, kw_only=True)
class Config:
    """Everything a node needs to start. See the configuration reference in README.md."""

    data_dir: Path = Path("kai-data")
    listen: Address = Address("127.0.0.1", 11211)
    rpc: Address = Address("127.0.0.1", 11011)
    seeds: tuple[Address, ...] = ()
    quorum: Quorum = Quorum(3, 2, 2)
    secret_file: Path | None = None
    log_level: str = "info"
    log_format: str = "text"
    buckets: int = 1024
    virtual_nodes: int = 128
    store: StoreKind = "leveldb"
    sync_writes: bool = False
    cache_size: int = 64 * 1024 * 1024
    max_connections: int = 1024
    max_item_size: int = 1024 * 1024
    request_timeout: int = 5000
    membership_interval: int = 1000
    sync_interval: int = 1000
    #: Whether anti-entropy exchanges run (every ``sync_interval``).
    anti_entropy: bool = True
    #: Whether fallbacks stand in for primaries that are down (Dynamo's sloppy quorum).
    sloppy_quorum: bool = True
    #: How often (ms) hints are offered to owners that are up, besides when one comes back.
    handoff_interval: int = 5000
    #: The most transfers (hint handoffs, partition streams) running at once on this node.
    transfer_limit: int = 2
    #: Bytes per second each transfer sends at most (0: as fast as the receiver takes them).
    transfer_rate: int = 16 * 1024 * 1024
    #: How long (ms) a tombstone, expired or flushed version is kept before it may be reaped;
    #: also the longest outage a node may have before it must be wiped and rejoined.
    tombstone_grace: int = 86_400_000
    siblings: SiblingView = "newest"
    clock_max_entries: int = 10
    siblings_warning_threshold: int = 25
    siblings_maximum: int = 100
    #: The Prometheus metrics HTTP listener; None (the default) serves none.
    metrics: Address | None = None

    def __attrs_post_init__(self) -> None:
        _check_rpc_host(self.rpc.host, "rpc")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format: must be one of {', '.join(LOG_FORMATS)}")
        if self.buckets < 1 or self.buckets & (self.buckets - 1):
            raise ConfigError(f"buckets: must be a power of two, got {self.buckets}")
        if self.buckets > 2**16:
            raise ConfigError(f"buckets: at most 65536, got {self.buckets}")
        _check_range("virtual_nodes", self.virtual_nodes, 1, 65535)
        _check_range("max_connections", self.max_connections, 1, 1_000_000)
        _check_range("cache_size", self.cache_size, 0, 1 << 40)
        _check_range("max_item_size", self.max_item_size, 1024, 1024 * 1024 * 1024)
        _check_range("request_timeout", self.request_timeout, 1, 3_600_000)
        _check_range("membership_interval", self.membership_interval, 10, 3_600_000)
        _check_range("sync_interval", self.sync_interval, 10, 3_600_000)
        _check_range("handoff_interval", self.handoff_interval, 10, 3_600_000)
        _check_range("transfer_limit", self.transfer_limit, 1, 64)
        _check_range("transfer_rate", self.transfer_rate, 0, 1 << 40)
        _check_range("tombstone_grace", self.tombstone_grace, 1000, 365 * 86_400_000)
        _check_range("clock_max_entries", self.clock_max_entries, 1, 1000)
        _check_range("siblings_maximum", self.siblings_maximum, 1, 10_000)
        _check_range(
            "siblings_warning_threshold", self.siblings_warning_threshold, 1, self.siblings_maximum
        )

    @property
    def secret_path(self) -> Path:
        """Where the cluster secret lives (default: inside the data directory)."""
        return (
            self.secret_file if self.secret_file is not None else self.data_dir / "cluster.secret"
        )

    def warnings(self) -> list[str]:
        """Legal but risky settings, to be logged at start."""
        found = []
        if not self.quorum.overlapping:
            found.append(f"quorum {self.quorum}: R + W <= N, so a read may miss the latest write")
        return found

    def to_dict(self) -> dict[str, object]:
        """The settings as plain values (for ``stats settings`` and ``kai-admin``)."""
        return {
            "data_dir": str(self.data_dir),
            "listen": str(self.listen),
            "rpc": str(self.rpc),
            "seeds": [str(seed) for seed in self.seeds],
            "quorum": str(self.quorum),
            "secret_file": str(self.secret_path),
            "log_level": self.log_level,
            "log_format": self.log_format,
            "buckets": self.buckets,
            "virtual_nodes": self.virtual_nodes,
            "store": self.store,
            "sync_writes": self.sync_writes,
            "cache_size": self.cache_size,
            "max_connections": self.max_connections,
            "max_item_size": self.max_item_size,
            "request_timeout": self.request_timeout,
            "membership_interval": self.membership_interval,
            "sync_interval": self.sync_interval,
            "anti_entropy": self.anti_entropy,
            "sloppy_quorum": self.sloppy_quorum,
            "handoff_interval": self.handoff_interval,
            "transfer_limit": self.transfer_limit,
            "transfer_rate": self.transfer_rate,
            "tombstone_grace": self.tombstone_grace,
            "siblings": self.siblings,
            "clock_max_entries": self.clock_max_entries,
            "siblings_warning_threshold": self.siblings_warning_threshold,
            "siblings_maximum": self.siblings_maximum,
            "metrics": str(self.metrics) if self.metrics is not None else "off",
        }


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name}: must be between {low} and {high}, got {value}")


def _check_rpc_host(host: str, name: str) -> None:
    """Refuse an RPC host that cannot be the node's identity: not IPv4, or unspecified.

    The RPC address is what other nodes store, gossip and call, so it must never be one that
    only makes sense to a listener (``0.0.0.0`` binds every interface but names none).
    """
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(
            f"{name}: the host must be an IPv4 address (it places the node on the ring), "
            f"got {host!r}"
        ) from None
    if address.is_unspecified:
        raise ConfigError(
            f"{name}: {host} cannot be the node's address: the RPC address is its identity"
            f' and other nodes cannot reach "{host}"; give the address peers should use to'
            " reach this node (its address on their network, or 127.0.0.1 for a node on its"
            " own); listen and metrics may be 0.0.0.0"
        )


# --- reading settings ------------------------------------------------------------------------


def _want(kind: type | tuple[type, ...], name: str, value: object) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{name}: expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{name}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        {int: "an integer", str: "a string", bool: "true or false"}.get(k, k.__name__)
        for k in kinds
    )


def _address(name: str, value: object) -> Address:
    return Address.parse(_want(str, name, value), name=name)


def _metrics(name: str, value: object) -> Address:
    # A bare port listens on loopback: metrics are not for the world unless asked (DESIGN §11).
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text: str = _want(str, name, value)
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    return Address.parse(text, name=name)


def _quorum(name: str, value: object) -> Quorum:
    if isinstance(value, list):
        if len(value) != 3:
            raise ConfigError(f"{name}: expected [N, R, W], got {value!r}")
        n, r, w = (_want(int, name, item) for item in value)
        return Quorum(n, r, w)
    return Quorum.parse(_want(str, name, value), name=name)


def _choice(*choices: str) -> Callable[[str, object], str]:
    def parse(name: str, value: object) -> str:
        text: str = _want(str, name, value)
        if text not in choices:
            raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def _integer(name: str, value: object) -> int:
    result: int = _want(int, name, value)
    return result


def _boolean(name: str, value: object) -> bool:
    result: bool = _want(bool, name, value)
    return result


def _path(name: str, value: object) -> Path:
    return Path(_want(str, name, value))


def _seeds(name: str, value: object) -> tuple[Address, ...]:
    items = value if isinstance(value, list) else [value]
    return tuple(_address(name, item) for item in items)


def _buckets(name: str, value: object) -> int:
    # Kai rounds the bucket count to a power of two; round up (Kai's rounding could go down).
    count = _integer(name, value)
    if count < 1:
        raise ConfigError(f"{name}: must be at least 1, got {count}")
    return 1 << (count - 1).bit_length()


# Setting name -> (Config field, parser). Kai's names are aliases of the new ones.
_SETTINGS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "data_dir": ("data_dir", _path),
    "listen": ("listen", _address),
    "rpc": ("rpc", _address),
    "seeds": ("seeds", _seeds),
    "quorum": ("quorum", _quorum),
    "secret_file": ("secret_file", _path),
    "log_level": ("log_level", _choice(*LOG_LEVELS)),
    "log_format": ("log_format", _choice(*LOG_FORMATS)),
    "buckets": ("buckets", _buckets),
    "number_of_buckets": ("buckets", _buckets),
    "virtual_nodes": ("virtual_nodes", _integer),
    "number_of_virtual_nodes": ("virtual_nodes", _integer),
    "store": ("store", _choice("leveldb", "memory")),
    "sync_writes": ("sync_writes", _boolean),
    "cache_size": ("cache_size", _integer),
    "max_connections": ("max_connections", _integer),
    "max_item_size": ("max_item_size", _integer),
    "request_timeout": ("request_timeout", _integer),
    "membership_interval": ("membership_interval", _integer),
    "sync_interval": ("sync_interval", _integer),
    "anti_entropy": ("anti_entropy", _boolean),
    "sloppy_quorum": ("sloppy_quorum", _boolean),
    "handoff_interval": ("handoff_interval", _integer),
    "transfer_limit": ("transfer_limit", _integer),
    "transfer_rate": ("transfer_rate", _integer),
    "tombstone_grace": ("tombstone_grace", _integer),
    "siblings": ("siblings", _choice("newest", "all")),
    "clock_max_entries": ("clock_max_entries", _integer),
    "siblings_warning_threshold": ("siblings_warning_threshold", _integer),
    "siblings_maximum": ("siblings_maximum", _integer),
    "metrics": ("metrics", _metrics),
}
# Kai's names that set one part of a compound setting.
_PARTS = ("memcache_port", "rpc_port", "hostname", "n", "r", "w")


def config_from_mapping(settings: Mapping[str, object], *, base: Config | None = None) -> Config:
    """Build a Config from parsed settings (TOML tables flattened by the caller).

    Raises:
        ConfigError: an unknown key, or a value of the wrong type or out of range.
    """
    config = base if base is not None else Config()
    changes: dict[str, Any] = {}
    for name, value in settings.items():
        if name in _SETTINGS:
            field, parse = _SETTINGS[name]
            changes[field] = parse(name, value)
        elif name not in _PARTS:
            raise ConfigError(f"unknown configuration key {name!r}")
    listen: Address = changes.get("listen", config.listen)
    rpc: Address = changes.get("rpc", config.rpc)
    if "memcache_port" in settings:
        changes["listen"] = attrs.evolve(
            listen, port=_integer("memcache_port", settings["memcache_port"])
        )
    if "rpc_port" in settings or "hostname" in settings:
        port = _integer("rpc_port", settings["rpc_port"]) if "rpc_port" in settings else rpc.port
        host = _want(str, "hostname", settings["hostname"]) if "hostname" in settings else rpc.host
        if "hostname" in settings:
            _check_rpc_host(host, "hostname")  # named as the operator wrote it
        changes["rpc"] = Address(host, port)
    if any(part in settings for part in ("n", "r", "w")):
        quorum: Quorum = changes.get("quorum", config.quorum)
        changes["quorum"] = Quorum(
            _integer("n", settings.get("n", quorum.n)),
            _integer("r", settings.get("r", quorum.r)),
            _integer("w", settings.get("w", quorum.w)),
        )
    try:
        return attrs.evolve(config, **changes)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error


def load_config_file(path: Path, *, base: Config | None = None) -> Config:
    """Read a TOML configuration file.

    Raises:
        ConfigError: the file is missing, not valid TOML, or has a bad key or value.
    """
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"config file {path}: {error.strerror}") from error
    try:
        settings = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path}: {error}") from error
    try:
        return config_from_mapping(settings, base=base)
    except ConfigError as error:
        raise ConfigError(f"config file {path}: {error}") from error

"""Configuration: TOML + flags, Kai's names, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kai.__main__ import build_parser, config_from_args
from kai.core.config import Address, Config, Quorum, config_from_mapping, load_config_file
from kai.core.errors import ConfigError


def test_defaults_match_the_design() -> None:
    config = Config()
    assert str(config.listen) == "127.0.0.1:11211"
    assert str(config.rpc) == "127.0.0.1:11011"
    assert config.data_dir == Path("kai-data")
    assert config.secret_path == Path("kai-data/cluster.secret")
    assert str(config.quorum) == "3,2,2"
    assert (config.buckets, config.virtual_nodes) == (1024, 128)
    assert config.max_connections == 1024
    assert config.max_item_size == 1024 * 1024


def test_toml_file_and_kai_names(tmp_path: Path) -> None:
    path = tmp_path / "kai.toml"
    path.write_text(
        'hostname = "127.0.0.2"\nrpc_port = 12011\nmemcache_port = 12211\n'
        "n = 5\nr = 3\nw = 3\nnumber_of_buckets = 1000\nnumber_of_virtual_nodes = 64\n"
        'store = "memory"\nseeds = ["127.0.0.1:11011"]\n'
    )
    config = load_config_file(path)
    assert config.rpc == Address("127.0.0.2", 12011)
    assert config.listen == Address("127.0.0.1", 12211)
    assert config.quorum == Quorum(5, 3, 3)
    assert config.buckets == 1024  # rounded up to a power of two, as Kai does
    assert config.virtual_nodes == 64
    assert config.store == "memory"
    assert config.seeds == (Address("127.0.0.1", 11011),)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "kai.toml"
    path.write_text('listen = "127.0.0.1:1"\nquorum = [3, 1, 1]\n')
    args = build_parser().parse_args(
        [
            "--config",
            str(path),
            "--listen",
            "127.0.0.1:2",
            "--seed",
            "127.0.0.3:3",
            "--seed",
            "127.0.0.4:4",
        ]
    )
    config = config_from_args(args)
    assert config.listen.port == 2
    assert config.quorum == Quorum(3, 1, 1)
    assert [str(seed) for seed in config.seeds] == ["127.0.0.3:3", "127.0.0.4:4"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"colour": "blue"}, "unknown configuration key 'colour'"),
        ({"listen": "nowhere"}, "listen: expected HOST:PORT"),
        ({"listen": "127.0.0.1:70000"}, "listen: port 70000 is out of range"),
        ({"rpc": "example.org:11011"}, "rpc: the host must be an IPv4 address"),
        ({"quorum": "3,4,2"}, "quorum: R must be between 1 and N=3"),
        ({"quorum": "3,2"}, "quorum: expected N,R,W"),
        ({"n": 0}, "quorum: N must be at least 1"),
        ({"max_connections": "many"}, "max_connections: expected an integer"),
        ({"max_connections": True}, "max_connections: expected an integer"),
        ({"max_item_size": 10}, "max_item_size: must be between"),
        ({"store": "ets"}, "store: must be one of leveldb, memory"),
        ({"sync_writes": "yes"}, "sync_writes: expected true or false"),
        ({"siblings": "some"}, "siblings: must be one of newest, all"),
        ({"log_format": "xml"}, "log_format: must be one of text, json"),
        ({"metrics": "9150:x"}, "metrics: expected HOST:PORT"),
        ({"metrics": 70000}, "metrics: port 70000 is out of range"),
        ({"metrics": True}, "metrics: expected a string"),
    ],
)
def test_bad_settings_name_the_key(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_mapping(settings)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("listen = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config_file(path)
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config_file(tmp_path / "missing.toml")


def test_quorum_warning_and_capping() -> None:
    assert Config(quorum=Quorum(3, 1, 1)).warnings() != []
    assert Config().warnings() == []
    assert Quorum(3, 2, 2).capped(1) == Quorum(1, 1, 1)
    assert Quorum(3, 2, 2).capped(5) == Quorum(3, 2, 2)


def test_log_format_from_the_file_and_the_flag(tmp_path: Path) -> None:
    assert Config().log_format == "text"
    path = tmp_path / "kai.toml"
    path.write_text('log_format = "json"\n')
    assert load_config_file(path).log_format == "json"
    args = build_parser().parse_args(["--config", str(path), "--log-format", "text"])
    config = config_from_args(args)
    assert config.log_format == "text"
    assert config.to_dict()["log_format"] == "text"


def test_metrics_are_off_unless_asked_and_a_bare_port_is_loopback(tmp_path: Path) -> None:
    assert Config().metrics is None
    assert Config().to_dict()["metrics"] == "off"
    path = tmp_path / "kai.toml"
    path.write_text("metrics = 9150\n")
    assert load_config_file(path).metrics == Address("127.0.0.1", 9150)
    assert config_from_mapping({"metrics": "9151"}).metrics == Address("127.0.0.1", 9151)
    args = build_parser().parse_args(["--config", str(path), "--metrics", "0.0.0.0:9152"])
    config = config_from_args(args)
    assert config.metrics == Address("0.0.0.0", 9152)
    assert config.to_dict()["metrics"] == "0.0.0.0:9152"
    assert config_from_mapping({"metrics": "[::1]:9153"}).metrics == Address("::1", 9153)


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    from kai.core.config import _SETTINGS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = {row.split("`")[1] for row in rows}
    fields = {field for field, _parse in _SETTINGS.values()}
    assert fields <= documented

"""The production examples parse, and the command lines in them are ones kai accepts.

examples/systemd/kai.service is read as systemd's INI dialect (and verified by
``systemd-analyze verify`` where it exists), examples/container/Containerfile instruction by
instruction, and examples/container/compose.yaml with PyYAML if it happens to be installed,
else with the small YAML subset the file is written in (no dependency is added for it).
Every ``kai`` command line found in them goes through kai's own argument parser and config
validation, so a renamed flag or a bad address fails here rather than on a server.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kai.__main__ import build_parser, config_from_args
from kai.core.config import Config, config_from_mapping, load_config_file

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "examples" / "systemd"
CONTAINER = ROOT / "examples" / "container"
DATA_DIR = Path("/var/lib/kai")


def kai_config(argv: list[str], *, config_file: Path | None = None) -> Config:
    """The Config that ``kai argv...`` would run with; ``config_file`` stands in for --config."""
    args = build_parser().parse_args(argv)
    if config_file is not None:
        assert args.config is not None
        args.config = config_file
    return config_from_args(args)


# --- systemd ---------------------------------------------------------------------------------


def read_unit(path: Path) -> configparser.RawConfigParser:
    unit = configparser.RawConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(path.read_text(), source=str(path))
    return unit


def test_the_unit_file_is_hardened() -> None:
    unit = read_unit(SYSTEMD / "kai.service")
    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root", "0")
    expected = {
        "StateDirectory": "kai",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",  # kai's status for a configuration error
    }
    assert {key: service.get(key) for key in expected} == expected
    assert service["CapabilityBoundingSet"] == ""
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_unit_runs_kai_from_a_venv_on_its_state_directory() -> None:
    service = read_unit(SYSTEMD / "kai.service")["Service"]
    program, *argv = shlex.split(service["ExecStart"])
    assert Path(program).is_absolute()
    assert Path(program).parts[-3:-1] == ("venv", "bin")
    assert Path(program).name == "kai"
    args = build_parser().parse_args(argv)
    assert Path(args.data_dir) == DATA_DIR == Path("/var/lib") / service["StateDirectory"]
    assert Path(args.config) == Path("/etc/kai/kai.toml")
    config = kai_config(argv, config_file=SYSTEMD / "kai.toml")
    assert config.data_dir == DATA_DIR


def test_the_systemd_config_is_valid_with_its_commented_settings_too() -> None:
    path = SYSTEMD / "kai.toml"
    assert load_config_file(path).listen.host == "127.0.0.1"
    commented = [
        line.removeprefix("# ")
        for line in path.read_text().splitlines()
        if line.startswith("# ") and " = " in line.split("#")[1]
    ]
    assert len(commented) == 2, commented  # seeds and secret_file
    uncommented = path.read_text() + "\n" + "\n".join(commented) + "\n"
    config = config_from_mapping(tomllib.loads(uncommented))
    assert config.secret_path == Path("/run/credentials/kai.service/cluster.secret")
    assert [str(seed) for seed in config.seeds] == ["192.0.2.11:11011"]
    # The credential the config reads is the one the unit (once uncommented) loads.
    service = read_unit(SYSTEMD / "kai.service")["Service"]
    assert (
        "#LoadCredential=cluster.secret:/etc/kai/cluster.secret"
        in (SYSTEMD / "kai.service").read_text()
    )
    assert "LoadCredential" not in service  # off until the operator has a shared secret


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    kai = Path(sys.executable).with_name("kai")
    if not kai.exists():
        pytest.skip(f"no kai script next to {sys.executable}: install the project into its venv")
    # verify checks that ExecStart's program exists: point it at this venv's kai.
    text = (SYSTEMD / "kai.service").read_text()
    program = shlex.split(read_unit(SYSTEMD / "kai.service")["Service"]["ExecStart"])[0]
    unit = tmp_path / "kai.service"
    unit.write_text(text.replace(f"ExecStart={program} ", f"ExecStart={kai} "))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys and unparsable values are only warnings: none may name our unit.
    assert [line for line in output.splitlines() if "kai.service" in line] == []


# --- Containerfile ---------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, comments dropped and continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, arguments = (pending + line).strip().partition(" ")
        found.append((instruction.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, "the last instruction ends with a line continuation"
    return found


def container_entrypoint() -> tuple[list[str], list[str]]:
    """The Containerfile's ENTRYPOINT and CMD, both in exec (JSON) form."""
    found = dict(instructions(CONTAINER / "Containerfile"))
    entrypoint, command = json.loads(found["ENTRYPOINT"]), json.loads(found["CMD"])
    assert isinstance(entrypoint, list)
    assert isinstance(command, list)
    return entrypoint, command


def test_the_containerfile_runs_an_unprivileged_node_on_a_volume() -> None:
    steps = instructions(CONTAINER / "Containerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")
    by_name: dict[str, list[str]] = {}
    for instruction, argument in steps:
        by_name.setdefault(instruction, []).append(argument)
    user = by_name["USER"][-1].split(":")[0]
    assert user not in ("root", "0"), user
    order = [instruction for instruction, _ in steps]
    assert order.index("USER") < order.index("ENTRYPOINT")  # the node never runs as root
    assert set(" ".join(by_name["EXPOSE"]).split()) >= {"11211", "11011"}
    assert by_name["VOLUME"] == [str(DATA_DIR)]
    assert any(step.startswith("pip install") for step in by_name["RUN"]), by_name["RUN"]
    # What it copies in is in the repository, so a build from the root works.
    for copy in by_name["COPY"]:
        *sources, _destination = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), source


def test_the_container_command_line_is_one_kai_accepts() -> None:
    entrypoint, command = container_entrypoint()
    assert entrypoint[0] == "kai"
    config = kai_config([*entrypoint[1:], *command])
    assert config.data_dir == DATA_DIR
    assert config.listen.host == "0.0.0.0"  # reachable through a published port
    found = dict(instructions(CONTAINER / "Containerfile"))
    assert found["WORKDIR"] == str(DATA_DIR)


# --- compose.yaml ----------------------------------------------------------------------------


def parse_yaml_subset(text: str) -> dict[str, Any]:
    """Parse the YAML subset compose.yaml keeps to: block mappings indented with spaces,
    plain scalars (digits read as integers) and JSON flow collections; no inline comments."""
    root: dict[str, Any] = {}
    stack: list[tuple[int, dict[str, Any]]] = [(-1, root)]
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert "\t" not in line, f"line {number}: a tab"
        assert " #" not in line, f"line {number}: an inline comment"
        indent = len(line) - len(line.lstrip(" "))
        key, colon, value = line.strip().partition(":")
        assert colon, f"line {number}: not 'key: value': {line!r}"
        assert value == "" or value.startswith(" "), f"line {number}: no space after ':'"
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        assert key not in parent, f"line {number}: {key} given twice"
        value = value.strip()
        if not value:
            child: dict[str, Any] = {}
            parent[key] = child
            stack.append((indent, child))
        elif value[0] in '[{"':
            parent[key] = json.loads(value)
        else:
            parent[key] = int(value) if value.isdecimal() else value
    return root


def read_compose() -> dict[str, Any]:
    text = (CONTAINER / "compose.yaml").read_text()
    parsed = parse_yaml_subset(text)
    if importlib.util.find_spec("yaml") is not None:
        import yaml  # type: ignore[import-untyped]

        assert yaml.safe_load(text) == parsed  # the subset reader read what YAML reads
    return parsed


def test_compose_starts_three_nodes_that_share_one_secret() -> None:
    compose = read_compose()
    services = compose["services"]
    assert sorted(services) == ["kai1", "kai2", "kai3"]
    (secret_name,) = compose["secrets"]
    assert compose["secrets"][secret_name]["file"] == "./cluster.secret"
    entrypoint, _command = container_entrypoint()
    subnet = compose["networks"]["kai"]["ipam"]["config"][0]["subnet"]
    rpc: dict[str, str] = {}
    volumes: set[str] = set()
    host_ports: set[str] = set()
    configs: dict[str, Config] = {}
    for name, service in services.items():
        build = service["build"]
        assert (CONTAINER / build["context"] / build["dockerfile"]).resolve() == (
            CONTAINER / "Containerfile"
        ).resolve()
        config = kai_config([*entrypoint[1:], *service["command"]])
        configs[name] = config
        rpc[name] = str(config.rpc)
        (network,) = service["networks"].values()
        assert config.rpc.host == network["ipv4_address"]
        assert config.rpc.host.rsplit(".", 1)[0] == subnet.rsplit(".", 1)[0]
        assert service["secrets"] == [secret_name]
        assert config.secret_path == Path("/run/secrets") / secret_name
        assert service["environment"]["KAI_SECRET_FILE"] == str(config.secret_path)
        assert service["healthcheck"]["test"][-3:] == ["--node", rpc[name], "status"]
        (volume,) = service["volumes"]
        volume_name, mount = volume.split(":")
        assert mount == str(config.data_dir) == str(DATA_DIR)
        assert volume_name in compose["volumes"]
        volumes.add(volume_name)
        (port,) = service["ports"]
        host_ports.add(port.rsplit(":", 1)[0])
        assert port.endswith(f":{config.listen.port}")
    assert len(set(rpc.values())) == len(volumes) == len(host_ports) == 3
    assert configs["kai1"].seeds == ()
    for joiner in ("kai2", "kai3"):
        assert [str(seed) for seed in configs[joiner].seeds] == [rpc["kai1"]]
        assert services[joiner]["depends_on"] == {"kai1": {"condition": "service_healthy"}}


def test_the_subset_reader_refuses_what_it_does_not_understand() -> None:
    assert parse_yaml_subset('a:\n  b: 1\n  c: ["x"]\nd: e\n') == {
        "a": {"b": 1, "c": ["x"]},
        "d": "e",
    }
    for bad in ("- item\n", "a: 1 # note\n", "a:b\n", "a: 1\na: 2\n"):
        with pytest.raises(AssertionError):
            parse_yaml_subset(bad)


# --- documentation ---------------------------------------------------------------------------


def test_the_readme_documents_each_production_example() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running in production", 1)[1].split("\n## ", 1)[0]
    for example in ("examples/systemd/kai.service", "examples/container/Containerfile"):
        assert example in section
    assert "examples/container/compose.yaml" in section

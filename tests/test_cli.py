"""The command lines are documented: every flag and subcommand has help and an example."""

from __future__ import annotations

import argparse

import pytest

from kai.__main__ import build_parser as build_kai_parser
from kai.admin.__main__ import COMMANDS, build_parser as build_admin_parser, main as admin_main


def _help_text(parser: argparse.ArgumentParser) -> str:
    return parser.format_help()


def test_every_kai_flag_has_help() -> None:
    parser = build_kai_parser()
    for action in parser._actions:
        if action.option_strings:
            assert action.help, f"{action.option_strings} has no help"
    text = _help_text(parser)
    for flag in (
        "--config",
        "--data-dir",
        "--listen",
        "--rpc",
        "--seed",
        "--quorum",
        "--secret-file",
        "--log-level",
        "--log-format",
        "--metrics",
    ):
        assert flag in text
    assert "examples:" in text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_admin_subcommand_has_help_and_an_example(command: str) -> None:
    parser = build_admin_parser()
    subparsers = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    sub = subparsers.choices[command]
    text = sub.format_help()
    assert "example:" in text
    assert "kai-admin" in text.split("example:")[1]
    help_text, example, _method = COMMANDS[command]
    assert help_text
    assert command in example


def test_admin_flags_have_help() -> None:
    parser = build_admin_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"


def test_a_command_not_available_in_this_version_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    help_text, example, _method = COMMANDS["leave"]
    monkeypatch.setitem(COMMANDS, "leave", (help_text, example, None))
    assert admin_main(["leave"]) == 4  # not available in this version
    assert capsys.readouterr().err == "kai-admin: leave: not available in this version\n"


def test_every_membership_command_of_the_design_is_available() -> None:
    for name in ("join", "leave", "remove", "replace", "plan", "commit"):
        assert COMMANDS[name][2] is not None, name


def test_help_marks_the_commands_that_are_not_available_yet() -> None:
    for name, (help_text, _example, method) in COMMANDS.items():
        assert ("not available yet" in help_text) == (method is None), name


def test_admin_reports_a_missing_secret(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.secret"
    assert admin_main(["--secret-file", str(missing), "status"]) == 3  # cannot authenticate
    assert str(missing) in capsys.readouterr().err


def test_kai_rejects_a_bad_config_naming_the_key(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kai.__main__ import main as kai_main

    config = tmp_path / "kai.toml"
    config.write_text("colour = 'blue'\n")
    assert kai_main(["--config", str(config)]) == 2
    assert "colour" in capsys.readouterr().err


def test_kai_freezes_its_start_up_objects_and_tunes_collection_before_serving(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import logging

    import trio

    import kai.__main__ as kai_cli

    when_run: list[tuple[int, tuple[int, ...]]] = []

    def fake_run(*args: object) -> None:
        when_run.append((gc.get_freeze_count(), gc.get_threshold()))

    monkeypatch.setattr(trio, "run", fake_run)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    thresholds = gc.get_threshold()
    gc.unfreeze()
    try:
        assert kai_cli.main(["--data-dir", str(tmp_path / "data")]) == 0
    finally:
        gc.unfreeze()  # give the test process its objects back
        gc.set_threshold(*thresholds)
    assert when_run
    frozen, serving_thresholds = when_run[0]
    assert frozen > 1000  # imported modules, classes and functions
    assert serving_thresholds == kai_cli.GC_THRESHOLDS
    assert kai_cli.GC_THRESHOLDS[2] > 10  # full collections rarer than CPython's default

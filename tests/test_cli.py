"""The `dpn` command line: every listed sub-command is there, and one whose module is missing is an error
(a broken install), never silently dropped from `dpn --help`."""

from __future__ import annotations

import pytest

from jobs import cli


def test_every_listed_subcommand_is_registered():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == [name.removeprefix("jobs.") for name in cli._COMMAND_MODULES]


def test_a_listed_subcommand_whose_module_is_missing_is_an_error(monkeypatch):
    monkeypatch.setattr(cli, "_COMMAND_MODULES", (*cli._COMMAND_MODULES, "jobs.no_such_command"))
    with pytest.raises(ModuleNotFoundError, match="jobs.no_such_command"):
        cli.build_parser()

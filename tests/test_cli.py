"""The `valuerank` dispatcher: every listed command resolves to a module with main(argv)."""

from __future__ import annotations

import importlib

import pytest

from loadtest import cli


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for words, _, _ in cli.COMMANDS:
        assert " ".join(words) in out


def test_no_or_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize(("words", "module"), [(w, m) for w, m, _ in cli.COMMANDS])
def test_each_command_module_has_main(words: tuple[str, ...], module: str) -> None:
    assert callable(importlib.import_module(module).main), words


def test_multi_word_commands_pass_only_their_own_flags(capsys: pytest.CaptureFixture[str]) -> None:
    # `bench precision --help` must reach the precision command's parser, not a bench parser.
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "precision", "--help"])
    assert info.value.code == 0
    assert "valuerank bench precision" in capsys.readouterr().out

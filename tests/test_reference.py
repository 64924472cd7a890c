"""docs/reference.md keeps every flag (issue #24): each option that ``adaptsoup ... --help`` names, for every
command and subcommand of the CLI, appears in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from adaptsoup_cli.main import app

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def walk(command, path: tuple[str, ...] = ("adaptsoup",)):
    """``(path, command)`` for ``command`` and every command below it (Typer groups have ``commands``)."""
    yield path, command
    for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
        yield from walk(sub, (*path, name))


def help_options(command) -> list[str]:
    """The option names ``--help`` shows for ``command``: every visible option's names and its ``--no-`` form,
    ``--help`` itself aside.  (Typer may vendor its own click, so options are told by ``param_type_name``.)"""
    names = []
    for param in command.params:
        if param.param_type_name != "option" or getattr(param, "hidden", False):
            continue
        names += [name for name in (*param.opts, *param.secondary_opts) if name != "--help"]
    return names


def mentioned(option: str, text: str) -> bool:
    """``option`` appears in ``text`` as a whole flag (``--no`` is not found inside ``--no-progress``)."""
    return re.search(r"(?<![\w-])" + re.escape(option) + r"(?![\w-])", text) is not None


COMMANDS = dict((" ".join(path), command) for path, command in walk(typer.main.get_command(app)))


def test_the_walk_reaches_every_command_and_its_options():
    assert {"adaptsoup adapt", "adaptsoup export", "adaptsoup predict", "adaptsoup mix", "adaptsoup interpolate", "adaptsoup tta",
            "adaptsoup estimate", "adaptsoup info", "adaptsoup bench c10c", "adaptsoup bench imagenet-c"} <= set(COMMANDS)
    adapt = help_options(COMMANDS["adaptsoup adapt"])
    assert {"--model", "-m", "--progress", "--no-progress", "--finetune", "--no-finetune"} <= set(adapt)
    assert "--bf16" not in adapt and "--help" not in adapt  # hidden, and help itself
    assert "--onnx" in help_options(COMMANDS["adaptsoup export"])


def test_mentioned_matches_whole_flags_only():
    assert mentioned("--no-progress", "pass `--no-progress` in CI")
    assert mentioned("-o", "(`-o`)") and not mentioned("-o", "--onnx")
    assert not mentioned("--no", "--no-progress") and not mentioned("--lr", "--ft-lrs") and not mentioned("--lr", "--lrs")


@pytest.mark.parametrize("name", sorted(name for name, command in COMMANDS.items() if help_options(command)))
def test_every_option_in_help_is_in_the_reference(name):
    text = REFERENCE.read_text(encoding="utf-8")
    missing = [option for option in help_options(COMMANDS[name]) if not mentioned(option, text)]
    assert missing == [], f"{name}: options of --help that docs/reference.md does not mention: {', '.join(missing)}"

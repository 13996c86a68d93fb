"""`--help` reads as prose at any terminal width: docstrings are re-wrapped (markdown mode),
and nothing a user must type is eaten by the markup."""

import typer
from typer.testing import CliRunner

from looptune.cli.app import app

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)


def _help(*args, width):
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_help_fits_a_narrow_terminal():
    for command in ["", *COMMANDS]:
        text = _help(*filter(None, [command]), width=80)
        too_long = [line for line in text.splitlines() if len(line) > 80]
        assert not too_long, (command, too_long)


def test_a_description_is_rewrapped_not_broken_where_the_source_line_ends():
    # the docstring breaks after "decode latency"; on a wide terminal the paragraph is one line
    lines = _help("profile", width=200).splitlines()
    line = next(line for line in lines if "For every combination" in line)
    assert "(p50/p90/p99)" in line and "peak memory." in line


def test_the_markup_keeps_the_gate_names_a_user_copies():
    text = "".join(_help("init", width=200).split())
    assert "self_attn.plt_gate.*" in text
    assert "model.gate_projections.{i}.*" in text

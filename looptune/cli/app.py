"""The typer app and the one place where expected failures become a message and an exit code."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from typer.core import TyperGroup

from looptune.errors import LooptuneError

# Human output goes to stderr; stdout is kept for `--json` documents.
console = Console(stderr=True)


class _Group(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LooptuneError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Choose the loop count and inference knobs of a Parallel Loop Transformer for a model "
         "and a device: profile latency and memory, score quality, search the Pareto front, "
         "and write a deployable profile.",
)


def emit_json(document) -> None:
    """Exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def parse_int_list(text: str, name: str, minimum: int = 1) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; a clear error for anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LooptuneError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise LooptuneError(f"{name} values must be integers >= {minimum}, got {text!r}")
    return values


def parse_choice_list(text: str, name: str, choices) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in choices]
    if not values or bad:
        raise LooptuneError(f"{name} must be from {', '.join(choices)}; got {text!r}")
    return values

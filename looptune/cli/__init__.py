"""The `looptune` command line: thin typer commands over the Python API."""

from looptune.cli import checkpoint  # noqa: F401  (registers init, info)
from looptune.cli import diagnose  # noqa: F401  (registers diagnose)
from looptune.cli import profile  # noqa: F401  (registers profile)
from looptune.cli import score  # noqa: F401  (registers score)
from looptune.cli import train  # noqa: F401  (registers train)
from looptune.cli.app import app


def main():
    app()


__all__ = ["app", "main"]

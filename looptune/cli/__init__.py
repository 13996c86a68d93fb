"""The `looptune` command line: thin typer commands over the Python API.

Each module registers its commands on `app`; they are imported in the order `--help` lists them,
which follows the workflow: make or train a model, measure it, search, explain, deploy.
"""

# isort: off
from looptune.cli import checkpoint  # noqa: F401  (init, info)
from looptune.cli import train  # noqa: F401  (train)
from looptune.cli import profile  # noqa: F401  (profile)
from looptune.cli import score  # noqa: F401  (score)
from looptune.cli import pareto  # noqa: F401  (pareto)
from looptune.cli import diagnose  # noqa: F401  (diagnose)
from looptune.cli import deploy  # noqa: F401  (show, export, generate)
from looptune.cli.app import app

# isort: on


def main():
    import signal

    from looptune.cli.app import raise_interrupt

    signal.signal(signal.SIGTERM, raise_interrupt)  # from the start, as Ctrl-C is
    app()


__all__ = ["app", "main"]

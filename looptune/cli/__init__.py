"""The `looptune` command line: thin typer commands over the Python API.

Each module registers its commands on `app`; they are imported in the order `--help` lists them,
which follows the workflow: make or train a model, measure it, search, explain, deploy.
"""

import signal
import sys
import threading


def _interrupted_while_loading(signum, frame):  # nothing has run yet: one line, no traceback
    print("interrupted", file=sys.stderr)
    raise SystemExit(130)


_loading = threading.current_thread() is threading.main_thread()
if _loading:
    _handlers = [
        signal.signal(s, _interrupted_while_loading) for s in (signal.SIGINT, signal.SIGTERM)
    ]

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
if _loading:
    signal.signal(signal.SIGINT, _handlers[0])
    signal.signal(signal.SIGTERM, _handlers[1])


def main():
    from looptune.cli.app import raise_interrupt

    signal.signal(signal.SIGTERM, raise_interrupt)  # from the start, as Ctrl-C is
    try:
        app()
    except KeyboardInterrupt:  # outside a command (typer building it): as inside one
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


__all__ = ["app", "main"]

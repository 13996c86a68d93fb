"""The `looptune` command line: thin typer commands over the Python API.

Each module registers its commands on `app`; they are imported in the order `--help` lists them,
which follows the workflow: make or train a model, measure it, search, explain, deploy.
"""

import atexit
import os
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
from looptune.cli.app import OutputLost, app, output_lost

# isort: on
if _loading:
    signal.signal(signal.SIGINT, _handlers[0])
    signal.signal(signal.SIGTERM, _handlers[1])


def main():
    from looptune.cli.app import INTERRUPT_SAID, raise_interrupt, say_interrupted

    INTERRUPT_SAID.clear()
    ending = {}
    atexit.register(_end, ending)  # the first exit function, so the last to run
    signal.signal(signal.SIGTERM, raise_interrupt)  # from the start, as Ctrl-C is
    try:
        try:
            app()
        finally:  # the command is over: from here a Ctrl-C ends the process at once
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, _interrupted_at_the_end)
    except KeyboardInterrupt:  # outside a command (typer building it): as inside one
        say_interrupted()
        ending["code"] = 130
    except SystemExit as e:
        if e.code == 130 and not INTERRUPT_SAID.is_set():  # typer's, after the command
            say_interrupted()
        ending["code"] = e.code if isinstance(e.code, int) else int(e.code is not None)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except OSError as e:  # typer writing --help, or a command writing past `write_out`
        if _stdout_refusal() is None:  # not stdout's: a bug, with its traceback
            raise
        ending["code"] = output_lost(OutputLost(e))
    ending["code"] = _written_out(ending["code"])
    raise SystemExit(ending["code"])


def _interrupted_at_the_end(signum, frame):
    """A Ctrl-C or SIGTERM once the command is over (writing its output, or the exit functions
    of the libraries it used): nothing of the command is left to stop, so one line, and 130."""
    from looptune.cli.app import INTERRUPT_SAID

    if not INTERRUPT_SAID.is_set():
        os.write(2, b"interrupted\n")  # not print: the signal may come in the middle of one
    os._exit(130)


def _end(ending: dict) -> None:
    """Exit once the other exit functions ran, skipping the interpreter's own teardown: in it
    Python gives SIGINT back to the kernel's default, so a Ctrl-C there killed the process
    (status -2) with no word, and torch's teardown takes a while."""
    if "code" in ending:
        _flush()
        os._exit(ending["code"])


def _written_out(code: int) -> int:
    """The exit code once the command's output went out whole, before the teardown (which a
    Ctrl-C ends at once): a stdout that took no more makes it a failure, not a silent 0."""
    refusal = _stdout_refusal()
    if refusal is not None and code != 130:
        code = output_lost(OutputLost(refusal))
    _flush()
    return code


def _stdout_refusal() -> OSError | None:
    """The error with which stdout refuses what it holds (a failed write stays buffered)."""
    try:
        sys.stdout.flush()
    except OSError as e:
        return e
    except ValueError:  # closed
        pass
    return None


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can go out
            pass


__all__ = ["app", "main"]

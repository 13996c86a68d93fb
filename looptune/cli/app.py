"""The typer app and the one place where expected failures become a message and an exit code."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading

import typer
from rich.console import Console
from typer.core import TyperGroup

from looptune.errors import LooptuneError

try:  # typer 0.2x vendors its own click; older typer uses click itself
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:
    from click.exceptions import NoArgsIsHelpError, UsageError

# Human output goes to stderr; stdout is kept for `--json` documents.
console = Console(stderr=True)
if not console.is_terminal:  # a log file or a pipe: rich's 80 columns would cut the tables
    console.width = 120


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends a command exactly as Ctrl-C does


INTERRUPT_SAID = threading.Event()  # `main` says it where typer ended with 130 alone


def say_interrupted(detail: str = "") -> None:
    """The one line an interrupt ends with."""
    print(f"interrupted: {detail}" if detail else "interrupted", file=sys.stderr)
    INTERRUPT_SAID.set()


def _usage_error(e: UsageError):
    """A bad option or argument: one line and exit 2, not typer's boxed message."""
    where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
    print(f"error: {e.format_message()}{where}", file=sys.stderr)
    raise typer.Exit(2) from None


class _Group(TyperGroup):
    """Every expected way a command ends, in one place: a LooptuneError or a bad parameter is
    `error: ...` and its exit code (2), Ctrl-C or SIGTERM is `interrupted...` and 130."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except NoArgsIsHelpError:
            raise
        except UsageError as e:
            _usage_error(e)
        except KeyboardInterrupt:  # typer would end with 130 and not a word
            say_interrupted()
            raise typer.Exit(130) from None

    def invoke(self, ctx):
        main_thread = threading.current_thread() is threading.main_thread()
        signals = []  # the Ctrl-Cs and SIGTERMs that came while the command ran

        def interrupt(signum, frame):
            signals.append(signum)
            raise KeyboardInterrupt

        if main_thread:
            previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGINT, interrupt)
            signal.signal(signal.SIGTERM, interrupt)
        try:
            return super().invoke(ctx)
        except (NoArgsIsHelpError, typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if signals:  # a library made the interrupt an error of its own (safetensors'
                self._interrupted(main_thread, "")  # get_tensor a ValueError): still one
            if isinstance(e, UsageError):
                _usage_error(e)
            if isinstance(e, OutputLost):
                raise typer.Exit(output_lost(e)) from None
            if isinstance(e, LooptuneError):
                print(f"error: {e}", file=sys.stderr)
                raise typer.Exit(e.exit_code) from None
            raise
        except KeyboardInterrupt as e:
            self._interrupted(main_thread, str(e))
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous[0])
                signal.signal(signal.SIGTERM, previous[1])

    @staticmethod
    def _interrupted(main_thread: bool, detail: str):
        if main_thread:  # a second Ctrl-C must not turn the last line into a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say_interrupted(detail)
        raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
    help="Choose the loop count and inference knobs of a Parallel Loop Transformer for a model "
    "and a device: profile latency and memory, score quality, search the Pareto front, "
    "and write a deployable profile.",
)


class OutputLost(LooptuneError):
    """stdout takes no more: a full disk or quota, or a pipe whose reader is gone."""

    def __init__(self, error: OSError):
        super().__init__(f"the output could not be written to stdout: {error.strerror or error}")
        self.reader_gone = error.errno == errno.EPIPE


def write_out(text: str) -> None:
    """Write `text` on stdout now, so that a stdout that takes no more is known while the
    command can still say so (at the exit it was silent: exit 0 with the document cut)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        raise OutputLost(e) from None


def output_lost(e: OutputLost) -> int:
    """One line and exit 2 for a full stdout; nothing and 141 (as a tool that SIGPIPE ends)
    for `| head`, whose reader has what it wanted. What stdout still holds is dropped, so
    the exit's flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's stream): nothing to drop
        pass
    if e.reader_gone:
        return 128 + signal.SIGPIPE
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code


def emit_json(document) -> None:
    """Exactly one JSON document on stdout."""
    write_out(json.dumps(document, indent=2, default=str) + "\n")


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

"""The one exception family for expected failures, and the interrupt that carries a message.

The CLI turns a `LooptuneError` into a one-line message and its `exit_code`; anything else is a
bug and keeps its traceback.
"""


class LooptuneError(Exception):
    """A user-facing failure: bad input, a bad checkpoint, an impossible request."""

    exit_code = 2


class CheckpointError(LooptuneError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


class NothingFitsError(LooptuneError):
    """No candidate meets every budget (pareto)."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with one line on what was kept (what finished before it, cached).

    A KeyboardInterrupt, so code that stops on Ctrl-C stops on it too; the CLI prints
    `interrupted: <message>` and exits 130."""

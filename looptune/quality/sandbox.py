"""Run a model's completion against a problem's tests, assuming the completion may be written
to fake a pass or to harm the machine.

A check is two processes:

- the candidate (`sandbox_candidate`), fresh for each check: the prompt and the completion,
  answering calls of the entry point over a pipe, each result encoded as plain data (None,
  bool, int, float, complex, str, bytes, and lists, tuples, sets and dicts of them, by exact
  type) or refused;
- the runner (`sandbox_runner`, trusted, kept warm across a `Sandbox`'s checks): the problem's
  own tests, calling a stand-in that forwards each call to the candidate and decodes the answer
  as plain data only.

A check passes only when the runner answers `<nonce> passed` after the tests returned, on a
socket the candidate never holds, with a nonce the candidate never sees. Exit statuses count
for nothing: `os._exit(0)` or `sys.exit(0)` in a completion is a failure, and so is an answer
the candidate forges, since all it can forge is a return value.

Where the candidate runs (`sandbox_kind`):

- "boundary": under bubblewrap (`bwrap`), in new user, PID, mount, network, IPC, UTS and
  cgroup namespaces, as an unprivileged user with no capabilities: it sees only its own
  processes, a read-only root holding the system's libraries and Python's standard library
  (not the environment, the home directory, the repository or anything else of the parent's),
  a private size-capped tmpfs as its only writable directory (`Limits.disk_bytes` in all), and
  no network; it may start no process and create no user namespace, and a seccomp filter
  refuses System V IPC objects, tracing, extended attributes and keyrings, which hold memory,
  outlive the check or reach the sandbox's unlimited pid 1 (`quality.boundary`; what a
  machine leaves open is named in each result's `sandbox`). /proc and /dev are read-only too
  (a fresh /proc would let a user that is root outside write the host's sysctls). The files
  and directories it makes are capped in number too (`Limits.files`, counted every 0.1 s:
  each holds about 1 KiB of kernel memory that the tmpfs's size does not count). A candidate
  the sandbox could not start is an error, not a failed check. The tripwire below runs
  inside it too, as a second layer.
- "tripwire": where bubblewrap is missing or cannot create namespaces, with a warning (once, on
  stderr): a scrubbed environment, an empty working directory, and an audit hook refusing
  writes outside it, reads outside it and the system's and Python's files, spawning processes
  or threads, signals, sockets, SQLite, ctypes and native code of its own. It stops
  accidents and the attacks tested in tests/test_sandbox.py, not every program written to
  escape it; the total written is not capped.

Both: `python -I -S`, rlimits on CPU, memory, file size, open files and processes (none),
and a wall-clock limit after which the candidate's process group, and the runner, are killed.
`LOOPTUNE_SANDBOX` (`auto`, `boundary`, `tripwire`) or the `sandbox` argument chooses;
`boundary` fails where the boundary is not available. The tripwire alone, run by root, does not
cap processes started by native code (the kernel exempts root from the limit).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from looptune.errors import LooptuneError
from looptune.quality.boundary import SCRUBBED_ENV, Boundary, base_python, probe
from looptune.quality.sandbox_watch import EVERY_S, Watch

KINDS = ("auto", "boundary", "tripwire")
ENV_VAR = "LOOPTUNE_SANDBOX"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock; the process group is killed after it
    cpu_s: int = 10  # RLIMIT_CPU of each process
    memory_bytes: int = 1 << 30  # RLIMIT_AS of each process
    file_bytes: int = 1 << 20  # RLIMIT_FSIZE: the largest file it may write, its output included
    open_files: int = 64  # RLIMIT_NOFILE
    disk_bytes: int = 16 << 20  # all it may write (the boundary's tmpfs)
    files: int = 10_000  # the files, directories and links it may make there (`sandbox_watch`)


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed", "failed" or "timeout"
    detail: str  # why it failed: the error, the failed assertion or the limit that stopped it
    seconds: float
    sandbox: str  # "tripwire", or "boundary" and what it leaves open here ("boundary (...)")
    output: str = ""  # the last 2,000 characters the candidate and the tests printed

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def sandbox_kind(requested: str | None = None) -> str:
    """ "boundary" or "tripwire": `requested`, else $LOOPTUNE_SANDBOX, else "auto" (the boundary
    where it works here, else the tripwire, with a warning once)."""
    name = "sandbox" if requested else ENV_VAR
    requested = requested or os.environ.get(ENV_VAR) or "auto"
    if requested not in KINDS:
        raise LooptuneError(f"{name} must be one of {', '.join(KINDS)}, got {requested!r}")
    if requested == "tripwire":
        return "tripwire"
    why = probe()
    if isinstance(why, Boundary):
        return "boundary"
    if requested == "boundary":
        raise LooptuneError(f"the sandbox's OS boundary is not available here: {why}")
    _warn_tripwire(why)
    return "tripwire"


def run_check(
    program: str,
    tests: str,
    entry_point: str,
    limits: Limits = Limits(),
    sandbox: str | None = None,
    call: str = "check",
    *,
    tripwire: bool = True,
) -> SandboxResult:
    """One check in a `Sandbox` of its own; see `Sandbox.check`."""
    with Sandbox(sandbox, tripwire=tripwire) as box:
        return box.check(program, tests, entry_point, limits, call)


class Sandbox:
    """Checks, from any number of threads, sharing warm test runners (one per check running at
    once; a runner that timed out or died is replaced). Use as a context manager.

    `sandbox`: see `sandbox_kind`. `tripwire=False` leaves the audit hook out of the boundary,
    to test the boundary alone."""

    def __init__(self, sandbox: str | None = None, *, tripwire: bool = True):
        self.kind = sandbox_kind(sandbox)
        self.tripwire = tripwire or self.kind == "tripwire"
        found = probe() if self.kind == "boundary" else None
        self.boundary = found if isinstance(found, Boundary) else None
        # each result's `sandbox`: the kind, and what the boundary leaves open here
        self.description = self.boundary.description if self.boundary else self.kind
        self._idle: list[_Runner] = []
        self._busy: set[_Runner] = set()
        self._aborted = False
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is not None:  # Ctrl-C: the checks other threads run end now too
            self.abort()
        with self._lock:
            idle, self._idle = self._idle, []
        for runner in idle:
            runner.close()

    def abort(self) -> None:
        """End the checks under way at once (each then ends with its candidate killed, and no
        verdict) and refuse new ones: for Ctrl-C, rather than wait for their time limits."""
        with self._lock:
            self._aborted, busy = True, list(self._busy)
        for runner in busy:
            runner.hang_up()

    def check(
        self,
        program: str,
        tests: str,
        entry_point: str,
        limits: Limits = Limits(),
        call: str = "check",
    ) -> SandboxResult:
        """Run untrusted `program` (which defines `entry_point`) against trusted `tests`
        (which define `call`, called with the entry point); see the module docstring. Never
        raises for anything the program does."""
        with self._lock:
            runner = self._idle.pop() if self._idle and not self._aborted else None
        runner = runner or _Runner(non_dumpable=self.kind == "tripwire")
        with self._lock:  # from here `abort` reaches it
            aborted = self._aborted
            if not aborted:
                self._busy.add(runner)
        if aborted:
            runner.close()
            raise LooptuneError("the sandbox was stopped (interrupted)")
        try:
            return self._check(runner, program, tests, entry_point, limits, call)
        finally:
            with self._lock:
                self._busy.discard(runner)
                if runner.alive and not self._aborted:
                    self._idle.append(runner)
            if runner.alive and self._aborted:
                runner.kill()

    def _check(self, runner, program, tests, entry_point, limits, call) -> SandboxResult:
        kind, nonce = self.description, secrets.token_hex(16)
        start = time.perf_counter()
        with ExitStack() as stack:
            out, log = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(2))
            work = (
                None
                if self.boundary
                else stack.enter_context(
                    tempfile.TemporaryDirectory(
                        prefix="looptune-sandbox-", ignore_cleanup_errors=True
                    )
                )
            )
            lim = {
                "cpu_s": limits.cpu_s,
                "memory_bytes": limits.memory_bytes,
                "file_bytes": limits.file_bytes,
                "open_files": limits.open_files,
            }
            argv = [
                base_python(),
                "-I",
                "-S",
                "-c",
                _source("candidate"),
                json.dumps({**lim, "tripwire": self.tripwire}),
            ]
            fds: tuple[int, ...] = ()
            if self.boundary:
                wrap, fds = stack.enter_context(self.boundary.command(limits.disk_bytes))
                argv = wrap + argv
            to_read, to_write = os.pipe()  # runner -> candidate
            from_read, from_write = os.pipe()  # candidate -> runner
            try:
                candidate = subprocess.Popen(
                    argv,
                    stdin=to_read,
                    stdout=from_write,
                    stderr=out,
                    cwd=work or "/",
                    env={**SCRUBBED_ENV, "HOME": work or "/sandbox", "TMPDIR": work or "/sandbox"},
                    start_new_session=True,  # no terminal to inject keystrokes into
                    pass_fds=fds,
                )
            except BaseException as e:
                os.close(to_write)
                os.close(from_read)
                if isinstance(e, OSError):  # no program ran: not a failed check
                    raise LooptuneError(
                        f"the sandbox could not start the candidate's process ({argv[0]}): {e}"
                    ) from e
                raise
            finally:
                os.close(to_read)
                os.close(from_write)
            job = {"program": program, "tests": tests, "entry_point": entry_point, "call": call}
            files = limits.files if self.boundary else None
            watch = Watch(candidate.pid, files, limits.disk_bytes)
            # its input is held open here too: having answered, it waits, its CPU time in /proc
            stack.callback(os.close, os.dup(to_write))
            try:
                said = runner.run(nonce, job, log, to_write, from_read, limits.timeout_s, watch)
                watch.check()  # what it used in all
            except BaseException:  # Ctrl-C: the runner is mid-check, waiting on the candidate
                runner.kill()
                raise
            finally:
                try:  # not reaped yet: its group id cannot have been reused
                    os.killpg(candidate.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                candidate_rc = candidate.wait()
            if runner.broken is not None:
                raise LooptuneError(
                    f"the sandbox's test runner exited at its start (status "
                    f"{runner.broken}); run it with python -I -S to see why"
                )
            seconds = time.perf_counter() - start
            out_bytes = out.seek(0, os.SEEK_END)
            output = _tail(out) + _tail(log)
        if said == "unstarted":  # before any program ran: the machine, not the completion
            last = (output.strip().splitlines() or ["no message"])[-1]
            raise LooptuneError(
                f"the sandbox ({kind}) could not start the candidate's process, exit status "
                f"{candidate_rc}: {last}"
            )
        if said is _TIMED_OUT:
            return SandboxResult(
                "timeout", f"time limit ({limits.timeout_s:g} s wall)", seconds, kind, output
            )
        # past its CPU limit, whether SIGXCPU ended it (bwrap: 128 + the signal) or it ignored
        # or handled the signal and ran on, until the hard limit killed it or it answered
        if watch.cpu_s >= limits.cpu_s or candidate_rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            return SandboxResult(
                "timeout", f"time limit ({limits.cpu_s} s CPU)", seconds, kind, output
            )
        # past its file limit, counted once more once it answered: a pass made between two
        # counts is none either
        if watch.tripped:
            return SandboxResult(
                "failed", f"file limit ({limits.files} files)", seconds, kind, output
            )
        if said == "passed":
            return SandboxResult("passed", "", seconds, kind, output)
        if out_bytes >= limits.file_bytes:
            detail = f"file size limit ({limits.file_bytes} bytes)"
        elif said is not None:
            detail = said.removeprefix("failed ")
        else:
            detail = "the tests ended without a verdict"
        return SandboxResult("failed", detail, seconds, kind, output)


_TIMED_OUT = object()


class _Runner:
    """A warm `sandbox_runner` process, one check at a time. Each check's descriptors (its job,
    its output, the candidate's two pipes) and nonce reach it over a private socket, and the
    verdict comes back on it; the candidate holds none of these."""

    def __init__(self, non_dumpable: bool):
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [
                    base_python(),
                    "-I",
                    "-S",
                    "-c",
                    _source("runner"),
                    str(theirs.fileno()),
                    str(int(non_dumpable)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                cwd="/",
                env=SCRUBBED_ENV,
                start_new_session=True,
            )
        self.alive, self.verdicts = True, 0
        self.broken: int | None = None  # its exit status, when it failed before any verdict

    def run(
        self,
        nonce: str,
        job: dict,
        log,
        to_candidate: int,
        from_candidate: int,
        timeout_s: float,
        watch: Watch,
    ):
        """The runner's verdict on `job` ("passed" or "failed <why>"), None when it died
        without one, `_TIMED_OUT` after `timeout_s` (it is killed then). `watch` is checked
        every `sandbox_watch.EVERY_S` while it waits."""
        job_read, job_write = os.pipe()
        try:
            socket.send_fds(
                self.socket,
                [nonce.encode()],
                [job_read, log.fileno(), to_candidate, from_candidate],
            )
        except OSError:
            self.kill()
            return None
        finally:
            for fd in (job_read, to_candidate, from_candidate):
                os.close(fd)
        try:
            with open(job_write, "wb") as f:
                f.write(json.dumps(job).encode())
        except OSError:
            pass
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            self.socket.settimeout(max(min(left, EVERY_S), 1e-3))
            try:
                said = self.socket.recv(4096).decode("utf-8", errors="replace")
                break
            except TimeoutError:
                if left <= EVERY_S:
                    self.kill()
                    return _TIMED_OUT
                watch.check()
            except OSError:
                said = ""
                break
        if not said.startswith(nonce + " "):
            self.kill()
            return None
        self.verdicts += 1
        return said[len(nonce) + 1 :]

    def hang_up(self) -> None:
        """From another thread: the check `run` waits on ends now, without a verdict."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:  # closed meanwhile: that check is over anyway
            pass

    def kill(self) -> None:
        try:  # not reaped before this: its group id cannot have been reused
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.close()
        if self.proc.returncode > 0 and not self.verdicts:  # not killed: it never ran
            self.broken = self.proc.returncode

    def close(self) -> None:
        self.alive = False
        self.socket.close()  # it exits when it reads the end
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _tail(f, n: int = 1000) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - n))
    return f.read().decode("utf-8", errors="replace")


@functools.cache
def _source(part: str) -> str:
    return Path(__file__).with_name(f"sandbox_{part}.py").read_text()


@functools.cache
def _warn_tripwire(why: str) -> None:
    print(
        f"warning: {why}; generated code runs behind the sandbox's tripwire only, which stops "
        "accidents, not code written to escape it",
        file=sys.stderr,
    )

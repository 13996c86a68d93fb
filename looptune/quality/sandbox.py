"""Run untrusted Python (a model's completion and its tests) in a separate, limited process.

Layers, each covering what the others cannot:

- A fresh `python -I` (isolated: no PYTHON* variables, no user site, no cwd on `sys.path`) in
  its own session, so the whole process group is killed at the wall-clock limit.
- Its working directory is an empty temporary directory (removed afterwards), and its
  environment is scrubbed to PATH, HOME=TMPDIR=that directory and a UTF-8 locale.
- Resource limits, set by the child on itself before the program runs and not raisable after:
  CPU seconds (SIGXCPU, then SIGKILL a second later), address space, the largest file it may
  write (its output goes to a file, so a flood of prints is capped too), open files, processes
  (0; Linux does not enforce this one for root, hence the hook below), no core dumps. Setting
  them in the child rather than in a `preexec_fn` keeps `subprocess` safe in a parent with
  threads (torch has several).
- An audit hook (`sys.addaudithook`, which cannot be removed) installed before the program:
  writes, renames, deletes and the like are allowed only inside the working directory (paths
  resolved through symlinks; `dir_fd` forms refused; `os.open`, whose audit event does not show
  a `dir_fd`, may not write or open a directory outside it); spawning or replacing processes
  (`os.system`, `os.fork`, `os.exec*`, `os.posix_spawn`, `subprocess`, `pty`, importing
  `_posixsubprocess`), `os.kill`, `chdir`, sockets, `ctypes`, raising resource limits and
  walking the garbage collector are refused with a `PermissionError`.
- No namespaces: they need privileges or user namespaces that containers often lack, so the
  network is refused by the hook alone.

rlimits are the hard boundary; the audit hook is a tripwire against accidents, not a defence
against code written to escape it (no Python-level sandbox is; a container or VM is). The
program passes when it runs to its end: an exception, `exit()` or a limit is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock; the process group is killed after it
    cpu_s: int = 10  # RLIMIT_CPU
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_bytes: int = 1 << 20  # RLIMIT_FSIZE: the largest file it may write, its output included
    open_files: int = 64  # RLIMIT_NOFILE


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed", "failed" or "timeout"
    returncode: int | None  # negative: killed by that signal
    detail: str  # why it failed: the last line of its output, or the limit that stopped it
    seconds: float
    output: str = ""  # the last 2,000 characters of stdout and stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs in the child as `python -I -c _GUARD LIMITS_JSON`, the program on stdin.
_GUARD = r'''
import json, os, resource, sys

_src = sys.stdin.read()
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
_lim = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_CPU, (_lim["cpu_s"], _lim["cpu_s"] + 1))  # SIGXCPU, then KILL
for _kind, _value in ((resource.RLIMIT_AS, _lim["memory_bytes"]),
                      (resource.RLIMIT_FSIZE, _lim["file_bytes"]),
                      (resource.RLIMIT_NOFILE, _lim["open_files"]), (resource.RLIMIT_NPROC, 0),
                      (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_kind, (_value, _value))

_DENY = ("os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
         "os.startfile", "os.kill", "os.killpg", "os.chdir", "subprocess.", "pty.", "socket.",
         "ctypes.", "resource.setrlimit", "resource.prlimit", "gc.get_", "webbrowser.",
         "urllib.", "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.",
         "telnetlib.")
_NO_IMPORT = ("ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi",
              "_testinternalcapi")
# event -> positions of its path arguments and of its dir_fd arguments
_PATHS = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
          "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)),
          "os.symlink": ((0, 1), (2,)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
          "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)), "os.chflags": ((0,), ()),
          "os.lchflags": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
          "shutil.rmtree": ((0,), (1,)), "shutil.chown": ((0,), ()),
          "tempfile.mkstemp": ((0,), ()), "tempfile.mkdtemp": ((0,), ())}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _hook(event, args, root=os.path.realpath(os.getcwd()) + os.sep, deny=_DENY,
          paths=_PATHS, no_import=_NO_IMPORT, write_flags=_WRITE_FLAGS, realpath=os.path.realpath,
          fsdecode=os.fsdecode, isdir=os.path.isdir, func=type(lambda: 0)):
    def inside(path):
        if isinstance(path, int):
            return True  # a descriptor it already holds (it could only have opened it here)
        return (realpath(fsdecode(path)) + "/").startswith(root)

    if event == "open":
        path, mode, flags = args
        if mode is None:  # os.open, whose event does not show a dir_fd: no writing and no
            # directory descriptors outside, so a dir_fd can only point inside
            if not inside(path) and (flags & write_flags or isdir(path)):
                raise PermissionError(f"sandbox: os.open outside the working directory: {path!r}")
        elif any(c in mode for c in "wax+") and not inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory: {path!r}")
    elif event in paths:
        where, fds = paths[event]
        if any(i < len(args) and args[i] not in (None, -1) for i in fds):  # -1: no dir_fd
            raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")
        if not all(args[i] is None or inside(args[i]) for i in where if i < len(args)):
            raise PermissionError(f"sandbox: {event} outside the working directory")
    elif event == "import":
        if args[0] in no_import:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    elif event == "object.__setattr__":
        if isinstance(args[0], func):
            raise PermissionError("sandbox: changing a function's code or defaults is not allowed")
    elif event.startswith(deny):
        raise PermissionError(f"sandbox: {event} is not allowed")


sys.addaudithook(_hook)
_code = compile(_src, "<program>", "exec")
del _hook, _src, _lim, _kind, _value
try:
    exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as _e:
    sys.stderr.write(f"SystemExit: the program exited ({_e.code!r}) before finishing\n")
    sys.stderr.flush()
    os._exit(3)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # don't wait for threads it left behind
'''


def run_python(source: str, limits: Limits = Limits()) -> SandboxResult:
    """Run `source` as a program under `limits`; never raises for anything the program does."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="looptune-sandbox-",
                                     ignore_cleanup_errors=True) as work, \
            tempfile.TemporaryFile() as program, tempfile.TemporaryFile() as out:
        program.write(source.encode("utf-8"))
        program.seek(0)
        env.update(HOME=work, TMPDIR=work)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _GUARD, json.dumps(limits.__dict__)], cwd=work,
            env=env, stdin=program, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
        timed_out = not _wait_unreaped(proc.pid, limits.timeout_s)
        try:  # the leader is not reaped yet, so its group id cannot have been reused
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        rc = proc.wait()
        seconds = time.perf_counter() - start
        out_bytes = out.seek(0, os.SEEK_END)
        out.seek(max(0, out_bytes - 2000))
        output = out.read().decode("utf-8", errors="replace")
    lines = [line for line in output.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if timed_out or rc == -signal.SIGXCPU:
        limit = f"{limits.timeout_s:g} s wall" if timed_out else f"{limits.cpu_s} s CPU"
        return SandboxResult("timeout", None if timed_out else rc, f"time limit ({limit})",
                             seconds, output)
    if rc == 0:
        return SandboxResult("passed", 0, "", seconds, output)
    if rc == -signal.SIGXFSZ or out_bytes >= limits.file_bytes:  # Python ignores SIGXFSZ
        detail = f"file size limit ({limits.file_bytes} bytes)"
    elif rc < 0:
        detail = f"killed by {signal.Signals(-rc).name}"
    else:
        detail = last or f"exit status {rc}"
    return SandboxResult("failed", rc, detail, seconds, output)


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait for the child to exit without reaping it; False if the time ran out."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)

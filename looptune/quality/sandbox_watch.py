"""What the sandbox reads from outside a candidate's processes while a check runs (imported by
`sandbox`, unlike the two `sandbox_` scripts run in processes of their own):

- the CPU time of each: RLIMIT_CPU's soft limit only sends SIGXCPU, which a program may ignore
  or handle, and the hard limit a second later ends it with a SIGKILL that says nothing of
  why. What /proc says it used is what tells a program that ran past its limit.
- under the boundary, the files it made: each file, directory and link holds about 1 KiB of
  kernel memory that the tmpfs's size cap does not count (some 150,000 a second), and
  bubblewrap cannot set the tmpfs's nr_inodes. Read through the /proc entry of bubblewrap's
  child (the sandbox's pid 1); the candidate is killed once there are more than allowed.
"""

from __future__ import annotations

import os
import signal
import time

EVERY_S = 0.1  # how often the sandbox reads them while it waits for a verdict
_PROF = 0  # the kind of a process's CPU clock, in the clock id Linux makes of its pid


class Watch:
    """Reads the process tree under `pid` (the candidate, or bubblewrap holding it) on each
    `check`. `files`: the most inodes its tmpfs of `disk_bytes` may hold, None without one."""

    def __init__(self, pid: int, files: int | None = None, disk_bytes: int = 0):
        self.pid, self.files, self.disk_bytes = pid, files, disk_bytes
        self.cpu_s = 0.0  # the most CPU time one of its processes was seen to have used
        self.tripped = False  # it made more than `files`, and was killed for it
        self._where: str | None = None

    def check(self) -> None:
        self.cpu_s = max([self.cpu_s, *map(_cpu_s, _tree(self.pid))])
        if self.files is not None and not self.tripped:
            self._count_files()

    def _count_files(self) -> None:
        try:
            if self._where is None:
                self._where = f"/proc/{_children(self.pid)[0]}/root/sandbox"
            fs = os.statvfs(self._where)
        except (OSError, IndexError):  # not set up yet, or already gone
            return
        if fs.f_blocks != -(-self.disk_bytes // fs.f_frsize):  # not its tmpfs (yet), whose
            return  # size is rounded up to whole pages
        if fs.f_files - fs.f_ffree > self.files:
            self.tripped = True
            try:  # not reaped yet: its group id cannot have been reused
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # gone
        return []


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += _children(found[-1])
    return found


def _cpu_s(pid: int) -> float:
    """The CPU time RLIMIT_CPU counts for `pid`, 0 once it is gone (a zombie keeps it): its
    process clock of user plus system time (Linux's CPUCLOCK_PROF), in the scheduler's ticks.
    /proc's schedstat and stat can show a tick less than the kernel signalled SIGXCPU at."""
    try:
        return time.clock_gettime((~pid << 3) | _PROF)
    except OSError:  # gone
        return 0.0

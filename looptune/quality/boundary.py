"""The sandbox's OS boundary: the bubblewrap (`bwrap`) command a candidate runs under, chosen
once a process by running a probe under each form this machine may allow.

Besides the namespaces, these holes are closed where the machine allows it:

- nested user namespaces: in a user namespace of its own a process holds every capability,
  which opens much more of the kernel to it. `--disable-userns` (bubblewrap 0.8) refuses
  them; the namespace prepared for root (below) refuses them too.
- processes: the candidate sets RLIMIT_NPROC to 0, but the kernel exempts the host's root
  user from it, and under a plain `--unshare-user` the candidate's user outside is whoever runs
  looptune. So when that is root, the candidate joins (`--userns`) a user namespace prepared
  here in which it is the host's nobody, whom the limit binds, and in which no user namespace
  may be created. The host's root is mapped there too, as uid 1: bubblewrap mounts as nobody,
  with capabilities that reach only files whose owner is mapped (a Python under /root), and
  as uid 0 its switch to nobody would drop them.
- memory no rlimit counts: a System V shared memory segment (or message queue) outlives its
  maker's mapping and stays until the sandbox's IPC namespace ends, so detaching and making
  another held gigabytes past RLIMIT_AS. A seccomp filter (`bwrap --seccomp`) refuses
  `shmget`, `msgget` and `semget` (EPERM) on x86_64 and aarch64, and every system call of
  another ABI (32-bit, x32), whose numbers it does not know.
- the sandbox's init: bubblewrap's pid 1 runs as the candidate's user with none of its
  rlimits, so a candidate that traced it could fork and allocate through it. The filter
  refuses `ptrace`, `process_vm_readv`/`writev` and `pidfd_getfd` too, and /proc is read-only
  (no writing /proc/1/mem).
- extended attributes: the tmpfs keeps them in kernel memory outside its size cap (120 MB on
  one file in 0.6 s); the filter refuses `setxattr` and its variants.
- the kernel's keyrings: nobody's user keyring lives as long as the prepared namespace, so a
  key one check added was found by the next; the filter refuses `add_key`, `request_key` and
  `keyctl`.

The tmpfs caps bytes, not files, and bubblewrap cannot set its nr_inodes: the files,
directories and symlinks a candidate makes (about 1 KiB of kernel memory each, some 150,000 a
second) are counted from outside instead (`sandbox_watch`).

What the probe finds still open (an old bubblewrap, a kernel that refuses the prepared
namespace) is named in `Boundary.gaps`, which every result's `sandbox` description carries.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

SCRUBBED_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
NOBODY = 65534
# every namespace but the user's, which the prepared one stands for (--unshare-all would try a
# user namespace of its own)
_OTHER_NAMESPACES = ("--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts")
_OTHER_NAMESPACES += ("--unshare-cgroup-try",)

# Run under each form of the boundary: what the candidate could do there that it should not.
_PROBE = """
import ctypes, json, os, resource
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # as the candidate does
try:
    forked = os.fork()
except OSError:
    forked = None
if forked == 0:
    os._exit(0)
try:
    nested = ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0  # CLONE_NEWUSER
except OSError:
    nested = True  # not tried: not known to be refused
try:
    ipc = ctypes.CDLL(None, use_errno=True).shmget(0, 4096, 0o1600) >= 0  # IPC_PRIVATE
except OSError:
    ipc = True
print(json.dumps({"processes": forked is not None, "nested_userns": nested, "sysv_ipc": ipc}))
"""

# Made a user namespace of its own, capped at no nested ones (user.max_user_namespaces is per
# namespace and needs capabilities in it to change); the parent then writes its id maps.
_PREPARE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER): " + os.strerror(ctypes.get_errno()))
with open("/proc/sys/user/max_user_namespaces", "w") as f:
    f.write("0")
print("ready", flush=True)
sys.stdin.read()
"""


# seccomp_data's arch and the numbers of the calls refused, by machine: (AUDIT_ARCH_*, (shmget,
# msgget, semget, ptrace, process_vm_readv, process_vm_writev, pidfd_getfd, setxattr,
# lsetxattr, fsetxattr, setxattrat, add_key, request_key, keyctl))
_REFUSED_CALLS = {
    "x86_64": (0xC000003E, (29, 68, 64, 101, 310, 311, 438, 188, 189, 190, 463, 248, 249, 250)),
    "aarch64": (0xC00000B7, (194, 186, 190, 117, 270, 271, 438, 5, 6, 7, 463, 217, 218, 219)),
}
_X32_BIT = 0x40000000  # x86_64's x32 ABI: the same arch, these numbers with this bit set


@functools.cache
def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The classic BPF program bwrap's `--seccomp` loads: EPERM for the System V IPC, tracing,
    xattr-setting and keyring calls (module docstring), EPERM for x32's and ENOSYS for another
    architecture's calls, every other call allowed; None where the numbers of
    this `machine` (os.uname's, by default) are not known here."""
    arch, calls = _REFUSED_CALLS.get(machine or os.uname().machine, (None, ()))
    if arch is None:
        return None
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ..|JGE|K, RET|K
    allow, refuse = 0x7FFF0000, 0x00050000  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
    n = len(calls)
    program = [
        (ld, 0, 0, 4),  # arch
        (jeq, 1, 0, arch),
        (ret, 0, 0, refuse | errno.ENOSYS),  # another ABI
        (ld, 0, 0, 0),  # the call's number
        (jge, n + 1, 0, _X32_BIT),
        *((jeq, n - i, 0, nr) for i, nr in enumerate(calls)),
        (ret, 0, 0, allow),
        (ret, 0, 0, refuse | errno.EPERM),
    ]
    return b"".join(struct.pack("=HBBI", *op) for op in program)


@dataclass(frozen=True)
class Boundary:
    namespaces: tuple[str, ...]  # bwrap's options that make or join the namespaces
    userns_fd: int | None  # the prepared user namespace it joins, open as long as the process
    gaps: tuple[str, ...]  # what the candidate can still do here that it should not

    @property
    def description(self) -> str:
        return "boundary" + (f" ({'; '.join(self.gaps)})" if self.gaps else "")

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return () if self.userns_fd is None else (self.userns_fd,)

    @contextlib.contextmanager
    def command(self, disk_bytes: int) -> Iterator[tuple[list[str], tuple[int, ...]]]:
        """bwrap's command up to `--` (`argv`) with the seccomp filter, and the descriptors
        it needs passed on; the filter's pipe, which bwrap reads once, is closed on exit."""
        program = seccomp_filter()
        if program is None:
            yield self.argv(disk_bytes), self.pass_fds
            return
        read, write = os.pipe()
        try:
            with open(write, "wb") as f:  # far less than a pipe holds: never blocks
                f.write(program)
            argv = self.argv(disk_bytes)
            argv[1:1] = ["--seccomp", str(read)]
            yield argv, (*self.pass_fds, read)
        finally:
            os.close(read)

    def argv(self, disk_bytes: int) -> list[str]:
        """bwrap's command up to `--`: the namespaces, an unprivileged user, read-only system
        and Python dirs, a read-only /proc and /dev, a size-capped tmpfs at /sandbox (also
        /tmp), and nothing else of the parent's (`command` adds the seccomp filter)."""
        argv = [
            shutil.which("bwrap") or "bwrap",
            *self.namespaces,
            "--die-with-parent",
            "--uid",
            str(NOBODY),
            "--gid",
            str(NOBODY),
            "--cap-drop",
            "ALL",
        ]
        for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(d):
                argv += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                argv += ["--ro-bind", d, d]
        for d in sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}):
            if not d.startswith("/usr/") and d != "/usr":
                argv += ["--ro-bind", d, d]
        return argv + [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(disk_bytes),
            "--tmpfs",
            "/sandbox",
            "--symlink",
            "/sandbox",
            "/tmp",
            "--remount-ro",
            "/dev",
            "--remount-ro",  # its user may be root's outside: no writing the host's sysctls
            "/proc",
            "--remount-ro",
            "/",
            "--chdir",
            "/sandbox",
            "--clearenv",
            *(a for k, v in SCRUBBED_ENV.items() for a in ("--setenv", k, v)),
            "--setenv",
            "HOME",
            "/sandbox",
            "--setenv",
            "TMPDIR",
            "/sandbox",
            "--",
        ]


@functools.cache
def base_python() -> str:
    """The base interpreter: the children need the standard library only, not the venv."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.cache
def probe() -> Boundary | str:
    """The best boundary bubblewrap gives here, or why it gives none (tried once a process)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    options = _bwrap_options()
    forms = []
    if os.geteuid() == 0:
        try:
            fd = _prepared_userns()
        except (OSError, subprocess.SubprocessError):
            pass  # the probe of the forms below finds processes uncapped
        else:
            check = ("--assert-userns-disabled",) if "--assert-userns-disabled" in options else ()
            forms.append(("--userns", str(fd), *check, *_OTHER_NAMESPACES))
    if "--disable-userns" in options:
        forms.append(("--unshare-all", "--unshare-user", "--disable-userns"))
    forms.append(("--unshare-all", "--unshare-user"))
    why, machine = "", os.uname().machine
    for namespaces in forms:
        userns_fd = int(namespaces[1]) if namespaces[0] == "--userns" else None
        found = _run_probe(Boundary(namespaces, userns_fd, ()))
        if isinstance(found, str):
            why = found
            continue
        gaps = []
        if found["processes"]:
            gaps.append("new processes not capped: looptune runs as root")
        if found["nested_userns"]:
            old = "--disable-userns" not in options
            gaps.append(
                "nested user namespaces allowed" + (": bwrap older than 0.8" if old else "")
            )
        if found["sysv_ipc"]:
            gaps.append(f"System V shared memory not capped: no seccomp filter for {machine}")
        return Boundary(namespaces, userns_fd, tuple(gaps))
    return why


def _run_probe(boundary: Boundary) -> dict | str:
    """What `_PROBE` found under `boundary`, or why it did not run."""
    try:
        with boundary.command(1 << 20) as (argv, fds):
            done = subprocess.run(
                argv + [base_python(), "-I", "-S", "-c", _PROBE],
                check=False,
                capture_output=True,
                timeout=30,
                env=SCRUBBED_ENV,
                pass_fds=fds,
            )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap failed to start: {e}"
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return f"bwrap could not run Python in its namespaces here ({last})"
    try:
        return json.loads(done.stdout)
    except ValueError:
        return f"bwrap's probe said {done.stdout[-200:]!r}"


@functools.cache
def _bwrap_options() -> frozenset[str]:
    """The options this bubblewrap lists in its --help."""
    try:
        done = subprocess.run(
            ["bwrap", "--help"], capture_output=True, timeout=30, env=SCRUBBED_ENV, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    text = (done.stdout + done.stderr).decode(errors="replace")
    return frozenset(word for word in text.split() if word.startswith("--"))


@functools.cache
def _prepared_userns() -> int:
    """An open descriptor of a new user namespace holding the host's nobody (as nobody) and
    root (as uid 1), in which no user namespace may be created. Only root may map those."""
    with subprocess.Popen(
        [base_python(), "-I", "-S", "-c", _PREPARE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=SCRUBBED_ENV,
        cwd="/",
    ) as helper:
        try:
            if helper.stdout.readline() != b"ready\n":
                fd = None
            else:
                maps = f"1 0 1\n{NOBODY} {NOBODY} 1\n"
                for name in ("uid_map", "gid_map"):
                    with open(f"/proc/{helper.pid}/{name}", "w") as f:
                        f.write(maps)
                fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY)
        finally:
            _, err = helper.communicate(timeout=30)
    if fd is None:
        last = (err.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        raise OSError(f"could not prepare a user namespace: {last}")
    return fd

"""The untrusted side of a check, run as `python -I -S -c <this file> LIMITS_JSON` (never
imported by looptune): it limits itself, loads the program it is sent (a prompt and a model's
completion) and answers calls of the program's entry point, one JSON line each way.

Nothing this process says can make a check pass: the tests run in the runner
(`sandbox_runner`), which sees only the plain data decoded from these answers. A result that is
not plain data (`encode`) is answered as an error, so an object whose `__eq__` is always True,
or a subclass of int or str, never reaches the tests; the runner's decoder would refuse one
anyway.

The tripwire (`install_tripwire`) refuses what a program that only computes never needs:
writing outside its directory, reading anything but its directory and the system's and
Python's files, spawning processes or threads, signals, sockets, SQLite, ctypes, native code
of its own. Its state lives only in a closure built before the program runs, out of the
program's reach (no module global, no mutable container), and it resolves paths with C
functions bound at install time, so patching `os`, `posixpath` or builtins does not blind it.
Inside the OS boundary it is a second layer; without one it is all there is, and it is a
tripwire, not a proof: a program written to escape it may find a way the tests do not try.
"""

import errno
import json
import os
import resource
import sys

# Plain data: what a HumanEval solution returns. Exact types, so no subclass can pass.
_SCALARS = (type(None), bool, int, float, str)
_SEQUENCES = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}


def encode(x):
    """`x` as JSON-ready tagged data, or TypeError when it is not plain data."""
    t = type(x)
    if t in _SCALARS:
        return x
    if t in _SEQUENCES:
        return {_SEQUENCES[t]: [encode(v) for v in x]}
    if t is dict:
        return {"dict": [[encode(k), encode(v)] for k, v in x.items()]}
    if t is bytes:
        return {"bytes": x.hex()}
    if t is complex:
        return {"complex": [x.real, x.imag]}
    raise TypeError(
        f"returned a {t.__module__}.{t.__qualname__}, not plain data (None, bool, "
        "int, float, complex, str, bytes, or lists, tuples, sets and dicts of them)"
    )


def decode(x):
    """The inverse of `encode` (the runner sends arguments this way)."""
    t = type(x)
    if t in _SCALARS:
        return x
    if t is dict and len(x) == 1:
        ((tag, v),) = x.items()
        if tag in ("list", "tuple", "set", "frozenset") and type(v) is list:
            kind = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag]
            return kind(decode(e) for e in v)
        if tag == "dict" and type(v) is list:
            return {decode(k): decode(e) for k, e in v}
        if tag == "bytes" and type(v) is str:
            return bytes.fromhex(v)
        if tag == "complex" and type(v) is list and len(v) == 2:
            return complex(float(v[0]), float(v[1]))
    raise ValueError("malformed message")


def set_limits(lim):
    """rlimits, lowered for good (an unprivileged process cannot raise a hard limit)."""
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))  # XCPU, then KILL
    for kind, value in (
        (resource.RLIMIT_AS, lim["memory_bytes"]),
        (resource.RLIMIT_FSIZE, lim["file_bytes"]),
        (resource.RLIMIT_NOFILE, lim["open_files"]),
        (resource.RLIMIT_NPROC, 0),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(kind, (value, value))


def install_tripwire(root):
    """An audit hook (it cannot be removed) refusing, with PermissionError, what a program that
    only computes never needs. `root`: the one directory it may change."""
    import _imp
    import _signal
    import _thread
    import posix
    import stat
    import types
    import warnings

    no_import = frozenset(
        (
            "ctypes",
            "_ctypes",
            "_posixsubprocess",
            "_xxsubinterpreters",
            "_testcapi",
            "_testinternalcapi",
            "_ssl",
            "_socket",
            "_sqlite3",  # SQL's ATTACH and VACUUM INTO write files with no audit event
            "mmap",
        )
    )
    # Killing the parent, changing its priority or CPUs, or leaving the process group raises no
    # audit event: take the functions away (`signal` copies `_signal` when imported), and with
    # them the means of building fresh built-in modules that would have them again, once every
    # other built-in is loaded.
    process = ("pidfd_open", "setsid", "setpgid", "setpgrp", "killpg", "setpriority")
    process += ("sched_setaffinity", "sched_setscheduler", "sched_setparam")
    for module, names in (
        (os, process),
        (posix, process),
        (_signal, ("pidfd_send_signal", "pthread_kill")),
    ):
        for name in names:
            module.__dict__.pop(name, None)
    # A path is checked, then opened: a second thread could swap a symlink in between and open
    # a path the check never saw. Starting a thread raises no audit event.
    for name in ("start_new_thread", "start_new", "start_joinable_thread"):
        if name in _thread.__dict__:
            _thread.__dict__[name] = _no_threads
    with warnings.catch_warnings():  # some built-ins are deprecated (spwd on Debian's Python)
        warnings.simplefilter("ignore")
        for name in sys.builtin_module_names:
            if name not in sys.modules and name not in no_import:
                __import__(name)
    _imp.__dict__.pop("create_builtin", None)

    root = posix.getcwd() if root is None else root
    root = root.rstrip("/") + "/"
    proc_self = f"/proc/{posix.getpid()}/"
    deny = (
        "os.system",
        "os.exec",
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.spawn",
        "os.kill",
        "os.killpg",
        "os.chdir",
        "os.fchdir",
        "subprocess.",
        "pty.",
        "socket.",
        "ctypes.",
        "resource.setrlimit",
        "resource.prlimit",
        "gc.get_",
        "sys.setprofile",
        "sys.settrace",
        "signal.pthread_kill",
        "webbrowser.",
        "urllib.",
        "http.",
        "ftplib.",
        "smtplib.",
        "poplib.",
        "imaplib.",
        "nntplib.",
        "telnetlib.",
    )
    # event -> (positions of path arguments, positions of dir_fd arguments, descriptor allowed)
    paths = {
        "os.remove": ((0,), (1,), False),
        "os.rmdir": ((0,), (1,), False),
        "os.mkdir": ((0,), (2,), False),
        "os.rename": ((0, 1), (2, 3), False),
        "os.link": ((0, 1), (2, 3), False),
        "os.symlink": ((0, 1), (2,), False),
        "os.chmod": ((0,), (2,), False),
        "os.chown": ((0,), (3,), False),
        "os.truncate": ((0,), (), True),
        "os.utime": ((0,), (3,), False),
        "os.chflags": ((0,), (), False),
        "os.lchflags": ((0,), (), False),
        "os.setxattr": ((0,), (), False),
        "os.removexattr": ((0,), (), False),
        "os.mkfifo": ((0,), (2,), False),
        "os.mknod": ((0,), (3,), False),
        "shutil.rmtree": ((0,), (1,), False),
        "shutil.chown": ((0,), (), False),
        "tempfile.mkstemp": ((0,), (), False),
        "tempfile.mkdtemp": ((0,), (), False),
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    o_directory = os.O_DIRECTORY
    # Only C functions and immutable values from here on, each bound now: the hook must not look
    # up anything (a builtin, a module attribute) that the program could replace.
    paths = types.MappingProxyType(paths)
    lstat, stat_, readlink, getcwd, fspath = (
        posix.lstat,
        posix.stat,
        posix.readlink,
        posix.getcwd,
        posix.fspath,
    )
    s_islnk, s_isdir = stat.S_ISLNK, stat.S_ISDIR
    type_, isinstance_, str_, bytes_, int_, any_, len_ = type, isinstance, str, bytes, int, any, len
    oserror, denied, func = OSError, PermissionError, type(lambda: 0)

    def resolve(path):
        """The absolute path with every symlink followed (os.path.realpath, from C parts)."""
        if type_(path) is not str_:  # a path-like, bytes, or a str subclass that may lie
            path = fspath(path)
            path = (
                bytes_.decode(path, "utf-8", "surrogateescape")
                if isinstance_(path, bytes_)
                else str_.__str__(path)
            )  # an exact str, with str's own methods
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        done, todo, hops = [], path.split("/"), 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            here = "/" + "/".join(done + [part])
            try:
                link = s_islnk(lstat(here).st_mode)
            except oserror:
                link = False
            if not link:
                done.append(part)
                continue
            hops += 1
            if hops > 40:
                raise denied("sandbox: too many symbolic links")
            target = readlink(here)
            todo = target.split("/") + todo
            if target.startswith("/"):
                done = []
        return "/" + "/".join(done)

    def inside(path):
        return (resolve(path) + "/").startswith(root)

    def is_dir(path):
        try:
            return s_isdir(stat_(resolve(path)).st_mode)
        except oserror:
            return False

    def other_process(path):
        real = resolve(path) + "/"
        return real.startswith("/proc/") and real[6:7].isdigit() and not real.startswith(proc_self)

    # what it may read: what the boundary shows it (the system's and Python's files), its own
    # directory and /proc entries, and the harmless devices
    readable = tuple(
        sorted(
            {
                resolve(d) + "/"
                for d in (
                    "/usr",
                    "/bin",
                    "/sbin",
                    "/lib",
                    "/lib32",
                    "/lib64",
                    "/libx32",
                    sys.prefix,
                    sys.exec_prefix,
                )
            }
        )
    ) + (root, proc_self)
    devices = frozenset(f"/dev/{d}/" for d in ("null", "zero", "full", "random", "urandom"))
    system = readable[:-2]  # where native code may be loaded from

    def may_read(path):
        real = resolve(path) + "/"
        return real.startswith(readable) or real in devices

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if type_(path) is int_:
                return
            if mode is None:  # os.open, whose event does not show a dir_fd: no writing and no
                # directory descriptors outside, so a dir_fd can only point inside
                if not inside(path) and (flags & (write_flags | o_directory) or is_dir(path)):
                    raise denied(f"sandbox: os.open outside the working directory: {path!r}")
            elif any_(c in mode for c in "wax+") and not inside(path):
                raise denied(f"sandbox: writing outside the working directory: {path!r}")
            if not may_read(path):
                raise denied(
                    f"sandbox: reading outside the working directory and Python's own "
                    f"files: {path!r}"
                )
        elif event in paths:
            where, fds, descriptor_ok = paths[event]
            if any_(i < len_(args) and args[i] not in (None, -1) for i in fds):  # -1: no dir_fd
                raise denied(f"sandbox: {event} with dir_fd is not allowed")
            for i in where:
                if i >= len_(args) or args[i] is None:
                    continue
                if type_(args[i]) is int_:
                    if not descriptor_ok:
                        raise denied(f"sandbox: {event} on a file descriptor is not allowed")
                elif not inside(args[i]):
                    raise denied(f"sandbox: {event} outside the working directory")
        elif event in ("os.listdir", "os.scandir"):
            if (
                args
                and args[0] is not None
                and type_(args[0]) is not int_
                and other_process(args[0])
            ):
                raise denied("sandbox: listing another process's /proc entry")
        elif event == "import":
            if type_(args[0]) is str_ and args[0].rpartition(".")[2] in no_import:
                raise denied(f"sandbox: importing {args[0]} is not allowed")
            if (
                len_(args) > 1
                and args[1] is not None
                and not (resolve(args[1]) + "/").startswith(system)
            ):  # an extension's file
                raise denied("sandbox: loading native code from outside Python's own files")
        elif event == "object.__setattr__":
            if type_(args[0]) is func:
                raise denied("sandbox: changing a function's code or defaults is not allowed")
        elif event.startswith(deny):
            raise denied(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


def _no_threads(*args, **kwargs):
    raise PermissionError("sandbox: starting a thread is not allowed")


def serve(inp, out, tripwire):
    """Load the program, then answer calls of its entry point until the runner hangs up."""

    def send(message):
        try:  # the check's output is read as soon as the tests are done
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):  # past the file size limit, or closed by the program
            pass
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    request = json.loads(inp.readline())
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        code = compile(request["program"], "<program>", "exec")
        if tripwire:
            install_tripwire(None)
        exec(code, namespace)  # noqa: S102 - running it is the point
        if request["entry_point"] not in namespace:
            raise NameError(f"the program does not define {request['entry_point']}")
        function = namespace[request["entry_point"]]
    except BaseException as e:  # noqa: BLE001 - SystemExit included: it did not finish loading
        send({"error": _describe(e)})
        return
    send({"ready": True})
    for line in inp:
        call = json.loads(line)
        try:
            args, kwargs = decode(call["args"]), decode(call["kwargs"])
            send({"result": encode(function(*args, **kwargs))})
        except BaseException as e:  # noqa: BLE001 - every failure of the candidate is an answer
            send({"error": _describe(e)})


def _describe(e):
    try:
        if isinstance(e, SystemExit):
            return f"SystemExit: the program exited ({e.code!r})"
        text = str(e).strip().splitlines()
        said = f"{type(e).__name__}: {text[-1]}"[:300] if text else type(e).__name__
        if type(e) is BlockingIOError and e.errno == errno.EAGAIN:  # what fork raises here
            said += " (the sandbox allows no new processes)"
        elif type(e) is RuntimeError and said.endswith("can't start new thread"):  # RLIMIT_NPROC
            said += " (the sandbox allows no new threads)"
        return said
    except BaseException:  # noqa: BLE001 - a hostile __str__
        return "an exception that could not be described"


def close_inherited():
    """Close every descriptor above 2: what bwrap passed on (as root, the user namespace it
    joined), however high its number; `close_range` makes a wide range cheap."""
    try:
        high = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        high = 0
    os.closerange(3, max(high + 1, 1 << 16))


def main():
    lim = json.loads(sys.argv[1])
    close_inherited()
    set_limits(lim)
    # the protocol gets private descriptors; fd 0 reads nothing, fd 1 goes where fd 2 goes,
    # so the program's prints and os.write(1, ...) land in the output, not in the protocol
    inp, out = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    try:
        out.write(b'{"started": true}\n')  # before the program: no program can unsay it
        out.flush()
        serve(inp, out, lim["tripwire"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # don't wait for threads it left behind


if __name__ == "__main__":
    main()

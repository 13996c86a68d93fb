"""The sandbox that runs generated code, against completions written to cheat or to escape.

Each attack runs with the OS boundary (bubblewrap; skipped where it cannot run) and with the
tripwire alone; with the boundary, the file, secret, parent and network attacks also run without
the tripwire inside it, so that the boundary alone is what holds. Only the boundary contains
the total written (a cap) and keeps the system read-only and the parent's files invisible
rather than refused (`test_boundary_only_*`); the tripwire holds against the forms tested here,
not against every program written to escape it.
"""

import ast
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from looptune.errors import LooptuneError
from looptune.quality import boundary, sandbox
from looptune.quality.humaneval import run_test, run_tests, truncate_at_stop
from looptune.quality.sandbox import Limits, run_check, sandbox_kind
from looptune.quality.sets import load_set

FAST = Limits(timeout_s=5.0, cpu_s=3)
RETURNS_ONE = "def check(f):\n    assert f() == 1\n"  # the tests of most programs below
FOUND = boundary.probe()
BOUNDARY = None if isinstance(FOUND, boundary.Boundary) else FOUND
needs_boundary = pytest.mark.skipif(BOUNDARY is not None, reason=f"no boundary: {BOUNDARY}")


@pytest.fixture(params=["boundary", "tripwire"])
def kind(request):
    if request.param == "boundary" and BOUNDARY is not None:
        pytest.skip(f"no boundary here: {BOUNDARY}")
    return request.param


def check(program, kind, tests=RETURNS_ONE, limits=FAST, **kw):
    return run_check(program, tests, "f", limits, kind, **kw)


def boundary_alone(program, tests=RETURNS_ONE, limits=FAST):
    """The boundary without the tripwire inside it: what holds is the OS alone."""
    return run_check(program, tests, "f", limits, "boundary", tripwire=False)


def fn(body):
    """A program defining f() with `body` (indented lines) and returning 1."""
    return "def f():\n" + "".join(f"    {line}\n" for line in body.splitlines()) + "    return 1\n"


# --- the check itself --------------------------------------------------------------------------


def test_a_plain_program_passes_and_may_use_its_own_directory(kind):
    r = check(
        fn(
            "import os, tempfile\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\n"
            "os.rename('a.txt', 'd/b.txt')\nos.remove('d/b.txt')\n"
            "tempfile.NamedTemporaryFile().write(b'x')\nprint(sorted(os.environ))"
        ),
        kind,
    )
    assert r.passed and r.sandbox.split(" (")[0] == kind, r
    shown = set(ast.literal_eval(r.output.strip()))  # nothing of the parent's environment
    assert (
        {"HOME", "PATH", "TMPDIR"} <= shown <= {"HOME", "LANG", "LC_ALL", "PATH", "PWD", "TMPDIR"}
    )


def test_wrong_answers_errors_and_exits_fail(kind):
    assert check("def f():\n    return 2\n", kind).detail == "AssertionError"
    r = check("def f():\n    return 1 / 0\n", kind)
    assert not r.passed and r.detail == "ZeroDivisionError: division by zero"
    r = check("def g():\n    return 1\n", kind)
    assert not r.passed and r.detail == "NameError: the program does not define f", r


@pytest.mark.parametrize(
    "program",
    [
        "import os\nos._exit(0)\n",  # before the tests ran
        "import sys\nsys.exit(0)\n",
        fn("import os\nos._exit(0)"),  # while they run
        fn("raise SystemExit(0)"),
        # every line an honest harness might print, on every descriptor it might hold
        (
            "import os\nfor fd in range(64):\n    for m in (b'passed\\n', b'PASS\\n', b'0 passed\\n',"
            " b'{\"ready\": true}\\n'):\n        try:\n            os.write(fd, m)\n"
            "        except OSError:\n            pass\nprint('passed')\nos._exit(0)\n"
        ),
    ],
)
def test_a_pass_cannot_be_forged_by_exiting_or_printing(kind, program):
    r = check(program, kind, tests="def check(f):\n    assert f() == 2\n")
    assert not r.passed, r


@pytest.mark.parametrize(
    "result",
    [
        "type('Eq', (), {'__eq__': lambda s, o: True, '__hash__': lambda s: 0})()",
        "type('I', (int,), {'__eq__': lambda s, o: True, '__hash__': lambda s: 0})(7)",
        "type('S', (str,), {'__eq__': lambda s, o: True, '__hash__': lambda s: 0})('x')",
        "[type('F', (float,), {'__eq__': lambda s, o: True})(1.0)]",  # nested
        "{1: type('T', (tuple,), {})()}",
        "iter([1])",
    ],
)
def test_results_that_are_not_plain_data_fail(kind, result):
    r = check(f"def f():\n    return {result}\n", kind)
    assert not r.passed and "not plain data" in r.detail, r


def test_plain_data_crosses_exactly(kind):
    value = "[None, True, 3, 2.5, 1j, 'é', b'\\x00', (1, [2]), {3: {'k': frozenset({4})}}, {5}]"
    r = check(
        f"def f(*a, **k):\n    return a, k, {value}\n",
        kind,
        tests=f"def check(f):\n    got = f((1, 2), [b'x'], k={{1.5}})\n"
        f"    assert got == (((1, 2), [b'x']), {{'k': {{1.5}}}}, {value}), got\n"
        f"    assert type(got[2][7]) is tuple and type(got[2][7][1]) is list\n",
    )
    assert r.passed, r


@pytest.mark.parametrize(
    "program, tests",
    [
        ("def f():\n    raise ValueError('\\ud800 odd')\n", RETURNS_ONE),
        (
            "def f():\n    return '\\udfff odd'\n",
            "def check(f):\n    x = f()\n    assert x == 1, x\n",
        ),
    ],
)
def test_text_that_is_not_valid_unicode_is_reported_not_fatal(kind, program, tests):
    # a lone surrogate crosses JSON; it once killed the runner (no verdict, the error lost)
    r = check(program, kind, tests=tests)
    assert r.status == "failed" and "odd" in r.detail and "\\ud" in r.detail, r


def test_a_candidate_that_stops_listening_fails_with_the_runner_kept(kind):
    # it closes the pipe the runner writes calls to; the runner's unsent bytes once killed it
    # while it closed that pipe, after the verdict was decided and before it was sent
    program = (
        "import fcntl, os, stat\nfor fd in range(3, 64):\n    try:\n"
        "        fifo = stat.S_ISFIFO(os.fstat(fd).st_mode)\n    except OSError:\n"
        "        continue\n"
        "    if fifo and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:\n"
        "        os.close(fd)\ndef f():\n    return 1\n"
    )
    with sandbox.Sandbox(kind) as box:
        r = box.check(program, RETURNS_ONE, "f", FAST)
        assert r.detail == "the candidate's process ended before answering", r
        assert len(box._idle) == 1 and box._idle[0].alive  # the same runner serves the next
        assert box.check(fn(""), RETURNS_ONE, "f", FAST).passed


# --- the guard's own state ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        "import sys\nsys.modules['__main__'].__dict__.clear()",
        (
            "import os, posixpath\nos.path.realpath = posixpath.realpath = lambda p, **k: '/sandbox/x'"
            "\nos.lstat = os.stat = lambda *a, **k: None"
        ),
        (
            "import builtins\nbuiltins.any = lambda *a: False\nbuiltins.type = lambda *a: str\n"
            "builtins.PermissionError = OSError\nbuiltins.len = lambda *a: 0"
        ),
        "import gc\n[o for o in gc.get_objects() if callable(o)]",
        # a path whose own methods lie about where it leads
        (
            "import builtins, os\nclass P(str):\n    def split(self, *a):\n"
            "        return (os.getcwd() + '/x').split('/')\n"
            "    def startswith(self, *a):\n        return True\n"
            "builtins.open = (lambda o: lambda p, m: o(P(p), m))(builtins.open)"
        ),
        "import sys\nsys.settrace(lambda *a: None)",
    ],
)
def test_the_guards_state_cannot_be_changed(kind, tmp_path, tamper):
    target = tmp_path / "escaped.txt"
    r = check(fn(f"{tamper}\nopen({str(target)!r}, 'w').write('x')"), kind)
    assert not r.passed and not target.exists(), r


# --- the parent --------------------------------------------------------------------------------

PARENT = """
import json, sys
from looptune.quality.sandbox import Limits, run_check
kind, programs = sys.argv[1], json.loads(sys.argv[2])
results = [run_check(p, "def check(f):\\n    assert f() == 1\\n", "f", Limits(timeout_s=5.0),
                     kind, tripwire=kind == "tripwire").__dict__ for p in programs]
print(json.dumps(results))
"""


def in_a_parent(kind, programs, env=None):
    """Run the checks from a separate parent process: if an attack kills its parent, that
    process dies, not pytest."""
    done = subprocess.run(
        [sys.executable, "-c", PARENT, kind, json.dumps(programs)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # the parent survived
    return json.loads(done.stdout)


KILL_THE_PARENT = [
    fn("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"),
    fn("import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)"),
    fn("import os\nos.killpg(os.getpgid(os.getppid()), 9)"),
]
# Get back the functions the tripwire takes away: a fresh module from the same spec, or one
# made by the import system's own primitive
KILL_THE_PARENT_REBUILT = [
    fn(
        f"import importlib.util as u, importlib.machinery as m, _imp, os\n"
        f"new = {make}\n"
        "p, s = new('posix'), new('_signal')\n"
        "for pid in {os.getppid(), 1}:\n"
        "    try:\n"
        "        s.pidfd_send_signal(p.pidfd_open(pid), 9)\n"
        "    except OSError:\n"
        "        pass"
    )
    for make in (
        "lambda n: u.module_from_spec(u.find_spec(n))",
        "lambda n: _imp.create_builtin(m.ModuleSpec(n, m.BuiltinImporter))",
    )
]


def test_the_parent_survives_attempts_to_kill_it(kind):
    programs = KILL_THE_PARENT + KILL_THE_PARENT_REBUILT
    results = in_a_parent(kind, programs)  # asserts that the parent survived
    assert len(results) == len(programs)
    if kind == "tripwire":  # refused; in the boundary they reach only the sandbox's own init
        assert all(r["status"] == "failed" for r in results), results


SCHEDULED_PARENT = """
import json, os, sys
from looptune.quality.sandbox import Limits, run_check
def now():
    return os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)), \\
        os.sched_getscheduler(0)
before = now()
for p in json.loads(sys.argv[2]):
    run_check(p, "def check(f):\\n    assert f() == 1\\n", "f", Limits(timeout_s=5.0), sys.argv[1])
print(json.dumps([before, now()]))
"""


def test_the_parent_keeps_its_priority_and_cpus(kind):
    # no audit event guards these: as root, PRIO_USER would renice every process of the machine
    nice = 19 if os.getpriority(os.PRIO_PROCESS, 0) < 19 else 0
    programs = [
        fn(f"import os\nos.setpriority(os.PRIO_PROCESS, os.getppid(), {nice})"),
        fn("import os\nos.sched_setaffinity(os.getppid(), {0})"),
        fn("import os\nos.sched_setscheduler(os.getppid(), os.SCHED_IDLE, os.sched_param(0))"),
    ]
    done = subprocess.run(
        [sys.executable, "-c", SCHEDULED_PARENT, kind, json.dumps(programs)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    before, after = json.loads(done.stdout)
    assert after == before


SECRET_READERS = [
    fn("import os\nraise ValueError(open(f'/proc/{os.getppid()}/environ').read())"),
    fn("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())"),
    fn("import os\nprint(open('/proc/self/../' + str(os.getppid()) + '/environ', 'rb').read())"),
    fn("import os\nprint(open(f'/proc/{os.getppid()}/cmdline').read())"),
    fn("import os\nprint(os.environ)"),
    # every process it can see, by every path
    fn(
        "import os\nfor p in os.listdir('/proc'):\n    try:\n"
        "        print(open(f'/proc/{p}/environ', 'rb').read())\n    except Exception:\n"
        "        pass\n    try:\n        for t in os.listdir(f'/proc/{p}/task'):\n"
        "            print(open(f'/proc/{p}/task/{t}/environ', 'rb').read())\n"
        "    except Exception:\n        pass\nraise ValueError(str(os.listdir('/proc')))"
    ),
]


def test_the_parents_environment_is_out_of_reach(kind):
    secret = "looptune-secret-" + secrets.token_hex(8)
    results = in_a_parent(kind, SECRET_READERS, env={**os.environ, "LOOPTUNE_TEST_SECRET": secret})
    assert "PATH" in results[4]["output"], results  # what they print is kept: they did run
    assert secret not in json.dumps(results)  # detail and output: all a score keeps of a check


def test_the_parents_files_are_out_of_reach(kind, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("looptune-secret-" + secrets.token_hex(8))
    program = fn(f"s = open({str(secret)!r}).read()\nprint(s)\nraise ValueError(s)")
    for r in [check(program, kind)] + ([boundary_alone(program)] if kind == "boundary" else []):
        assert not r.passed and secret.read_text() not in r.detail + r.output, r


def test_the_score_names_its_sandbox_and_its_cache_holds_nothing_of_the_parents(
    kind, tmp_path, monkeypatch
):
    from looptune.model.checkpoint import init_checkpoint
    from looptune.quality import humaneval
    from looptune.quality.score import score_checkpoints

    # a variable of this process's own environment, as /proc shows it to others
    pick = (
        "lambda v: max((e for e in v.split('\\0') if len(e) < 200 and "
        "e.split('=')[0] not in ('PATH', 'PWD', 'HOME')), key=len)"
    )
    secret = eval(pick)(Path("/proc/self/environ").read_text(errors="replace"))
    steal = (
        f"    import os\n    s = ({pick})(open(f'/proc/{{os.getppid()}}/environ').read())\n"
        "    print(s)\n    raise ValueError(s)\n"
    )
    monkeypatch.setattr(humaneval, "complete", lambda *a, **k: (steal, 1))  # every completion
    monkeypatch.setenv("LOOPTUNE_SANDBOX", kind)
    init_checkpoint(tmp_path / "ck", "tiny", loops=2)
    (s,) = score_checkpoints(
        [tmp_path / "ck"], loops=[2], sets=["humaneval"], limit=2, execute=True
    )
    assert s.to_dict()["sandbox"].split(" (")[0] == kind and s.value == 0.0
    cache = Path(os.environ["LOOPTUNE_CACHE_DIR"])
    cached = [f.read_text() for f in cache.rglob("*") if f.is_file()]
    assert cached and all("ValueError" in text or "PermissionError" in text for text in cached)
    assert len(secret) > 10 and secret not in json.dumps(s.to_dict()) + "".join(cached)


# --- files, disk and network -------------------------------------------------------------------

OUTSIDE_WRITES = [
    "open({target!r}, 'w').write('x')",
    "import os\nos.chdir('/')\nopen({target!r}, 'w')",
    "open('../' * 12 + {target!r}.lstrip('/'), 'w').write('x')",
    "import pathlib\npathlib.Path({target!r}).write_text('x')",
    "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')",
    (
        "import os\nfd = os.open({dir!r}, os.O_RDONLY)\n"
        "os.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd)"
    ),
    "import shutil\nshutil.copy('/etc/hostname', {target!r})",
    "import sqlite3\nsqlite3.connect({target!r}).execute('create table t (x)')",
    (
        "import sqlite3\nsqlite3.connect(':memory:').execute('attach database ' + repr({target!r}) "
        "+ ' as x').execute('create table x.t (a)')"
    ),
    (
        "import sqlite3\nc = sqlite3.connect(':memory:')\nc.execute('create table t (a)')\n"
        "c.execute('vacuum into ' + repr({target!r}))"
    ),
    (
        "import sqlite3\nsqlite3.connect('file:' + {target!r} + '?mode=rwc', uri=True).execute("
        "'create table t (a)')"
    ),
    # a thread swaps a/b between a symlink three levels deep and a directory, so that the
    # path checked and the path opened differ
    (
        "import os, threading\nos.makedirs('a/c/d/e')\nos.mkdir('a/bdir')\n"
        "os.symlink('c/d/e', 'a/blink')\nstop = []\ndef flip():\n    while not stop:\n"
        "        try:\n            os.rename('a/bdir', 'a/b'); os.rename('a/b', 'a/bdir')\n"
        "            os.rename('a/blink', 'a/b'); os.rename('a/b', 'a/blink')\n"
        "        except OSError:\n            pass\nthreading.Thread(target=flip).start()\n"
        "p = 'a/b/' + '../' * (2 + os.getcwd().count('/')) + {target!r}.lstrip('/')\n"
        "for _ in range(20000):\n    try:\n        open(p, 'w').write('x')\n"
        "    except OSError:\n        pass\nstop.append(1)\nopen(p, 'w')"
    ),
    "import os\nos.open({target!r}, os.O_WRONLY | os.O_CREAT)",
]
OUTSIDE_CHANGES = [
    "import os\nos.remove({victim!r})",
    "import os\nos.rename({victim!r}, {target!r})",
    "import os\nos.chmod({victim!r}, 0o777)",
    "import os\nfd = os.open({victim!r}, os.O_RDONLY)\nos.fchmod(fd, 0o777)",
    "import os\nos.utime({victim!r}, (0, 0))",
    "import shutil\nshutil.rmtree({dir!r})",
    # a path-like that names the victim once, then a file of its own
    (
        "import os\nclass P:\n    n = 0\n    def __fspath__(self):\n        P.n += 1\n"
        "        return {victim!r} if P.n == 1 else 'mine.txt'\nos.remove(P())"
    ),
]


@pytest.mark.parametrize("program", OUTSIDE_WRITES + OUTSIDE_CHANGES)
def test_files_outside_its_directory_stay_as_they_were(kind, tmp_path, program):
    target, victim = tmp_path / "escaped.txt", tmp_path / "victim.txt"
    victim.write_text("keep")
    victim.chmod(0o600)
    before = victim.stat()
    src = program.format(
        target=str(target), dir=str(tmp_path), name=target.name, victim=str(victim)
    )
    for r in [check(fn(src), kind)] + ([boundary_alone(fn(src))] if kind == "boundary" else []):
        assert not r.passed, r
        assert not target.exists() and victim.read_text() == "keep"
        after = victim.stat()
        assert (stat.S_IMODE(after.st_mode), after.st_mtime_ns) == (
            stat.S_IMODE(before.st_mode),
            before.st_mtime_ns,
        )


@needs_boundary
def test_boundary_only_the_system_is_read_only_and_the_parents_files_invisible():
    here = os.path.abspath(__file__)
    r = boundary_alone(
        fn(
            f"import os\nassert not os.path.exists({here!r})\n"
            f"assert not os.path.exists({os.path.expanduser('~')!r} + '/.bashrc')\n"
            "for d in ('/usr', '/', '/dev', '/proc/1'):\n    try:\n"
            "        open(d + '/x', 'w')\n    except OSError:\n        pass\n"
            "    else:\n        raise AssertionError(d)"
        )
    )
    assert r.passed, r


@needs_boundary
def test_boundary_only_the_kernels_settings_are_read_only():
    # where the sandbox's user is root outside (boundary.py), a fresh /proc let it write the host's
    # sysctls (kernel/core_pattern runs a program as root). Checked with access(), which
    # writes nothing but answers as open() would, the read-only mount included.
    program = (
        "def f():\n    import os\n    found = []\n    for top in os.listdir('/proc'):\n"
        "        if top[0].isdigit() or top in ('self', 'thread-self'):\n            continue\n"
        "        for d, _, files in os.walk('/proc/' + top):\n"
        "            found += [f'{d}/{n}' for n in files if os.access(f'{d}/{n}', os.W_OK)]\n"
        "        if os.path.isfile('/proc/' + top) and os.access('/proc/' + top, os.W_OK):\n"
        "            found.append('/proc/' + top)\n    return found[:5]\n"
    )
    r = boundary_alone(program, "def check(f):\n    assert f() == [], f()\n")
    assert r.passed, r


@needs_boundary
def test_boundary_only_the_total_written_is_capped():
    limits = Limits(timeout_s=10.0, file_bytes=1 << 20, disk_bytes=4 << 20)
    program = (
        "def f():\n    n = 0\n    for i in range(64):\n        try:\n"
        "            with open(f'/tmp/{i}', 'wb') as out:\n"
        "                n += out.write(bytes(1 << 20))\n"
        "        except OSError:\n            break\n    return n\n"
    )
    r = boundary_alone(program, "def check(f):\n    assert 0 < f() <= 4 << 20\n", limits)
    assert r.passed, r


@needs_boundary
def test_boundary_only_the_number_of_files_is_capped():
    # each costs kernel memory that the tmpfs's byte cap does not count; the tripwire allows
    # them in its own directory, so this holds in the default sandbox too
    limits = Limits(timeout_s=20.0, cpu_s=20, files=2000)
    program = fn("import os\nfor i in range(10 ** 6):\n    os.mkdir(f'/tmp/{i}')")
    for r in (boundary_alone(program, limits=limits), check(program, "boundary", limits=limits)):
        assert (r.status, r.detail) == ("failed", "file limit (2000 files)"), r
    made = fn("import os\nfor i in range(1000):\n    os.symlink('x', f'/tmp/{i}')")
    assert boundary_alone(made, limits=limits).passed


@needs_boundary
def test_boundary_only_a_pass_made_past_the_file_limit_fails():
    """The files made before it answered are counted once more after the verdict: a pass that
    went past the limit between two reads is no pass (as one past its CPU limit is none)."""
    program = fn("import os\nfor i in range(500):\n    os.mkdir(f'/tmp/{i}')")
    r = boundary_alone(program, limits=Limits(timeout_s=10.0, files=100))
    assert (r.status, r.detail) == ("failed", "file limit (100 files)"), r


@needs_boundary
def test_boundary_only_the_files_are_capped_whatever_the_disk_size():
    # the tmpfs rounds its size up to whole pages: 10,000,000 bytes is 10,002,432
    limits = Limits(timeout_s=20.0, cpu_s=20, files=2000, disk_bytes=10_000_000)
    program = fn("import os\nfor i in range(10 ** 6):\n    os.mkdir(f'/tmp/{i}')")
    r = boundary_alone(program, limits=limits)
    assert (r.status, r.detail) == ("failed", "file limit (2000 files)"), r


# --- processes and user namespaces -------------------------------------------------------------

FORKS = fn(
    "import os, time\nfor _ in range(200):\n    if os.fork() == 0:\n"
    "        time.sleep(5)\n        os._exit(0)"
)
NATIVE_FORKS = fn(
    "import ctypes, time\nlibc = ctypes.CDLL(None, use_errno=True)\nmade = 0\n"
    "for _ in range(200):\n    pid = libc.fork()\n    if pid == 0:\n        time.sleep(5)\n"
    "        libc._exit(0)\n    made += pid > 0\nraise ValueError(f'forked {made}')"
)
NESTED_USERNS = fn(  # CLONE_NEWUSER: a user namespace where it would hold every capability
    "import ctypes\nr = ctypes.CDLL(None, use_errno=True).unshare(0x10000000)\n"
    "raise ValueError(f'unshare {r}')"
)


@needs_boundary
def test_boundary_only_a_fork_bomb_gets_no_process():
    if "processes not capped" in FOUND.description:  # said in every result; not run uncapped
        pytest.skip(f"this machine leaves processes uncapped: {FOUND.description}")
    r = boundary_alone(FORKS)
    assert r.status == "failed", r  # at once, not at the time limit
    assert r.detail == (
        "BlockingIOError: [Errno 11] Resource temporarily unavailable "
        "(the sandbox allows no new processes)"
    )
    r = boundary_alone(NATIVE_FORKS)
    assert (r.status, r.detail) == ("failed", "ValueError: forked 0"), r
    r = boundary_alone(fn("import threading\nthreading.Thread(target=print).start()"))
    assert r.detail == "RuntimeError: can't start new thread (the sandbox allows no new threads)"


def test_the_candidate_holds_no_descriptor_but_its_own(kind):
    program = (
        "def f():\n    import os\n    fds = os.listdir('/proc/self/fd')\n"
        "    return sorted(os.readlink(f'/proc/self/fd/{n}').split(':')[0] for n in fds\n"
        "                  if os.path.exists(f'/proc/self/fd/{n}'))\n"
    )  # /dev/null, the output file (deleted), the two pipes; bwrap passes on the userns it joins
    tests = (
        "def check(f):\n    held = f()\n    assert held.count('pipe') == 2 and all(\n"
        "        t in ('/dev/null', 'pipe') or t.endswith('(deleted)') for t in held), held\n"
    )
    for r in [check(program, kind, tests)] + (
        [boundary_alone(program, tests)] if kind == "boundary" else []
    ):
        assert r.passed, r


@needs_boundary
def test_boundary_only_no_user_namespace_can_be_made_inside():
    r = boundary_alone(NESTED_USERNS)
    if "nested user namespaces allowed" in r.sandbox:  # an old bwrap, said in every result
        assert r.detail == "ValueError: unshare 0", r
    else:
        assert r.detail == "ValueError: unshare -1", r


SYSV_IPC = fn(  # IPC_PRIVATE objects outlive a detach: memory that no rlimit counts
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nmade = []\n"
    "for make, args in (('shmget', (64 << 20, 0o1600)), ('msgget', (0o1600,)),\n"
    "                   ('semget', (1, 0o1600))):\n"
    "    made.append((getattr(libc, make)(0, *args), ctypes.get_errno()))\n"
    "raise ValueError(f'made {made}')"
)


@needs_boundary
def test_boundary_only_no_system_v_ipc_object_holds_memory_past_the_limit():
    if "System V shared memory not capped" in FOUND.description:  # said in every result
        pytest.skip(f"no seccomp filter for this machine: {FOUND.description}")
    r = boundary_alone(SYSV_IPC)
    assert r.detail == "ValueError: made [(-1, 1), (-1, 1), (-1, 1)]", r  # EPERM, each


@needs_boundary
def test_boundary_only_the_sandboxs_init_cannot_be_driven():
    # bwrap's pid 1 has the candidate's user but none of its rlimits: traced, it would fork
    # and allocate for the candidate
    program = fn(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "said = [libc.ptrace(16, 1, None, None), ctypes.get_errno()]\n"  # PTRACE_ATTACH
        "buf = ctypes.create_string_buffer(8)\n"
        "iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)\n"
        "said += [libc.process_vm_readv(1, iov, 1, iov, 1, 0), ctypes.get_errno()]\n"
        "try:\n    open('/proc/1/mem', 'r+b')\nexcept OSError as e:\n"
        "    said.append(e.errno)\nraise ValueError(f'said {said}')"
    )
    r = boundary_alone(program)
    assert r.detail == "ValueError: said [-1, 1, -1, 1, 30]", r  # EPERM, EPERM, EROFS


@needs_boundary
def test_boundary_only_no_extended_attribute_holds_memory_past_the_disk_cap():
    # the tmpfs keeps xattrs in kernel memory that its size cap does not count
    program = fn(
        "import ctypes, os\nopen('a', 'w').close()\nsaid = []\ntry:\n"
        "    os.setxattr('a', 'user.k', bytes(60000))\nexcept OSError as e:\n"
        "    said.append(e.errno)\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "said += [libc.syscall(463, -100, b'a', 0, b'user.k', None, 0), ctypes.get_errno()]\n"
        "raise ValueError(f'said {said}')"  # 463: setxattrat (Linux 6.13)
    )
    r = boundary_alone(program)
    assert r.detail == "ValueError: said [1, -1, 1]", r  # EPERM each


@needs_boundary
def test_boundary_only_no_key_outlives_a_check():
    # nobody's user keyring outlived the check that filled it: the next one found the key
    name = "looptune-" + secrets.token_hex(4)
    program = fn(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"said = [libc.syscall(248, b'user', b'{name}', b'x', 1, -4), ctypes.get_errno()]\n"
        f"said += [libc.syscall(249, b'user', b'{name}', None, 0), ctypes.get_errno()]\n"
        "said += [libc.syscall(250, 0, -4, 0), ctypes.get_errno()]\n"  # KEYCTL_GET_KEYRING_ID
        "raise ValueError(f'said {said}')"  # add_key, request_key, keyctl
    )
    for _ in range(2):
        r = boundary_alone(program)
        assert r.detail == "ValueError: said [-1, 1, -1, 1, -1, 1]", r  # EPERM each


@needs_boundary
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x32 is x86_64's")
def test_boundary_only_no_call_by_x32_numbers():
    # the same arch with another table: shmget's number with the x32 bit would miss the filter
    program = fn(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "said = [libc.syscall(0x40000000 + 29, 0, 4096, 0o1600), ctypes.get_errno()]\n"
        "raise ValueError(f'said {said}')"
    )
    r = boundary_alone(program)
    assert r.detail == "ValueError: said [-1, 1]", r  # EPERM, not the kernel's own ENOSYS


def test_the_seccomp_filter_knows_only_the_machines_it_has_numbers_for():
    assert boundary.seccomp_filter("riscv64") is None
    for machine in ("x86_64", "aarch64"):
        program = boundary.seccomp_filter(machine)
        assert len(program) % 8 == 0 and len(program) // 8 == 21  # sock_filter: 8 bytes each


@needs_boundary
def test_a_machine_without_the_seccomp_filter_says_so_in_each_result(monkeypatch):
    monkeypatch.setattr(boundary, "seccomp_filter", lambda machine=None: None)
    boundary.probe.cache_clear()
    try:
        r = boundary_alone(SYSV_IPC)
    finally:
        boundary.probe.cache_clear()
    made = ast.literal_eval(r.detail.removeprefix("ValueError: made "))
    assert made[0][0] >= 0, r  # a segment was made: the gap is real, and named
    assert "System V shared memory not capped: no seccomp filter for" in r.sandbox, r


@needs_boundary
@pytest.mark.parametrize("prepared", [True, False], ids=["prepared-userns", "plain"])
def test_what_an_old_bubblewrap_leaves_open_is_named_in_each_result(
    tmp_path, monkeypatch, prepared
):
    """bwrap without --disable-userns (before 0.8), and, as root, with or without the user
    namespace prepared for nobody: the description says what the candidate can do."""
    if prepared and os.geteuid() == 0 and FOUND.userns_fd is None:
        pytest.skip(f"this machine refuses the prepared user namespace: {FOUND.description}")
    real, old = shutil.which("bwrap"), tmp_path / "bwrap"
    old.write_text(
        f'#!/bin/sh\nif [ "$1" = --help ]; then {real} --help 2>&1 | '
        f'grep -v -e disable-userns -e userns-disabled; exit 0; fi\nexec {real} "$@"\n'
    )
    old.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    if not prepared:
        monkeypatch.setattr(boundary, "_prepared_userns", _refused)
    boundary.probe.cache_clear()
    boundary._bwrap_options.cache_clear()
    try:
        r = boundary_alone(NESTED_USERNS)
    finally:
        boundary.probe.cache_clear()
        boundary._bwrap_options.cache_clear()
    assert r.detail in ("ValueError: unshare 0", "ValueError: unshare -1"), r
    said = "nested user namespaces allowed: bwrap older than 0.8" in r.sandbox
    assert said == (r.detail == "ValueError: unshare 0"), r
    uncapped = os.geteuid() == 0 and not prepared  # the kernel exempts root from RLIMIT_NPROC
    assert ("new processes not capped" in r.sandbox) == uncapped, r


def _refused():
    raise OSError("could not prepare a user namespace: refused")


def test_the_network_is_refused(kind):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        program = fn(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        results = [check(program, kind)] + ([boundary_alone(program)] if kind == "boundary" else [])
        assert not any(r.passed for r in results), results
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody came


# --- limits ------------------------------------------------------------------------------------


def test_the_cpu_limit_stops_a_loop(kind):
    r = check(fn("while True:\n    pass"), kind, limits=Limits(timeout_s=10.0, cpu_s=1))
    assert r.status == "timeout" and "CPU" in r.detail and r.seconds < 8, r


@pytest.mark.parametrize(
    "handler, body",
    [
        ("signal.SIG_IGN", "while True:\n    pass"),  # the hard limit kills it a second later
        ("lambda *a: 1 / 0", "while True:\n    pass"),  # it answers with the handler's error
        ("signal.SIG_IGN", "import time\nwhile time.process_time() < 1.4:\n    pass"),  # late
    ],
)
def test_a_program_that_ignores_or_handles_sigxcpu_still_runs_out_of_time(kind, handler, body):
    program = f"import signal\nsignal.signal(signal.SIGXCPU, {handler})\n" + fn(body)
    r = check(program, kind, limits=Limits(timeout_s=10.0, cpu_s=1))
    assert (r.status, r.detail) == ("timeout", "time limit (1 s CPU)"), r


def test_the_wall_clock_limit_stops_a_sleep(kind):
    r = check(fn("import time\ntime.sleep(60)"), kind, limits=Limits(timeout_s=1.0, cpu_s=5))
    assert r.status == "timeout" and "wall" in r.detail and r.seconds < 8, r


def test_memory_and_output_are_capped(kind):
    r = check(
        fn("hog = []\nwhile True:\n    hog.append(bytes(64 << 20))"),
        kind,
        limits=Limits(timeout_s=10.0, cpu_s=5, memory_bytes=512 << 20),
    )
    assert r.status == "failed" and "MemoryError" in r.detail, r
    r = check(
        fn("while True:\n    print('x' * 1000)"),
        kind,
        limits=Limits(timeout_s=10.0, file_bytes=1 << 16),
    )
    assert not r.passed and "file size limit" in r.detail, r


@pytest.mark.parametrize(
    "program",
    [
        "import os\nos.system('touch {marker}')",
        "import subprocess\nsubprocess.run(['touch', '{marker}'])",
        "import os\nif os.fork() == 0:\n    open('{marker}', 'w')",
        "import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        "import ctypes",
        # the spawning primitive under another name, or made afresh
        (
            "import importlib.util as u, importlib.machinery as m, _imp\n"
            "spec = u.find_spec('_posixsubprocess')\n"
            "if spec.origin.endswith('.so'):\n"
            "    u.module_from_spec(u.spec_from_file_location('x._posixsubprocess', spec.origin))\n"
            "else:\n"
            "    _imp.create_builtin(m.ModuleSpec('_posixsubprocess', m.BuiltinImporter))"
        ),
        # native code it wrote itself (here a copy of one of Python's own extensions)
        (
            "import glob, os, shutil, sys, importlib.util as u\n"
            "so = [p for p in glob.glob(sys.prefix + '/lib/python3*/lib-dynload/*.so')\n"
            "      if os.path.basename(p).split('.')[0] in ('_bisect', '_json', 'array', 'math')][0]\n"
            "shutil.copy(so, 'mine.so')\n"
            "u.module_from_spec(u.spec_from_file_location(os.path.basename(so).split('.')[0],"
            " 'mine.so'))"
        ),
    ],
)
def test_the_tripwire_refuses_spawning_raising_limits_and_native_code(kind, tmp_path, program):
    marker = tmp_path / "spawned"
    r = check(fn(program.format(marker=marker)), kind)
    assert not r.passed and ("PermissionError" in r.detail or "create_builtin" in r.detail), r
    assert not marker.exists()


# --- choosing the sandbox ----------------------------------------------------------------------


def test_the_kind_is_chosen_by_argument_or_environment(monkeypatch, capsys):
    monkeypatch.setenv("LOOPTUNE_SANDBOX", "tripwire")
    assert sandbox_kind() == "tripwire"
    with pytest.raises(LooptuneError, match="^sandbox must be one of"):
        sandbox_kind("chroot")
    monkeypatch.setenv("LOOPTUNE_SANDBOX", "chroot")
    with pytest.raises(LooptuneError, match="^LOOPTUNE_SANDBOX must be one of"):
        sandbox_kind()
    monkeypatch.delenv("LOOPTUNE_SANDBOX")
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap: auto falls back, once, loudly
    boundary.probe.cache_clear()
    sandbox._warn_tripwire.cache_clear()
    try:
        with pytest.raises(LooptuneError, match="not available here"):
            sandbox_kind("boundary")
        assert sandbox_kind("auto") == sandbox_kind("auto") == "tripwire"
        assert capsys.readouterr().err.count("tripwire only") == 1
    finally:
        boundary.probe.cache_clear()


def test_a_test_runner_that_cannot_start_is_an_error_not_a_failed_check(monkeypatch):
    source = sandbox._source
    monkeypatch.setattr(
        sandbox, "_source", lambda part: "raise SystemExit(3)" if part == "runner" else source(part)
    )
    with pytest.raises(LooptuneError, match="test runner exited at its start"):
        check(fn(""), "tripwire")


def test_a_candidate_the_sandbox_could_not_start_is_an_error_not_a_failed_check(kind, monkeypatch):
    # as bwrap says when the machine refuses its namespaces: no completion ran, so recording a
    # failure would score the model for the machine; a program that exits at once still fails
    source = sandbox._source
    monkeypatch.setattr(
        sandbox,
        "_source",
        lambda part: (
            "import sys\nsys.stderr.write('bwrap: Creating new namespace failed\\n')\nsys.exit(1)"
            if part == "candidate"
            else source(part)
        ),
    )
    with pytest.raises(LooptuneError, match="could not start the candidate.*namespace failed$"):
        check(fn(""), kind)
    monkeypatch.setattr(sandbox, "_source", source)
    r = check("import sys\nsys.stderr.write('bwrap: forged\\n')\nimport os\nos._exit(1)\n", kind)
    assert r.status == "failed" and r.detail == "the candidate's process ended before answering"


@needs_boundary
def test_bubblewrap_gone_after_the_probe_is_an_error_not_a_failed_check(monkeypatch):
    monkeypatch.setattr(boundary.Boundary, "argv", lambda self, disk_bytes: ["/gone/bwrap"])
    with pytest.raises(LooptuneError, match=r"could not start the candidate's process \(/gone"):
        check(fn(""), "boundary")


# --- HumanEval ---------------------------------------------------------------------------------


def test_stop_sequences():
    assert truncate_at_stop("    return x\n\ndef other():\n") == "    return x\n"
    assert truncate_at_stop("    return x\n# test\n") == "    return x"
    assert truncate_at_stop("    return 1") == "    return 1"


def test_canonical_solutions_pass_and_wrong_ones_fail(kind):
    problems = load_set("humaneval").items
    sample = problems[::16] + [p for p in problems if p.id in ("HumanEval/32", "HumanEval/38")]
    results = run_tests(sample, [p.text for p in sample], sandbox=kind)
    assert [(p.id, r.detail) for p, r in zip(sample, results) if not r.passed] == []
    assert {r.sandbox.split(" (")[0] for r in results} == {kind}
    assert not run_test(problems[0], "    return None\n", sandbox=kind).passed


@pytest.mark.slow
def test_all_canonical_solutions_pass(kind):
    problems = load_set("humaneval").items
    results = run_tests(problems, [p.text for p in problems], sandbox=kind)
    assert [(p.id, r.detail) for p, r in zip(problems, results) if not r.passed] == []


# --- Ctrl-C ------------------------------------------------------------------------------------

LOOPS_FOR_EVER = "def f():\n    while True:\n        pass\n"


def _candidates_left(memory_bytes: int) -> list[int]:
    """The candidate processes still running with this (unusual) memory limit in their argv."""
    mark = f'"memory_bytes": {memory_bytes},'.encode()
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if mark in f.read():
                    left.append(int(pid))
        except OSError:  # gone
            pass
    return left


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_ends_the_checks_under_way_and_their_candidates(kind, workers):
    """At once, not when the checks would have timed out, and no candidate is left to burn its
    CPU limit (a timeout far longer than the test's)."""
    import signal
    import threading
    import time

    from looptune.quality.sets import Item

    memory = (1 << 30) + 4096 * (secrets.randbelow(1 << 20) + 1)
    limits = Limits(timeout_s=60.0, cpu_s=60, memory_bytes=memory)
    items = [Item(f"loop{i}", "", "", RETURNS_ONE, "f") for i in range(workers)]
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_tests(items, [LOOPS_FOR_EVER] * workers, limits, workers=workers, sandbox=kind)
    assert time.monotonic() - start < 30  # the checks' own limits are 60 s
    time.sleep(0.2)  # a SIGKILL is delivered at once, but its process may take a moment to go
    assert _candidates_left(memory) == []

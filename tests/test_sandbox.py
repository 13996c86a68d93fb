"""The sandbox that runs generated code: it stops what it must, the parent survives each, and
the HumanEval canonical solutions pass through it."""

import os
import time

import pytest

from looptune.quality.humaneval import check_program, run_tests, truncate_at_stop
from looptune.quality.sandbox import Limits, run_python
from looptune.quality.sets import load_set

FAST = Limits(timeout_s=5.0, cpu_s=3)


def test_a_plain_program_passes_and_may_use_its_own_directory():
    r = run_python("import os, tempfile\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\n"
                   "os.rename('a.txt', 'd/b.txt')\nos.remove('d/b.txt')\n"
                   "tempfile.NamedTemporaryFile().write(b'x')\nprint(sorted(os.environ))\n", FAST)
    assert r.passed, r.output
    assert "['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']" in r.output


def test_failures_and_exit_are_not_passes():
    assert run_python("assert 1 == 2", FAST).detail == "AssertionError"
    r = run_python("import sys\nsys.exit(0)", FAST)  # leaving before the tests ran
    assert not r.passed and "SystemExit" in r.detail


def test_infinite_loop_is_stopped():
    start = time.monotonic()
    r = run_python("while True:\n    pass\n", Limits(timeout_s=2.0, cpu_s=1))
    assert r.status == "timeout"
    assert time.monotonic() - start < 10
    r = run_python("import time\ntime.sleep(60)\n", Limits(timeout_s=1.0, cpu_s=5))
    assert r.status == "timeout" and "wall" in r.detail


def test_memory_bomb_is_stopped():
    r = run_python("hog = []\nwhile True:\n    hog.append(bytes(64 << 20))\n",
                   Limits(timeout_s=10.0, cpu_s=5, memory_bytes=512 << 20))
    assert r.status == "failed" and "MemoryError" in r.detail


@pytest.mark.parametrize("program", [
    "open({target!r}, 'w').write('x')",
    "import os\nos.chdir('/')\nopen({target!r}, 'w')",
    "open('../' * 12 + {target!r}.lstrip('/'), 'w').write('x')",
    "import pathlib\npathlib.Path({target!r}).write_text('x')",
    "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')",
    "import os\nfd = os.open({dir!r}, os.O_RDONLY)\n"
    "os.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    "import shutil\nshutil.copy('/etc/hostname', {target!r})",
])
def test_writes_outside_its_directory_are_refused(tmp_path, program):
    target = tmp_path / "escaped.txt"
    src = program.format(target=str(target), dir=str(tmp_path), name=target.name)
    r = run_python(src, FAST)
    assert not r.passed and "PermissionError" in r.output, r.output
    assert not target.exists()


@pytest.mark.parametrize("program", [
    "import os\nos.system('touch {marker}')",
    "import subprocess\nsubprocess.run(['touch', '{marker}'])",
    "import os\nif os.fork() == 0:\n    open('{marker}', 'w')",
    "import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
])
def test_process_spawning_is_refused_and_the_parent_survives(tmp_path, program):
    marker = tmp_path / "spawned"
    r = run_python(program.format(marker=marker), FAST)
    assert not r.passed and "PermissionError" in r.output, r.output
    assert not marker.exists()
    assert os.getpid() > 0  # still here


def test_raising_limits_sockets_and_ctypes_are_refused():
    for src in ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
                "import socket\nsocket.socket()", "import ctypes"):
        r = run_python(src, FAST)
        assert not r.passed and "PermissionError" in r.output


def test_output_flood_is_capped():
    r = run_python("while True:\n    print('x' * 1000)\n", Limits(timeout_s=10.0, file_bytes=1 << 16))
    assert not r.passed and "file size limit" in r.detail


def test_stop_sequences():
    assert truncate_at_stop("    return x\n\ndef other():\n") == "    return x\n"
    assert truncate_at_stop("    return x\n# test\n") == "    return x"
    assert truncate_at_stop("    return 1") == "    return 1"


def test_canonical_solutions_pass_and_a_wrong_one_fails():
    problems = load_set("humaneval").items
    results = run_tests(problems, [p.text for p in problems], workers=2)
    failed = [(p.id, r.detail) for p, r in zip(problems, results) if not r.passed]
    assert not failed
    wrong = run_python(check_program(problems[0], "    return None\n"), FAST)
    assert not wrong.passed

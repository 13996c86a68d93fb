"""Ctrl-C and SIGTERM: one line, exit 130, nothing interrupted kept (a real `looptune profile`
in a subprocess, signalled while it measures), and the same ending for every command."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from looptune.cli import app
from looptune.errors import LooptuneError
from looptune.model.checkpoint import init_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("interrupts") / "tiny"
    init_checkpoint(path, "tiny", loops=2, device="cpu")
    return path


def _start_profile(ckpt, tmp_path, name):
    env = {
        **os.environ,
        "LOOPTUNE_CACHE_DIR": str(tmp_path / f"cache-{name}"),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "looptune",
        "profile",
        str(ckpt),
        "--loops",
        "1,2",
        "--mode",
        "plt",
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--min-repeats",
        "3",
        "--min-time",
        "600",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--json",
        "--out",
        str(tmp_path / f"{name}.json"),
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    lines, measuring = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if ": run " in line:
                measuring.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, measuring, reader


@pytest.mark.parametrize(
    "names",
    [
        ["SIGINT"],  # one process in the default run: starting torch takes seconds here
        pytest.param(["SIGTERM", "SIGINT"], marks=pytest.mark.slow),
    ],
)
def test_a_signal_ends_profile_with_one_line_and_130(ckpt, tmp_path, names):
    runs = {name: _start_profile(ckpt, tmp_path, name) for name in names}
    for name, (proc, lines, measuring, _) in runs.items():
        assert measuring.wait(120), lines  # a timed run has finished: mid-measurement now
        proc.send_signal(getattr(signal, name))
    for name, (proc, lines, _, reader) in runs.items():
        proc.wait(60)
        reader.join(10)  # stderr to its end
        stdout = proc.stdout.read()
        assert proc.returncode == 130, (name, lines)
        assert stdout == ""  # no JSON document of an interrupted measurement
        assert lines[-1] == (
            "interrupted: 0 of 2 candidates were finished and cached; a rerun measures the rest"
        ), lines
        assert not any("Traceback" in line for line in lines)
        assert not (tmp_path / f"{name}.json").exists()
        assert not list((tmp_path / f"cache-{name}").glob("profile/*"))  # nothing cached
        assert not [p for p in tmp_path.rglob("*.tmp")]


@pytest.mark.parametrize(
    "command, target",
    [
        (["profile"], "looptune.bundled.resolve_checkpoints"),
        (["score"], "looptune.bundled.resolve_checkpoints"),
        (["pareto", "--budget-ms", "5"], "looptune.bundled.resolve_checkpoints"),
        (["diagnose"], "looptune.diagnose.diagnose"),
    ],
)
def test_every_command_ends_an_interrupt_the_same_way(monkeypatch, command, target):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    result = runner.invoke(app, command)
    assert result.exit_code == 130, result.output
    assert result.stderr == "interrupted\n" and result.stdout == ""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_sigterm_is_a_keyboard_interrupt_only_while_a_command_runs(monkeypatch):
    seen = []

    def handler_now(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (the main) thread
        time.sleep(5)  # interrupted long before this ends
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr("looptune.bundled.resolve_checkpoints", handler_now)
    before = signal.getsignal(signal.SIGTERM)
    result = runner.invoke(app, ["profile"])
    assert result.exit_code == 130 and result.stderr == "interrupted\n"
    assert seen[0] is not before and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("made", [ValueError, LooptuneError])
def test_an_interrupt_a_library_made_an_error_of_its_own_is_still_the_interrupt(monkeypatch, made):
    """safetensors' get_tensor, interrupted in the torch code it calls, raises a ValueError;
    looptune's reading of it then says the file is corrupt."""

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted long before this ends
        except KeyboardInterrupt:
            raise made("could not determine the shape of object type") from None
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr("looptune.bundled.resolve_checkpoints", swallowing)
    result = runner.invoke(app, ["score"])
    assert (result.exit_code, result.stderr, result.stdout) == (130, "interrupted\n", "")


STARTING = """
import os, signal, sys
import typer.main

class InterruptOn:  # Ctrl-C as the command's modules load, before any of its code runs
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            os.kill(os.getpid(), signal.{signal})
        return None

def get_group(*args, build=typer.main.get_group):  # or as typer builds the command
    if {module!r} == "typer's command":
        os.kill(os.getpid(), signal.{signal})
    return build(*args)

sys.meta_path.insert(0, InterruptOn())
typer.main.get_group = get_group
sys.argv = ["looptune", "info", "--help"]
from looptune.cli import main
main()
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("module", ["rich.table", "looptune.cli.pareto", "typer's command"])
def test_an_interrupt_while_the_command_loads_is_one_line_and_130(sig, module):
    code = STARTING.format(module=module, signal=sig)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "interrupted\n", "")


def test_an_interrupt_while_the_arguments_are_parsed_is_one_line_and_130(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("typer.core.TyperGroup.parse_args", interrupted)
    result = runner.invoke(app, ["profile", "--loops", "1"])
    assert result.exit_code == 130 and result.stderr == "interrupted\n"


ENDING = """
import atexit, os, signal, sys, time
import typer
from looptune.cli import app, main
from looptune.cli.app import emit_json


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(2)  # interrupted long before this ends, or not at all


class CtrlCWhenFreed:
    def __del__(self):
        ctrl_c()


@app.command()
def done(ctx: typer.Context):
    emit_json({{"done": True}})
    {point}


sys.argv = ["looptune", "done"]
main()
"""
AT_THE_END = {  # where, after the command's work, the Ctrl-C comes
    "its output": "ctrl_c()",
    "typer's ending": "ctx.find_root().call_on_close(ctrl_c)",
    "an exit function": "atexit.register(ctrl_c)",  # as torch's are
    # in the interpreter's teardown, where Python has handed SIGINT back to the kernel
    "the teardown": "sys.modules['looptune'].freed_last = CtrlCWhenFreed()",
}


@pytest.mark.parametrize("point", list(AT_THE_END))
def test_an_interrupt_after_the_command_is_one_line_and_130(point):
    code = ENDING.format(point=AT_THE_END[point])
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert json.loads(proc.stdout) == {"done": True}  # written whole before the Ctrl-C
    if point == "the teardown":  # never reached: the process ends before it, as it was
        assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    else:
        assert (proc.returncode, proc.stderr) == (130, "interrupted\n"), proc.stderr


OUTPUT = """
import resource, signal, sys
from looptune.cli import app, main
from looptune.cli.app import emit_json


@app.command()
def done(size: int):
    emit_json({{"x": "a" * size}})


if {no_room}:  # every write to a file fails, as on a full disk or /dev/full (EFBIG, ENOSPC)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
sys.argv = ["looptune", *{argv!r}]
main()
"""


def _output(argv, stdout, no_room=False):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a user runs it
    return subprocess.Popen(
        [sys.executable, "-c", OUTPUT.format(argv=argv, no_room=no_room)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


# a document stdout's buffer holds to the exit, one written within the command, typer's help
@pytest.mark.parametrize("argv", [["done", "10"], ["done", "100000"], ["--help"]])
def test_a_stdout_that_takes_no_more_is_one_line_and_2(tmp_path, argv):
    with open(tmp_path / "out", "wb") as out:
        proc = _output(argv, out, no_room=True)
        _, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stderr) == (
        2,
        "error: the output could not be written to stdout: File too large\n",
    )  # was exit 0 and not a word, or a traceback


def test_a_reader_that_is_gone_ends_it_quietly_as_sigpipe_would():  # `looptune ... | head -c 10`
    proc = _output(["done", "1000000"], subprocess.PIPE)
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stderr) == (128 + signal.SIGPIPE, "")

"""`looptune pareto` with real measurements on tiny checkpoints: one end-to-end subprocess run,
the rest in-process through typer's CliRunner (the same command, without the interpreter start).
"""

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from looptune.cli import app
from looptune.errors import LooptuneError
from looptune.model.checkpoint import init_checkpoint

FAST = [
    "--limit",
    "2",
    "--prompt-len",
    "8",
    "--gen-len",
    "4",
    "--min-time",
    "0.01",
    "--repeats",
    "2",
    "--windows",
    "8",
]
runner = CliRunner()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    for r in (1, 2):
        init_checkpoint(root / f"plt-r{r}", "tiny", loops=r, seed=r)
    return root


def pareto(family, tmp_path, *args, loops="1,2", members=("plt-r1", "plt-r2")):
    """`looptune pareto` in-process; returns the CliRunner result."""
    argv = [
        "pareto",
        *(str(family / m) for m in members),
        "--loops",
        loops,
        "--out",
        str(tmp_path / "p.yaml"),
        *FAST,
        *args,
    ]
    return runner.invoke(app, argv)


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_pareto_end_to_end_writes_profile_plot_and_progress(family, tmp_path):
    args = [
        sys.executable,
        "-m",
        "looptune",
        "pareto",
        str(family / "plt-r2"),
        "--budget-ms",
        "1000",
        "--loops",
        "1,2",
        "--out",
        str(tmp_path / "p.yaml"),
        "--plot",
        str(tmp_path / "front.png"),
        "--json",
        *FAST,
    ]
    proc = subprocess.run(
        args, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["grid_size"] == 2 and len(doc["outcomes"]) == 2
    assert doc["measurements"] == {"latency": 2, "quality_passes": 1}  # one pass scores each R
    best = doc["recommendation"]
    assert best["quality"] == min(o["quality"] for o in doc["outcomes"])
    profile = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert profile["knobs"]["loops"] == best["knobs"]["loops"]
    assert profile["study"]["storage"] == f"sqlite:///{tmp_path / 'p.db'}"
    assert profile["command"].startswith("looptune pareto ")
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    trial_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("trial ")]
    assert len(trial_lines) == 2 and trial_lines[-1].endswith("(2/2)")  # progress, not a tty


def test_rerun_measures_nothing_and_other_budgets_re_choose(family, tmp_path):
    first = pareto(family, tmp_path, "--budget-ms", "1000", "--json", loops="1")
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)
    latencies = sorted(o["latency_ms"] for o in doc["outcomes"])
    budget = (latencies[0] + latencies[1]) / 2  # only the fastest setting fits
    again = pareto(family, tmp_path, "--budget-ms", f"{budget:.6f}", "--json", loops="1")
    assert again.exit_code == 0, again.stderr
    tight = json.loads(again.stdout)
    assert tight["measurements"] == {"latency": 0, "quality_passes": 0}
    assert tight["study"] == doc["study"]
    assert tight["recommendation"]["latency_ms"] == latencies[0]
    assert [o["latency_ms"] for o in tight["pareto_set"]] == [latencies[0]]
    profile = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert profile["budgets"]["latency_ms"] == pytest.approx(budget)
    assert [o["latency_ms"] for o in profile["pareto_set"]] == [latencies[0]]


def test_changed_workload_is_a_new_study_or_a_one_line_error(family, tmp_path):
    first = pareto(
        family,
        tmp_path,
        "--budget-ms",
        "1000",
        "--json",
        "--study",
        "fixed",
        loops="1",
        members=("plt-r1",),
    )
    assert first.exit_code == 0, first.stderr
    refused = pareto(
        family,
        tmp_path,
        "--budget-ms",
        "1000",
        "--study",
        "fixed",
        "--set",
        "humaneval-nll",
        loops="1",
        members=("plt-r1",),
    )
    assert refused.exit_code == 2
    assert last_line(refused).startswith(
        "error: study 'fixed' was measured for another "
        "question (quality_set 'code' -> 'humaneval-nll')"
    )
    assert "Traceback" not in refused.stderr
    other = pareto(
        family,
        tmp_path,
        "--budget-ms",
        "1000",
        "--json",
        "--set",
        "humaneval-nll",
        loops="1",
        members=("plt-r1",),
    )
    assert other.exit_code == 0, other.stderr
    doc = json.loads(other.stdout)
    assert doc["study"] != "fixed" and doc["measurements"]["quality_passes"] == 1
    profile = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert profile["objectives"]["quality"]["set"] == "humaneval-nll"
    assert profile["objectives"]["quality"]["value"] == doc["recommendation"]["quality"]


def test_fresh_measures_again(family, tmp_path):
    one = {"loops": "1", "members": ("plt-r1",)}
    assert pareto(family, tmp_path, "--budget-ms", "1000", **one).exit_code == 0
    fresh = pareto(family, tmp_path, "--budget-ms", "1000", "--json", "--fresh", **one)
    assert fresh.exit_code == 0, fresh.stderr
    assert json.loads(fresh.stdout)["measurements"] == {"latency": 1, "quality_passes": 1}


def test_a_corrupt_score_entry_is_scored_again_and_the_pass_counted(family, tmp_path):
    one = {"loops": "1", "members": ("plt-r2",)}  # R=1 of a member trained at R=2

    def measured(out):
        result = pareto(family, tmp_path, "--budget-ms", "1000", "--json", "--out", out, **one)
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)["measurements"], result.stderr

    assert measured(str(tmp_path / "a.yaml"))[0] == {"latency": 1, "quality_passes": 1}
    # The pass also scores the trained R=2, as the reference of R=1: corrupt that entry.
    cache = Path(os.environ["LOOPTUNE_CACHE_DIR"]) / "score"
    entries = {json.loads(f.read_text())["key"]["loops"]: f for f in cache.glob("*.json")}
    assert sorted(entries) == [1, 2]
    entries[2].write_text('{"schema": 1, "key": {')
    # A new study (another --out) takes its numbers from the caches: R=1's is intact, the
    # reference's is not, so the model runs again, and the summary says so.
    again, stderr = measured(str(tmp_path / "b.yaml"))
    assert f"ignoring score cache entry {entries[2]}" in stderr
    assert again == {"latency": 0, "quality_passes": 1}
    assert measured(str(tmp_path / "c.yaml"))[0] == {"latency": 0, "quality_passes": 0}


def test_export_force_says_it_cannot_write_past_a_malformed_profile(family, tmp_path):
    made = pareto(family, tmp_path, "--budget-ms", "1000", loops="1", members=("plt-r1",))
    assert made.exit_code == 0, made.stderr
    profile = tmp_path / "p.yaml"
    doc = yaml.safe_load(profile.read_text())
    doc["knobs"]["loops"] = 0  # edited by hand
    profile.write_text(yaml.safe_dump(doc))
    out = tmp_path / "served"
    forced = runner.invoke(
        app, ["export", str(profile), "--to", "vllm", "--out", str(out), "--force"]
    )
    assert forced.exit_code == 2 and not out.exists()
    assert forced.stderr.strip() == (
        f"error: {profile}: knobs.loops must be an integer >= 1, got 0 (--force writes past a "
        "changed model or an engine that cannot serve the setting, never past a profile it "
        "cannot read)"
    )
    shown = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "400"})
    assert "Never past a profile that cannot be read (a malformed knob)" in shown.output


def test_a_busy_machine_is_said_once_and_recorded_in_table_json_and_profile(
    family, tmp_path, monkeypatch
):
    """Every measurement flagged, run after run: one line says so (the second run, whose one
    re-measurement was flagged again, that the machine is still busy), the choice says it was
    measured under load, and the profile records it."""
    from looptune.measure.interference import Limits

    monkeypatch.setattr(Limits, "from_env", classmethod(lambda cls: cls(0.0, 0.0, 0.0, 0.0)))
    first = pareto(family, tmp_path, "--budget-ms", "1000", loops="1,2", members=("plt-r1",))
    assert first.exit_code == 0, first.stderr
    (said,) = [line for line in first.stderr.splitlines() if line.startswith("busy: ")]
    assert said.startswith("busy: 2 of 2 settings were measured while the machine was busy")
    (choice,) = [line for line in first.stderr.splitlines() if line.startswith("choice: ")]
    assert "ms/token (measured under load); profile written to" in choice
    again = pareto(
        family, tmp_path, "--budget-ms", "1000", "--json", loops="1,2", members=("plt-r1",)
    )
    (said,) = [line for line in again.stderr.splitlines() if line.startswith("busy: ")]
    assert said.startswith("busy: the machine is still busy (")
    doc = json.loads(again.stdout)
    assert doc["measurements"]["latency"] == 1  # one setting measured again, not both
    assert doc["recommendation"]["interference"]
    assert doc["measured_under_load"]["settings"] == 2 and doc["measured_under_load"]["still_busy"]
    profile = yaml.safe_load((tmp_path / "p.yaml").read_text())
    under_load = profile["study"]["measured_under_load"]
    assert under_load["choice"] == doc["recommendation"]["interference"]
    assert under_load["settings"] == under_load["of"] == 2


def test_nothing_fits_exits_3(family, tmp_path):
    result = pareto(family, tmp_path, "--budget-ms", "0.0001", loops="1", members=("plt-r1",))
    assert result.exit_code == 3, result.stderr
    last = last_line(result)
    assert last.startswith("error: no setting fits the budgets; nearest miss: plt-r1 R=1")
    assert "latency_ms over by" in last and not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget-ms", "0"], "--budget-ms must be a number > 0, got 0.0"),
        (["--budget-ms", "10", "--budget-kv-mib", "0"], "--budget-kv-mib must be a number > 0"),
        (["--budget-ms", "10", "--budget-ttft-ms", "-1"], "--budget-ttft-ms must be a number > 0"),
        (["--budget-ms", "10", "--plot", "front.jpg"], "--plot must end in .png or .html"),
        (["--budget-ms", "10", "--plot", "README.md/front.png"], "is a file, not a directory"),
        (["--budget-ms", "10", "--out", "README.md/p.yaml"], "is a file, not a directory"),
        (["--budget-ms", "10", "--out", "p.json"], "--out must end in .yaml or .yml"),
        (["--budget-ms", "10", "--loops", "0"], "--loops values must be integers >= 1"),
        (["--budget-ms", "10", "--metric", "p42"], "--metric must be from tpot-p50, tpot-p90"),
        (["--budget-ms", "10", "--storage", "nosuchdb://x"], "cannot open study storage"),
        (["--budget-ms", "10", "--storage", "sqlite:///README.md/s.db"], "cannot open study"),
        (["--budget-ms", "10", "--out", "README.md/sub/p.yaml"], "is a file, not a directory"),
        (["--budget-ms", "10", "--set", "humaneval"], "use --set humaneval-nll"),
    ],
)
def test_bad_arguments_are_one_line_before_any_work(family, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("in the way\n")
    result = runner.invoke(app, ["pareto", str(family / "plt-r1"), *FAST, *args])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    cache = os.environ["LOOPTUNE_CACHE_DIR"]
    assert not os.path.exists(os.path.join(cache, "profile"))  # nothing was measured


def test_a_plot_on_a_full_disk_is_one_line_and_the_profile_is_still_written(
    family, tmp_path, monkeypatch
):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("looptune.search.plot.atomic_write_bytes", full)
    plot = tmp_path / "front.png"
    result = pareto(family, tmp_path, "--budget-ms", "1000", "--plot", str(plot), "--json")
    assert result.exit_code == 2, result.stderr
    assert last_line(result) == (
        f"error: cannot write --plot {plot}: No space left on device "
        "(the study is kept: a rerun measures nothing)"
    )
    assert "Traceback" not in result.stderr and not plot.exists()
    doc = json.loads(result.stdout)  # the result is not lost
    assert doc["profile"] == str(tmp_path / "p.yaml")
    profile = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert profile["knobs"]["loops"] == doc["recommendation"]["knobs"]["loops"]


def test_ctrl_c_mid_measurement_is_one_line_130_and_records_no_result(family, tmp_path):
    db = tmp_path / "p.db"

    def interrupt_when_measuring():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with sqlite3.connect(db) as con:
                    running = con.execute("select count(*) from trials where state='RUNNING'")
                    if running.fetchone()[0]:
                        time.sleep(0.3)
                        os.kill(os.getpid(), signal.SIGINT)
                        return
            except sqlite3.Error:
                pass
            time.sleep(0.1)

    killer = threading.Thread(target=interrupt_when_measuring, daemon=True)
    killer.start()
    # A long stopping rule: the interrupt lands in the middle of the first measurement.
    result = runner.invoke(
        app,
        [
            "pareto",
            str(family / "plt-r1"),
            "--loops",
            "1",
            "--budget-ms",
            "1000",
            "--out",
            str(tmp_path / "p.yaml"),
            *FAST,
            "--min-time",
            "60",
        ],
    )
    killer.join(timeout=5)
    assert result.exit_code == 130, result.stderr
    assert last_line(result).startswith("interrupted") and "Traceback" not in result.stderr
    assert not (tmp_path / "p.yaml").exists()
    with sqlite3.connect(db) as con:
        states = dict(con.execute("select state, count(*) from trials group by state"))
    assert states.get("COMPLETE", 0) == 0 and states.get("FAIL") == 1


@pytest.mark.slow
def test_killed_run_resumes_without_losing_trials(family, tmp_path):
    args = [
        sys.executable,
        "-m",
        "looptune",
        "pareto",
        str(family / "plt-r1"),
        str(family / "plt-r2"),
        "--budget-ms",
        "1000",
        "--loops",
        "1,2,3",
        "--out",
        str(tmp_path / "p.yaml"),
        *FAST,
    ]
    proc = subprocess.Popen(
        args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    db = tmp_path / "p.db"
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if db.exists():
            try:
                with sqlite3.connect(db) as con:
                    done = con.execute(
                        "select count(*) from trials where state='COMPLETE'"
                    ).fetchone()[0]
            except sqlite3.Error:
                continue
            if done >= 2:
                break
    proc.kill()
    proc.wait()
    assert done >= 2
    with sqlite3.connect(db) as con:
        before = con.execute("select count(*) from trials where state='COMPLETE'").fetchone()[0]
    assert before < 6  # it was killed before the end
    rerun = subprocess.run(
        [*args, "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert rerun.returncode == 0, rerun.stderr
    doc = json.loads(rerun.stdout)
    assert len(doc["outcomes"]) == 6  # the whole grid, the finished trials kept
    assert doc["measurements"]["latency"] <= 6 - before + 1  # the killed one at most again


def test_compile_choice_reaches_the_study_and_a_bad_one_is_one_line(family, tmp_path, monkeypatch):
    """`--compile off|on|both` sets the compile knob's options (a GPU user keeps 30-40 s
    compiles of a 7B out of the study with `off`); anything else is one line, exit 2."""
    seen = []

    def stop(*args, **kwargs):
        seen.append(kwargs["compile_options"])
        raise LooptuneError("stopped here")

    monkeypatch.setattr("looptune.search.pareto.run_pareto", stop)
    for choice, options in (("off", [False]), ("on", [True]), ("both", [False, True])):
        result = pareto(family, tmp_path, "--budget-ms", "1000", "--compile", choice)
        assert result.exit_code == 2 and "stopped here" in result.stderr
        assert seen[-1] == options
    pareto(family, tmp_path, "--budget-ms", "1000")
    assert seen[-1] is None  # the device decides: both on a GPU, off on the CPU
    result = pareto(family, tmp_path, "--budget-ms", "1000", "--compile", "yes")
    assert result.exit_code == 2 and len(seen) == 4
    assert last_line(result) == "error: --compile must be one of off, on, both; got 'yes'"


@pytest.mark.slow  # two inductor compiles on the CPU
def test_compile_both_on_the_cpu_measures_each_setting_both_ways(family, tmp_path):
    result = pareto(
        family,
        tmp_path,
        "--budget-ms",
        "1000",
        "--compile",
        "both",
        "--json",
        loops="1",
        members=("plt-r2",),
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["grid_size"] == 2
    assert sorted(o["knobs"]["compile"] for o in doc["outcomes"]) == [False, True]

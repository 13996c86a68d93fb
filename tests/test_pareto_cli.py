"""`looptune pareto` end to end with real measurements on tiny checkpoints."""

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from looptune.model.checkpoint import init_checkpoint

FAST = ["--limit", "2", "--prompt-len", "16", "--gen-len", "4", "--min-time", "0.02",
        "--repeats", "2", "--windows", "8"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    for r in (1, 2):
        init_checkpoint(root / f"plt-r{r}", "tiny", loops=r, seed=r)
    return root


def looptune(*args, cwd, env=None, check=False):
    proc = subprocess.run([sys.executable, "-m", "looptune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_pareto_writes_a_profile_and_a_rerun_measures_nothing(family, tmp_path):
    args = ["pareto", str(family / "plt-r1"), str(family / "plt-r2"), "--budget-ms", "1000",
            "--loops", "1,2", "--out", str(tmp_path / "p.yaml"), "--json", *FAST]
    doc = json.loads(looptune(*args, cwd=tmp_path, check=True).stdout)
    assert doc["grid_size"] == 4 and len(doc["outcomes"]) == 4
    assert doc["measurements"] == {"latency": 4, "quality_passes": 2}
    best = doc["recommendation"]
    assert best["quality"] == min(o["quality"] for o in doc["outcomes"])
    profile = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert profile["knobs"]["loops"] == best["knobs"]["loops"]
    assert profile["study"]["storage"] == f"sqlite:///{tmp_path / 'p.db'}"
    again = json.loads(looptune(*args, cwd=tmp_path, check=True).stdout)
    assert again["measurements"] == {"latency": 0, "quality_passes": 0}
    assert again["recommendation"] == best


def test_nothing_fits_exits_3(family, tmp_path):
    proc = looptune("pareto", str(family / "plt-r1"), "--budget-ms", "0.0001", "--loops", "1",
                    "--out", str(tmp_path / "p.yaml"), *FAST, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no setting fits the budgets; nearest miss: plt-r1 R=1")
    assert "latency_ms over by" in last and not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("args,message", [
    (["--budget-ms", "10", "--loops", "0"], "--loops values must be integers >= 1"),
    (["--budget-ms", "10", "--metric", "p42"], "--metric must be from tpot-p50, tpot-p90"),
    (["--budget-ms", "10", "--storage", "nosuchdb://x"], "cannot open study storage"),
    (["--budget-ms", "10", "--plot", "front.gif"], "--plot must end in .png or .html"),
])
def test_bad_arguments_are_one_line(family, tmp_path, args, message):
    proc = looptune("pareto", str(family / "plt-r1"), *args, *FAST, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_killed_run_resumes_without_losing_trials(family, tmp_path):
    args = [sys.executable, "-m", "looptune", "pareto", str(family / "plt-r1"),
            str(family / "plt-r2"), "--budget-ms", "1000", "--loops", "1,2,3",
            "--out", str(tmp_path / "p.yaml"), *FAST]
    env = dict(os.environ)
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    db = tmp_path / "p.db"
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if db.exists():
            try:
                with sqlite3.connect(db) as con:
                    done = con.execute("select count(*) from trials where state='COMPLETE'").fetchone()[0]
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
    rerun = subprocess.run([*args, "--json"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    doc = json.loads(rerun.stdout)
    assert len(doc["outcomes"]) == 6  # the whole grid, the finished trials kept
    assert doc["measurements"]["latency"] <= 6 - before + 1  # the killed one at most again

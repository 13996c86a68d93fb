"""The study mechanics: the Pareto set, the choice, budgets, identity, interrupts and retries,
resume and shared workers.

These use a deterministic stand-in for the measurements (a function of the knobs) so that the
Optuna side is tested exactly; tests/test_pareto_cli.py runs the real measurements."""

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from search_synthetic import SMALL, SPACE, synthetic

from looptune.errors import Interrupted, LooptuneError
from looptune.search import storage, trials
from looptune.search.choice import (
    Budgets,
    Knobs,
    Outcome,
    choose,
    pareto_front,
    quality_latency_front,
)
from looptune.search.pareto import Workload, run_pareto
from looptune.search.study import POLL_S, Space, TrialReport, run_study
from looptune.search.trials import MAX_ATTEMPTS


@pytest.fixture
def db(tmp_path):
    """An SQLite study storage, in /dev/shm where there is one: commits there wait for no disk
    (a study in /tmp spends most of its time in fsync on a busy machine)."""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm)) if os.access(shm, os.W_OK) else tmp_path
    yield f"sqlite:///{root}/s.db"
    if root != tmp_path:
        shutil.rmtree(root, ignore_errors=True)


class Counting:
    """`synthetic`, counting calls; raises `fail(knobs)` when it returns an exception."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def __call__(self, knobs):
        self.calls.append(knobs)
        error = self.fail(knobs) if self.fail else None
        if error is not None:
            raise error
        return synthetic(knobs)


def optuna_front(outcomes):
    """Optuna's own non-dominated sort of the outcomes (an implementation apart from ours)."""
    study = optuna.create_study(directions=["minimize"] * 3)
    dists = {"i": optuna.distributions.IntDistribution(0, len(outcomes))}
    study.add_trials(
        [
            optuna.trial.create_trial(values=list(o.values), params={"i": i}, distributions=dists)
            for i, o in enumerate(outcomes)
        ]
    )
    return {outcomes[t.params["i"]].knobs for t in study.best_trials}


def test_pareto_front_known_answer():
    def o(name, q, lat, kv):
        return Outcome(Knobs(name, 1, 8, "float32"), q, (q, q), lat, (lat, lat), 1.0, kv)

    points = [
        o("best-quality", 1.0, 9.0, 900),
        o("fast", 3.0, 1.0, 900),
        o("small-kv", 4.0, 9.5, 100),
        o("middle", 2.0, 5.0, 900),
        o("beaten", 2.5, 6.0, 900),
        o("tie-worse-kv", 2.0, 5.0, 950),
    ]
    names = {p.knobs.checkpoint for p in pareto_front(points)}
    assert names == {"best-quality", "fast", "small-kv", "middle"}
    names2d = {p.knobs.checkpoint for p in quality_latency_front(points)}
    assert names2d == {"best-quality", "fast", "middle", "tie-worse-kv"}


def test_grid_study_front_matches_optunas_own(tmp_path):
    budgets = Budgets(latency_ms=1.9)
    record = run_study(SPACE, synthetic, 100, None, "grid")
    assert len(record.outcomes) == SPACE.size == 24  # the grid fits in 100 trials: covered whole
    feasible = [o for o in record.outcomes if budgets.fits(o)]
    assert 0 < len(feasible) < 24
    front = {o.knobs for o in pareto_front(feasible)}
    assert front == optuna_front(feasible)
    assert all(budgets.fits(o) for o in record.outcomes if o.knobs in front)


def test_choice_obeys_every_budget_and_breaks_ties():
    outs = [
        synthetic(Knobs(c, r, w, "float32"))
        for c in "ab"
        for r in (1, 2, 3, 4)
        for w in (8, 16, 32)
    ]
    for budgets in [Budgets(1.6), Budgets(1.9, kv_mib=0.1), Budgets(5.0, ttft_ms=15.0)]:
        best = choose(outs, budgets).best
        assert budgets.fits(best)
        fitting = [o for o in outs if budgets.fits(o)]
        assert best.quality == min(o.quality for o in fitting)
    tie_a = Outcome(Knobs("a", 1, 8, "float32"), 2.0, (2, 2), 1.5, (1, 2), 1.0, 500)
    tie_b = Outcome(Knobs("a", 2, 8, "float32"), 2.0, (2, 2), 1.2, (1, 2), 1.0, 900)
    tie_c = Outcome(Knobs("a", 3, 8, "float32"), 2.0, (2, 2), 1.2, (1, 2), 1.0, 700)
    assert choose([tie_a, tie_b, tie_c], Budgets(2.0)).best is tie_c


def test_nothing_fits_reports_the_nearest_miss():
    outs = [synthetic(Knobs("a", r, 8, "float32")) for r in (1, 2, 3, 4)]
    choice = choose(outs, Budgets(latency_ms=1.0))
    assert choice.best is None
    assert choice.nearest_miss.knobs.loops == 1
    assert choice.overshoot["latency_ms"] == pytest.approx(outs[0].latency_ms - 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"latency_ms": 0},
        {"latency_ms": -1.0},
        {"latency_ms": float("nan")},
        {"latency_ms": 5, "kv_mib": 0},
        {"latency_ms": 5, "ttft_ms": 0.0},
    ],
)
def test_budgets_must_be_positive(kwargs):
    with pytest.raises(LooptuneError, match="must be a number > 0"):
        Budgets(**kwargs)


def test_sampled_study_covers_every_loop_count_and_reports_plain_trials():
    space = Space(("a", "b"), (1, 2, 3, 4), (4, 8, 16, 32, 64), ("float32", "bfloat16"))
    assert space.size == 80
    reports = []
    record = run_study(space, synthetic, 12, None, "tpe", on_trial=reports.append)
    assert len(record.outcomes) == 12  # twelve distinct settings measured; repeats not counted
    assert {o.knobs.loops for o in record.outcomes} == {1, 2, 3, 4}  # the loop axis: exhaustive
    assert all(type(r) is TrialReport for r in reports)
    measured = [r for r in reports if r.state == "measured"]
    assert len(measured) == 12 and measured[-1].measured == measured[-1].target == 12


def test_rerun_resumes_and_measures_nothing_twice(db):
    evaluate = Counting()
    small = Space(("a",), (1, 2, 3, 4), (8, 16), ("float32",))
    run_study(small, evaluate, 100, db, "resume")
    assert len(evaluate.calls) == 8
    record = run_study(small, evaluate, 100, db, "resume")
    assert len(evaluate.calls) == 8 and record.trials == 8


def test_more_trials_later_measures_only_the_rest(db):
    evaluate = Counting()
    run_study(SMALL, evaluate, 3, db, "grow")  # sampled: 3 of 8
    first = set(evaluate.calls)
    record = run_study(SMALL, evaluate, 100, db, "grow")  # now the whole grid
    assert len(record.outcomes) == 8
    assert len(evaluate.calls) == 8 and not first & set(evaluate.calls[3:])


def test_interrupted_trial_is_not_a_result_and_a_rerun_measures_exactly_the_rest(db):
    evaluate = Counting(fail=lambda k: KeyboardInterrupt() if len(evaluate.calls) == 5 else None)
    with pytest.raises(Interrupted) as stop:  # not Optuna's TypeError, not swallowed
        run_study(SMALL, evaluate, 100, db, "ctrl-c")
    assert str(stop.value) == "4 of 8 settings measured and kept; a rerun measures the rest"
    interrupted = evaluate.calls[-1]
    study = optuna.load_study(study_name="ctrl-c", storage=db)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and interrupted not in {Knobs(**t.params) for t in complete}
    (failed,) = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed.user_attrs["failure"] == "interrupted"
    record = run_study(SMALL, evaluate, 100, db, "ctrl-c")
    assert len(record.outcomes) == 8 and not record.failed
    rerun = evaluate.calls[5:]
    assert len(rerun) == 4 and len(set(rerun)) == 4 and interrupted in rerun


def test_an_interrupt_is_no_attempt_however_often_a_setting_is_interrupted(db):
    """Ctrl-C during one setting, run after run: every rerun measures it again (never given up
    as failed), keeps what was measured, and the first uninterrupted run completes the grid."""
    bad, stop = Knobs("a", 2, 16, "float32"), [True]
    evaluate = Counting(fail=lambda k: KeyboardInterrupt() if k == bad and stop[0] else None)
    for run in range(1, MAX_ATTEMPTS + 2):
        with pytest.raises(Interrupted):
            run_study(SMALL, evaluate, 100, db, "ctrl-c-again")
        assert evaluate.calls.count(bad) == run
    assert len(set(evaluate.calls)) == 8  # the other seven were measured once, and kept
    stop[0] = False
    record = run_study(SMALL, evaluate, 100, db, "ctrl-c-again")
    assert len(record.outcomes) == 8 and not record.failed
    assert len(evaluate.calls) == 7 + MAX_ATTEMPTS + 2


def test_an_interrupt_a_library_turned_into_its_own_error_is_no_attempt_either(db):
    """safetensors' get_tensor, interrupted, raises a ValueError: the trial is still an
    interrupted one (it was a failure, and three such Ctrl-Cs gave the setting up)."""
    import signal

    bad = Knobs("a", 2, 16, "float32")

    def evaluate(knobs):
        if knobs == bad:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # interrupted long before this ends
            except KeyboardInterrupt:
                raise ValueError("could not determine the shape of object type") from None
        return synthetic(knobs)

    for _ in range(MAX_ATTEMPTS + 1):
        with pytest.raises(Interrupted):
            run_study(SMALL, evaluate, 100, db, "swallowed")
    study = optuna.load_study(study_name="swallowed", storage=db)
    failed = study.get_trials(states=[TrialState.FAIL])
    assert [t.user_attrs["failure"] for t in failed] == [trials.INTERRUPTED] * (MAX_ATTEMPTS + 1)
    (failure,) = trials.collect(study).failed
    assert (failure.knobs, failure.attempts, failure.gave_up) == (bad, 0, False)


def test_an_interrupt_while_the_trial_is_stored_is_no_attempt_either(db, monkeypatch):
    """Ctrl-C after the measurement, while Optuna writes the trial: it is failed as interrupted
    (not left running for the next run to take for a dead worker's, which counts)."""
    from optuna.storages import RDBStorage

    evaluate, tell = Counting(), RDBStorage.set_trial_state_values

    def interrupted_on_the_third(self, trial_id, state, values=None):
        if state == TrialState.COMPLETE and len(evaluate.calls) == 3:
            raise KeyboardInterrupt
        return tell(self, trial_id, state, values)

    with monkeypatch.context() as patch:
        patch.setattr(RDBStorage, "set_trial_state_values", interrupted_on_the_third)
        with pytest.raises(Interrupted):
            run_study(SMALL, evaluate, 100, db, "ctrl-c-tell")
    study = optuna.load_study(study_name="ctrl-c-tell", storage=db)
    (failed,) = study.get_trials(states=[TrialState.FAIL])
    assert failed.user_attrs["failure"] == trials.INTERRUPTED
    assert not study.get_trials(states=[TrialState.RUNNING])
    record = run_study(SMALL, evaluate, 100, db, "ctrl-c-tell")
    assert len(record.outcomes) == 8 and not record.failed and len(evaluate.calls) == 9


@pytest.mark.parametrize("where", ["identity", "plan"])
def test_an_interrupt_while_the_study_is_created_leaves_one_that_a_rerun_completes(
    db, monkeypatch, where
):
    """Ctrl-C right after the study was created, before its identity or amid its plan: the
    rerun takes it over (it said the study was not made by looptune, for good) and queues
    each missing setting once."""
    set_attr, enqueue, calls = optuna.Study.set_user_attr, optuna.Study.enqueue_trial, []

    def stop_once(real, wanted):
        def call(self, *args, **kwargs):
            calls.append(args[0])
            if wanted(args[0]) and calls.count(args[0]) == 1:
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        if where == "identity":
            patch.setattr(optuna.Study, "set_user_attr", stop_once(set_attr, "identity".__eq__))
        else:
            third = vars(SMALL.settings()[2])
            patch.setattr(optuna.Study, "enqueue_trial", stop_once(enqueue, third.__eq__))
        with pytest.raises(KeyboardInterrupt):
            run_study(SMALL, synthetic, 100, db, "created")
    monkeypatch.setattr("looptune.search.study.time.sleep", lambda s: None)
    record = run_study(SMALL, synthetic, 100, db, "created")
    assert len(record.outcomes) == 8 and record.trials == 8


@pytest.mark.parametrize("rerun", ["later", "at once"])
def test_a_plan_entry_left_by_a_worker_on_another_machine_is_queued_once_its_claim_is_old(
    db, monkeypatch, rerun
):
    """A worker on another machine (sharing the database) stopped amid its plan, between the
    claim of an entry and its queueing: whether it is gone is not known here, and its claim
    stood for good, so that setting was never measured and no run said so. A run once the
    claim is older than the heartbeat's grace measures it, and so does one that starts before
    (its plan before each trial finds the entry missing)."""
    third, enqueue, calls = vars(SMALL.settings()[2]), optuna.Study.enqueue_trial, []

    def stop_at_the_third(self, params, *args, **kwargs):
        if params == third:
            raise KeyboardInterrupt
        return enqueue(self, params, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trials, "MACHINE", "another machine")
        patch.setattr(optuna.Study, "enqueue_trial", stop_at_the_third)
        with pytest.raises(KeyboardInterrupt):
            run_study(SMALL, synthetic, 100, db, "left")

    def evaluate(knobs):  # the claim grows old while this run measures
        calls.append(knobs)
        if len(calls) == 4:
            monkeypatch.setattr(trials, "GRACE_S", -1)
        return synthetic(knobs)

    monkeypatch.setattr(trials, "GRACE_S", -1 if rerun == "later" else 3600)
    record = run_study(SMALL, evaluate, 100, db, "left")
    assert len(record.outcomes) == 8 and record.trials == 8


def test_a_sampled_study_of_an_earlier_version_is_resumed_without_a_second_plan(db, monkeypatch):
    """Earlier versions marked only a grid plan as made (and claimed nothing): their sampled
    study is not planned again (twelve more queued entries) when it is resumed."""
    space = Space(("a", "b"), (1, 2, 3, 4), (4, 8, 16, 32, 64), ("float32",))
    with monkeypatch.context() as patch:
        for module in ("study", "trials"):
            patch.setattr(f"looptune.search.{module}.claim", lambda *args: True)
        run_study(space, synthetic, 12, db, "earlier")
    study = optuna.load_study(study_name="earlier", storage=db)
    for key in ("planned", "instance"):  # as an earlier looptune left it
        study._storage.set_study_user_attr(study._study_id, key, None)
    record = run_study(space, synthetic, 12, db, "earlier")
    assert record.trials == 12 and not study.get_trials(states=[TrialState.WAITING])


def test_a_full_disk_under_the_study_is_one_line_and_a_rerun_resumes(db, monkeypatch):
    import sqlite3

    from optuna.storages import RDBStorage
    from sqlalchemy.exc import OperationalError

    evaluate, tell = Counting(), RDBStorage.set_trial_state_values

    def full_on_the_third(self, *args, **kwargs):
        if len(evaluate.calls) == 3:
            full = sqlite3.OperationalError("database or disk is full")
            raise OperationalError("UPDATE trials", {}, full)
        return tell(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(RDBStorage, "set_trial_state_values", full_on_the_third)
        with pytest.raises(LooptuneError) as stop:
            run_study(SMALL, evaluate, 100, db, "full")
    assert str(stop.value).startswith("the study storage failed")
    assert "database or disk is full" in str(stop.value)
    study = optuna.load_study(study_name="full", storage=db)
    (running,) = study.get_trials(states=[optuna.trial.TrialState.RUNNING])
    # The rerun, right away in this process, retries that trial without waiting for its
    # heartbeat to go stale (it would poll for 10 s, saying nothing).
    monkeypatch.setattr("looptune.search.study.time.sleep", never_wait)
    record = run_study(SMALL, evaluate, 100, db, "full")  # space again: the rest is measured
    assert len(record.outcomes) == 8 and len(evaluate.calls) == 9
    failed = study.get_trials(states=[optuna.trial.TrialState.FAIL])
    assert [t.number for t in failed] == [running.number]
    assert failed[0].user_attrs["failure"] == "its run stopped before it ended"


def damage(db, value_json):
    """Overwrite the stored outcome of the study's first trial, as a damaged disk would."""
    import sqlite3

    with sqlite3.connect(db.removeprefix("sqlite:///")) as con:
        con.execute(
            "update trial_user_attributes set value_json = ? where key = 'outcome' and trial_id"
            " = (select min(trial_id) from trial_user_attributes where key = 'outcome')",
            (value_json,),
        )


@pytest.mark.parametrize("stored", ['{"knobs": {"checkpoint": "a"}}', "null", '{"bad": 1}'])
def test_a_damaged_result_in_the_storage_is_measured_again_never_used(db, stored):
    evaluate = Counting()
    run_study(SMALL, evaluate, 100, db, "damaged")
    first = evaluate.calls[0]
    damage(db, stored)
    record = run_study(SMALL, evaluate, 100, db, "damaged")
    assert evaluate.calls[8:] == [first]  # measured again, the rest kept
    assert {o.knobs: o.values for o in record.outcomes} == {
        k: synthetic(k).values for k in SMALL.settings()
    }


def test_a_damaged_storage_is_one_line_saying_what_to_do(db, tmp_path):
    from looptune.search.storage import open_storage

    run_study(SMALL, synthetic, 100, db, "damaged")
    damage(db, "not json")
    with pytest.raises(LooptuneError, match="^the study storage is damaged: .* not JSON") as e:
        run_study(SMALL, synthetic, 100, db, "damaged")
    assert "\n" not in str(e.value) and "give another storage" in str(e.value)
    (tmp_path / "junk.db").write_bytes(b"this is not a database\n" * 100)
    with pytest.raises(LooptuneError, match="file is not a database.*the file is damaged"):
        open_storage(f"sqlite:///{tmp_path / 'junk.db'}")


def test_a_read_only_storage_is_one_line_that_a_rerun_would_not_mend(db):
    run_study(SMALL, synthetic, 100, db, "read-only")
    read_only = f"sqlite:///file:{db.removeprefix('sqlite:///')}?mode=ro&uri=true"
    with pytest.raises(LooptuneError) as e:
        run_study(SMALL, synthetic, 100, read_only, "read-only")
    assert str(e.value) == (
        "cannot write to the study storage: (sqlite3.OperationalError) attempt to write a "
        "readonly database; give a writable one"
    )


def run_python(script):
    """A worker in its own process (to be killed, or to crash), its output captured."""
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )


def never_wait(seconds):
    raise AssertionError(f"the study waited {seconds} s for another worker")


KILLED = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    from search_synthetic import SMALL, synthetic
    from looptune.search.study import run_study

    calls = []

    def evaluate(knobs):
        calls.append(knobs)
        if len(calls) == {nth}:
            print(json.dumps(vars(knobs)), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # as `kill -9`, the OOM killer, a lost shell
        return synthetic(knobs)

    run_study(SMALL, evaluate, 100, {url!r}, {name!r})
""")


def test_a_killed_workers_trial_is_retried_at_once_by_a_rerun_on_this_machine(db, monkeypatch):
    script = KILLED.format(tests=str(Path(__file__).parent), url=db, nth=3, name="killed")
    killed = run_python(script)
    assert killed.returncode == -9, killed.stderr
    lost = Knobs(**json.loads(killed.stdout))
    monkeypatch.setattr("looptune.search.study.time.sleep", never_wait)
    evaluate = Counting()
    record = run_study(SMALL, evaluate, 100, db, "killed")
    assert len(record.outcomes) == 8 and not record.failed
    assert len(evaluate.calls) == 6 and lost in evaluate.calls  # the two finished are kept
    study = optuna.load_study(study_name="killed", storage=db)
    (failed,) = study.get_trials(states=[optuna.trial.TrialState.FAIL])
    assert failed.params == vars(lost)
    assert failed.user_attrs["failure"].startswith("its worker (process ")


def test_a_worker_killed_alongside_another_has_its_trial_retried_at_once_by_it(db, monkeypatch):
    """Two workers on one storage, one killed mid-trial: the other fails that trial at once (not
    after a heartbeat wait), measures the setting and ends with the whole grid."""
    script = KILLED.format(tests=str(Path(__file__).parent), url=db, nth=1, name="pair")
    killed = []

    def evaluate(knobs):
        if not killed:  # the other worker joins while this one measures, and dies in its trial
            killed.append(run_python(script))
        return synthetic(knobs)

    sleep = time.sleep  # subprocess.run sleeps a few ms while it waits for the other worker

    def never_poll(seconds):
        if seconds >= POLL_S:
            never_wait(seconds)
        sleep(seconds)

    monkeypatch.setattr("looptune.search.study.time.sleep", never_poll)
    record = run_study(SMALL, evaluate, 100, db, "pair")
    (other,) = killed
    assert other.returncode == -9, other.stderr
    lost = Knobs(**json.loads(other.stdout))
    assert {o.knobs for o in record.outcomes} == set(SMALL.settings()) and not record.failed
    (failed,) = optuna.load_study(study_name="pair", storage=db).get_trials(
        states=[TrialState.FAIL]
    )
    assert Knobs(**failed.params) == lost
    assert failed.user_attrs["failure"].startswith("its worker (process ")


PLANNER = textwrap.dedent("""
    import sys, time
    import optuna
    from looptune.search import storage, trials

    read_state = trials.read_state

    def slow_read(study):  # a storage far away: the read and the write are 0.3 s apart
        state = read_state(study)
        time.sleep(0.3)
        return state

    trials.read_state = slow_read
    study = optuna.load_study(study_name=sys.argv[2], storage=sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()  # all three plan at once
    trials.fail_abandoned(study, heartbeat=True)
    trials.plan(study, None, 8, set())
""")


def test_plans_that_read_the_study_at_once_queue_a_retry_once(db, monkeypatch):
    """Three plans that all read the study before any of them queued (as workers that notice a
    failed trial together do): the retry is queued by one of them."""
    bad = Knobs("a", 2, 16, "float32")
    evaluate = Counting(fail=lambda k: RuntimeError("flaky") if k == bad else None)
    with pytest.raises(RuntimeError):
        run_study(SMALL, evaluate, 100, db, "at-once")
    study = optuna.load_study(study_name="at-once", storage=db)
    stale = trials.read_state(study)
    monkeypatch.setattr(trials, "read_state", lambda s: copy.deepcopy(stale))
    for _ in range(3):
        trials.plan(study, None, 8, set())
    waiting = study.get_trials(states=[TrialState.WAITING])
    assert [Knobs(**t.system_attrs["fixed_params"]) for t in waiting].count(bad) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_three_workers_queue_a_killed_workers_retry_exactly_once(db, kind):
    """Three live workers on one storage notice one killed worker's trial at the same moment:
    each fails it, plans, and the retry is queued once (the claim is the database's)."""
    db, name = storage_url(kind, db), f"three-{uuid.uuid4().hex[:8]}"
    script = KILLED.format(tests=str(Path(__file__).parent), url=db, nth=3, name=name)
    killed = run_python(script)
    assert killed.returncode == -9, killed.stderr
    lost = Knobs(**json.loads(killed.stdout))
    planners = [
        subprocess.Popen(
            [sys.executable, "-c", PLANNER, db, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    assert [p.stdout.readline() for p in planners] == ["ready\n"] * 3
    for p in planners:
        p.stdin.write("go\n")
        p.stdin.flush()
    assert [p.wait(timeout=120) for p in planners] == [0, 0, 0]
    study = optuna.load_study(study_name=name, storage=db)
    same = [t for t in study.get_trials() if Knobs(**t.system_attrs["fixed_params"]) == lost]
    assert sorted(t.state.name for t in same) == ["FAIL", "WAITING"]
    (retry,) = [t for t in same if t.state == TrialState.WAITING]
    assert retry.user_attrs["attempt"] == 2


@pytest.mark.parametrize(
    "claimer", ["gone", "alive", "gone, retried since", "gone, a sampler's repeat since"]
)
def test_a_retry_claimed_by_a_worker_that_died_before_queuing_it_is_queued_by_another(db, claimer):
    """The claim and the queueing are two writes: a worker killed between them leaves a claim
    and no retry, which the next plan takes over; a live claimer's is left to it, and so is a
    gone claimer's whose retry exists (a plan that read the study before it was queued)."""
    bad = Knobs("a", 2, 16, "float32")
    evaluate = Counting(fail=lambda k: RuntimeError("flaky") if k == bad else None)
    with pytest.raises(RuntimeError):
        run_study(SMALL, evaluate, 100, db, "orphan")
    study = optuna.load_study(study_name="orphan", storage=db)
    (failed,) = study.get_trials(states=[TrialState.FAIL])
    parent = os.getppid()
    pid, start = (parent, trials.started(parent)) if claimer == "alive" else (dead_pid(), 1)
    key = f"looptune:retry:{failed.number}"
    assert storage.claim(study, key, {"process": [trials.MACHINE, pid, start]})
    if claimer.startswith("gone, "):
        grid = {k: optuna.distributions.CategoricalDistribution(v) for k, v in SMALL.grid().items()}
        retried = optuna.trial.create_trial(  # the retry, failed already; or a repeat (no trial)
            state=TrialState.FAIL if "retried" in claimer else TrialState.PRUNED,
            params=vars(bad).copy(),
            distributions=grid,
            user_attrs={} if "retried" in claimer else {"repeat": True},
        )
        study.add_trial(retried)
    trials.enqueue_once(study, vars(bad).copy(), key.removeprefix("looptune:"), since=failed.number)
    waiting = study.get_trials(states=[TrialState.WAITING])
    retries = [t for t in waiting if Knobs(**t.system_attrs["fixed_params"]) == bad]
    assert len(retries) == (0 if claimer in ("alive", "gone, retried since") else 1)


def running_trial(db, process):
    """A study whose one trial is RUNNING, said to be run by `process` (as `mark_worker` says)."""
    study = optuna.create_study(storage=db, directions=["minimize"] * 3)
    study.ask().set_user_attr("process", process)
    return study


def state_after_plan(study):
    trials.fail_abandoned(study, heartbeat=True)
    (t,) = study.get_trials()
    return t.state, t.user_attrs.get("failure")


def test_a_worker_on_another_machine_of_the_same_hostname_is_left_to_its_heartbeat(db):
    """Containers on other hosts share hostnames (`localhost`) and small pids: a trial of theirs
    is never failed under a live worker because its pid does not run here."""
    me = trials.MACHINE
    assert me is not None and me.startswith(socket.gethostname() + "/")
    other = me.replace(
        Path("/proc/sys/kernel/random/boot_id").read_text().strip(), str(uuid.uuid4())
    )
    gone = dead_pid()
    for process in ([other, gone, 100], [other, *trials.this_process()], [other, 1, 1]):
        study = running_trial(db, process)
        assert state_after_plan(study) == (TrialState.RUNNING, None)


def test_without_a_machine_identity_no_worker_is_taken_for_gone(db, tmp_path, monkeypatch):
    """Without /proc a hostname alone would be the identity: every worker waits for heartbeats."""
    assert trials.machine_id(tmp_path) is None
    monkeypatch.setattr(trials, "MACHINE", None)
    study = running_trial(db, [None, dead_pid(), None])
    assert state_after_plan(study) == (TrialState.RUNNING, None)


def test_another_users_worker_hidden_from_proc_is_not_taken_for_gone(db, monkeypatch):
    """/proc mounted hidepid=2 hides other users' processes; a signal still finds them."""
    hidden = 2**22 - 7  # no such process here, as seen through a hidden /proc

    def kill(pid, sig):
        if pid == hidden:
            raise PermissionError(1, "Operation not permitted")
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(trials.os, "kill", kill)
    study = running_trial(db, [trials.MACHINE, hidden, 12345])
    assert state_after_plan(study) == (TrialState.RUNNING, None)
    study = running_trial(db, [trials.MACHINE, hidden + 1, 12345])
    assert state_after_plan(study)[0] == TrialState.FAIL


FORKED = textwrap.dedent("""
    import multiprocessing, sys, time
    import optuna
    from looptune.search import storage, trials

    def worker(url, ready):  # a pool's worker, forked: alive while its trial runs
        study = optuna.load_study(study_name="forked", storage=url)
        trials.mark_worker(study.ask(), "run")
        ready.set()
        time.sleep(60)

    if __name__ == "__main__":
        optuna.create_study(study_name="forked", storage=sys.argv[1], directions=["minimize"] * 3)
        fork = multiprocessing.get_context("fork")
        ready = fork.Event()
        child = fork.Process(target=worker, args=(sys.argv[1], ready))
        child.start()
        ready.wait(60)
        study = optuna.load_study(study_name="forked", storage=sys.argv[1])
        trials.fail_abandoned(study, heartbeat=True)  # as the parent's next plan
        print(study.get_trials()[0].state.name, flush=True)
        child.kill()
""")


def test_a_forked_worker_is_known_by_its_own_start_time_not_its_parents(db):
    """A worker forked by a process that imported looptune (a multiprocessing pool) records its
    own start time: another worker does not take it for a pid given to another process."""
    out = subprocess.run(
        [sys.executable, "-c", FORKED, db], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.stdout.strip() == "RUNNING", out.stderr


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("how", ["pid-reused", "zombie", "alive"])
def test_a_worker_here_is_gone_when_its_process_is_not_the_one_that_ran_the_trial(db, how):
    """A pid names a process only with its start time: a dead worker's pid given to another
    process (containers reuse small pids) or a killed worker its parent has not reaped yet is
    gone, and its trial is retried at once; a live worker's trial is left alone."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(0.3 if %r else 30)" % (how == "zombie")]
    )
    try:
        start = trials.started(child.pid)
        assert start is not None
        if how == "zombie":  # exited, not reaped (its parent, this test, has not waited)
            for _ in range(100):
                if trials.started(child.pid) is None:
                    break
                time.sleep(0.1)
        recorded = start - 1 if how == "pid-reused" else start
        study = running_trial(db, [trials.MACHINE, child.pid, recorded])
        state, failure = state_after_plan(study)
    finally:
        child.kill()
        child.wait()
    if how == "alive":
        assert (state, failure) == (TrialState.RUNNING, None)
    else:
        assert state == TrialState.FAIL
        assert failure == f"its worker (process {child.pid}) stopped before it ended"


CRASHING = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    from search_synthetic import SMALL, synthetic
    from looptune.search.choice import Knobs
    from looptune.search.study import run_study

    def evaluate(knobs):
        if knobs == Knobs("a", 2, 16, "float32"):
            os.kill(os.getpid(), signal.SIGKILL)  # a setting that always kills its worker
        return synthetic(knobs)

    record = run_study(SMALL, evaluate, 100, {url!r}, "crashing")
    print(json.dumps([f.to_dict() for f in record.failed]))
""")


@pytest.mark.slow
def test_a_setting_that_always_kills_its_worker_is_given_up_after_its_attempts(db):
    """The at-once retry of a killed worker's trial still counts attempts: a supervisor that
    restarts the worker until it succeeds stops after MAX_ATTEMPTS kills."""
    script = CRASHING.format(tests=str(Path(__file__).parent), url=db)
    runs = []
    while not runs or runs[-1].returncode != 0:
        assert len(runs) <= MAX_ATTEMPTS, [r.stderr for r in runs]
        runs.append(run_python(script))
    assert [r.returncode for r in runs] == [-9] * MAX_ATTEMPTS + [0]
    (failure,) = json.loads(runs[-1].stdout)
    assert failure["attempts"] == MAX_ATTEMPTS and failure["gave_up"]
    assert failure["reason"].startswith("its worker (process ")


def test_failing_setting_is_retried_with_a_cap_and_its_reason_kept(db):
    bad = Knobs("a", 2, 16, "float32")
    evaluate = Counting(fail=lambda k: RuntimeError("cache entry unreadable") if k == bad else None)
    for attempt in range(MAX_ATTEMPTS):
        with pytest.raises(RuntimeError):
            run_study(SMALL, evaluate, 100, db, "flaky")
        assert evaluate.calls.count(bad) == attempt + 1  # tried again on every run
    record = run_study(SMALL, evaluate, 100, db, "flaky")
    assert evaluate.calls.count(bad) == MAX_ATTEMPTS and len(record.outcomes) == 7
    (failure,) = record.failed
    assert failure.knobs == bad and failure.attempts == MAX_ATTEMPTS and failure.gave_up
    assert failure.reason == "RuntimeError: cache entry unreadable"


def test_interference_flagged_setting_is_measured_again_by_the_next_run(db):
    busy = Knobs("b", 2, 8, "float32")
    quiet = [False]

    def evaluate(knobs):
        o = synthetic(knobs)
        if knobs == busy and not quiet[0]:
            o.latency_ms, o.interference = o.latency_ms * 7, "load"
        return o

    first = run_study(SMALL, evaluate, 100, db, "busy")
    assert {o.knobs: o.interference for o in first.outcomes}[busy] == "load"
    quiet[0] = True
    second = run_study(SMALL, evaluate, 100, db, "busy")
    clean = {o.knobs: o for o in second.outcomes}[busy]
    assert clean.interference is None and clean.latency_ms == synthetic(busy).latency_ms


def test_a_machine_busy_run_after_run_costs_one_measurement_a_run_not_the_whole_grid(db):
    """Every result flagged, run after run: a rerun measures one setting again, finds it
    flagged again, says the machine is still busy and stops (it re-measured all eight, three
    runs running); each setting keeps its fastest flagged measurement; the first run on an
    idle machine measures them all again."""
    load = [True]

    def evaluate(knobs):
        o = synthetic(knobs)
        if load[0]:  # the later, the busier: a slower latency each time
            o.latency_ms, o.interference = o.latency_ms * (2 + len(calls)), "load"
        calls.append(knobs)
        return o

    calls = []
    first = run_study(SMALL, evaluate, 100, db, "always-busy")
    assert len(calls) == 8 and not first.still_busy
    assert all(o.interference == "load" for o in first.outcomes)
    for run in (2, 3):
        again = run_study(SMALL, evaluate, 100, db, "always-busy")
        assert len(calls) == 8 + run - 1 and again.still_busy
        assert {o.knobs: o.latency_ms for o in again.outcomes} == {
            o.knobs: o.latency_ms for o in first.outcomes
        }  # the fastest of each setting's flagged measurements
    load[0] = False
    idle = run_study(SMALL, evaluate, 100, db, "always-busy")
    assert len(calls) == 10 + 8 and not idle.still_busy
    assert {o.knobs: o.latency_ms for o in idle.outcomes} == {
        k: synthetic(k).latency_ms for k in SMALL.settings()
    }


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_re_measurement_that_was_interrupted_or_failed_is_queued_again_by_the_next_run(db, stop):
    """Ctrl-C (or a crash) while a setting measured under load is measured again: the next run
    on an idle machine measures it again (its claim stood for good: no run ever did, and each
    sampled a hundred repeats instead), and a crash is retried up to its attempts."""
    busy, load, stopping, calls = Knobs("b", 2, 8, "float32"), [True], [True], []

    def evaluate(knobs):
        calls.append(knobs)
        if knobs == busy and not load[0] and stopping[0]:
            raise stop()
        o = synthetic(knobs)
        if knobs == busy and load[0]:
            o.latency_ms, o.interference = o.latency_ms * 7, "load"
        return o

    run_study(SMALL, evaluate, 100, db, "re-measure")
    load[0] = False
    for _ in range(1 if stop is KeyboardInterrupt else MAX_ATTEMPTS):
        with pytest.raises(Interrupted if stop is KeyboardInterrupt else RuntimeError):
            run_study(SMALL, evaluate, 100, db, "re-measure")
    assert calls[8:] == [busy] * (len(calls) - 8)
    stopping[0] = False
    again = run_study(SMALL, evaluate, 100, db, "re-measure")
    measured = {o.knobs: o for o in again.outcomes}[busy]
    if stop is KeyboardInterrupt:  # no attempt: measured again, clean
        assert calls[-1] == busy and measured.interference is None
    else:  # three crashes: the flagged measurement stands, and nothing is sampled instead
        assert measured.interference == "load" and len(calls) == 8 + MAX_ATTEMPTS
    assert again.trials == len(calls)  # no sampled repeats


def test_a_probe_of_a_busy_machine_is_one_setting_however_often_the_worker_plans(db):
    """A plan before each trial: while the one re-measurement waits (or a trial of this run
    measured nothing, a repeat), the next plan queues no second one."""

    def busy(knobs):
        o = synthetic(knobs)
        o.interference = "load"
        return o

    run_study(SMALL, busy, 100, db, "probe")
    study = optuna.load_study(study_name="probe", storage=db)
    earlier = trials.measured_earlier(study)
    for _ in range(3):
        trials.plan(study, None, 8, earlier, remeasure=1)
    (probe,) = study.get_trials(states=[TrialState.WAITING])
    assert probe.user_attrs["remeasure"]


@pytest.mark.parametrize("worker", ["alive", "gone"])
def test_fresh_is_refused_while_another_worker_measures_in_the_study(db, worker):
    """Deleting the study under a live worker would end it with an error (and could put its
    results into the new study); a gone worker's trial does not hold it."""
    study = optuna.create_study(storage=db, study_name="fresh", directions=["minimize"] * 3)
    parent = os.getppid()
    pid, start = (parent, trials.started(parent)) if worker == "alive" else (dead_pid(), 1)
    running = study.ask()
    running.set_user_attr("worker", f"elsewhere:{pid}")
    running.set_user_attr("process", [trials.MACHINE, pid, start])
    if worker == "alive":
        with pytest.raises(LooptuneError, match=f"by another worker \\(elsewhere:{pid}\\)"):
            run_study(SMALL, synthetic, 100, db, "fresh", fresh=True)
        assert len(optuna.load_study(study_name="fresh", storage=db).trials) == 1
    else:
        assert len(run_study(SMALL, synthetic, 100, db, "fresh", fresh=True).outcomes) == 8


def test_a_study_started_over_under_a_worker_ends_it_in_one_line(db):
    """Another process deletes the study (`optuna delete-study`, or fresh between two trials of
    this worker) and measures it again while this worker measures: this worker ends with one
    line, and the new study keeps only its own results."""
    calls = []

    def evaluate(knobs):
        calls.append(knobs)
        if len(calls) == 3:  # another process, meanwhile
            optuna.delete_study(study_name="under", storage=db)
            run_study(SMALL, synthetic, 100, db, "under")
        return synthetic(knobs)

    with pytest.raises(LooptuneError, match="^study 'under' was deleted or started over"):
        run_study(SMALL, evaluate, 100, db, "under")
    study = optuna.load_study(study_name="under", storage=db)
    assert len(study.trials) == 8 and all(t.state == TrialState.COMPLETE for t in study.trials)


@pytest.mark.parametrize("url", ["study.log", "runs/study.db"])
def test_a_storage_path_that_is_no_database_url_is_refused_saying_what_to_give(url):
    from looptune.search.storage import open_storage

    with pytest.raises(LooptuneError, match="not a database URL") as e:
        open_storage(url)
    assert "sqlite:///" in str(e.value) and "\n" not in str(e.value)


def test_same_study_name_with_another_identity_is_refused(db):
    space = Space(("a",), (1, 2), (8,), ("float32",))
    run_study(space, synthetic, 10, db, "x", {"space": space.grid(), "prompt_len": 8})
    with pytest.raises(LooptuneError, match=r"another question \(prompt_len 8 -> 16\)"):
        run_study(space, synthetic, 10, db, "x", {"space": space.grid(), "prompt_len": 16})


# ----- run_pareto: the library as a notebook uses it -----


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    from looptune.model.checkpoint import init_checkpoint

    root = tmp_path_factory.mktemp("members")
    for r in (1, 2):
        init_checkpoint(root / f"plt-r{r}", "tiny", loops=r, seed=r)
    return [root / "plt-r1", root / "plt-r2"]


TINY = Workload(prompt_len=8, gen_len=4, limit=2, min_time_s=0.01, min_repeats=2)


def test_run_pareto_writes_nothing_without_paths_and_names_studies_by_what_they_measure(
    members, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    evaluate = Counting()
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel.json"])
    result = run_pareto(
        members, Budgets(2.0), TINY, loops=(1, 2), windows=[8, 16], evaluator=evaluate
    )
    assert list(tmp_path.iterdir()) == []  # no profile, no database
    assert result.storage == "memory" and result.profile is not None
    assert result.profile.command == "run_pareto (Python API)" and result.profile_path is None
    assert result.profile.knobs.loops == result.choice.best.knobs.loops
    # another question in the same session: another study, no clash on a default name
    other = run_pareto(
        members,
        Budgets(2.0),
        Workload(**{**vars(TINY), "prompt_len": 16}),
        loops=(1, 2),
        windows=[8, 16],
        evaluator=evaluate,
    )
    assert other.study_name != result.study_name and len(evaluate.calls) == 16


def test_changed_workload_starts_a_new_study_or_names_the_change(members, db):
    evaluate = Counting()
    kwargs = {"loops": (1, 2), "windows": [8], "storage": db, "evaluator": evaluate}
    first = run_pareto(members, Budgets(2.0), TINY, **kwargs)
    assert len(evaluate.calls) == 4
    changed = Workload(**{**vars(TINY), "quality_set": "humaneval-nll", "limit": 3})
    second = run_pareto(members, Budgets(2.0), changed, **kwargs)
    assert second.study_name != first.study_name and len(evaluate.calls) == 8
    with pytest.raises(LooptuneError, match="limit 2 -> 3.*quality_set 'code' -> 'humaneval-nll'"):
        run_pareto(members, Budgets(2.0), changed, study_name=first.study_name, **kwargs)
    with pytest.raises(LooptuneError, match=r"\(members plt-r1, plt-r2 -> plt-r1, "):
        run_pareto(members[:1], Budgets(2.0), TINY, study_name=first.study_name, **kwargs)


def test_budgets_only_filter_and_re_choose_without_measuring(members, tmp_path, db):
    evaluate = Counting()
    kwargs = {"loops": (1, 2, 3), "windows": [8, 16], "storage": db, "evaluator": evaluate}
    loose = run_pareto(members, Budgets(5.0), TINY, **kwargs)
    tight_budget = Budgets(1.4)
    tight = run_pareto(members, tight_budget, TINY, out=tmp_path / "p.yaml", **kwargs)
    assert len(evaluate.calls) == 12  # the second run measured nothing
    assert tight.study_name == loose.study_name
    fitting = [o for o in tight.outcomes if tight_budget.fits(o)]
    assert {o.knobs for o in tight.front} == optuna_front(fitting)
    assert {o.knobs for o in tight.front} != {o.knobs for o in loose.front}
    assert tight.choice.best.latency_ms <= 1.4 < loose.choice.best.latency_ms
    import yaml

    profile = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert profile["budgets"]["latency_ms"] == 1.4
    assert all(o["latency_ms"] <= 1.4 for o in profile["pareto_set"])


def test_fresh_measures_again(members, db):
    evaluate = Counting()
    kwargs = {"loops": (1, 2), "windows": [8], "storage": db, "evaluator": evaluate}
    run_pareto(members, Budgets(2.0), TINY, **kwargs)
    run_pareto(members, Budgets(2.0), TINY, fresh=True, **kwargs)
    assert len(evaluate.calls) == 8


@pytest.mark.parametrize(
    "change,message",
    [
        ({"plot": "front.jpg"}, "plot must end in .png or .html"),
        ({"out": "README.md/p.yaml"}, "is a file, not a directory"),
        ({"out": "p.json"}, "out must end in .yaml or .yml"),
        ({"trials": 0}, "trials must be an integer >= 1"),
        ({"loops": (0, 1)}, "loops must be integers >= 1"),
        ({"work": Workload(metric="p42")}, "metric must be one of tpot-p50, tpot-p90"),
        ({"work": Workload(quality_set="humaneval")}, "cannot be a study objective"),
    ],
)
def test_arguments_are_checked_before_any_measurement(
    members, tmp_path, monkeypatch, change, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("in the way\n")
    evaluate = Counting()
    kwargs = {"work": TINY, "loops": (1, 2), "windows": [8], "evaluator": evaluate, **change}
    with pytest.raises(LooptuneError, match=message):
        run_pareto(members, Budgets(2.0), **kwargs)
    assert evaluate.calls == []


PLOTTED = {  # (R, W): (quality, latency ms, KV bytes); R=3 W=8 is Pareto only for its KV size
    (1, 8): (3.0, 1.0, 100),
    (1, 16): (2.8, 1.1, 100),
    (2, 8): (2.5, 1.5, 110),
    (2, 16): (2.3, 1.6, 120),
    (3, 8): (2.6, 1.7, 105),
    (3, 16): (2.4, 2.5, 130),
}


def test_plot_marks_the_two_dimensional_front_and_kv_only_points(members, tmp_path):
    from looptune.search.plot import marked_points

    def evaluate(k):
        q, lat, kv = PLOTTED[k.loops, k.window]
        return Outcome(k, q, (q, q), lat, (lat, lat), 1.0, kv)

    budgets = Budgets(1.9)
    result = run_pareto(
        members[:1],
        budgets,
        TINY,
        loops=(1, 2, 3),
        windows=[8, 16],
        evaluator=evaluate,
        plot=tmp_path / "front.png",
    )
    front, kv_only = marked_points(result.outcomes, budgets)
    assert [(o.knobs.loops, o.knobs.window) for o in front] == [(1, 8), (1, 16), (2, 8), (2, 16)]
    assert [(o.knobs.loops, o.knobs.window) for o in kv_only] == [(3, 8)]
    fitting = [o for o in result.outcomes if budgets.fits(o)]
    assert {o.knobs for o in front + kv_only} == optuna_front(fitting)
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


WORKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    from search_synthetic import synthetic, SPACE
    from looptune.search.choice import Budgets, choose, pareto_front
    from looptune.search.study import run_study

    def slow(knobs):
        time.sleep(0.1)  # long enough that both workers are busy at once
        outcome = synthetic(knobs)
        # On one machine each worker sees the other's CPU use: every result is flagged.
        outcome.interference = "other processes" if {busy!r} else None
        return outcome

    record = run_study(SPACE, slow, 100, {url!r}, {name!r})
    fits = [o for o in record.outcomes if Budgets(1.9).fits(o)]
    best = choose(record.outcomes, Budgets(1.9)).best
    print(json.dumps({{"best": best.to_dict()["knobs"],
                       "front": sorted(str(o.knobs) for o in pareto_front(fits))}}))
""")


def storage_url(kind, db):
    if kind == "sqlite":
        return db
    url = os.environ.get("LOOPTUNE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip(
            "no PostgreSQL server: .ci/run starts one where it can "
            "(set LOOPTUNE_TEST_POSTGRES_URL to use your own)"
        )
    return url


@pytest.mark.parametrize("kind,busy", [("sqlite", False), ("sqlite", True), ("postgresql", False)])
def test_two_workers_split_one_study_and_agree(db, kind, busy):
    """Also when the machine is busy: neither worker measures again what the other measured
    under interference alongside it (that is for a later run)."""
    url = storage_url(kind, db)
    name = f"shared-{uuid.uuid4().hex[:8]}"
    script = WORKER.format(tests=str(Path(__file__).parent), url=url, name=name, busy=busy)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    docs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert docs[0] == docs[1]  # both workers agree on the front and the choice
    study = optuna.load_study(study_name=name, storage=url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert {Knobs(**t.params) for t in finished} == set(SPACE.settings())
    assert len(finished) <= SPACE.size + 2  # at most a rare race duplicates a point
    per_worker = {}
    for t in finished:
        per_worker[t.user_attrs["worker"]] = per_worker.get(t.user_attrs["worker"], 0) + 1
    assert len(per_worker) == 2 and min(per_worker.values()) >= 4, per_worker  # split the work


def test_a_wait_for_other_workers_is_reported_not_silent(db, monkeypatch):
    """When only other workers' settings are left, the worker says what it waits for (once per
    change), then ends when they do."""
    from looptune.search.study import _Worker
    from looptune.search.trials import StudyState

    other = {SMALL.settings()[0]: None, SMALL.settings()[1]: None}
    states = iter(
        [
            StudyState({}, set(), dict(other), {}, {}),
            StudyState({}, set(), dict(other), {}, {}),  # the same two: said once
            StudyState({}, set(), dict(list(other.items())[:1]), {}, {}),
            StudyState({}, set(), {}, {}, {}),  # they ended (or gave up): nothing left here
        ]
    )
    monkeypatch.setattr(_Worker, "_plan", lambda self: next(states))
    monkeypatch.setattr("looptune.search.study.time.sleep", lambda s: None)
    reports = []
    study = optuna.create_study(storage=db, directions=["minimize"] * 3)
    worker = _Worker(study, SMALL, Counting(), SMALL.size, reports.append, heartbeat=True)
    worker.run()
    assert [(r.state, r.knobs, r.detail) for r in reports] == [
        ("waiting", None, "2 settings being measured by other workers"),
        ("waiting", None, "1 setting being measured by other workers"),
    ]

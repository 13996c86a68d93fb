"""The study mechanics: the Pareto set, the choice, budgets, resume and shared workers.

These use a deterministic stand-in for the measurements (a function of the knobs) so that the
Optuna side is tested exactly; tests/test_pareto_cli.py runs the real measurements."""

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from looptune.errors import LooptuneError
from looptune.search.choice import Budgets, Knobs, Outcome, choose, dominates, pareto_front
from looptune.search.study import Space, collect, run_study

SPACE = Space(("a", "b"), (1, 2, 3, 4), (8, 16, 32), ("float32",))


def synthetic(knobs: Knobs) -> Outcome:
    """Quality best at R=2 (as LoopCoder-v2), worse with a small window; latency grows with R."""
    member = 0.05 if knobs.checkpoint == "b" else 0.0
    quality = 2.0 + 0.3 * abs(knobs.loops - 2) + 4.0 / knobs.window + member
    latency = 1.0 + 0.25 * knobs.loops + 0.002 * knobs.window + (0.1 if knobs.checkpoint == "b" else 0)
    kv = 1000 * (100 + (knobs.loops - 1) * knobs.window)
    return Outcome(knobs, quality, (quality - 0.01, quality + 0.01), latency,
                   (latency * 0.99, latency * 1.01), 10.0 * knobs.loops, kv)


def brute_force_front(outcomes):
    return [o for o in outcomes if not any(dominates(p.values, o.values) for p in outcomes)]


def test_grid_study_front_equals_brute_force(tmp_path):
    budgets = Budgets(latency_ms=1.9)
    study = run_study(SPACE, synthetic, budgets, 100, f"sqlite:///{tmp_path}/s.db", "grid")
    outcomes, front, _ = collect(study)
    assert len(outcomes) == SPACE.size == 24  # the grid fits in 100 trials: covered whole
    feasible = [o for o in outcomes if budgets.fits(o)]
    assert {o.knobs for o in front} == {o.knobs for o in brute_force_front(feasible)}
    assert {o.knobs for o in pareto_front(feasible)} == {o.knobs for o in front}


def test_choice_obeys_every_budget_and_breaks_ties():
    outs = [synthetic(Knobs(c, r, w, "float32")) for c in "ab" for r in (1, 2, 3, 4) for w in (8, 16, 32)]
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


def test_sampled_study_covers_every_loop_count(tmp_path):
    space = Space(("a", "b"), (1, 2, 3, 4), (4, 8, 16, 32, 64), ("float32", "bfloat16"))
    assert space.size == 80
    study = run_study(space, synthetic, Budgets(2.0), 12, f"sqlite:///{tmp_path}/s.db", "tpe")
    outcomes, front, _ = collect(study)
    assert len(outcomes) == 12  # twelve distinct settings measured; repeats are not counted
    assert {o.knobs.loops for o in outcomes} == {1, 2, 3, 4}  # the loop axis is exhaustive
    assert {o.knobs for o in front} == {o.knobs for o in brute_force_front(
        [o for o in outcomes if Budgets(2.0).fits(o)])}


def test_rerun_resumes_and_measures_nothing_twice(tmp_path):
    calls = []

    def counting(knobs):
        calls.append(knobs)
        return synthetic(knobs)

    url = f"sqlite:///{tmp_path}/s.db"
    small = Space(("a",), (1, 2, 3, 4), (8, 16), ("float32",))
    run_study(small, counting, Budgets(2.0), 100, url, "resume")
    assert len(calls) == 8
    study = run_study(small, counting, Budgets(2.0), 100, url, "resume")
    assert len(calls) == 8 and len(study.trials) == 8


def test_same_study_name_with_another_space_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    run_study(Space(("a",), (1, 2), (8,), ("float32",)), synthetic, Budgets(2.0), 10, url, "x")
    with pytest.raises(LooptuneError, match="another search space"):
        run_study(Space(("a",), (1, 2, 3), (8,), ("float32",)), synthetic, Budgets(2.0), 10, url, "x")


WORKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    from test_search import synthetic, SPACE
    from looptune.search.choice import Budgets, choose
    from looptune.search.study import collect, run_study

    def slow(knobs):
        time.sleep(0.1)  # long enough that both workers are busy at once
        return synthetic(knobs)

    study = run_study(SPACE, slow, Budgets(1.9), 100, {url!r}, {name!r})
    outcomes, front, _ = collect(study)
    best = choose(outcomes, Budgets(1.9)).best
    print(json.dumps({{"best": best.to_dict()["knobs"], "front": sorted(str(o.knobs) for o in front)}}))
""")


def storage_url(kind, tmp_path):
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    url = os.environ.get("LOOPTUNE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: .ci/run starts one where it can "
                    "(set LOOPTUNE_TEST_POSTGRES_URL to use your own)")
    return url


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_two_workers_split_one_study_and_agree(tmp_path, kind):
    url = storage_url(kind, tmp_path)
    name = f"shared-{uuid.uuid4().hex[:8]}"
    script = WORKER.format(tests=str(__import__("pathlib").Path(__file__).parent), url=url,
                           name=name)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    docs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert docs[0] == docs[1]  # both workers agree on the front and the choice
    import optuna

    study = optuna.load_study(study_name=name, storage=url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert {t.system_attrs["grid_id"] for t in finished} == set(range(SPACE.size))
    assert len(finished) <= SPACE.size + 2  # at most a rare race duplicates a point
    per_worker = {}
    for t in finished:
        per_worker[t.user_attrs["worker"]] = per_worker.get(t.user_attrs["worker"], 0) + 1
    assert len(per_worker) == 2 and min(per_worker.values()) >= 4, per_worker  # split the work

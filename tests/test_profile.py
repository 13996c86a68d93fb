"""`looptune profile`: timers against known sleeps, statistics, memory, the environment, the
fields of a Measurement, KV measured == analytic, out of memory, Ctrl-C, the result cache and
the command line. Tiny checkpoints, 8-token prompts, a few decode steps: seconds in all."""

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from looptune.cli import app
from looptune.errors import Interrupted, LooptuneError
from looptune.measure import env as envmod
from looptune.measure.interference import CpuWatch, Limits, interference, usable_cores
from looptune.measure.latency import profile_candidates
from looptune.measure.measurement import Measurement, check_measurement
from looptune.measure.memory import PeakMemory
from looptune.measure.stats import bootstrap_ci, percentile, summarize
from looptune.measure.timers import LapTimer, Timer
from looptune.model.checkpoint import init_checkpoint
from looptune.model.plt import PLTForCausalLM
from looptune.store import ResultCache, cache_root

runner = CliRunner()
FAST = {
    "prompt_len": 8,
    "gen_len": 4,
    "min_repeats": 2,
    "min_time_s": 0.0,
    "device": "cpu",
    "warmup": 0,
    "threads": 1,
}
ISSUE_FIELDS = [
    "ttft_ms",
    "tpot_ms_p50",
    "tpot_ms_p90",
    "tpot_ms_p99",
    "tpot_ms_p50_ci95",
    "tokens_per_s",
    "kv_bytes",
    "kv_bytes_analytic",
    "peak_mem_bytes",
    "environment",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "tiny"
    init_checkpoint(path, "tiny", loops=2, device="cpu")
    return path


# ----- timers, statistics, memory, environment -----


def test_timer_measures_known_sleeps():
    with Timer("cpu") as t:
        time.sleep(0.05)
    assert 50 <= t.ms < 50 + 250  # never short; a loaded machine may wake it late
    with LapTimer("cpu") as laps:
        for s in (0.01, 0.04, 0.02):
            time.sleep(s)
            laps.lap()
    assert len(laps.ms) == 3
    for got, want in zip(laps.ms, (10, 40, 20), strict=True):
        assert want <= got < want + 250


def test_percentiles_and_bootstrap():
    runs = [list(np.arange(1.0, 101.0))] * 4
    assert percentile(runs[0], 50) == pytest.approx(50.5)
    assert percentile(runs[0], 99) == pytest.approx(99.01)
    lo, hi = bootstrap_ci(runs, 50)
    assert lo == hi == pytest.approx(50.5)  # identical runs: no spread between runs
    rng = np.random.default_rng(0)
    noisy = [list(rng.normal(10.0 + i % 3, 1.0, 64)) for i in range(8)]
    s = summarize(noisy)
    assert s["p50_ci95"][0] < s["p50"] < s["p50_ci95"][1]
    assert s["p50"] <= s["p90"] <= s["p99"]
    assert bootstrap_ci(noisy, 50) == bootstrap_ci(noisy, 50)  # seeded
    assert bootstrap_ci([[5.0]], 50) == (5.0, 5.0)
    one = bootstrap_ci([[1.0, 2.0, 3.0, 4.0, 100.0]], 50)  # one run: resample its tokens
    assert one[0] <= 3.0 <= one[1]


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as mem:
        x = torch.ones(16 << 20, dtype=torch.float32)  # 64 MiB, touched
        del x
    assert mem.method.startswith("rss growth")
    if mem.method == "rss growth (VmHWM)":
        assert mem.peak_bytes >= 60 << 20


def test_environment_and_fingerprint():
    e = envmod.environment("cpu", torch.float32)
    for key in [
        "device",
        "device_name",
        "torch",
        "cuda",
        "dtype",
        "threads",
        "cpu_count",
        "loadavg",
        "looptune",
    ]:
        assert key in e
    assert e["dtype"] == "float32" and e["threads"] == torch.get_num_threads()
    fp = envmod.fingerprint(e)
    assert "loadavg" not in fp and fp["torch"] == torch.__version__ and fp["threads"]
    assert envmod.gpu_state("cpu") is None


def test_throttle_reasons_and_nvidia_smi_parsing(monkeypatch):
    assert envmod.throttle_reasons(0x0) == []
    assert envmod.throttle_reasons(0x44) == ["sw_power_cap", "hw_thermal_slowdown"]

    class Done:
        returncode, stderr = 0, ""
        stdout = "550.54.15, 1980, 2619, 1980, 312.45, 700.00, 41, P0, 0x0000000000000004\n"

    calls = []
    monkeypatch.setattr(envmod.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    state = envmod._state_smi("GPU-1234")
    assert state["sm_clock_mhz"] == 1980 and state["power_w"] == pytest.approx(312.45)
    assert state["throttle_reasons"] == ["sw_power_cap"] and state["pstate"] == "P0"
    assert calls[0][-2:] == ["-i", "GPU-1234"]


# ----- the profiler -----


def test_fields_present_and_sane(ckpt):
    ms = profile_candidates(
        [ckpt],
        loops=[1, 2, 3],
        modes=["plt", "plt-noshift", "sequential"],
        batches=[2],
        fresh=True,
        **{**FAST, "warmup": 1},
    )
    assert [(m.mode, m.loops) for m in ms] == [
        (mode, R) for mode in ("plt", "plt-noshift", "sequential") for R in (1, 2, 3)
    ]
    for m in ms:
        d = m.to_dict()
        assert all(d[f] is not None for f in ISSUE_FIELDS), m.label
        json.dumps(d)
        assert m.status == "ok" and m.feasible and not m.cached and m.error is None
        assert m.repeats >= 2 and m.decode_steps == m.repeats * 4 and len(m.warmup_ms) == 1
        assert 0 < m.tpot_ms_p50 <= m.tpot_ms_p90 <= m.tpot_ms_p99
        lo, hi = m.tpot_ms_p50_ci95
        assert lo <= m.tpot_ms_p50 <= hi
        assert m.ttft_ms > 0 and m.tokens_per_s == pytest.approx(2e3 / m.tpot_ms_p50)
        assert m.peak_mem_bytes >= 0 and m.weights_bytes > 0 and m.compile_ms is None
        assert m.step == "eager" and m.setup_ms is None and m.load_ms > 0 and m.threads == 1
        assert m.dtype == "float32" and m.device == "cpu" and m.window == 8
        assert m.interference == [] and m.conditions["cores"] == usable_cores()
        assert m.conditions["tpot_p90_over_p50"] >= 1.0 and m.conditions["run_cv"] is None
        assert m.environment["device_name"] and m.environment["torch"] == torch.__version__


def test_kv_measured_equals_analytic(ckpt):
    # window 4 < context 12: the rings wrap; batch 3; every mode and R
    ms = profile_candidates(
        [ckpt],
        loops=[1, 2, 4],
        modes=["plt", "plt-noshift", "sequential"],
        batches=[1, 3],
        window=4,
        fresh=True,
        **{**FAST, "min_repeats": 1, "gen_len": 2},
    )
    for m in ms:
        assert m.kv_bytes == m.kv_bytes_analytic and m.kv_match, m.label
    by = {(m.mode, m.loops, m.batch): m.kv_bytes for m in ms}
    assert by["sequential", 4, 3] == 4 * by["sequential", 1, 3] == 12 * by["sequential", 1, 1]
    assert by["plt", 4, 1] < by["sequential", 4, 1]


def test_modes_none_uses_the_trained_mode(ckpt):
    (m,) = profile_candidates([ckpt], loops=[2], modes=None, fresh=True, **FAST)
    assert m.mode == "plt"


def _oom_at_batch(batch, error):
    real = PLTForCausalLM.new_cache

    def new_cache(self, b, *args, **kwargs):
        if b == batch:
            raise error
        return real(self, b, *args, **kwargs)

    return new_cache


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        ),
    ],
)
def test_out_of_memory_is_infeasible_and_the_run_goes_on(ckpt, monkeypatch, error):
    monkeypatch.setattr(PLTForCausalLM, "new_cache", _oom_at_batch(4, error))
    ms = profile_candidates([ckpt], loops=[1, 2], modes=["plt"], batches=[1, 4], fresh=True, **FAST)
    ok, oom = ms[:2], ms[2:]
    assert all(m.status == "ok" and m.tpot_ms_p50 for m in ok)
    for m in oom:
        assert m.status == "infeasible" and not m.feasible and m.tpot_ms_p50 is None
        assert m.error.startswith("out of memory")
    again = profile_candidates([ckpt], loops=[1, 2], modes=["plt"], batches=[1, 4], **FAST)
    assert [m.cached for m in again] == [True, True, False, False]  # infeasible: tried again


def test_weights_that_do_not_fit_make_every_candidate_infeasible(ckpt, monkeypatch):
    def load_model(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB")

    monkeypatch.setattr("looptune.measure.bench.load_model", load_model)
    ms = profile_candidates([ckpt], loops=[1, 2], modes=["plt"], fresh=True, **FAST)
    assert [m.status for m in ms] == ["infeasible"] * 2
    assert all(m.error.startswith("out of memory loading the weights") for m in ms)


def test_other_errors_are_not_taken_for_out_of_memory(ckpt, monkeypatch):
    monkeypatch.setattr(PLTForCausalLM, "new_cache", _oom_at_batch(1, RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        profile_candidates([ckpt], loops=[1], modes=["plt"], fresh=True, **FAST)


def test_cache_hit_measures_nothing_and_fresh_remeasures(ckpt, monkeypatch):
    args = dict(loops=[1, 2], modes=["plt"], batches=[1], **FAST)
    first = profile_candidates([ckpt], **args)
    assert not any(m.cached for m in first)

    def no_loading(*a, **k):
        raise AssertionError("a cached candidate must not load the model")

    with monkeypatch.context() as patch:  # (undo() would also drop the isolated cache dir)
        patch.setattr("looptune.measure.bench.load_model", no_loading)
        again = profile_candidates([ckpt], **args)
    assert all(m.cached for m in again)
    assert [m.tpot_ms_p50 for m in again] == [m.tpot_ms_p50 for m in first]
    assert again[0].tpot_ms_p50_ci95 == first[0].tpot_ms_p50_ci95  # tuples survive JSON
    fresh = profile_candidates([ckpt], fresh=True, **args)
    assert not any(m.cached for m in fresh)
    other = profile_candidates([ckpt], **{**args, "gen_len": 5})  # another candidate: a miss
    assert not any(m.cached for m in other)


def test_a_copy_of_a_checkpoint_hits_the_cache_under_its_own_path(ckpt, tmp_path):
    args = dict(loops=[1], modes=["plt"], **FAST)
    (first,) = profile_candidates([ckpt], **args)
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    (again,) = profile_candidates([copy], **args)
    assert again.cached and again.tpot_ms_p50 == first.tpot_ms_p50  # same content, same result
    assert again.checkpoint == str(copy) and again.label.startswith("copy ")


def test_candidates_are_interleaved(ckpt):
    runs = []

    def progress(message):
        if ": run " in message:
            runs.append(message.split(":")[0])

    profile_candidates(
        [ckpt],
        loops=[1, 2],
        modes=["plt"],
        fresh=True,
        progress=progress,
        **{**FAST, "min_repeats": 4},
    )
    a, b = "tiny plt R=1 B=1", "tiny plt R=2 B=1"
    assert runs == [a, b, b, a, a, b, b, a]  # never all of A, then all of B


def test_r1_is_measured_once_and_shown_under_every_mode(ckpt):
    """R = 1 is one plain decoder whatever the mode: a profile of several modes runs it once
    (at 7B, one compile and one measurement fewer per extra mode) and reports it under each."""
    runs = []

    def progress(message):
        if ": run " in message:
            runs.append(message.split(":")[0])

    ms = profile_candidates(
        [ckpt], loops=[1, 2], modes=["sequential", "plt"], fresh=True, progress=progress, **FAST
    )
    assert [(m.mode, m.loops) for m in ms] == [
        ("sequential", 1),
        ("sequential", 2),
        ("plt", 1),
        ("plt", 2),
    ]
    assert {r.split(" ", 1)[1] for r in runs} == {
        "sequential R=1 B=1",
        "sequential R=2 B=1",
        "plt R=2 B=1",
    }
    seq1, plt1 = ms[0], ms[2]
    assert plt1.tpot_ms_p50 == seq1.tpot_ms_p50 and plt1.kv_bytes == seq1.kv_bytes
    assert plt1.label == seq1.label.replace("sequential", "plt")


def test_r1_measured_in_one_mode_is_the_cached_r1_of_every_mode(ckpt):
    """R = 1 measured in the first mode asked is every mode's: a later profile that asks the
    modes in another order, or one of the others alone, finds it cached (it measured R = 1
    again, at 7B a compile and a measurement, and overwrote the cached row with it)."""
    runs = []

    def progress(message):
        if ": run " in message:
            runs.append(message.split(":")[0])

    args = dict(loops=[1, 2], progress=progress, **FAST)
    first = profile_candidates([ckpt], modes=["plt", "sequential"], fresh=True, **args)
    assert len(set(runs)) == 3
    for modes in (["sequential", "plt"], ["sequential"], ["plt-noshift"]):
        runs.clear()
        ms = profile_candidates([ckpt], modes=modes, **{**args, "loops": [1]})
        assert runs == [] and [(m.mode, m.cached) for m in ms] == [(mode, True) for mode in modes]
        assert {m.tpot_ms_p50 for m in ms} == {first[0].tpot_ms_p50}
        assert [m.label for m in ms] == [first[0].label.replace("plt", mode) for mode in modes]


def test_ctrl_c_caches_only_finished_candidates_and_raises(ckpt):
    seen = []

    def progress(message):
        if ": run " in message:
            seen.append(message.split(":")[0])
            if len(seen) == 4:  # A, B, then B's second run finished B; Ctrl-C at A's second
                raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="1 of 2 candidates were finished"):
        profile_candidates(
            [ckpt], loops=[1, 2], modes=["plt"], fresh=True, progress=progress, **FAST
        )
    assert seen == ["tiny plt R=1 B=1", "tiny plt R=2 B=1", "tiny plt R=2 B=1", "tiny plt R=1 B=1"]
    again = profile_candidates([ckpt], loops=[1, 2], modes=["plt"], **FAST)
    assert [m.cached for m in again] == [False, True]  # the interrupted one is measured again

    def stop_at_warmup(message):
        if "warm-up" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_candidates(
            [ckpt],
            loops=[3],
            modes=["plt"],
            fresh=True,
            progress=stop_at_warmup,
            **{**FAST, "warmup": 1},
        )
    (m,) = profile_candidates([ckpt], loops=[3], modes=["plt"], **FAST)
    assert not m.cached


def test_measurement_round_trips_through_a_dict(ckpt):
    (m,) = profile_candidates([ckpt], loops=[1], modes=["plt"], fresh=True, **FAST)
    back = Measurement.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back == m


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loops": [0]}, "loops"),
        ({"modes": ["fast"]}, "modes"),
        ({"batches": []}, "batches"),
        ({"window": 0}, "window"),
        ({"prompt_len": 600}, "max_position_embeddings"),
        ({"dtype": "float8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"threads": 0}, "threads"),
        ({"graphs": True}, "CUDA device"),
        ({"graphs": True, "compile": True}, "choose one"),
    ],
)
def test_bad_arguments_are_looptune_errors(ckpt, kwargs, message):
    with pytest.raises(LooptuneError, match=message):
        profile_candidates([ckpt], **{**FAST, **kwargs})


# ----- the command line -----


@pytest.mark.parametrize(
    "args, message",
    [
        (["--loops", "0"], "--loops"),
        (["--loops", "1,two"], "--loops"),
        (["--mode", "plt,fast"], "--mode"),
        (["--batch", "eight"], "--batch"),
        (["--batch", "0"], "--batch"),
        (["--dtype", "float8"], "dtype"),
        (["--prompt-len", "0"], "--prompt-len"),
        (["--threads", "0"], "--threads"),
        (["--min-time", "-1"], "--min-time"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--out", "profile.txt"], ".json"),
        (["--graphs"], "CUDA"),
    ],
)
def test_cli_bad_arguments_exit_2(ckpt, args, message):
    result = runner.invoke(app, ["profile", str(ckpt), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_cli_json_is_one_document_on_stdout(ckpt, tmp_path):
    out = tmp_path / "profile.json"
    result = runner.invoke(
        app,
        [
            "profile",
            str(ckpt),
            "--loops",
            "1,2",
            "--mode",
            "plt",
            "--batch",
            "1,2",
            "--prompt-len",
            "8",
            "--gen-len",
            "4",
            "--min-repeats",
            "2",
            "--min-time",
            "0",
            "--device",
            "cpu",
            "--json",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert json.loads(out.read_text()) == doc
    assert doc["environment"]["device"] == "cpu" and doc["interference"] == 0
    assert len(doc["measurements"]) == 4
    for rec in doc["measurements"]:
        assert all(rec[f] is not None for f in ISSUE_FIELDS) and rec["kv_match"]
    assert "TPOT p50" in result.stderr  # the table went to stderr


def test_cli_shows_a_kv_mismatch_loudly(ckpt, monkeypatch):
    from looptune.measure import bench

    real = bench.kv_bytes
    monkeypatch.setattr(bench, "kv_bytes", lambda *a, **k: real(*a, **k) + 1)
    result = runner.invoke(
        app,
        [
            "profile",
            str(ckpt),
            "--loops",
            "2",
            "--mode",
            "plt",
            "--prompt-len",
            "8",
            "--gen-len",
            "4",
            "--min-repeats",
            "1",
            "--min-time",
            "0",
            "--device",
            "cpu",
            "--fresh",
        ],
    )
    assert result.exit_code == 1
    assert "KV MISMATCH" in result.stderr


@pytest.mark.slow
def test_compiled_decode_on_the_cpu(ckpt):
    (m,) = profile_candidates(
        [ckpt], loops=[2], modes=["plt"], compile=True, fresh=True, **FAST
    )  # no warm-up: the setup is timed on its own all the same
    assert m.status == "ok" and m.kv_match and m.compile_ms > 0 and m.tpot_ms_p50 > 0
    assert m.setup_ms == m.compile_ms and m.step == "compile"
    assert m.compile_ms > m.tpot_ms_p50  # compilation is reported apart, not in the statistics


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("step", ["eager", "compile", "graphs"])
def test_cuda_path(ckpt, step):
    ms = profile_candidates(
        [ckpt],
        loops=[1, 2],
        modes=["plt", "sequential"],
        batches=[1],
        compile=step == "compile",
        graphs=step == "graphs",
        fresh=True,
        **{**FAST, "device": "cuda", "gen_len": 8},
    )
    for m in ms:
        assert m.status == "ok" and m.kv_match and m.peak_mem_bytes >= m.weights_bytes
        assert m.environment["device_type"] == "cuda" and m.step == step
        assert (m.compile_ms is not None) == (step == "compile")
        assert (m.setup_ms is not None) == (step != "eager") and m.load_ms > 0
        if step != "eager":
            assert m.setup_ms > m.tpot_ms_p50


def test_cli_without_a_checkpoint_or_bundled_model_is_a_clear_error(monkeypatch, tmp_path):
    from looptune import bundled

    monkeypatch.setattr(bundled, "MODELS_DIR", tmp_path / "none")
    result = runner.invoke(app, ["profile"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no checkpoint given")


# ----- the result cache, interference, threads -----


@pytest.mark.parametrize(
    "edit",
    [  # (the envelope's checks are in test_store.py)
        {"tpot_ms_p50": 0.001},
        {"ttft_ms": float("nan")},
        {"tpot_ms_p50_ci95": [1.0]},
        {"status": "partial"},
        {"interference": ["load"]},
        {"loops": 7},  # the key is right but the result is another candidate's
        {"mode": "sequential"},
        {"model_hash": "0" * 64},
    ],
)
def test_an_impossible_cache_entry_is_measured_again(ckpt, capsys, edit):
    args = dict(loops=[1], modes=["plt"], **FAST)
    profile_candidates([ckpt], fresh=True, **args)
    (entry,) = (cache_root() / "profile").glob("*.json")
    doc = json.loads(entry.read_text())
    doc["result"].update(edit)
    entry.write_text(json.dumps(doc))
    capsys.readouterr()
    (again,) = profile_candidates([ckpt], **args)
    assert not again.cached and again.tpot_ms_p50 > 0.005  # measured, not believed
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ignoring profile cache entry")
    (entry,) = (cache_root() / "profile").glob("*.json")
    assert json.loads(entry.read_text())["result"]["tpot_ms_p50"] == again.tpot_ms_p50


def test_check_measurement_rejects_what_no_run_produces(ckpt):
    (m,) = profile_candidates([ckpt], loops=[1], modes=["plt"], fresh=True, **FAST)
    good = json.loads(json.dumps(m.to_dict()))
    check_measurement(good)
    for edit in [
        {"tpot_ms_p50": -1.0},
        {"tpot_ms_p99": None},
        {"tokens_per_s": 1e9},
        {"tpot_ms_p90": good["tpot_ms_p50"] / 2},
        {"kv_bytes": 0},
        {"repeats": 0},
        {"decode_steps": 1},
        {"ttft_ms": float("inf")},
        {"status": "infeasible"},
    ]:
        with pytest.raises(ValueError):
            ResultCache("profile", validate=check_measurement).check({**good, **edit})


def test_interference_is_flagged_and_never_cached(ckpt):
    # every machine is busy under these limits: by the load average where nothing better is
    # measured, else by the CPU time others took (any at all)
    strict = dataclasses.replace(Limits.never(), load_per_core=0.0, other_cores=-1e9)
    args = dict(loops=[1], modes=["plt"], **FAST)
    (m,) = profile_candidates([ckpt], fresh=True, limits=strict, **args)
    assert m.status == "ok" and m.interference in (["load"], ["other processes"])
    assert m.tpot_ms_p50 > 0 and m.to_dict()["interference"] == m.interference
    (again,) = profile_candidates([ckpt], limits=Limits.never(), **args)
    assert not again.cached and again.interference == []  # the flagged one was not kept
    (third,) = profile_candidates([ckpt], limits=strict, **args)
    assert third.cached  # a clean measurement is reused


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="Linux schedstat")
def test_cpu_wait_is_seen_when_another_process_takes_our_cpu():
    before = os.sched_getaffinity(0)
    cpu = min(before)
    hog = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.3)  # the hog is pinned and spinning
        watch = CpuWatch()
        end = time.perf_counter() + 0.4
        while time.perf_counter() < end:  # runnable the whole time, on the hog's CPU
            pass
        conditions = watch.read()
    finally:
        os.sched_setaffinity(0, before)
        hog.kill()
        hog.wait()
    assert conditions["cpu_wait"] > 0.2, conditions  # about half the time, shared fairly
    assert "cpu wait" in interference(conditions, 1, Limits())


def test_interference_reasons():
    quiet = {
        "load_before": 0.5,
        "load_after": 1.2,
        "cores": 16,
        "cpus": 16,
        "other_busy_cores": 0.3,
        "tpot_p90_over_p50": 1.04,
        "run_cv": 0.01,
    }
    assert interference(quiet, threads=8, limits=Limits()) == []
    waited = {**quiet, "cpu_wait": 0.3}  # our threads were runnable, a CPU was not free
    assert interference(waited, threads=8, limits=Limits()) == ["cpu wait"]
    busy = {**quiet, "load_after": 17.0, "other_busy_cores": 8.6}
    assert interference(busy, threads=8, limits=Limits()) == ["load", "other processes"]
    # two cores, one ours, the other taken by another process: contention on a memory-bound
    # decode is measured as "other processes" only when it exceeds the free core
    two = {
        "load_before": 1.0,
        "load_after": 1.9,
        "cores": 2,
        "cpus": 2,
        "other_busy_cores": 1.5,
        "tpot_p90_over_p50": 2.4,
        "run_cv": 0.3,
    }
    assert interference(two, threads=1, limits=Limits()) == [
        "other processes",
        "dispersion",
        "drift",
    ]
    assert interference(two, threads=1, limits=Limits.never()) == []
    assert interference({}, threads=1, limits=Limits()) == []  # nothing known, nothing claimed
    # a load average still high from work that ended: with what others took during the runs
    # measured (nothing), it is no reason; without that measure, it is the only one there is
    ended = {**quiet, "load_before": 40.0, "cpu_wait": 0.0}
    assert interference(ended, threads=8, limits=Limits()) == []
    assert interference({**ended, "cpu_wait": None}, threads=8, limits=Limits()) == ["load"]


def test_threads_are_probed_once_per_shape_and_recorded(ckpt):
    args = dict(loops=[1], modes=["plt"], **{**FAST, "threads": None})
    (m,) = profile_candidates([ckpt], fresh=True, **args)
    assert m.threads in (1, usable_cores()) and m.environment["threads"] == m.threads
    assert m.environment["threads_chosen"] == (
        "probed" if usable_cores() > 1 else "one usable core"
    )
    (again,) = profile_candidates([ckpt], **args)
    assert again.threads == m.threads and again.cached
    (given,) = profile_candidates([ckpt], fresh=True, **{**args, "threads": 1})
    assert given.threads == 1 and given.environment["threads_chosen"] == "given"
    assert torch.get_num_threads() == 1  # the caller's setting is left as it was


def test_cli_out_is_checked_before_any_work(ckpt, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, message in [
        (tmp_path / "file" / "p.json", "is a file, not a directory"),
        (tmp_path, "must end in .json"),
        (tmp_path / "p.yaml", ".json"),
    ]:
        result = runner.invoke(app, ["profile", str(ckpt), "--out", str(out), "--device", "cpu"])
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
        assert "loading" not in result.stderr  # nothing was measured


def test_environment_is_plain_data_a_profile_can_hold():
    """The environment lands in the profile's YAML; safe_dump refuses any non-plain type."""
    import yaml

    from looptune.measure.env import environment

    env = environment("cpu", torch.float32)
    assert yaml.safe_load(yaml.safe_dump(env)) == env


def test_cli_a_full_disk_for_out_is_one_line_and_the_results_are_shown(ckpt, tmp_path, monkeypatch):
    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("looptune.store.atomic_write_text", full)
    out = tmp_path / "p.json"
    args = ["profile", str(ckpt), "--loops", "1", "--mode", "plt", "--out", str(out), "--json"]
    fast = ["--prompt-len", "8", "--gen-len", "4", "--min-time", "0", "--min-repeats", "2"]
    result = runner.invoke(app, [*args, *fast, "--device", "cpu", "--threads", "1"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot write --out {out}: No space left on device; the results are above"
    )
    assert json.loads(result.stdout)["measurements"][0]["status"] == "ok"  # not lost
    assert "profile (times in ms)" in result.stderr and not out.exists()

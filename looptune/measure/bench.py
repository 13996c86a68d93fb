"""The interleaved decode benchmark behind `profile_candidates` (see `looptune.measure.latency`).

`run_candidates(todo, ...)` loads each model once, builds each candidate's decode step (its
setup cost timed apart: compilation or graph capture), runs the warm-ups, then rounds in an
order reversed each round until every candidate meets the stopping rule. A candidate that meets
it is finished at once (statistics, interference) and handed to `on_done`, so a Ctrl-C later
loses only the unfinished ones. Ctrl-C is not caught here: it propagates, and the unfinished
candidates' partial runs are dropped with it.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from looptune.measure.env import gpu_state
from looptune.measure.interference import CpuWatch, Limits, dispersion, interference
from looptune.measure.memory import PeakMemory
from looptune.measure.stats import bootstrap_ci, percentile, summarize
from looptune.measure.timers import LapTimer, Timer, synchronize
from looptune.model.cache import KVCache, kv_bytes
from looptune.model.checkpoint import load_model
from looptune.model.generate import prefill
from looptune.model.step import make_decode_step


@dataclass
class Plan:
    """How every candidate of one call is measured."""

    step: str  # "eager", "compile" or "graphs"
    min_repeats: int
    min_time_s: float
    warmup: int
    seed: int
    limits: Limits


@dataclass
class Candidate:
    """A Measurement being filled in, with what its runs need."""

    m: object  # the Measurement
    path: Path
    cfg: object
    key: dict
    model: object = None
    step: Callable | None = None  # token ids -> logits on `cache`, for a built (setup) step
    prompt: torch.Tensor | None = None
    cache: object = None  # kept between runs by a built step (fixed shapes and addresses)
    ttft: list[float] = field(default_factory=list)
    tpot: list[list[float]] = field(default_factory=list)
    # R = 1 in a second mode: the same step as this candidate's, whose Measurement it takes
    same_as: Candidate | None = None
    growth: int = 0
    finished: bool = False

    def done(self, plan: Plan) -> bool:
        return self.m.repeats >= plan.min_repeats and self.m.measured_s >= plan.min_time_s


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    text = str(e).lower()
    return (
        isinstance(e, (torch.OutOfMemoryError, MemoryError))
        or "out of memory" in text
        or "can't allocate memory" in text
    )


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _held_bytes(cache: KVCache) -> int:
    """Bytes of the storages behind the cache's KV tensors: what it really holds."""
    storages = {}
    for t in cache.tensors():
        s = t.untyped_storage()
        storages[s.data_ptr(), t.device] = s.nbytes()
    return sum(storages.values())


def run_candidates(
    todo: list[Candidate],
    dev,
    plan: Plan,
    say: Callable[[str], None],
    on_done: Callable[[Candidate], None],
) -> None:
    """Measure `todo` in place; `on_done(c)` as each finishes. OOM makes one infeasible."""
    built = plan.step != "eager"
    loaded = {}
    threads = torch.get_num_threads()
    watch = CpuWatch()
    try:
        with torch.inference_mode():
            for c in todo:
                _prepare(c, dev, loaded, say)
            for c in todo:
                if built and c.m.feasible:
                    _guard(c, dev, say, "out of memory building the step", _build, plan.step)
            for c in todo:  # warm-up, apart from the statistics
                for i in range(plan.warmup if c.m.feasible else 0):
                    say(f"{c.m.label}: warm-up {i + 1}/{plan.warmup}")
                    if not _attempt(c, dev, warm=True, say=say):
                        break
            watch.start()  # other processes' CPU time is counted over the timed rounds
            rounds = 0
            while True:
                active = [c for c in todo if c.m.feasible and not c.finished]
                if not active:
                    break
                for c in active if rounds % 2 == 0 else active[::-1]:  # A B C, C B A, ...
                    if _attempt(c, dev, warm=False, say=say):
                        say(
                            f"{c.m.label}: run {c.m.repeats}, ttft {c.ttft[-1]:.2f} ms, "
                            f"tpot median {statistics.median(c.tpot[-1]):.3f} ms"
                        )
                        if c.done(plan):
                            _finish(c, dev, watch, plan.limits)
                            on_done(c)
                rounds += 1
    finally:
        torch.set_num_threads(threads)
        for c in todo:
            c.cache = c.model = c.step = c.prompt = None
        loaded.clear()
        _free(dev)
    for c in todo:
        if not c.finished:  # infeasible: the analytic KV figure and the machine's state
            _finish(c, dev, watch, plan.limits)


def _prepare(c: Candidate, dev, loaded: dict, say):
    k = (c.path, c.m.dtype)
    if k not in loaded:
        say(f"loading {c.path} ({c.m.dtype}, {dev})")
        start = time.perf_counter()
        try:
            model = load_model(c.path, dev, c.m.dtype)[0].fuse()  # as every step runs it
            loaded[k] = model, (time.perf_counter() - start) * 1e3
        except (RuntimeError, MemoryError) as e:
            if not is_oom(e):
                raise
            _free(dev)
            loaded[k] = e
    if isinstance(loaded[k], BaseException):
        _infeasible(c, "out of memory loading the weights", loaded[k], say)
        return
    c.model, c.m.load_ms = loaded[k]
    c.m.weights_bytes = sum(p.numel() * p.element_size() for p in c.model.parameters())
    gen = torch.Generator(dev).manual_seed(c.key["seed"])
    c.prompt = torch.randint(
        0, min(c.cfg.vocab_size, 256), (c.m.batch, c.m.prompt_len), device=dev, generator=gen
    )


def _build(c: Candidate, dev, how: str, say):
    """The candidate's own cache and its compiled or graph-captured step, built before any
    timed run; what building costs (compiling, capturing) is `setup_ms`."""
    m = c.m
    say(f"{m.label}: building the {how} step")
    if dev.type == "cpu":
        torch.set_num_threads(m.threads)
    cache = c.model.new_cache(m.batch, m.prompt_len + m.gen_len, m.loops, m.mode, m.window)
    c.step, m.setup_ms = make_decode_step(c.model, cache, how)
    c.cache = cache  # a built step is bound to this cache (fixed shapes and addresses)
    if how == "compile":
        m.compile_ms = m.setup_ms
    return True


def _guard(c: Candidate, dev, say, what: str, fn, *args) -> bool:
    """fn(c, dev, *args, say); False (and the candidate infeasible) when it runs out of memory."""
    try:
        return fn(c, dev, *args, say)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        _infeasible(c, what, e, say)
        _free(dev)
        return False


def _infeasible(c: Candidate, what: str, e: BaseException, say):
    c.cache = c.step = None
    c.m.status = "infeasible"
    c.m.error = f"{what}: " + (str(e).strip().splitlines() or [""])[0][:300]
    say(f"{c.m.label}: {what}, recorded as infeasible")


def _attempt(c: Candidate, dev, warm: bool, say) -> bool:
    """One run; False (and the candidate infeasible) when it runs out of memory."""
    try:
        ttft, tpot, held, growth, method = _run(c, dev)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        _infeasible(c, "out of memory", e, say)
        _free(dev)
        return False
    c.m.kv_bytes, c.m.peak_mem_method = held, method
    c.growth = max(c.growth, growth)
    if warm:
        c.m.warmup_ms.append(ttft + sum(tpot))
        return True
    c.ttft.append(ttft)
    c.tpot.append(tpot)
    c.m.repeats += 1
    c.m.decode_steps += len(tpot)
    c.m.measured_s += (ttft + sum(tpot)) / 1e3
    return True


def _run(c: Candidate, dev):
    """Prefill + first token, then gen_len timed greedy decode steps. Returns (ttft_ms,
    [tpot_ms], KV bytes held, memory growth, how memory was measured)."""
    m = c.m
    if dev.type == "cpu":
        torch.set_num_threads(m.threads)
    kept = _held_bytes(c.cache) if c.cache is not None else 0  # allocated before the region
    synchronize(dev)
    with PeakMemory(dev) as mem:
        cache = c.cache
        if cache is None:
            cache = c.model.new_cache(m.batch, m.prompt_len + m.gen_len, m.loops, m.mode, m.window)
        step = c.step or make_decode_step(c.model, cache, "eager")[0]
        with Timer(dev) as first_token:
            token = prefill(c.model, c.prompt, cache).argmax(-1)
        with LapTimer(dev) as laps:
            for _ in range(m.gen_len):
                token = step(token).argmax(-1)
                laps.lap()
        held = _held_bytes(cache)
        ttft, tpot = first_token.ms, laps.ms
        del cache, token, step
    return ttft, tpot, held, mem.peak_bytes + kept, mem.method


def _finish(c: Candidate, dev, watch: CpuWatch, limits: Limits):
    """Statistics, peak memory, the analytic KV figure, the machine's state and interference."""
    c.finished = True
    m = c.m
    m.kv_bytes_analytic = kv_bytes(
        c.cfg, m.mode, m.loops, m.window, m.prompt_len + m.gen_len, m.batch, getattr(torch, m.dtype)
    )
    end = {"loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if dev.type == "cuda":
        end["gpu_state"] = gpu_state(dev)
    m.environment = {**m.environment, **end}
    if not c.ttft:
        return
    m.status = "ok"
    m.ttft_ms = percentile(c.ttft, 50)
    m.ttft_ms_ci95 = bootstrap_ci([[t] for t in c.ttft], 50)
    stats = summarize(c.tpot)
    for q in (50, 90, 99):
        setattr(m, f"tpot_ms_p{q}", stats[f"p{q}"])
        setattr(m, f"tpot_ms_p{q}_ci95", stats[f"p{q}_ci95"])
    m.tokens_per_s = m.batch * 1e3 / m.tpot_ms_p50
    m.peak_mem_bytes = c.growth + (m.weights_bytes if dev.type == "cuda" else 0)
    m.conditions = {**m.conditions, **watch.read(), **dispersion(c.tpot)}
    busy = m.threads if dev.type == "cpu" else 1
    m.interference = interference(m.conditions, busy, limits)

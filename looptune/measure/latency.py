"""Latency and memory per candidate (checkpoint x mode x loops x batch) on one device.

`profile_candidates(...)` is the Python API behind `looptune profile` (and pareto's latency
objective); it returns one `Measurement` per candidate. How it measures:

- One *run* of a candidate: allocate its static cache for prompt + generated tokens, prefill a
  seeded random prompt and take the first token (TTFT), then `gen_len` greedy decode steps, each
  timed on its own (the TPOT samples). CUDA events on a GPU, sync + perf_counter elsewhere.
- Warm-up runs come first (with `compile`, the compilation happens in the first one); their
  times are kept in `warmup_ms` / `compile_ms` and never enter the statistics.
- Then rounds: every unfinished candidate runs once per round, in an order reversed each round
  (A B C, C B A, ...), so a drift of the machine's speed falls on all of them alike. A candidate
  is done once it has `min_repeats` runs and `min_time_s` of measured time.
- Out of memory: that candidate is recorded as infeasible and the others go on. Ctrl-C: the
  rounds stop and every candidate keeps what it measured (`status` "partial" / "not-measured").
- Finished results go to `ResultCache("profile")`, keyed by the model's content hash, the
  candidate, the device fingerprint and versions and the stopping rule; `fresh` re-measures.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from looptune.errors import LooptuneError
from looptune.measure.env import environment, fingerprint, gpu_state
from looptune.measure.memory import PeakMemory
from looptune.measure.stats import bootstrap_ci, percentile, summarize
from looptune.measure.timers import LapTimer, Timer, synchronize
from looptune.model.cache import KVCache, kv_bytes
from looptune.model.checkpoint import (content_hash, load_model, read_config, resolve_device,
                                       resolve_dtype, run_dtype, weight_files)
from looptune.model.config import MODES
from looptune.model.generate import prefill
from looptune.model.plt import PLTForCausalLM
from looptune.store import ResultCache

METHOD = 1  # bump when the way of measuring changes: older cache entries are then not reused
STATUSES = ("ok", "partial", "not-measured", "infeasible")


@dataclass
class Measurement:
    """One candidate's result. Times in ms over measured runs only (warm-up apart).

    `tpot_ms_*` are percentiles of the per-token decode latencies pooled over runs, with 95%
    bootstrap intervals that resample whole runs. `tokens_per_s` is the decode throughput at this
    batch, batch / tpot_ms_p50. `kv_bytes` is what the cache's tensors hold at prompt + generated
    length, `kv_bytes_analytic` the formula's figure (`looptune.model.kv_bytes`); they must be
    equal. `peak_mem_bytes`: on a GPU the weights plus the peak of `torch.cuda` allocations a run
    adds; on the CPU the peak growth of resident memory during a run (a lower bound, see
    `looptune.measure.memory`). `status` is one of STATUSES; `error` says why when not "ok".
    """

    checkpoint: str
    model_hash: str
    mode: str
    loops: int
    batch: int
    window: int
    prompt_len: int
    gen_len: int
    dtype: str
    device: str
    compile: bool
    status: str = "not-measured"
    error: str | None = None
    cached: bool = False
    ttft_ms: float | None = None
    ttft_ms_ci95: tuple[float, float] | None = None
    tpot_ms_p50: float | None = None
    tpot_ms_p50_ci95: tuple[float, float] | None = None
    tpot_ms_p90: float | None = None
    tpot_ms_p90_ci95: tuple[float, float] | None = None
    tpot_ms_p99: float | None = None
    tpot_ms_p99_ci95: tuple[float, float] | None = None
    tokens_per_s: float | None = None
    kv_bytes: int | None = None
    kv_bytes_analytic: int | None = None
    peak_mem_bytes: int | None = None
    peak_mem_method: str | None = None
    weights_bytes: int | None = None
    repeats: int = 0
    decode_steps: int = 0
    measured_s: float = 0.0
    warmup_ms: list[float] = field(default_factory=list)
    compile_ms: float | None = None
    environment: dict = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.status != "infeasible"

    @property
    def kv_match(self) -> bool | None:
        return None if self.kv_bytes is None else self.kv_bytes == self.kv_bytes_analytic

    @property
    def label(self) -> str:
        return f"{Path(self.checkpoint).name} {self.mode} R={self.loops} B={self.batch}"

    def to_dict(self) -> dict:
        return {**asdict(self), "feasible": self.feasible, "kv_match": self.kv_match}

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for name, v in values.items():
            if name.endswith("_ci95") and v is not None:
                values[name] = tuple(v)
        return cls(**values)


@dataclass
class _Candidate:
    """A Measurement being filled in, with what its runs need."""

    m: Measurement
    path: Path
    cfg: object
    key: dict
    model: object = None
    step: Callable | None = None
    prompt: torch.Tensor | None = None
    cache: object = None  # kept between runs only when compiled (CUDA graphs need fixed addresses)
    ttft: list[float] = field(default_factory=list)
    tpot: list[list[float]] = field(default_factory=list)
    growth: int = 0

    def done(self, min_repeats: int, min_time_s: float) -> bool:
        return self.m.repeats >= min_repeats and self.m.measured_s >= min_time_s


def profile_candidates(checkpoints: Sequence[Path | str], loops: Sequence[int] = (1, 2, 3, 4),
                       modes: Sequence[str] | None = ("plt", "sequential"),
                       batches: Sequence[int] = (1,), prompt_len: int = 512, gen_len: int = 64,
                       window: int | None = None, dtype: str = "auto", device: str = "auto",
                       compile: bool = False, fresh: bool = False,
                       progress: Callable[[str], None] | None = None, min_repeats: int = 5,
                       min_time_s: float = 2.0, warmup: int = 1,
                       seed: int = 0) -> list[Measurement]:
    """Measure every (checkpoint, batch, mode, loops); one Measurement each, in that order.

    `modes=None` runs each checkpoint in the mode it was trained in; `window=None` uses each
    checkpoint's trained window; `dtype="auto"` keeps the stored dtype. A candidate is measured
    until it has `min_repeats` runs and `min_time_s` seconds of them, after `warmup` runs.
    `progress` receives one human-readable line per event. Cached results are returned as they
    were measured (`cached=True`) unless `fresh`. Raises LooptuneError on bad arguments before
    anything is measured; never raises for out of memory or Ctrl-C (see `status`).
    """
    say = progress or (lambda message: None)
    dev = resolve_device(device)
    resolve_dtype(dtype)  # rejects unknown names
    _check_args(loops, modes, batches, prompt_len, gen_len, min_repeats, min_time_s, warmup)
    store = ResultCache("profile")
    envs: dict[str, dict] = {}
    cands: list[_Candidate] = []
    for path in map(Path, checkpoints):
        cfg, dtype_name = _read_checkpoint(path, dtype, dev)
        W = window if window is not None else cfg.window
        model_hash = content_hash(path)
        env = envs.setdefault(dtype_name, environment(dev, dtype_name))
        for batch in batches:
            for mode in (modes if modes is not None else [cfg.mode]):
                for R in loops:
                    _check_knobs(cfg, R, mode, W, prompt_len + gen_len, path)
                    m = Measurement(str(path), model_hash, mode, R, batch, W, prompt_len, gen_len,
                                    dtype_name, str(dev), compile, environment=env)
                    key = {"method": METHOD, "model": model_hash, "mode": mode, "loops": R,
                           "batch": batch, "window": W, "prompt_len": prompt_len,
                           "gen_len": gen_len, "compile": compile, "device": fingerprint(env),
                           "min_repeats": min_repeats, "min_time_s": min_time_s,
                           "warmup": warmup, "seed": seed}
                    cands.append(_Candidate(m, path, cfg, key))

    todo = []
    for c in cands:
        hit = None if fresh else store.get(c.key)
        if hit is not None:
            c.m = Measurement.from_dict(hit)
            c.m.cached = True
            say(f"{c.m.label}: cached")
        else:
            todo.append(c)
    if todo:
        _measure(todo, dev, compile, min_repeats, min_time_s, warmup, seed, say)
        for c in todo:
            if c.m.status == "ok":
                store.put(c.key, c.m.to_dict())
    return [c.m for c in cands]


# ----- arguments -----

def _check_args(loops, modes, batches, prompt_len, gen_len, min_repeats, min_time_s, warmup):
    def ints(values, name):
        values = list(values)
        if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise LooptuneError(f"{name} must be positive integers, got {values!r}")

    ints(loops, "loops")
    ints(batches, "batches")
    ints([prompt_len], "prompt_len")
    ints([gen_len], "gen_len")
    ints([min_repeats], "min_repeats")
    if modes is not None and (not list(modes) or any(m not in MODES for m in modes)):
        raise LooptuneError(f"modes must be from {', '.join(MODES)}, got {list(modes)!r}")
    if min_time_s < 0 or warmup < 0:
        raise LooptuneError("min_time_s and warmup must not be negative")


def _read_checkpoint(path: Path, dtype: str, device: torch.device):
    """(config, dtype name) without loading the weights: 'auto' is the stored dtype on a GPU
    and float32 on the CPU (CPUs without bf16 units emulate it, 3-5x slower; as `score`)."""
    cfg, _ = read_config(path)
    chosen = resolve_dtype(run_dtype(dtype, device))
    if chosen is not None:
        return cfg, str(chosen).removeprefix("torch.")
    from safetensors import safe_open

    with safe_open(str(weight_files(path)[0]), framework="pt") as f:
        stored = f.get_slice(next(iter(f.keys()))).get_dtype()
    return cfg, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(stored, "float32")


def _check_knobs(cfg, loops, mode, window, context, path):
    with torch.device("meta"):
        PLTForCausalLM(cfg).knobs(loops, mode, window)
    if context > cfg.max_position_embeddings:
        raise LooptuneError(f"{path}: prompt + generated = {context} tokens exceeds the model's "
                            f"max_position_embeddings ({cfg.max_position_embeddings})")


# ----- measuring -----

def _is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    text = str(e).lower()
    return (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "can't allocate memory" in text)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _held_bytes(cache: KVCache) -> int:
    """Bytes of the storages behind the cache's KV tensors: what it really holds."""
    storages = {}
    for t in (cache.full_k, cache.full_v, cache.ring_k, cache.ring_v, cache.carry):
        s = t.untyped_storage()
        storages[s.data_ptr(), t.device] = s.nbytes()
    return sum(storages.values())


@contextlib.contextmanager
def _recompile_budget(n: int):
    """Room for one compiled decode graph per candidate (dynamo's default is 8)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(getattr(cfg, name), n + 8)}):
        yield


def _measure(todo: list[_Candidate], dev, compile, min_repeats, min_time_s, warmup, seed, say):
    cudagraphs = compile and dev.type == "cuda"
    loaded = {}
    try:
        with torch.inference_mode(), (_recompile_budget(len(todo)) if compile
                                      else contextlib.nullcontext()):
            for c in todo:
                k = (c.path, c.m.dtype)
                if k not in loaded:
                    say(f"loading {c.path} ({c.m.dtype}, {dev})")
                    loaded[k] = _load(c.path, dev, c.m.dtype, compile, cudagraphs)
                if isinstance(loaded[k], BaseException):
                    _infeasible(c, "out of memory loading the weights", loaded[k], say)
                    continue
                c.model, c.step = loaded[k]
                c.m.weights_bytes = sum(p.numel() * p.element_size() for p in c.model.parameters())
                gen = torch.Generator(dev).manual_seed(seed)
                c.prompt = torch.randint(0, min(c.cfg.vocab_size, 256), (c.m.batch, c.m.prompt_len),
                                         device=dev, generator=gen)
            for c in todo:  # warm-up, apart from the statistics
                for i in range(warmup if c.m.feasible else 0):
                    say(f"{c.m.label}: warm-up {i + 1}/{warmup}"
                        + (" (compiling)" if compile and i == 0 else ""))
                    if not _attempt(c, dev, cudagraphs, say, warm=True, first=i == 0):
                        break
            rounds = 0
            while True:
                active = [c for c in todo if c.m.status in ("not-measured", "partial")
                          and not c.done(min_repeats, min_time_s)]
                if not active:
                    break
                for c in (active if rounds % 2 == 0 else active[::-1]):  # A B C, C B A, ...
                    if _attempt(c, dev, cudagraphs, say, warm=False, first=False):
                        say(f"{c.m.label}: run {c.m.repeats}, ttft {c.ttft[-1]:.2f} ms, "
                            f"tpot median {statistics.median(c.tpot[-1]):.3f} ms")
                rounds += 1
            for c in todo:
                if c.m.status == "partial":
                    c.m.status = "ok"
    except KeyboardInterrupt:
        say("interrupted: keeping what was measured")
        for c in todo:
            if c.m.status == "partial":
                c.m.error = "interrupted before the stopping rule was met"
            elif c.m.status == "not-measured":
                c.m.error = "interrupted before it was measured"
    finally:
        for c in todo:
            c.cache = c.model = c.step = c.prompt = None
        loaded.clear()
        _free(dev)
    end = {"loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if dev.type == "cuda":
        end["gpu_state"] = gpu_state(dev)
    for c in todo:
        _finish(c, dev, end)


def _load(path, dev, dtype, compile, cudagraphs):
    """(model, decode step), or the out-of-memory error if the weights do not fit."""
    try:
        model, _ = load_model(path, dev, dtype)
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
        _free(dev)
        return e
    step = model.decode_step
    if compile:
        step = torch.compile(step, mode="reduce-overhead" if cudagraphs else None)
    return model, step


def _infeasible(c: _Candidate, what: str, e: BaseException, say):
    c.cache = None
    c.m.status = "infeasible"
    c.m.error = f"{what}: " + (str(e).strip().splitlines() or [""])[0][:300]
    say(f"{c.m.label}: {what}, recorded as infeasible")


def _attempt(c: _Candidate, dev, cudagraphs, say, warm: bool, first: bool) -> bool:
    """One run; False (and the candidate infeasible) when it runs out of memory."""
    try:
        ttft, tpot, held, growth, method, compile_ms = _run(c, dev, cudagraphs, first)
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
        _infeasible(c, "out of memory", e, say)
        _free(dev)
        return False
    c.m.kv_bytes, c.m.peak_mem_method = held, method
    if compile_ms is not None:
        c.m.compile_ms = compile_ms
    if not (warm and first and c.m.compile):  # the compiling run's memory is the compiler's
        c.growth = max(c.growth, growth)
    if warm:
        c.m.warmup_ms.append(ttft + sum(tpot))
        return True
    c.ttft.append(ttft)
    c.tpot.append(tpot)
    c.m.status = "partial"  # "ok" once the stopping rule is met
    c.m.repeats += 1
    c.m.decode_steps += len(tpot)
    c.m.measured_s += (ttft + sum(tpot)) / 1e3
    return True


def _run(c: _Candidate, dev, cudagraphs, first):
    """Prefill + first token, then gen_len timed greedy decode steps. Returns (ttft_ms,
    [tpot_ms], KV bytes held, memory growth, how memory was measured, compile_ms or None)."""
    m = c.m
    compile_ms = None
    # The first compiled call compiles; with CUDA graphs the next one records the graph.
    n_compile = (2 if cudagraphs else 1) if (first and m.compile) else 0
    kept = _held_bytes(c.cache) if c.cache is not None else 0  # allocated before the region
    synchronize(dev)
    with PeakMemory(dev) as mem:
        cache = c.cache
        if cache is None:
            cache = c.model.new_cache(m.batch, m.prompt_len + m.gen_len, m.loops, m.mode, m.window)
            if m.compile:
                c.cache = cache  # a compiled step keeps one cache: fixed shapes and addresses
                if cudagraphs:
                    for t in vars(cache).values():
                        if isinstance(t, torch.Tensor):
                            torch._dynamo.mark_static_address(t)
        with Timer(dev) as first_token:
            token = prefill(c.model, c.prompt, cache).argmax(-1)
        t0 = time.perf_counter()
        with LapTimer(dev) as laps:
            for i in range(m.gen_len):
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                token = c.step(token, cache).argmax(-1)
                laps.lap()
                if i + 1 == n_compile:  # host time, compilation included
                    synchronize(dev)
                    compile_ms = (time.perf_counter() - t0) * 1e3
        held = _held_bytes(cache)
        ttft, tpot = first_token.ms, laps.ms
        del cache, token
    return ttft, tpot, held, mem.peak_bytes + kept, mem.method, compile_ms


def _finish(c: _Candidate, dev, end: dict):
    """Statistics, peak memory, the analytic KV figure, and the machine's state at the end."""
    m = c.m
    m.kv_bytes_analytic = kv_bytes(c.cfg, m.mode, m.loops, m.window, m.prompt_len + m.gen_len,
                                   m.batch, getattr(torch, m.dtype))
    m.environment = {**m.environment, **end}
    if not c.ttft:
        return
    m.ttft_ms = percentile(c.ttft, 50)
    m.ttft_ms_ci95 = bootstrap_ci([[t] for t in c.ttft], 50)
    stats = summarize(c.tpot)
    for q in (50, 90, 99):
        setattr(m, f"tpot_ms_p{q}", stats[f"p{q}"])
        setattr(m, f"tpot_ms_p{q}_ci95", stats[f"p{q}_ci95"])
    m.tokens_per_s = m.batch * 1e3 / m.tpot_ms_p50
    m.peak_mem_bytes = c.growth + (m.weights_bytes if dev.type == "cuda" else 0)


def document(measurements: list[Measurement], settings: dict, env: dict,
             interrupted: bool = False) -> dict:
    """The `--json` document: settings, the environment, one record per candidate."""
    return {"command": "profile", "settings": settings, "environment": env,
            "interrupted": interrupted, "measurements": [m.to_dict() for m in measurements]}


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2, default=str) + "\n"

"""Latency and memory per candidate (checkpoint x mode x loops x batch) on one device.

`profile_candidates(...)` is the Python API behind `looptune profile` (and pareto's latency
objective); it returns one `Measurement` (`measurement.py`) per candidate. How it measures:

- One *run* of a candidate: prefill a seeded random prompt into a static cache for prompt +
  generated tokens and take the first token (TTFT), then `gen_len` greedy decode steps, each
  timed on its own (the TPOT samples). CUDA events on a GPU, sync + perf_counter elsewhere.
- A compiled or graph-captured step is built first, on its own cache, and the time that takes
  is `setup_ms` (also `compile_ms` when compiled); warm-up runs come next, kept in `warmup_ms`.
  Neither enters the statistics.
- Then rounds: every unfinished candidate runs once per round, in an order reversed each round
  (A B C, C B A, ...), so a drift of the machine's speed falls on all of them alike. A candidate
  is done once it has `min_repeats` runs and `min_time_s` of measured time.
- On the CPU the thread count is the faster of 1 and all usable cores for this model's shape
  (`interference.choose_threads`, cached per shape and machine) unless `threads` is given.
- Runs on one device are serialised between processes (`looptune.store.device_lock`); each
  Measurement records the load, other processes' CPU use and the dispersion it saw, and the
  reasons it is not to be trusted in `interference` (see `looptune.measure.interference`).
- Out of memory: that candidate is recorded as infeasible and the others go on. Ctrl-C raises
  `looptune.errors.Interrupted` (a KeyboardInterrupt) after the candidates already finished
  were cached; nothing interrupted is cached or returned.
- Finished results go to `ResultCache("profile")`, keyed by the model's content hash, the
  candidate, the device fingerprint (threads included) and versions and the stopping rule,
  unless taken under interference; `fresh` re-measures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from looptune.errors import Interrupted, LooptuneError
from looptune.measure.bench import Candidate, Plan, run_candidates
from looptune.measure.env import environment, fingerprint
from looptune.measure.interference import (
    CpuWatch,
    Limits,
    choose_threads,
    interference,
    usable_cores,
)
from looptune.measure.measurement import Measurement, check_measurement
from looptune.model.checkpoint import (
    content_hash,
    load_model,
    read_config,
    resolve_device,
    resolve_dtype,
    run_dtype,
    weight_files,
)
from looptune.model.config import MODES
from looptune.model.plt import PLTForCausalLM
from looptune.store import ResultCache, device_lock, warn

METHOD = 2  # bump when the way of measuring changes: older cache entries are then not reused


def profile_candidates(
    checkpoints: Sequence[Path | str],
    loops: Sequence[int] = (1, 2, 3, 4),
    modes: Sequence[str] | None = ("plt", "sequential"),
    batches: Sequence[int] = (1,),
    prompt_len: int = 512,
    gen_len: int = 64,
    window: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    compile: bool = False,
    fresh: bool = False,
    progress: Callable[[str], None] | None = None,
    min_repeats: int = 5,
    min_time_s: float = 2.0,
    warmup: int = 1,
    seed: int = 0,
    graphs: bool = False,
    threads: int | None = None,
    limits: Limits | None = None,
) -> list[Measurement]:
    """Measure every (checkpoint, batch, mode, loops); one Measurement each, in that order.

    `modes=None` runs each checkpoint in the mode it was trained in; `window=None` uses each
    checkpoint's trained window; `dtype="auto"` keeps the stored dtype on a GPU, float32 on
    the CPU. `compile`: torch.compile the decode step (inductor); `graphs`:
    capture the eager step in a CUDA graph (GPU only). `threads`: torch CPU threads (default:
    the faster of 1 and all cores, probed). A candidate is measured until it has `min_repeats`
    runs and `min_time_s` seconds of them, after `warmup` runs. `limits`: when a measurement is
    flagged as taken under interference (default `Limits.from_env()`). `progress` receives one
    human-readable line per event. Cached results are returned as they were measured
    (`cached=True`) unless `fresh`. Writes nothing but the result cache. Raises LooptuneError on
    bad arguments before anything is measured, `looptune.errors.Interrupted` on Ctrl-C (after
    caching the candidates already finished); never raises for out of memory (see `status`).
    """
    say = progress or (lambda message: None)
    dev = resolve_device(device)
    resolve_dtype(dtype)  # rejects unknown names
    _check_args(loops, modes, batches, prompt_len, gen_len, min_repeats, min_time_s, warmup)
    how = _step_kind(compile, graphs, dev)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise LooptuneError(f"threads must be a positive integer, got {threads!r}")
    limits = limits or Limits.from_env()
    store = ResultCache("profile", validate=check_measurement)
    envs: dict[tuple, dict] = {}
    cands: list[Candidate] = []
    for path in map(Path, checkpoints):
        cfg, dtype_name = _read_checkpoint(path, dtype, dev)
        W = window if window is not None else cfg.window
        for mode in modes if modes is not None else [cfg.mode]:
            for R in loops:
                _check_knobs(cfg, R, mode, W, prompt_len + gen_len, path)
        model_hash = content_hash(path)
        for batch in batches:
            n, how_chosen = _threads(path, cfg, dtype_name, batch, dev, threads, fresh, limits, say)
            if (dtype_name, n) not in envs:
                envs[dtype_name, n] = {
                    **environment(dev, dtype_name),
                    "threads": n,
                    "threads_chosen": how_chosen,
                }
            env = envs[dtype_name, n]
            plain = None  # R = 1, as measured in the first mode asked
            for mode in modes if modes is not None else [cfg.mode]:
                for R in loops:
                    m = Measurement(
                        str(path),
                        model_hash,
                        mode,
                        R,
                        batch,
                        W,
                        prompt_len,
                        gen_len,
                        dtype_name,
                        str(dev),
                        how == "compile",
                        step=how,
                        threads=n,
                        environment=env,
                    )
                    key = {
                        "method": METHOD,
                        "model": model_hash,
                        "mode": mode,
                        "loops": R,
                        "batch": batch,
                        "window": W,
                        "prompt_len": prompt_len,
                        "gen_len": gen_len,
                        "step": how,
                        "device": fingerprint(env),
                        "min_repeats": min_repeats,
                        "min_time_s": min_time_s,
                        "warmup": warmup,
                        "seed": seed,
                    }
                    cands.append(Candidate(m, path, cfg, key, same_as=plain if R == 1 else None))
                    if R == 1:
                        plain = plain or cands[-1]

    todo = []
    for c in cands:
        if c.same_as:
            continue
        hit = None if fresh else _cached(store, c)
        if hit is not None:
            c.m = hit
            say(f"{c.m.label}: cached")
        else:
            todo.append(c)
    if todo:
        _measure(todo, dev, Plan(how, min_repeats, min_time_s, warmup, seed, limits), store, say)
    for c in cands:  # R = 1 is one plain decoder in every mode: the same step, measured once
        if c.same_as:
            c.m = dataclasses.replace(c.same_as.m, mode=c.m.mode)
    return [c.m for c in cands]


IDENTITY = ("model_hash", "mode", "loops", "batch", "window", "prompt_len", "gen_len", "dtype")


def _cached(store: ResultCache, c: Candidate) -> Measurement | None:
    """The cached Measurement of `c`, under `c`'s own path (a copy of a checkpoint has the same
    content, so the same result); None, with a warning for a result of another candidate.
    R = 1 is one plain decoder in every mode: one measured in another mode is `c`'s too."""
    others = [mode for mode in MODES if mode != c.m.mode] if c.m.loops == 1 else []
    for mode in [c.m.mode, *others]:
        key = {**c.key, "mode": mode}
        hit = store.get(key)
        if hit is None:
            continue
        m = Measurement.from_dict(hit)
        if m.mode == mode:  # as its key says: the same step, shown under `c`'s mode
            m.mode = c.m.mode
        wrong = [f for f in IDENTITY if getattr(m, f) != getattr(c.m, f)]
        if wrong:
            warn(
                f"ignoring profile cache entry {store.path(key)}: its {wrong[0]} "
                f"{getattr(m, wrong[0])!r} is not the candidate's {getattr(c.m, wrong[0])!r}; "
                "measuring again"
            )
            continue
        m.checkpoint, m.cached = c.m.checkpoint, True
        return m
    return None


def _measure(todo: list[Candidate], dev, plan: Plan, store: ResultCache, say):
    cached = []

    def done(c: Candidate):
        if c.m.interference:
            say(
                f"{c.m.label}: measured under interference ({', '.join(c.m.interference)}); "
                "not cached"
            )
        elif c.m.status == "ok" and store.put(c.key, c.m.to_dict()):
            cached.append(c)

    with device_lock(_lock_name(dev), on_wait=say) as waited:
        for c in todo:
            c.m.conditions["lock_wait_s"] = None if waited is None else round(waited, 3)
        try:
            run_candidates(todo, dev, plan, say, done)
        except KeyboardInterrupt:
            raise Interrupted(
                f"{len(cached)} of {len(todo)} candidates were finished and "
                "cached; a rerun measures the rest"
            ) from None


def _lock_name(dev: torch.device) -> str:
    return f"latency-{dev.type}{'' if dev.index is None else dev.index}"


def _step_kind(compile: bool, graphs: bool, dev: torch.device) -> str:
    if compile and graphs:
        raise LooptuneError("compile and graphs are two ways to build the step: choose one")
    if graphs and dev.type != "cuda":
        raise LooptuneError(f"graphs (CUDA graphs) needs a CUDA device, not {dev}")
    return "graphs" if graphs else "compile" if compile else "eager"


def _threads(path, cfg, dtype_name, batch, dev, threads, fresh, limits, say) -> tuple[int, str]:
    """(torch CPU threads for this model and batch, how they were chosen)."""
    if dev.type != "cpu":
        return torch.get_num_threads(), "torch default (not a CPU device)"
    if threads is not None:
        return threads, "given"
    if usable_cores() == 1:
        return 1, "one usable core"
    shape = {
        k: getattr(cfg, k)
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    }
    machine = {k: v for k, v in fingerprint(environment(dev, dtype_name)).items() if k != "threads"}
    key = {"v": 1, "shape": shape, "batch": batch, "machine": machine, "cores": usable_cores()}
    cache = ResultCache("threads", validate=_check_threads)
    hit = None if fresh else cache.get(key)
    if hit is not None:
        return hit["threads"], "probed (cached)"
    say(f"{path.name}: probing CPU threads (1 or {usable_cores()}) at batch {batch}")
    with device_lock(_lock_name(dev), on_wait=say):
        watch = CpuWatch()
        model = load_model(path, dev, dtype_name)[0].fuse()  # as the measured steps run it
        probe = choose_threads(model, batch, dev)
        del model
    if not interference(watch.read(), 1, limits):
        cache.put(key, probe)
    return probe["threads"], "probed"


def _check_threads(result):
    if not (isinstance(result["threads"], int) and 1 <= result["threads"] <= usable_cores()):
        raise ValueError(f"threads {result['threads']!r} is not a usable count here")


# ----- arguments -----


def _check_args(loops, modes, batches, prompt_len, gen_len, min_repeats, min_time_s, warmup):
    def ints(values, name):
        values = list(values)
        if not values or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values
        ):
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
        raise LooptuneError(
            f"{path}: prompt + generated = {context} tokens exceeds the model's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )

"""`score`: quality per (checkpoint, loops, window, set) on the same model and knobs `profile`
measures.

`score_checkpoints(...)` is the Python API (`looptune score` and `pareto` call it). For each
checkpoint, window and set it scores every requested loop count R and the checkpoint's trained R
on the same items, and returns one `Score` per requested (checkpoint, R, window, set):

- `bits_per_byte` (code, JSONL texts) and `nll_per_byte` (HumanEval solutions, JSONL
  completions; in nats, natural log) are pooled over items: total over total bytes. Texts are
  scored in windows of the context the checkpoint was trained with (`trained_context`),
  advancing by half of it. All loop counts come from one forward pass at the largest R, since
  loop r's state is the final state of an r-loop run (`quality.bpb.score_loops`).
- `pass_at_1` (HumanEval, opt-in with `execute=True`): greedy completions run against the tests
  in the sandbox; one generation per R.
- Each value has a 95% percentile bootstrap interval over items; each R is compared with the
  trained R by a paired bootstrap over the same items (R minus trained), and for likelihood sets
  by top-1 next-token agreement with the trained R over the scored tokens.

Per-item results are cached in `ResultCache("score")`, one entry per (model hash, mode, R,
window, set name and content hash, limit, seed, context, stride, device type, dtype), so a
repeated call, or `pareto` after `score`, does no model work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from looptune.errors import LooptuneError
from looptune.quality.bpb import WindowPlan, clamp_window, score_loops, small_model_threads
from looptune.quality.sets import ValidationSet, load_set
from looptune.quality.stats import N_BOOT, paired_ratio_diff_ci, ratio_ci
from looptune.store import ResultCache

CACHE_VERSION = 1
DEFAULT_LOOPS = (1, 2, 3, 4)
BATCH_TOKENS = 8192  # tokens per forward batch of windows

# progress(label, done, total): called as work finishes; label names the current pass.
Progress = Callable[[str, int, int], None]


@dataclass
class Score:
    """One (checkpoint, loops, window, set). `value` is in the unit `metric` names."""

    checkpoint: str
    model_hash: str
    set: str
    metric: str  # "bits_per_byte", "nll_per_byte" (nats per byte) or "pass_at_1"
    loops: int
    trained_loops: int
    mode: str
    window: int
    value: float
    ci95_low: float
    ci95_high: float
    diff_vs_trained: float | None  # value minus the trained R's, paired over items; None at R
    diff_ci95_low: float | None
    diff_ci95_high: float | None
    top1_agreement: float | None  # share of scored tokens whose argmax equals the trained R's
    items: int  # items scored
    set_items: int  # items in the full set (more than `items` under --limit)
    tokens: int  # tokens scored (pass_at_1: tokens generated)
    bytes: int  # bytes those tokens stand for
    seconds: float  # wall time of the pass that produced it (shared by the loop counts of it)
    pass_loops: int  # loops of that pass: likelihood sets score R = 1..pass_loops in one pass
    context: int  # tokens per scoring window
    stride: int  # tokens a window advances (each scored token has >= context - stride before it)
    device: str
    dtype: str
    torch_version: str
    cached: bool = False
    sandbox: str | None = None  # pass_at_1: "boundary" or "tripwire", plus any gaps

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "pass_at_1"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        m = self.metric
        diff = None if self.diff_vs_trained is None else [self.diff_ci95_low, self.diff_ci95_high]
        return {
            "checkpoint": self.checkpoint,
            "model_hash": self.model_hash,
            "set": self.set,
            "loops": self.loops,
            "trained_loops": self.trained_loops,
            "mode": self.mode,
            "window": self.window,
            m: self.value,
            f"{m}_ci95": [self.ci95_low, self.ci95_high],
            f"diff_vs_trained_{m}": self.diff_vs_trained,
            f"diff_vs_trained_{m}_ci95": diff,
            "top1_agreement_with_trained": self.top1_agreement,
            "items": self.items,
            "set_items": self.set_items,
            "scored_tokens": self.tokens,
            "scored_bytes": self.bytes,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "bytes_per_s": self.bytes_per_s,
            "pass_loops": self.pass_loops,
            "context": self.context,
            "stride": self.stride,
            "device": self.device,
            "dtype": self.dtype,
            "torch_version": self.torch_version,
            "cached": self.cached,
            "sandbox": self.sandbox,
        }


def score_checkpoints(
    checkpoints: Sequence[str | Path],
    loops: Sequence[int] = DEFAULT_LOOPS,
    windows: Sequence[int] | None = None,
    sets: Sequence[str] = ("code",),
    limit: int | None = None,
    seed: int = 0,
    mode: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    execute: bool = False,
    context: int | None = None,
    stride: int | None = None,
    n_boot: int = N_BOOT,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> list[Score]:
    """Score every (checkpoint, R in `loops`, window, set); see the module docstring.

    `windows`: G-SWA windows to score (default: each checkpoint's trained W). `sets`: names
    (`code`, `humaneval-nll`, `humaneval`) or JSONL paths. `limit`/`seed`: a seeded stratified
    subset of each set (`quality.sets`), the seed also seeds the bootstrap. `mode`: run-time mode
    (default: the checkpoint's). `dtype`: "auto" is the stored dtype on a GPU and float32 on
    the CPU, where bfloat16 matmuls are emulated (5x slower on the machine this was built on,
    with the same bits per byte to three decimals). `context`/`stride`: tokens per scoring
    window and how far windows advance (default: `trained_context`, half of it). `execute` must
    be True to score `humaneval` (it runs generated code). Results come from the cache when
    present unless `use_cache` is False."""
    from looptune.model.checkpoint import content_hash, load_model, resolve_device, run_dtype

    if "humaneval" in sets and not execute:
        raise LooptuneError(
            "the humaneval set runs model-generated code; set execute to "
            "allow it (each program runs in a limited, isolated subprocess)"
        )
    if "humaneval" in sets:
        from looptune.quality.sandbox import sandbox_kind

        sandbox_kind()  # a bad $LOOPTUNE_SANDBOX fails, and a fallback is announced, before work
    if not loops or any(not isinstance(r, int) or r < 1 for r in loops):
        raise LooptuneError(f"loops must be positive integers, got {list(loops)!r}")
    vsets = [load_set(s, limit, seed) for s in sets]  # every set is checked before any scoring
    dtype = run_dtype(dtype, resolve_device(device))
    cache = ResultCache("score", validate=check_record)
    scores = []
    for ckpt in checkpoints:
        model, tokenizer = load_model(ckpt, device, dtype)
        if tokenizer is None:
            raise LooptuneError(f"{ckpt}: the checkpoint has no tokenizer; scoring needs text")
        param = model.model.embed_tokens.weight
        context_ = context or trained_context(ckpt, model.config)
        run = _Run(
            model,
            tokenizer,
            str(ckpt),
            content_hash(ckpt),
            mode,
            context_,
            stride,
            param.device,
            str(param.dtype).removeprefix("torch."),
            cache,
            use_cache,
            progress,
        )
        for w in windows or [model.config.window]:
            model.knobs(None, mode, w)  # check the knobs before any work
            for vs in vsets:
                records = run.records(vs, w, sorted(set(loops) | {run.trained}))
                scores += [_summarise(run, vs, w, r, records, seed, n_boot) for r in loops]
        del model
    return scores


def check_record(rec: dict) -> None:
    """The result cache's check of a per-item record: one no scoring could produce (bits per
    byte <= 0, a byte count < 0, a pass that is not 0 or 1) is scored again."""
    if "passed" in rec:
        if any(p not in (0, 1) for p in rec["passed"]):
            raise ValueError("passed must be 0 or 1 per item")
    elif (
        len(rec["bits"]) != len(rec["bytes"])
        or min(rec["bytes"]) < 0
        or min(rec["bits"]) < 0
        or sum(rec["bits"]) <= 0
        or sum(rec["bytes"]) <= 0
    ):
        raise ValueError("bits per byte must be positive, with one count per item")


def trained_context(checkpoint, cfg) -> int:
    """The context a checkpoint was trained with, when its config.json records it (looptune's
    trainer writes `looptune_train.context`), else its `max_position_embeddings`. Scoring in
    longer windows would measure length extrapolation, not the model."""
    from looptune.model.checkpoint import read_config

    trained = read_config(Path(checkpoint))[1].get("looptune_train", {}).get("context")
    if isinstance(trained, int) and 1 < trained <= cfg.max_position_embeddings:
        return trained
    return cfg.max_position_embeddings


def scores_document(scores: list[Score]) -> dict:
    """The `--json` document: one entry per (checkpoint, loops, window, set)."""
    return {
        "scores": [s.to_dict() for s in scores],
        "units": {
            "bits_per_byte": "bits per UTF-8 byte",
            "nll_per_byte": "nats per UTF-8 byte of the completion given its prompt",
            "pass_at_1": "share of problems whose greedy completion passes its tests",
        },
        "intervals": "95% percentile bootstrap over items; diff_vs_trained is paired",
    }


class _Run:
    """One loaded checkpoint: produces per-item records for (set, window, R), cached."""

    def __init__(
        self,
        model,
        tokenizer,
        checkpoint,
        model_hash,
        mode,
        context,
        stride,
        device,
        dtype,
        cache,
        use_cache,
        progress,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.checkpoint, self.model_hash = checkpoint, model_hash
        self.trained = model.config.num_loops
        self.mode = model.knobs(None, mode, None)[1]
        self.context, self.stride = clamp_window(model.config, context, stride)
        self.device, self.dtype = device, dtype
        self.cache, self.use_cache, self.progress = cache, use_cache, progress

    def key(self, vs: ValidationSet, window: int, loops: int) -> dict:
        key = {
            "v": CACHE_VERSION,
            "model": self.model_hash,
            "mode": self.mode,
            "loops": loops,
            "window": window,
            "set": vs.name,
            "set_hash": vs.content_hash,
            "items": [x.id for x in vs.items],
            "device": self.device.type,
            "dtype": self.dtype,
        }
        if vs.metric == "pass_at_1":
            from looptune.quality.humaneval import HARNESS, MAX_NEW_TOKENS, STOP_SEQUENCES

            key.update(max_new_tokens=MAX_NEW_TOKENS, stop=list(STOP_SEQUENCES), harness=HARNESS)
        else:
            key.update(context=self.context, stride=self.stride, reference=self.trained)
        return key

    def records(self, vs: ValidationSet, window: int, loops: list[int]) -> dict[int, dict]:
        records, missing = {}, []
        for r in loops:
            hit = self.cache.get(self.key(vs, window, r)) if self.use_cache else None
            if hit is not None:
                records[r] = {**hit, "cached": True}
            else:
                missing.append(r)
        if missing:
            fresh = (
                self._generate_and_test(vs, window, missing)
                if vs.metric == "pass_at_1"
                else self._likelihood(vs, window, missing)
            )
            for r, rec in fresh.items():
                self.cache.put(self.key(vs, window, r), rec)
                records[r] = {**rec, "cached": False}
        return records

    def _likelihood(self, vs: ValidationSet, window: int, loops: list[int]) -> dict[int, dict]:
        texts = [x.text for x in vs.items]
        prompts = [x.prompt for x in vs.items] if any(x.prompt for x in vs.items) else None
        top = max([*loops, self.trained])
        label = f"{Path(self.checkpoint).name} {vs.name} W={window} R<={top}"
        report = None
        if self.progress:
            total = len(WindowPlan(self.tokenizer, texts, self.context, self.stride, prompts).jobs)
            done = [0]

            def report(n):
                done[0] += n
                self.progress(label, done[0], total)

        start = time.perf_counter()
        result = score_loops(
            self.model,
            self.tokenizer,
            texts,
            loops,
            prompts=prompts,
            reference=self.trained,
            mode=self.mode,
            window=window,
            context=self.context,
            stride=self.stride,
            batch_tokens=BATCH_TOKENS,
            progress=report,
        )
        seconds = time.perf_counter() - start
        return {
            r: {
                "bits": [x.bits for x in items],
                "bytes": [x.bytes for x in items],
                "tokens": [x.tokens for x in items],
                "agree": [x.agree for x in items],
                "seconds": seconds,
                "pass_loops": top,
            }
            for r, items in result.items()
        }

    def _generate_and_test(
        self, vs: ValidationSet, window: int, loops: list[int]
    ) -> dict[int, dict]:
        from looptune.quality.humaneval import complete, run_tests

        out = {}
        for r in loops:
            label = f"{Path(self.checkpoint).name} {vs.name} W={window} R={r}"
            completions, tokens = [], []
            start = time.perf_counter()
            with small_model_threads(self.model):
                for i, item in enumerate(vs.items):
                    text, n = complete(
                        self.model, self.tokenizer, item.prompt, r, self.mode, window
                    )
                    completions.append(text)
                    tokens.append(n)
                    if self.progress:
                        self.progress(label, i + 1, len(vs.items))
            seconds = time.perf_counter() - start
            results = run_tests(vs.items, completions)
            out[r] = {
                "passed": [int(x.passed) for x in results],
                "tokens": tokens,
                "bytes": [len(c.encode()) for c in completions],
                "seconds": seconds,
                "pass_loops": r,
                "completions": completions,
                "results": [x.detail or x.status for x in results],
                "sandbox": results[0].sandbox if results else None,
            }
        return out


def _summarise(
    run: _Run,
    vs: ValidationSet,
    window: int,
    r: int,
    records: dict[int, dict],
    seed: int,
    n_boot: int,
) -> Score:
    rec, ref = records[r], records[run.trained]
    if vs.metric == "pass_at_1":
        ones = [1] * len(rec["passed"])
        value, lo, hi = ratio_ci(rec["passed"], ones, n_boot, seed)
        diff = paired_ratio_diff_ci(rec["passed"], ones, ref["passed"], ones, n_boot, seed)
        agreement = None
    else:
        scale = math.log(2) if vs.metric == "nll_per_byte" else 1.0  # bits -> nats
        value, lo, hi = (scale * v for v in ratio_ci(rec["bits"], rec["bytes"], n_boot, seed))
        diff = tuple(
            scale * v
            for v in paired_ratio_diff_ci(
                rec["bits"], rec["bytes"], ref["bits"], ref["bytes"], n_boot, seed
            )
        )
        agreement = sum(rec["agree"]) / max(sum(rec["tokens"]), 1)
    if r == run.trained:
        diff = (None, None, None)
    return Score(
        checkpoint=run.checkpoint,
        model_hash=run.model_hash,
        set=vs.name,
        metric=vs.metric,
        loops=r,
        trained_loops=run.trained,
        mode=run.mode,
        window=window,
        value=value,
        ci95_low=lo,
        ci95_high=hi,
        diff_vs_trained=diff[0],
        diff_ci95_low=diff[1],
        diff_ci95_high=diff[2],
        top1_agreement=agreement,
        items=len(vs.items),
        set_items=vs.total,
        tokens=sum(rec["tokens"]),
        bytes=sum(rec["bytes"]),
        seconds=rec["seconds"],
        pass_loops=rec["pass_loops"],
        context=run.context,
        stride=run.stride,
        device=str(run.device),
        dtype=run.dtype,
        torch_version=torch.__version__,
        cached=rec["cached"],
        sandbox=rec.get("sandbox"),
    )


__all__ = ["DEFAULT_LOOPS", "Score", "score_checkpoints", "scores_document"]

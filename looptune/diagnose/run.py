"""`diagnose(...)`: per-loop diagnostics of one checkpoint and the verdict on another loop.

The jobs live apart: `measure` (the pass and every definition), `verdict` (the rule and the
prediction), `family` (the bundled members on the same texts), `plot`. Texts come from
`quality.sets`, as for `score`: the same sets, the same `limit` (None: the set's default, 32
pieces of 512 bytes for `code`; 0: every item) and the same windows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from looptune.diagnose.family import family_scores
from looptune.diagnose.measure import BATCH_TOKENS, BATCHED_SMALL, measure_loops
from looptune.diagnose.result import Diagnosis, LoopRow
from looptune.diagnose.verdict import verdict
from looptune.errors import LooptuneError


def resolve_checkpoint(checkpoint) -> Path:
    """A checkpoint directory, a bundled member's name (`plt-r3`), or None (the default)."""
    from looptune.bundled import MODELS_DIR, resolve_checkpoints

    if checkpoint is not None and not Path(checkpoint).exists():
        named = MODELS_DIR / str(checkpoint)
        if str(checkpoint).startswith("plt-r") and (named / "config.json").exists():
            return named
    return resolve_checkpoints([checkpoint] if checkpoint else None)[0]


def diagnose(
    checkpoint=None,
    loops: int | None = None,
    set_name: str = "code",
    limit: int | None = None,
    seed: int = 0,
    device="auto",
    dtype="auto",
    family: bool = False,
    cache_dir: Path | None = None,
    batch_tokens: int = BATCH_TOKENS,
    progress=None,
) -> Diagnosis:
    """Per-loop diagnostics of `checkpoint` (a directory or a bundled member's name; default:
    the bundled model) at `loops` (default: its trained R) on the set `set_name` (`code`,
    `humaneval-nll` or a JSONL path; `limit`, `seed` as in `score`), with the verdict.

    `family=True` scores the bundled members at their own R on the same items to check the
    prediction. Nothing is written unless `cache_dir` is given: then family scores are cached
    there, and reused even when `family` is False (without them, no model but this one runs).
    `dtype="auto"` is float32 on a CPU and the stored dtype elsewhere.
    `progress(label, done, total)` is called as windows ("windows") and members ("family")
    finish."""
    from looptune.bundled import family_members
    from looptune.model.checkpoint import content_hash, load_model, resolve_device, run_dtype
    from looptune.quality.bpb import clamp_window, small_model_threads
    from looptune.quality.score import trained_context
    from looptune.quality.sets import load_set

    path = resolve_checkpoint(checkpoint)
    if loops is not None and loops < 1:
        raise LooptuneError(f"loops must be at least 1, got {loops}")
    vs = load_set(set_name, limit, seed)
    if vs.metric == "pass_at_1":
        raise LooptuneError(
            f"set {set_name!r} is scored by running code; diagnose measures "
            "likelihood: use humaneval-nll"
        )
    dtype = run_dtype(dtype, resolve_device(device))  # norms, KL and SVD want float32 on a CPU
    model, tokenizer = load_model(path, device, dtype)
    if tokenizer is None:
        raise LooptuneError(f"{path} has no tokenizer; diagnose needs one to read text")
    cfg = model.config
    R = cfg.num_loops if loops is None else loops
    context, stride = clamp_window(cfg, trained_context(path, cfg), None)
    texts = [x.text for x in vs.items]
    prompts = [x.prompt for x in vs.items] if any(x.prompt for x in vs.items) else None
    with small_model_threads(model, BATCHED_SMALL):
        m = measure_loops(
            model,
            tokenizer,
            texts,
            R,
            context,
            stride,
            prompts=prompts,
            batch_tokens=batch_tokens,
            seed=seed,
            progress=(lambda d, t: progress("windows", d, t)) if progress else None,
        )
    rows = [LoopRow(trained=row["loop"] <= cfg.num_loops, **row) for row in m["rows"]]
    members = []
    if family or cache_dir is not None:
        members = family_scores(vs, device, dtype, cache_dir, compute=family, progress=progress)
    is_member = any(Path(p).resolve() == path.resolve() for p in family_members())
    p = next(model.parameters())
    _, mode, window = model.knobs(R)
    diag = Diagnosis(
        checkpoint=str(path),
        content_hash=content_hash(path),
        trained_loops=cfg.num_loops,
        loops=R,
        mode=mode,
        window=window,
        set_name=vs.name,
        texts=len(vs.items),
        set_items=vs.total,
        tokens=m["tokens"],
        bytes=m["bytes"],
        context=context,
        stride=stride,
        rank_sample=m["rank_sample"],
        embedding_effective_rank=m["embedding_effective_rank"],
        device=str(p.device),
        dtype=str(p.dtype).removeprefix("torch."),
        torch_version=torch.__version__,
        seconds=m["seconds"],
        rows=rows,
        family=members,
        items=[x.id for x in vs.items],
    )
    diag.verdict = verdict(rows, diag.embedding_effective_rank, members, cfg.num_loops, is_member)
    return diag

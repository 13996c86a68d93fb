"""The bundled family at its own R, on the texts a diagnosis used: what checks its prediction."""

from __future__ import annotations

from pathlib import Path

from looptune.diagnose.measure import BATCHED_SMALL
from looptune.diagnose.result import FamilyRow
from looptune.quality.sets import ValidationSet

CACHE_VERSION = 2


def family_scores(
    vs: ValidationSet,
    device="auto",
    dtype="auto",
    cache_dir: Path | None = None,
    compute: bool = True,
    progress=None,
) -> list[FamilyRow]:
    """Bits per byte of each bundled member at its own R on the items of `vs`, in the windows
    `score` uses (its trained context, stride half that). With `cache_dir`, results are read
    from and written to `ResultCache("diagnose-family")` there; with `compute=False` only the
    cached members are returned (no model runs). `progress(label, done, total)` per member."""
    from looptune.bundled import family_members
    from looptune.model.checkpoint import content_hash, load_model, read_config, resolve_device
    from looptune.quality.bpb import bits_per_byte, clamp_window, score_loops, small_model_threads
    from looptune.quality.score import trained_context
    from looptune.store import ResultCache, positive_number

    cache = (
        ResultCache("diagnose-family", cache_dir, validate=positive_number)
        if cache_dir is not None
        else None
    )
    members = family_members()
    texts = [x.text for x in vs.items]
    prompts = [x.prompt for x in vs.items] if any(x.prompt for x in vs.items) else None
    out = []
    for done, path in enumerate(members, 1):
        cfg = read_config(path)[0]
        context, stride = clamp_window(cfg, trained_context(path, cfg), None)
        key = {
            "v": CACHE_VERSION,
            "model": content_hash(path),
            "set": vs.name,
            "set_hash": vs.content_hash,
            "items": [x.id for x in vs.items],
            "context": context,
            "stride": stride,
            "device": resolve_device(device).type,
            "dtype": str(dtype),
        }
        value = cache.get(key) if cache else None
        if value is None and compute:
            model, tokenizer = load_model(path, device, dtype)
            R = model.config.num_loops
            with small_model_threads(model, BATCHED_SMALL):
                scores = score_loops(
                    model, tokenizer, texts, [R], prompts=prompts, context=context, stride=stride
                )[R]
            value = bits_per_byte(scores)
            if cache:
                cache.put(key, value)
        if value is not None:
            out.append(FamilyRow(str(path), cfg.num_loops, value, context))
        if progress:
            progress("family", done, len(members))
    return out

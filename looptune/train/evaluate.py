"""How a trained checkpoint is scored for its card: held-out bits per byte on a fixed sample of
each held-out file, loaded from disk as a user would load it."""

from __future__ import annotations

from pathlib import Path

from looptune.model.checkpoint import load_model

PER_FILE = 400  # bytes per held-out file in the evaluation sample (see `eval_sample`)


def eval_sample(heldout: list[tuple[str, str]], per_file: int = PER_FILE) -> list[tuple[str, str]]:
    """The card's evaluation sample: from each held-out file, whole lines from its middle adding
    up to about `per_file` bytes (the full held-out set is too slow to score at R = 4 on a CPU)."""
    out = []
    for path, text in heldout:
        lines = text.splitlines(keepends=True)
        mid = len(lines) // 2
        lo = hi = mid
        size = 0
        while size < per_file and (lo > 0 or hi < len(lines)):
            if hi < len(lines):
                size += len(lines[hi].encode())
                hi += 1
            if size < per_file and lo > 0:
                lo -= 1
                size += len(lines[lo].encode())
        chunk = "".join(lines[lo:hi])
        if chunk.strip():
            out.append((path, chunk))
    return out


def eval_stride(context: int) -> int:
    """Scoring windows of the training context advance by 3/4 of it (>= 1/4 left context)."""
    return max(1, context * 3 // 4)


def score_checkpoint(
    path: Path,
    heldout: list[tuple[str, str]],
    loops: int,
    context: int = 128,
    per_file: int = PER_FILE,
    device: str = "cpu",
) -> tuple[float, int]:
    """Held-out bits per byte of a checkpoint as `load_model` gives it in float32, on the
    evaluation sample, in windows of `context` tokens (see `eval_stride`)."""
    return score_sample(path, eval_sample(heldout, per_file), loops, context, device)


def score_sample(
    path: Path, sample: list[tuple[str, str]], loops: int, context: int = 128, device: str = "cpu"
) -> tuple[float, int]:
    """(bits per byte, bytes) of `sample` texts under the checkpoint at `path`, in float32."""
    from looptune.quality.bpb import bits_per_byte, score_texts

    model, tok = load_model(path, device=device, dtype="float32")
    items = score_texts(
        model,
        tok,
        [t for _, t in sample],
        loops=loops,
        mode="plt",
        context=context,
        stride=eval_stride(context),
        batch_size=16,
    )
    return bits_per_byte(items), sum(x.bytes for x in items)

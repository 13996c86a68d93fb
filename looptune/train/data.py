"""Training data as token ids: one byte stream of the files, and the batch of a step as a pure
function of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

import numpy as np
import torch

from looptune.model.tokenizer import ByteTokenizer

BOS = ByteTokenizer.bos_id


def token_stream(texts: list[tuple[str, str]]) -> np.ndarray:
    """<bos> + bytes of each file, concatenated; uint16 token ids."""
    parts = []
    for _, text in texts:
        parts.append(np.array([BOS], dtype=np.uint16))
        parts.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def batch_at(
    stream: np.ndarray, seed: int, step: int, batch_size: int, context: int
) -> torch.Tensor:
    """The batch of `step`: a pure function of (seed, step), so resume is exact."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - context - 1, size=batch_size)
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))  # [B, T+1]


def eval_batches(stream: np.ndarray, context: int, n_windows: int = 16) -> torch.Tensor:
    """Fixed, evenly spaced held-out windows for the loss shown during training."""
    n = min(n_windows, max(1, (len(stream) - 1) // (context + 1)))
    starts = np.linspace(0, len(stream) - context - 1, n).astype(np.int64)
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))

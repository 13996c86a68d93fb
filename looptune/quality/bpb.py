"""Bits per byte of texts under a model, scored in sliding windows of the model's context.

Shared by training (held-out loss), `score` (the `code` set and JSONL text sets) and `diagnose`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ItemScore:
    bits: float  # total -log2 p over the scored tokens
    bytes: int  # UTF-8 bytes those tokens stand for
    tokens: int

    @property
    def bits_per_byte(self) -> float:
        return self.bits / max(self.bytes, 1)


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) spans over a sequence of n tokens, predicting tokens 1..n-1.

    Each window sees up to `context` tokens; after the first, a window scores only the tokens no
    earlier window scored, so every token is scored exactly once with at least
    `context - stride` tokens of left context (the usual strided evaluation)."""
    if n_tokens < 2:
        return []
    spans, scored_to = [], 1  # token 0 is context only
    while scored_to < n_tokens:
        end = min(scored_to + stride, n_tokens) if scored_to > 1 else min(context, n_tokens)
        start = max(0, end - context)
        spans.append((start, end, scored_to))
        scored_to = end
    return spans


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str], loops=None, mode=None, window=None,
                context: int | None = None, stride: int | None = None, batch_size: int = 8,
                progress=None) -> list[ItemScore]:
    """One `ItemScore` per text. A BOS token is prepended when the tokenizer has one, so every
    byte of the text is scored; otherwise the first token is context only."""
    cfg = model.config
    context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    stride = stride or max(context // 2, 1)
    device = model.model.embed_tokens.weight.device
    bos = getattr(tokenizer, "bos_id", None)
    jobs = []  # (item, start, end, first_scored, ids)
    encoded = []
    for i, text in enumerate(texts):
        ids = ([bos] if bos is not None else []) + tokenizer.encode(text)
        encoded.append(ids)
        jobs += [(i, s, e, f) for s, e, f in windows(len(ids), context, stride)]
    bits = [0.0] * len(texts)
    nbytes = [0] * len(texts)
    ntok = [0] * len(texts)
    jobs.sort(key=lambda j: j[2] - j[1])  # batch windows of equal length together
    for b in range(0, len(jobs), batch_size):
        group = jobs[b:b + batch_size]
        length = group[-1][2] - group[-1][1]
        same = [j for j in group if j[2] - j[1] == length]
        rest = [j for j in group if j[2] - j[1] != length]
        for chunk in ([same, *[[j] for j in rest]] if rest else [same]):
            ids = torch.tensor([encoded[i][s:e] for i, s, e, _ in chunk], device=device)
            logits = model(ids, loops=loops, mode=mode, window=window).float()
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            for row, (i, s, e, f) in enumerate(chunk):
                targets = encoded[i][f:e]
                bits[i] += nll[row, f - s - 1:].sum().item() / math.log(2)
                nbytes[i] += sum(len(tokenizer.token_bytes(t)) for t in targets)
                ntok[i] += len(targets)
        if progress:
            progress(len(group))
    return [ItemScore(bits[i], nbytes[i], ntok[i]) for i in range(len(texts))]


def bits_per_byte(items: list[ItemScore]) -> float:
    """Pooled over items: total bits over total bytes."""
    return sum(x.bits for x in items) / max(sum(x.bytes for x in items), 1)

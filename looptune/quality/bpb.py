"""Bits per byte of texts under a model, scored in sliding windows of the model's context.

Shared by training (held-out loss), `score` (every likelihood set) and `diagnose`: `WindowPlan`
is the one way texts become scored windows.

`score_loops` scores several loop counts in one forward pass: loop r never reads a later loop, so
the hidden state after loop r of an R-loop pass is exactly the final state of an r-loop pass, and
`model.head(h_r)` are the r-loop logits. Scoring R = 1..4 costs one 4-loop pass, not 1+2+3+4.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ItemScore:
    bits: float  # total -log2 p over the scored tokens
    bytes: int  # UTF-8 bytes those tokens stand for
    tokens: int
    agree: int = 0  # scored tokens whose top-1 prediction equals the reference loop count's

    @property
    def bits_per_byte(self) -> float:
        return self.bits / max(self.bytes, 1)


def windows(n_tokens: int, context: int, stride: int, first: int = 1) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) spans over a sequence of n tokens, predicting tokens first..n-1.

    Each window sees up to `context` tokens; after the first, a window scores only the tokens no
    earlier window scored, so every token is scored exactly once with at least
    `context - stride` tokens of left context (the usual strided evaluation). Tokens before
    `first` (a prompt) are context only; `first` is at least 1, token 0 has nothing to predict
    it."""
    scored_to = max(first, 1)
    spans = []
    while scored_to < n_tokens:
        if not spans and scored_to < context:  # the first window starts at 0 and sees all it can
            end = min(context, n_tokens)
        else:
            end = min(scored_to + stride, n_tokens)
        start = max(0, end - context)
        spans.append((start, end, scored_to))
        scored_to = end
    return spans


@dataclass
class WindowBatch:
    """Windows of several items, right-padded to one length (padding after a causal sequence
    cannot change the positions before it)."""

    ids: torch.Tensor  # [B, L] token ids
    scored: torch.Tensor  # [B, L-1] bool: position t predicts token t + 1 and is scored
    items: list[int]  # the item each row belongs to

    @property
    def targets(self) -> torch.Tensor:
        return self.ids[:, 1:]  # [B, L-1]


class WindowPlan:
    """Every item's tokens and the strided windows that score each of its text's tokens once.

    An item is a text and an optional prompt before it (context only). A BOS token is prepended
    when the tokenizer has one, so every byte of the text is scored; otherwise the first token
    is context only. This is the one windowing loop behind `score`, training's held-out loss and
    `diagnose`."""

    def __init__(
        self,
        tokenizer,
        texts: list[str],
        context: int,
        stride: int,
        prompts: list[str] | None = None,
    ):
        bos = getattr(tokenizer, "bos_id", None)
        head = [bos] if bos is not None else []
        self.encoded, self.jobs = [], []  # jobs: (item, start, end, first_scored)
        for i, text in enumerate(texts):
            prompt = head + (tokenizer.encode(prompts[i]) if prompts and prompts[i] else [])
            ids = prompt + tokenizer.encode(text)
            self.encoded.append(ids)
            self.jobs += [
                (i, s, e, f) for s, e, f in windows(len(ids), context, stride, len(prompt))
            ]
        self.jobs.sort(key=lambda j: j[1] - j[2])  # longest first, so padding stays small

    @property
    def scored_tokens(self) -> int:
        return sum(e - f for _, _, e, f in self.jobs)

    def batches(self, batch_tokens: int, device) -> Iterator[WindowBatch]:
        """The windows in batches of about `batch_tokens` tokens, longest first."""
        b = 0
        while b < len(self.jobs):
            length = self.jobs[b][2] - self.jobs[b][1]
            group = self.jobs[b : b + max(1, batch_tokens // length)]
            b += len(group)
            ids = torch.zeros(len(group), length, dtype=torch.long, device=device)
            scored = torch.zeros(len(group), length - 1, dtype=torch.bool, device=device)
            for row, (i, s, e, f) in enumerate(group):
                ids[row, : e - s] = torch.tensor(self.encoded[i][s:e])
                scored[row, f - s - 1 : e - s - 1] = True  # position t predicts token t + 1
            yield WindowBatch(ids, scored, [j[0] for j in group])


@contextmanager
def small_model_threads(model, small: int = 50_000_000):
    """One CPU thread while running a model of at most `small` parameters: its ops are tiny,
    and splitting each across threads costs more than it saves (decode: 30 ms against 5 ms a
    token with two threads against one, measured with the family shape on a busy two-core
    machine)."""
    param = model.model.embed_tokens.weight
    if param.device.type != "cpu" or model.num_params() > small:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def token_bytes(tokenizer, vocab_size: int, device) -> torch.Tensor:
    """UTF-8 bytes each token id stands for, `[vocab]`: the denominator of bits per byte."""
    return torch.tensor([len(tokenizer.token_bytes(t)) for t in range(vocab_size)], device=device)


def score_texts(
    model,
    tokenizer,
    texts: list[str],
    loops=None,
    mode=None,
    window=None,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress=None,
) -> list[ItemScore]:
    """One `ItemScore` per text, at `loops` (default: the model's)."""
    loops = model.knobs(loops, mode, window)[0]
    batch_tokens = batch_size * (context or model.config.max_position_embeddings)
    return score_loops(
        model,
        tokenizer,
        texts,
        [loops],
        mode=mode,
        window=window,
        context=context,
        stride=stride,
        progress=progress,
        batch_tokens=batch_tokens,
    )[loops]


def clamp_window(cfg, context: int | None, stride: int | None) -> tuple[int, int]:
    """(context, stride) as scored: the context at most the model's, the stride by default half
    of it and always less than it (so consecutive windows overlap)."""
    context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    return context, max(1, min(stride or context // 2, context - 1 if context > 1 else 1))


@torch.inference_mode()
def score_loops(
    model,
    tokenizer,
    texts: list[str],
    loops: list[int],
    prompts: list[str] | None = None,
    reference: int | None = None,
    mode=None,
    window=None,
    context: int | None = None,
    stride: int | None = None,
    batch_tokens: int = 8192,
    progress=None,
) -> dict[int, list[ItemScore]]:
    """`{R: [ItemScore per text]}` for every R in `loops`, from one pass at max(loops).

    `prompts[i]`, when given, is context for `texts[i]`: only the text's tokens are scored (the
    negative log-likelihood of a completion given its prompt). `reference` (default: the largest
    R) is the loop count whose top-1 predictions `ItemScore.agree` counts agreement with; it is
    added to the pass if needed. `progress(n)` is called after each batch of n windows."""
    cfg = model.config
    context, stride = clamp_window(cfg, context, stride)
    reference = max(loops) if reference is None else reference
    top = max([*loops, reference])
    device = model.model.embed_tokens.weight.device
    nbytes_of = token_bytes(tokenizer, cfg.vocab_size, device)
    plan = WindowPlan(tokenizer, texts, context, stride, prompts)
    n = len(texts)
    bits = {r: [0.0] * n for r in loops}
    agree = {r: [0] * n for r in loops}
    nbytes, ntok = [0] * n, [0] * n
    for batch in plan.batches(batch_tokens, device):
        targets, scored = batch.targets, batch.scored
        _, hidden = model(batch.ids, loops=top, mode=mode, window=window, return_hidden=True)
        logits = {r: model.head(hidden[r - 1][:, :-1]).float() for r in {*loops, reference}}
        ref_top1 = logits[reference].argmax(-1)  # [B, L-1]
        for r in loops:
            nll = F.cross_entropy(logits[r].transpose(1, 2), targets, reduction="none")
            row_bits = ((nll.double() * scored).sum(1) / math.log(2)).tolist()
            row_agree = ((logits[r].argmax(-1) == ref_top1) & scored).sum(1).tolist()
            for row, i in enumerate(batch.items):
                bits[r][i] += row_bits[row]
                agree[r][i] += row_agree[row]
        row_bytes = (nbytes_of[targets] * scored).sum(1).tolist()
        row_tokens = scored.sum(1).tolist()
        for row, i in enumerate(batch.items):
            nbytes[i] += row_bytes[row]
            ntok[i] += row_tokens[row]
        if progress:
            progress(len(batch.items))
    return {
        r: [ItemScore(bits[r][i], nbytes[i], ntok[i], agree[r][i]) for i in range(n)] for r in loops
    }


def bits_per_byte(items: list[ItemScore]) -> float:
    """Pooled over items: total bits over total bytes."""
    return sum(x.bits for x in items) / max(sum(x.bytes for x in items), 1)

"""The measuring pass: every per-loop quantity of one checkpoint on held-out texts.

Definitions (LoopCoder-v2's per-loop diagnostics, plus an exact decomposition of each loop's
change in bits per byte):

- States. `h_r` is the raw residual stream leaving loop r, before any norm (LoopCoder-v2's step
  sizes, hundreds to a thousand for a 7B model, are raw magnitudes). `h_0` is the token embedding
  `E`. The loops are run one at a time with the model's own `first_loop` / `next_loop`, exactly
  as its forward runs them.
- Tokens. The items come from `quality.sets` and are scored in the windows `score` uses
  (`quality.bpb.WindowPlan`: the checkpoint's trained context, stride half of it, a prompt as
  context only); every quantity averages over the scored tokens, each token once.
- Bits per byte at loop r: the cross-entropy of `model.head(h_r)`. Loop r never reads a later
  loop, so this is exactly what an r-loop run of the same weights scores. The gain of loop r is
  `bpb_{r-1} - bpb_r` (positive: loop r helped), from loop 2 (`head(E)` is not a distribution
  the model decodes from).
- Decomposition of the gain (from loop 2, on the same tokens). `bpb_r(unshifted)` reruns loop r
  alone with the carry `n(h_{r-1})` at its own position instead of shifted one token right (the
  cross-loop offset undone; the `plt-noshift` input for that loop only, loops before it as
  trained). Then

      refinement_r  = bpb_{r-1} - bpb_r(unshifted)   what loop r gains with an aligned carry
      offset cost_r = bpb_r - bpb_r(unshifted)       what running it shifted costs instead
      gain_r        = refinement_r - offset cost_r   exactly, by construction

  Both parts are measured bits on the same texts, so they compare with the gain and each other.
  What they mean depends on the weights: weights trained with the shift have only ever read a
  shifted carry, so for them the unshifted loop is off the training distribution, the offset
  cost comes out negative (the shift the weights were trained for is worth bits to them) and the
  refinement can be negative too. The decomposition then says how much of the gain rests on
  the shifted alignment, not what a model trained without the shift would have lost; that would
  need such a model. A checkpoint run without the shift (`plt-noshift`, `sequential`) has no
  offset: cost 0 and refinement = gain.
- Indicators (reported, not used by the verdict): step size `mean ||h_r - h_{r-1}||`; hidden
  norm `mean ||h_r||`; output change `KL(p_r || p_{r-1})` in nats; update cosine
  `cos(h_r - h_{r-1}, h_{r-1} - h_{r-2})` from loop 2; offset distance
  `Omega_r = mean_i ||h_{r-1,i} - h_{r-1,i-1}||` over scored positions with a predecessor in the
  window, and `Omega_r / mean ||h_{r-1}||`. They are distances and angles in the residual
  stream, with no exchange rate into bits, so the verdict does not weigh them against bits.
- Effective rank: of the same seeded sample of up to 4096 scored token states for every loop,
  loop 0 included (float64 SVD, states not centred; `metrics.effective_rank`).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from looptune.diagnose import metrics
from looptune.errors import LooptuneError
from looptune.quality.bpb import WindowPlan, token_bytes

RANK_SAMPLE = 4096
BATCH_TOKENS = 8192  # tokens per forward batch of windows, as `score`
# Batched windows make larger matmuls than a decode step, which threads can share: one CPU thread
# only up to this size (measured on the 116K-parameter family: 3.3 s against 16 s on two threads
# of a busy two-core machine; not measured on larger models).
BATCHED_SMALL = 1_000_000


class _Mean:
    """Token-weighted running means per loop."""

    def __init__(self, loops):
        self.v = [0.0] * (loops + 1)
        self.n = [0] * (loops + 1)

    def add(self, r, mean, count):
        self.v[r] += mean * count
        self.n[r] += count

    def __getitem__(self, r):
        return self.v[r] / self.n[r] if self.n[r] else None


@torch.inference_mode()
def measure_loops(
    model,
    tokenizer,
    texts: list[str],
    loops: int,
    context: int,
    stride: int,
    prompts: list[str] | None = None,
    batch_tokens: int = BATCH_TOKENS,
    rank_sample: int = RANK_SAMPLE,
    seed: int = 0,
    progress=None,
) -> dict:
    """Every per-loop quantity of the module docstring over the scored tokens of `texts` (each
    after its prompt, if any) at `loops` loops. `progress(done, total)` counts windows.
    Returns {"rows": [dict per loop], "embedding_effective_rank", "tokens", "bytes",
    "rank_sample", "windows", "seconds"}."""
    start = time.perf_counter()
    R, mode, W = model.knobs(loops)
    shift = mode == "plt"
    shared = mode != "sequential"  # G-SWA against loop 1's keys and values
    device = model.model.embed_tokens.weight.device
    plan = WindowPlan(tokenizer, texts, context, stride, prompts)
    if not plan.jobs:
        raise LooptuneError("the texts are too short to score (each needs at least two tokens)")
    nbytes_of = token_bytes(tokenizer, model.config.vocab_size, device)
    n_total = plan.scored_tokens
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(n_total, generator=gen)[: min(rank_sample, n_total)].sort().values
    rank_states = torch.zeros(R + 1, len(sample), model.config.hidden_size)  # [R+1, S, d]
    step, norm, kl, cosine, omega = (_Mean(R) for _ in range(5))
    bits, bits_un = [0.0] * (R + 1), [0.0] * (R + 1)
    nbytes, offset, done = 0, 0, 0
    for batch in plan.batches(batch_tokens, device):
        ids = batch.ids  # [B, L]
        mask = F.pad(batch.scored, (0, 1))  # [B, L]: the state at t predicts token t + 1
        pairs = mask[:, 1:]  # (t - 1, t) with t scored: both states in the window
        targets = batch.targets[batch.scored]  # [n]
        nbytes += int(nbytes_of[targets].sum())
        n = len(targets)
        h, loop1_kv = model.first_loop(ids, W)
        kv = loop1_kv if shared else None
        states = [model.model.embed_tokens(ids), h]  # states[r] = h_r, [B, L, d]
        unshifted = [None, None]
        for _ in range(2, R + 1):
            prev = states[-1]
            states.append(model.next_loop(ids, prev, kv, shift, W))
            unshifted.append(model.next_loop(ids, prev, kv, False, W) if shift else None)
        here = (sample >= offset) & (sample < offset + n)  # rank-sampled tokens in this batch
        for r in range(R + 1):
            picked = states[r][mask][(sample[here] - offset).to(device)]
            rank_states[r, here] = picked.float().cpu()
        offset += n
        logits_prev = None
        for r in range(1, R + 1):
            h, h_prev = states[r][mask], states[r - 1][mask]
            step.add(r, metrics.step_size(h, h_prev), n)
            norm.add(r, metrics.mean_norm(h), n)
            logits = model.head(h).float()  # [n, V]
            bits[r] += _bits(logits, targets)
            if r >= 2:
                kl.add(r, metrics.kl_between(logits, logits_prev), n)
                cosine.add(r, metrics.update_cosine(h, h_prev, states[r - 2][mask]), n)
                seq = states[r - 1]
                neighbours = torch.stack((seq[:, :-1][pairs], seq[:, 1:][pairs]), dim=1)
                if len(neighbours):  # [P, 2, d]
                    omega.add(r, metrics.offset_distance(neighbours), len(neighbours))
                if shift:
                    bits_un[r] += _bits(model.head(unshifted[r][mask]).float(), targets)
            logits_prev = logits
        done += len(batch.items)
        if progress:
            progress(done, len(plan.jobs))

    bpb = [b / nbytes for b in bits]
    rows = []
    for r in range(1, R + 1):
        rank = metrics.effective_rank(rank_states[r])
        row = {
            "loop": r,
            "bits_per_byte": bpb[r],
            "effective_rank": rank,
            "step_size": step[r],
            "hidden_norm": norm[r],
        }
        if r >= 2:
            un = bits_un[r] / nbytes if shift else bpb[r]
            om = omega[r]
            row.update(
                kl_nats=kl[r],
                update_cosine=cosine[r],
                offset_distance=om,
                offset_distance_relative=None if om is None else om / norm[r - 1],
                gain_bits_per_byte=bpb[r - 1] - bpb[r],
                bits_per_byte_unshifted=un,
                refinement_bits_per_byte=bpb[r - 1] - un,
                offset_cost_bits_per_byte=bpb[r] - un,
            )
        rows.append(row)
    return {
        "rows": rows,
        "embedding_effective_rank": metrics.effective_rank(rank_states[0]),
        "tokens": n_total,
        "bytes": nbytes,
        "rank_sample": len(sample),
        "windows": len(plan.jobs),
        "seconds": time.perf_counter() - start,
    }


def _bits(logits, targets) -> float:
    return F.cross_entropy(logits, targets, reduction="sum").item() / math.log(2)

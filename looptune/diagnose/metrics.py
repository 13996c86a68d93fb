"""Per-loop diagnostics as pure functions on tensors.

Hidden states are `[..., d]` with any leading token axes; every function returns the mean over
tokens as a Python float and computes in float32 (float64 for the SVD) whatever the input dtype.
`h_prev` / `h` are the residual streams leaving loops r-1 and r (h_0 = the token embeddings).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def step_size(h: torch.Tensor, h_prev: torch.Tensor) -> float:
    """Mean per-token update length: `mean_i ||h_{r,i} - h_{r-1,i}||_2`."""
    return (h.float() - h_prev.float()).norm(dim=-1).mean().item()


def mean_norm(h: torch.Tensor) -> float:
    """Mean per-token length `mean_i ||h_i||_2`: the scale the other norms are read against."""
    return h.float().norm(dim=-1).mean().item()


def kl_between(logits: torch.Tensor, logits_prev: torch.Tensor) -> float:
    """Mean per-token `KL(p_r || p_{r-1}) = sum_v p_r(v) (log p_r(v) - log p_{r-1}(v))`, in nats,
    where `p = softmax(logits)` over the last axis: how far loop r moved the next-token
    distribution away from the one loop r-1 would have decoded."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(logits_prev.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).mean().item()


def effective_rank(h: torch.Tensor) -> float:
    """Roy and Vetterli's effective rank of the token-by-feature matrix `X` `[N, d]` (leading axes
    flattened): with singular values `s` and `p_k = s_k / sum_j s_j`,
    `erank = exp(-sum_k p_k log p_k)`. 1 for a rank-1 matrix, d for orthogonal rows of equal
    length; 0 for an all-zero matrix. `X` is not centred (the raw states, as the model sees them).
    float64 SVD."""
    x = h.reshape(-1, h.shape[-1]).double()
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def update_cosine(
    h: torch.Tensor, h_prev: torch.Tensor, h_prev2: torch.Tensor, eps: float = 1e-8
) -> float:
    """Mean per-token cosine between successive updates,
    `cos(h_r - h_{r-1}, h_{r-1} - h_{r-2})`: +1 keeps going the same way, -1 undoes the previous
    loop's step (oscillation). A token whose either update is zero counts as 0."""
    a = h.float() - h_prev.float()
    b = h_prev.float() - h_prev2.float()
    return F.cosine_similarity(a, b, dim=-1, eps=eps).mean().item()


def offset_distance(h_prev: torch.Tensor) -> float:
    """CLP's cross-loop position offset, `Omega_r = mean_i ||h_{r-1,i} - h_{r-1,i-1}||_2` over
    consecutive positions i = 1..T-1 of the sequence axis (-2) of the state loop r is fed:
    what loop r at position i receives (position i-1's state) against its own. A distance in the
    residual stream, not a cost in bits (`measure` measures that)."""
    if h_prev.shape[-2] < 2:
        raise ValueError("offset_distance needs at least two positions")
    return (h_prev[..., 1:, :].float() - h_prev[..., :-1, :].float()).norm(dim=-1).mean().item()

"""The static-shape decode cache and the analytic KV-memory formula it must match.

Shapes are fixed at construction (gpt-fast style) and the position is a 0-d tensor, so a decode
step can be captured by `torch.compile` or a CUDA graph without recompiling per position.

- `full_k/v` `[L, G, B, H_kv, S, d_h]`: full-length caches, G = 1 (loop 1, the shared global
  cache of `plt` / `plt-noshift`) or G = R (`sequential`, one per loop).
- `ring_k/v` `[L, B, H_kv, (R-1) W', d_h]`, W' = min(W, S): the local-branch keys of loops 2..R
  side by side, loop r's position p in slot (r-2) W' + p % W' (`plt` / `plt-noshift` only). One
  block per layer lets all local rows of a step attend in one call under a block-diagonal mask.
- `carry` `[R-1, B, d]`: n(h_r) of the previous position for r < R (`plt` only, the CLP shift).

A decode step calls `begin_step()` once; it makes the write indices and the additive attention
masks (0 where a key may be seen, -inf where not) that every layer then reuses.
"""

from __future__ import annotations

import torch

from looptune.errors import LooptuneError


def kv_bytes(cfg, mode: str, loops: int, window: int, context: int, batch: int = 1,
             dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of decode state for `batch` sequences of `context` tokens (architecture doc, sec. 4).

    non-looped / R = 1: m N_L S;  sequential: m N_L R S;
    plt-noshift: m N_L (S + (R-1) min(S, W));  plt: the same plus (R-1) d carried activations;
    with m = 2 H_kv d_h b, b the bytes of `dtype`.
    """
    b = torch.empty((), dtype=dtype).element_size()
    m = 2 * cfg.num_key_value_heads * cfg.head_dim * b
    L, R, S = cfg.num_hidden_layers, loops, context
    if mode == "sequential":
        per_seq = m * L * R * S
    else:
        per_seq = m * L * (S + (R - 1) * min(S, window))
        if mode == "plt":
            per_seq += (R - 1) * cfg.hidden_size * b
    return per_seq * batch


class KVCache:
    def __init__(self, cfg, mode: str, loops: int, window: int, batch: int, max_len: int,
                 dtype: torch.dtype, device):
        if max_len > cfg.max_position_embeddings:
            raise LooptuneError(f"context of {max_len} tokens exceeds the model's "
                                f"max_position_embeddings ({cfg.max_position_embeddings})")
        self.mode, self.loops, self.window, self.batch, self.max_len = mode, loops, window, batch, max_len
        L, H_kv, d_h = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        groups = loops if mode == "sequential" else 1
        full = (L, groups, batch, H_kv, max_len, d_h)
        self.full_k = torch.zeros(full, dtype=dtype, device=device)
        self.full_v = torch.zeros(full, dtype=dtype, device=device)
        rings = loops - 1 if mode != "sequential" else 0
        self.ring_len = W = min(window, max_len)
        ring = (L, batch, H_kv, rings * W, d_h)
        self.ring_k = torch.zeros(ring, dtype=dtype, device=device)
        self.ring_v = torch.zeros(ring, dtype=dtype, device=device)
        carries = loops - 1 if mode == "plt" else 0
        self.carry = torch.zeros((carries, batch, cfg.hidden_size), dtype=dtype, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # next position to write
        self._full_slots = torch.arange(max_len, device=device)
        self._ring_slots = torch.arange(rings * W, device=device) % W  # position mod W' per slot
        self._ring_base = torch.arange(rings, device=device) * W  # first slot of each loop's block
        self._ring_blocks = (torch.arange(rings, device=device)[:, None]
                             == torch.arange(rings * W, device=device)[None] // W)  # [R-1, (R-1) W']
        self.begin_step()

    def nbytes(self) -> int:
        """Bytes this cache really holds (the tensors above; not the position counter)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.full_k, self.full_v, self.ring_k, self.ring_v, self.carry))

    def reset(self):
        self.pos.zero_()
        self.carry.zero_()

    # ----- decode-time access, position = self.pos -----

    def begin_step(self):
        """What every layer of the step at `pos` shares, made once: write indices and masks."""
        zero = torch.zeros((), dtype=self.full_k.dtype, device=self.pos.device)
        blocked = torch.full((), float("-inf"), dtype=self.full_k.dtype, device=self.pos.device)
        self._full_at = self.pos.view(1)
        self._full_mask = torch.where(self._full_slots <= self.pos, zero, blocked)[None]  # [1, S]
        if self.ring_k.shape[3]:
            self._ring_at = self._ring_base + self.pos % self.ring_len
            # row r sees its own loop's block, and there only the slots written so far
            seen = self._ring_blocks & (self._ring_slots <= self.pos)
            self._ring_mask = torch.where(seen, zero, blocked)  # [R-1, (R-1) W']

    def write_full(self, layer: int, group: int, k, v):  # k [B, H_kv, 1, d_h]
        self.full_k[layer, group].index_copy_(2, self._full_at, k)
        self.full_v[layer, group].index_copy_(2, self._full_at, v)

    def full(self, layer: int, group: int):
        return self.full_k[layer, group], self.full_v[layer, group]

    def full_mask(self):
        return self._full_mask  # [1, S]

    def write_ring(self, layer: int, lo: int, hi: int, k, v):  # loops lo+2..hi+1, k [B, H_kv, m, d_h]
        self.ring_k[layer].index_copy_(2, self._ring_at[lo:hi], k)
        self.ring_v[layer].index_copy_(2, self._ring_at[lo:hi], v)

    def ring(self, layer: int, lo: int, hi: int):  # -> [B, H_kv, m W', d_h]
        W = self.ring_len
        return self.ring_k[layer, :, :, lo * W:hi * W], self.ring_v[layer, :, :, lo * W:hi * W]

    def ring_mask(self, lo: int, hi: int):  # [m, m W']
        W = self.ring_len
        return self._ring_mask[lo:hi, lo * W:hi * W]

    # ----- prefill -----

    def fill(self, layer: int, loop: int, k, v):
        """Store one loop's keys and values for a whole prompt `[B, H_kv, T, d_h]` from position 0."""
        T = k.shape[2]
        if T > self.max_len:
            raise LooptuneError(f"prompt of {T} tokens does not fit a cache of {self.max_len}")
        if self.mode == "sequential" or loop == 0:
            group = loop if self.mode == "sequential" else 0
            self.full_k[layer, group, :, :, :T] = k
            self.full_v[layer, group, :, :, :T] = v
            return
        keep = min(T, self.ring_len)
        positions = torch.arange(T - keep, T, device=k.device)
        slots = (loop - 1) * self.ring_len + positions % self.ring_len
        self.ring_k[layer].index_copy_(2, slots, k[:, :, T - keep:])
        self.ring_v[layer].index_copy_(2, slots, v[:, :, T - keep:])

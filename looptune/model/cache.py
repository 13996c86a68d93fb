"""The static-shape decode cache and the analytic KV-memory formula it must match.

Shapes are fixed at construction (gpt-fast style) and the position is a 0-d tensor, so a decode
step can be captured by `torch.compile` or a CUDA graph without recompiling per position.

- `full_k/v[layer][g]` `[B, H_kv, S, d_h]`: full-length caches, G = 1 group (loop 1, the shared
  global cache of `plt` / `plt-noshift`) or G = R (`sequential`, one per loop).
- `ring_k/v[layer]` `[B, H_kv, (R-1) W', d_h]`, W' = min(W, S): the local-branch keys of loops
  2..R side by side, loop r's position p in slot (r-2) W' + p % W' (`plt` / `plt-noshift` only).
  One block per layer lets all local rows of a step attend in one call under a block-diagonal
  mask.
- `carry` `[R-1, B, d]`: n(h_r) of the previous position for r < R (`plt` only, the CLP shift).

Each layer (and group) has a tensor of its own, not a view into one: a compiled step then
writes the new token in place, where a view of a shared tensor made inductor copy the whole
cache at every step (functionalised writes into a view are not put back in place).

A decode step calls `begin_step()` once; it makes the write indices and the additive attention
masks (0 where a key may be seen, -inf where not) that every layer then reuses.
"""

from __future__ import annotations

import torch

from looptune.errors import LooptuneError


def kv_bytes(
    cfg,
    mode: str,
    loops: int,
    window: int,
    context: int,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
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
    """The decode state of `batch` sequences; it owns the loop-to-slot mapping.

    Loops are numbered from 0 here (loop 0 is the architecture doc's loop 1). A decode step
    asks for what a loop needs by loop number and never sees a slot index:
    `write_full` / `full` for the rows that attend causally over a full-length cache (loop 0,
    and every loop in `sequential`), `write_local` / `local` for the G-SWA rows' own window.
    """

    def __init__(
        self,
        cfg,
        mode: str,
        loops: int,
        window: int,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device,
    ):
        if max_len > cfg.max_position_embeddings:
            raise LooptuneError(
                f"context of {max_len} tokens exceeds the model's "
                f"max_position_embeddings ({cfg.max_position_embeddings})"
            )
        self.mode, self.loops, self.window = mode, loops, window
        self.batch, self.max_len = batch, max_len
        L, H_kv, d_h = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.dtype = dtype
        groups = loops if mode == "sequential" else 1
        rings = self.rings = loops - 1 if mode != "sequential" else 0
        self.ring_len = W = min(window, max_len)

        def zeros(*shape):
            return torch.zeros(shape, dtype=dtype, device=device)

        full, ring = (batch, H_kv, max_len, d_h), (batch, H_kv, rings * W, d_h)
        self.full_k = [[zeros(*full) for _ in range(groups)] for _ in range(L)]
        self.full_v = [[zeros(*full) for _ in range(groups)] for _ in range(L)]
        self.ring_k = [zeros(*ring) for _ in range(L)]
        self.ring_v = [zeros(*ring) for _ in range(L)]
        carries = loops - 1 if mode == "plt" else 0
        self.carry = zeros(carries, batch, cfg.hidden_size)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # next position to write
        # The same count on the host, so a step can size its reads without a device sync; None
        # when unknown (after a compiled `decode_step`): steps then read the whole cache.
        # Kept by `filled`, `reset`, `PLTForCausalLM.decode_step` and the runners in step.py.
        self.length: int | None = 0
        self._full_slots = torch.arange(max_len, device=device)
        self._ring_slots = torch.arange(rings * W, device=device) % W  # position mod W' per slot
        self._ring_base = torch.arange(rings, device=device) * W  # first slot of each loop's block
        block = torch.arange(rings * W, device=device) // W
        self._ring_blocks = torch.arange(rings, device=device)[:, None] == block  # [R-1, (R-1) W']
        self.begin_step()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of decode state: the full caches, the rings and the carry."""
        full = [t for per_layer in self.full_k + self.full_v for t in per_layer]
        return full + self.ring_k + self.ring_v + [self.carry]

    def nbytes(self) -> int:
        """Bytes this cache really holds (`tensors()`; not the position counter)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self):
        self.pos.zero_()
        self.carry.zero_()
        self.length = 0

    def span(self) -> int:
        """Full-cache slots a fixed-shape step reads: the tokens held plus the new one, rounded
        up to a power of two (one CUDA graph per such span), or all when the count is unknown."""
        if self.length is None:
            return self.max_len
        return min(self.max_len, max(16, 1 << self.length.bit_length()))

    def check_room(self):
        """Refuse a step that would write past the last slot (on a GPU an out-of-bounds write
        is a device-side assert that ends the process's CUDA context); free when unknown."""
        if self.length is not None and self.length >= self.max_len:
            raise LooptuneError(
                f"the cache is full: it holds max_len = {self.max_len} tokens; "
                "allocate a longer one or reset() it"
            )

    def stepped(self):
        """Count one decoded token on the host (after a step; the device counter moved in it)."""
        if self.length is not None:
            self.length += 1

    def mark_dynamic(self):
        """Tell `torch.compile` that batch and length vary, so one compile serves every cache
        of this mode, R and window (`maybe_`: a size of 1 stays specialised, without an error)."""
        for t in self.tensors()[:-1]:  # [B, H_kv, S or (R-1) W', d_h]
            torch._dynamo.maybe_mark_dynamic(t, 0)
        for per_layer in self.full_k + self.full_v:
            for t in per_layer:
                torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.maybe_mark_dynamic(self.carry, 1)
        torch._dynamo.maybe_mark_dynamic(self._full_slots, 0)

    # ----- decode-time access, position = self.pos -----

    def begin_step(self, span: int | None = None, exact: bool = False):
        """What every layer of the step at `pos` shares, made once: write indices and additive
        masks (0 where a key may be seen, -inf where not). Shapes never depend on `pos`.

        The full caches are read over their first `span` slots (None: all). `exact`: they end at
        the new token (span = tokens held + 1, known on the host: the eager step), so every key
        may be seen and no mask is made; fixed-shape steps read a longer span under a mask.
        """
        zero = torch.zeros((), dtype=self.dtype, device=self.pos.device)
        blocked = torch.full((), float("-inf"), dtype=self.dtype, device=self.pos.device)
        self._span = span
        if span is not None and torch.compiler.is_compiling():
            torch._check(span >= 1)  # (and below span <= S): see `_first`
            torch._check(span <= self._full_slots.shape[0])
        self._full_at = self.pos.view(1)
        self._full_mask = None
        if not exact:
            seen = self._full_slots[:span] <= self.pos
            self._full_mask = torch.where(seen, zero, blocked)[None]  # [1, span]
        if self.rings:
            self._ring_at = self._ring_base + self.pos % self.ring_len
            # loop r sees its own block, and there only the slots written so far
            seen = self._ring_blocks & (self._ring_slots <= self.pos)
            self._ring_mask = torch.where(seen, zero, blocked)  # [R-1, (R-1) W']

    def causal_rows(self, loops: range) -> int:
        """How many of `loops` (the rows of one step, in order) attend causally over a full
        cache: loop 0 in `plt` / `plt-noshift`, every loop in `sequential`. The rest are G-SWA."""
        if self.mode == "sequential":
            return len(loops)
        return 1 if loops.start == 0 else 0

    def _group(self, loop: int) -> int:
        return loop if self.mode == "sequential" else 0

    def write_full(self, layer: int, loop: int, k, v):  # k [B, H_kv, 1, d_h]
        """Store loop `loop`'s keys and values of the new token in its full-length cache."""
        g = self._group(loop)
        self.full_k[layer][g].index_copy_(2, self._full_at, k)
        self.full_v[layer][g].index_copy_(2, self._full_at, v)

    def full(self, layer: int, loop: int):
        """(k, v, mask) of loop `loop`'s full cache over the step's span, every position up to
        and including the new token (in `plt` / `plt-noshift`, loop 0's: the global branch);
        the mask is None when the span ends at the new token."""
        g = self._group(loop)
        k, v = self.full_k[layer][g], self.full_v[layer][g]
        return self._first(k), self._first(v), self._full_mask

    def _first(self, t):  # t [B, H_kv, S, d_h] -> its first `span` slots
        if self._span is not None and torch.compiler.is_compiling():
            # the compiled step's span is unbacked (step.py), so dynamo never guards on its
            # value; stating its bound lets the slice be traced without a guard either
            torch._check(self._span <= t.shape[2])
        return t[:, :, : self._span]

    def write_local(self, layer: int, loops: range, k, v):  # k [B, H_kv, len(loops), d_h]
        """Push the new token's keys and values of G-SWA loops `loops` (>= 1) into their rings."""
        at = self._ring_at[loops.start - 1 : loops.stop - 1]
        self.ring_k[layer].index_copy_(2, at, k)
        self.ring_v[layer].index_copy_(2, at, v)

    def local(self, layer: int, loops: range):
        """(k, v, mask) of the local branch for G-SWA loops `loops`, all in one attention
        call: keys `[B, H_kv, len(loops) W', d_h]`, a block-diagonal mask `[len(loops), ...]`
        letting each loop see its own last W positions, the new token included."""
        W, lo, hi = self.ring_len, loops.start - 1, loops.stop - 1
        return (
            self.ring_k[layer][:, :, lo * W : hi * W],
            self.ring_v[layer][:, :, lo * W : hi * W],
            self._ring_mask[lo:hi, lo * W : hi * W],
        )

    # ----- prefill -----

    def fill(self, layer: int, loop: int, k, v):
        """Store one loop's keys and values of a whole prompt `[B, H_kv, T, d_h]` from 0."""
        T = k.shape[2]
        if T > self.max_len:
            raise LooptuneError(f"prompt of {T} tokens does not fit a cache of {self.max_len}")
        if self.causal_rows(range(loop, loop + 1)):
            g = self._group(loop)
            self.full_k[layer][g][:, :, :T] = k
            self.full_v[layer][g][:, :, :T] = v
            return
        keep = min(T, self.ring_len)
        positions = torch.arange(T - keep, T, device=k.device)
        slots = (loop - 1) * self.ring_len + positions % self.ring_len
        self.ring_k[layer].index_copy_(2, slots, k[:, :, T - keep :])
        self.ring_v[layer].index_copy_(2, slots, v[:, :, T - keep :])

    def filled(self, length: int):
        """Mark the prompt's `length` tokens as held (after `fill` of every loop and layer)."""
        self.pos.fill_(length)
        self.length = length

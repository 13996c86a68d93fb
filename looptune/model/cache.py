"""The static-shape decode cache and the analytic KV-memory formula it must match.

Shapes are fixed at construction (gpt-fast style) and the position is a 0-d tensor, so a decode
step can be captured by `torch.compile` or a CUDA graph without recompiling per position.

- `k[layer][g]`, `v[layer][g]`: the keys and values of one layer, G = 1 group in `plt` /
  `plt-noshift`, G = R in `sequential` (one full-length cache per loop).
  - `plt` / `plt-noshift`: `[B, H_kv, (R-1) W' + S, d_h]`, W' = min(W, S). The local-branch
    rings of loops 2..R come first, side by side (loop r's position p in slot
    (r-2) W' + p % W'), then loop 1's full-length cache (position p in slot (R-1) W' + p), the
    G-SWA global branch. So a step reads one prefix of one tensor, and a G-SWA row's global
    and local branches are two query rows of one attention call, each under its own mask.
  - `sequential`: `[B, H_kv, S, d_h]` per loop.
- `carry` `[R-1, B, d]`: n(h_r) of the previous position for r < R (`plt` only, the CLP shift).

Each layer (and group) has a tensor of its own, not a view into one, and writes go to that
tensor by index: a compiled step then writes the new token in place, where a write into a view
made inductor copy the whole cache at every step (functionalised writes into a view are not put
back in place).

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
    hands over the new token's keys of a pass's loops with `write` and gets what their rows
    attend over with `keys`; it never sees a slot index. A pass's first `causal_rows(loops)`
    rows attend causally over a full-length cache (loop 0, and every loop in `sequential`), the
    rest are G-SWA rows, which `keys` expects twice: once for each branch.
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
        # The step reads R as this tuple's length: dynamo makes an int that changed between
        # compiles a symbol, but keeps a tuple's length a constant, so each R keeps a compile
        # of its own (its rows, passes and masks are Python structure).
        self.loop_ids = tuple(range(loops))
        self.batch, self.max_len = batch, max_len
        L, H_kv, d_h = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.dtype = dtype
        self.heads_per_kv = cfg.num_attention_heads // H_kv
        groups = loops if mode == "sequential" else 1
        rings = self.rings = loops - 1 if mode != "sequential" else 0
        self.ring_len = W = min(window, max_len)
        self.full_at = off = rings * W  # slot of position 0 in the full-length cache

        def zeros(*shape):
            return torch.zeros(shape, dtype=dtype, device=device)

        shape = (batch, H_kv, off + max_len, d_h)
        self.k = [[zeros(*shape) for _ in range(groups)] for _ in range(L)]
        self.v = [[zeros(*shape) for _ in range(groups)] for _ in range(L)]
        carries = loops - 1 if mode == "plt" else 0
        self.carry = zeros(carries, batch, cfg.hidden_size)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # next position to write
        # The same count on the host, so a step can size its reads without a device sync; None
        # when unknown (after a compiled `decode_step`): steps then read the whole cache.
        # Kept by `filled`, `reset`, `PLTForCausalLM.decode_step` and the runners in step.py.
        self.length: int | None = 0
        slots = torch.arange(off + max_len, device=device)
        # the position a slot holds once written, mod W' in the rings: written iff <= pos
        self._slot_pos = torch.where(slots < off, slots % W, slots - off)
        self._ring_base = torch.arange(rings, device=device) * W  # first slot of each ring
        self._pass_mask = self._pass_masks(slots)
        self.begin_step()

    def _pass_masks(self, slots: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per pass with G-SWA rows (by its first loop), the additive mask of which slots each
        query row may see once they are written: its global rows (every loop of the pass) see
        loop 0's full-length cache, then its local rows each their own ring. Stacked per head
        as `attend_step` stacks the rows, `[H / H_kv * rows, slots]`, and allocated with the
        row stride a multiple of 16 (the alignment CUDA's masked attention kernels want)."""
        if not self.rings:
            return {}
        starts = [0] if self.mode == "plt" else range(1, self.loops)  # plt: all R in one pass
        out = {}
        width = -(-len(slots) // 16) * 16
        for start in starts:
            stop = self.loops if self.mode == "plt" else start + 1
            local = range(max(start, 1), stop)
            lo = [self.full_at] * (stop - start) + [(r - 1) * self.ring_len for r in local]
            hi = [len(slots)] * (stop - start) + [r * self.ring_len for r in local]
            lo, hi = (torch.tensor(x, device=slots.device)[:, None] for x in (lo, hi))
            mask = torch.full((len(lo), width), float("-inf"), dtype=self.dtype)
            mask = mask.to(slots.device).repeat(self.heads_per_kv, 1)[:, : len(slots)]
            mask.masked_fill_(((slots >= lo) & (slots < hi)).repeat(self.heads_per_kv, 1), 0)
            out[start] = mask
        return out

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of decode state: the keys and values of every layer, and the carry."""
        return [t for per_layer in self.k + self.v for t in per_layer] + [self.carry]

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

    def check_room(self, dtype: torch.dtype | None = None):
        """Refuse a step that would write past the last slot (on a GPU an out-of-bounds write
        is a device-side assert that ends the process's CUDA context); free when unknown. With
        `dtype`, the model's: refuse a cache of another dtype (attention would not run)."""
        if self.length is not None and self.length >= self.max_len:
            raise LooptuneError(
                f"the cache is full: it holds max_len = {self.max_len} tokens; "
                "allocate a longer one or reset() it"
            )
        if dtype is not None:
            self._check_dtype(dtype)

    def _check_dtype(self, dtype: torch.dtype):
        if dtype != self.dtype:
            raise LooptuneError(
                f"a model in {str(dtype).removeprefix('torch.')}, but the cache is "
                f"{str(self.dtype).removeprefix('torch.')}: make it with the model's dtype"
            )

    def stepped(self):
        """Count one decoded token on the host (after a step; the device counter moved in it)."""
        if self.length is not None:
            self.length += 1

    def mark_dynamic(self):
        """Tell `torch.compile` that batch and length vary, so one compile serves every cache
        of this mode, R and window (`maybe_`: a size of 1 stays specialised, without an error)."""
        for t in self.tensors()[:-1]:  # [B, H_kv, (R-1) W' + S, d_h]
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.maybe_mark_dynamic(self.carry, 1)
        torch._dynamo.maybe_mark_dynamic(self._slot_pos, 0)
        for mask in self._pass_mask.values():
            torch._dynamo.maybe_mark_dynamic(mask, 1)

    # ----- decode-time access, position = self.pos -----

    def begin_step(self, span: int | None = None, exact: bool = False):
        """What every layer of the step at `pos` shares, made once: write indices and additive
        masks (0 where a key may be seen, -inf where not). Shapes never depend on `pos`.

        The full caches are read over their first `span` slots (None: all). `exact`: they end at
        the new token (span = tokens held + 1, known on the host: the eager step), so a pass
        with no G-SWA rows needs no mask; fixed-shape steps read a longer span under a mask.
        """
        self._span = span
        end = None if span is None else self.full_at + span  # slots read: [0, end)
        if span is not None and torch.compiler.is_compiling():
            torch._check(span >= 1)  # (and below end <= slots): see `_read`
            torch._check(self.full_at >= 0)  # a symbol too, once windows share a compile
            torch._check(end <= self._slot_pos.shape[0])
        full_at = self.full_at + self.pos.view(1)
        self._write_at, self._mask, self._full_mask = {0: full_at}, {}, None
        # The eager step knows the position (span - 1): its span ends at the new token, and
        # past the first W' tokens every ring slot is written too; then no mask needs an update.
        written = exact and (
            not self._pass_mask or (not torch.compiler.is_compiling() and span >= self.ring_len)
        )
        unwritten = None  # [end]: -inf at the slots not written yet (the new token's is)
        if not written:
            zero = torch.zeros((), dtype=self.dtype, device=self.pos.device)
            blocked = torch.full((), float("-inf"), dtype=self.dtype, device=self.pos.device)
            unwritten = torch.where(self._slot_pos[:end] <= self.pos, zero, blocked)
        if not exact:
            self._full_mask = unwritten[None, self.full_at :]  # [1, span]
        if not self._pass_mask:  # (not `rings`: an int may turn symbolic when compiled)
            return
        ring_at = self._ring_base + self.pos % self.ring_len
        for start, mask in self._pass_mask.items():
            if span is not None and torch.compiler.is_compiling():
                torch._check(end <= mask.shape[1])
            mask = mask[:, :end]  # [H / H_kv * rows, end]
            self._mask[start] = mask if written else mask + unwritten
            self._write_at[start] = (
                ring_at[start - 1 : start] if start else torch.cat((full_at, ring_at))
            )

    def causal_rows(self, loops: range) -> int:
        """How many of `loops` (the rows of one step, in order) attend causally over a full
        cache: loop 0 in `plt` / `plt-noshift`, every loop in `sequential`. The rest are G-SWA."""
        if self.mode == "sequential":
            return len(loops)
        return 1 if loops.start == 0 else 0

    def _group(self, loop: int) -> int:
        return loop if self.mode == "sequential" else 0

    def write(self, layer: int, loops: range, k, v):  # k [B, H_kv, len(loops), d_h]
        """Store the new token's keys and values of one pass's loops: each causal row in its
        full-length cache, each G-SWA row in its ring."""
        g = self._group(loops.start)
        at = self._write_at[0 if self.mode == "sequential" else loops.start]
        self.k[layer][g].index_copy_(2, at, k)
        self.v[layer][g].index_copy_(2, at, v)

    def keys(self, layer: int, loops: range):
        """(k, v, mask) that one pass's query rows attend over, every position up to and
        including the new token. A pass of causal rows only: the full-length cache, the mask
        `[1, span]` or None when the span ends at the new token. A pass with G-SWA rows: the
        rings and loop 0's cache, for its rows of `loops` (global branch, or plain causal for
        loop 0) and then one more row per G-SWA loop (local branch: its own last W positions);
        the mask is `[H / H_kv * rows, slots]`, rows stacked per head as `attend_step` does."""
        g = self._group(loops.start)
        k, v = self.k[layer][g], self.v[layer][g]
        if self.causal_rows(loops) == len(loops):
            return self._read(k, self.full_at), self._read(v, self.full_at), self._full_mask
        return self._read(k, 0), self._read(v, 0), self._mask[loops.start]

    def _read(self, t, first: int):  # t [B, H_kv, slots, d_h] -> slots [first, end of span)
        if self._span is None:
            return t[:, :, first:]
        end = self.full_at + self._span
        if torch.compiler.is_compiling():
            # the compiled step's span is unbacked (step.py), so dynamo never guards on its
            # value; stating its bound lets the slice be traced without a guard either
            torch._check(end <= t.shape[2])
        return t[:, :, first:end]

    # ----- prefill -----

    def check_prefill(self, loops: int, mode: str, window: int, batch: int, dtype):
        """Refuse, before anything is written, a prefill that would fill this cache with other
        knobs than its decode reads it with (a window only where the cache has rings)."""
        asked = {"loops": loops, "mode": mode, "window": window if self.rings else self.window}
        made = {"loops": self.loops, "mode": self.mode, "window": self.window}
        name = next((k for k in asked if asked[k] != made[k]), None)
        if name is not None:
            raise LooptuneError(
                f"a prefill with {name} {asked[name]!r}, but the cache was made for "
                f"{name} {made[name]!r}: make the cache with the same loops, mode and window"
            )
        if batch != self.batch:
            raise LooptuneError(f"a prompt of {batch} sequences, but the cache holds {self.batch}")
        self._check_dtype(dtype)

    def fill(self, layer: int, loop: int, k, v):
        """Store one loop's keys and values of a whole prompt `[B, H_kv, T, d_h]` from 0."""
        T = k.shape[2]
        if T > self.max_len:
            raise LooptuneError(f"prompt of {T} tokens does not fit a cache of {self.max_len}")
        g = self._group(loop)
        if self.causal_rows(range(loop, loop + 1)):
            slots = torch.arange(self.full_at, self.full_at + T, device=k.device)
            keep = T
        else:
            keep = min(T, self.ring_len)
            positions = torch.arange(T - keep, T, device=k.device)
            slots = (loop - 1) * self.ring_len + positions % self.ring_len
        self.k[layer][g].index_copy_(2, slots, k[:, :, T - keep :])
        self.v[layer][g].index_copy_(2, slots, v[:, :, T - keep :])

    def filled(self, length: int):
        """Mark the prompt's `length` tokens as held (after `fill` of every loop and layer)."""
        self.pos.fill_(length)
        self.length = length

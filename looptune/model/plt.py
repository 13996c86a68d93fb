"""The looped decoder: one set of weights, run as `plt`, `plt-noshift` or `sequential`.

Read top to bottom: norms and RoPE, the G-SWA gates, attention, MLP, the layer, the model. The
math is `../shared/docs/plt-architecture.md`; module and tensor names are the Llama/HF ones, so a
state dict maps 1:1 onto `config.json` checkpoints.

- Loop 1 is a plain causal decoder pass. For loop r >= 2 the input is
  `emb_scale * E + hidden_scale * n(h_{r-1})`, shifted right by one token in `plt` (CLP).
- `plt` and `plt-noshift`: loops r >= 2 attend with G-SWA, `g * Attn(q, K_1, V_1, causal) +
  (1 - g) * Attn(q, K_r, V_r, last W keys)`, so only loop 1 needs a full-length cache.
- `sequential`: every loop is a plain causal pass with its own full cache (the baseline).
- Decode: `decode_step` (eager) and `decode_static` (fixed shapes, no host reads: what CUDA
  graphs and `torch.compile` take; `looptune.model.step` runs either); `fuse()` merges the
  q/k/v and gate/up projections into one matmul each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from looptune.errors import LooptuneError
from looptune.model.cache import KVCache
from looptune.model.config import MODES, PLTConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def unit(self, x):
        """x / rms(x), in float32, returned in x's dtype (the part before the weight)."""
        dtype = x.dtype
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)

    def forward(self, x):
        return self.weight * self.unit(x)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin `[T, head_dim]` for integer `positions` `[T]` (HF rotate-half layout)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    freqs = positions.float()[:, None] * inv_freq  # [T, d_h/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attend(q, k, v, mask=None, causal=False):
    """SDPA with grouped-query heads at dim -3 (full-sequence passes): `mask` `[T, T]` is True
    where a key may be seen, or `causal`."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
    )


def attend_step(q, k, v, mask):
    """Decode-time attention, q `[B, H, n, d_h]` over cached k, v `[B, H_kv, S, d_h]`. The
    H / H_kv query heads that share a key head are stacked on the query axis (head
    h = kv * g + i gives rows i * n .. i * n + n - 1), so keys are read as they are, never
    repeated per head, by kernels that take no GQA. `mask` is additive (0 where a key may be
    seen, -inf where not), `[1, S]`, or `[g n, S]` in that stacked order; None: every key."""
    B, H, n, d_h = q.shape
    q = q.reshape(B, k.shape[1], H // k.shape[1] * n, d_h)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(B, H, n, d_h)


def fuse_linears(*linears: nn.Linear) -> torch.Tensor:
    """One weight `[sum(out), in]` for bias-free linears that read the same input; each
    linear's weight is rebound as a view of it, so state-dict keys, loading in place and
    memory stay as they were, and one matmul replaces several (gpt-fast's wqkv)."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    for lin, part in zip(linears, fused.split([lin.out_features for lin in linears]), strict=True):
        lin.weight = nn.Parameter(part, requires_grad=lin.weight.requires_grad)
    return fused


def gswa_mix(g, y_global, y_local):
    """G-SWA's output in one op: `g * Attn(q, K_1, V_1) + (1 - g) * Attn(q, K_r, V_r, W)`."""
    return torch.lerp(y_local, y_global, g)


class HiddenGate(nn.Module):
    """LoopCoder-V2's gate: sigmoid(W_g RMSNorm_g(x) + b_g) from the layer input x; W_g `[H, d]`."""

    def __init__(self, cfg: PLTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.num_attention_heads, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_attention_heads))
        self.gate_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, q, h_unit=None):  # h [B, T, d] -> g [B, H, T, 1]
        """`h_unit`, if given, is `RMSNorm.unit(h)` already computed with the same eps."""
        x = self.gate_norm(h) if h_unit is None else self.gate_norm.weight * h_unit
        logits = F.linear(x, self.weight, self.bias)  # [B, T, H]
        return torch.sigmoid(logits).transpose(1, 2)[..., None]


class QueryGate(nn.Module):
    """IQuest's gate: sigmoid(<q_h, w_h> + b_h) from the post-RoPE query; w `[H, d_h]`."""

    def __init__(self, cfg: PLTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.num_attention_heads, cfg.head_dim))
        self.bias = nn.Parameter(torch.zeros(cfg.num_attention_heads))

    def forward(self, h, q, h_unit=None):  # q [B, H, T, d_h] -> g [B, H, T, 1]
        return torch.sigmoid((q * self.weight[:, None, :]).sum(-1) + self.bias[:, None])[..., None]


class Attention(nn.Module):
    def __init__(self, cfg: PLTConfig):
        super().__init__()
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.gate == "hidden":
            self.plt_gate = HiddenGate(cfg)
        else:
            self.gate_projection = QueryGate(cfg)
        self.wqkv = None  # q, k, v weights in one tensor after `PLTForCausalLM.fuse()`

    def gate(self, h, q, h_unit=None):
        module = self.plt_gate if hasattr(self, "plt_gate") else self.gate_projection
        return module(h, q, h_unit)

    def qkv(self, x, cos, sin):
        B, T, _ = x.shape
        if self.wqkv is not None and not torch.is_grad_enabled():  # autograd sees the parts
            q, k, v = F.linear(x, self.wqkv).split(
                [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], -1
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, d_h]
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, H_kv, T, d_h]
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, y):  # y [B, H, T, d_h] -> [B, T, d]
        B, _, T, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: PLTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.w_gate_up = None  # gate and up weights in one tensor after `PLTForCausalLM.fuse()`

    def forward(self, x):
        if self.w_gate_up is not None and not torch.is_grad_enabled():
            gate, up = F.linear(x, self.w_gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: PLTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward_seq(self, h, cos, sin, gswa, loop1_kv, window_mask):
        """One loop over a whole sequence. Returns the new h and this loop's (k, v).

        `gswa`: this loop mixes the global branch (`loop1_kv`, loop 1's keys and values of this
        layer) with its own keys under `window_mask`; otherwise plain causal attention.
        """
        attn = self.self_attn
        q, k, v = attn.qkv(self.input_layernorm(h), cos, sin)
        if gswa:
            y = gswa_mix(
                attn.gate(h, q),
                attend(q, *loop1_kv, causal=True),
                attend(q, k, v, mask=window_mask),
            )
        else:
            y = attend(q, k, v, causal=True)
        h = h + attn.out(y)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, (k, v)

    def forward_step(self, rows, cos, sin, loops: range, layer: int, cache: KVCache):
        """Rows `[B, n, d]` are loops `loops` (numbered from 0) of one token at `cache.pos`.

        All rows share one weight read: this is the batched pass that makes PLT decode cheap.
        The first rows take the plain path (causal over a full cache: loop 1, or any loop of
        `sequential`); the rest the G-SWA path. Its two branches are two query rows of the
        plain path's attention call (the cache masks each), so `K_1, V_1` are read once for all
        R rows and a step makes one attention call per layer.
        """
        attn = self.self_attn
        # rows / rms(rows) once: the input norm and the hidden gate's norm share it (same eps)
        unit = self.input_layernorm.unit(rows)
        q, k, v = attn.qkv(self.input_layernorm.weight * unit, cos, sin)  # q [B, H, n, d_h]
        n, m = len(loops), cache.causal_rows(loops)
        cache.write(layer, loops, k, v)
        if m < n:  # G-SWA rows ask twice in one call: global (with the rest), then local
            q = torch.cat((q, q[:, :, m:]), dim=2)  # [B, H, 2n - m, d_h]
        y = attend_step(q, *cache.keys(layer, loops))
        if m < n:
            g = attn.gate(rows[:, m:], q[:, :, m:n], unit[:, m:])
            y_mixed = gswa_mix(g, y[:, :, m:n], y[:, :, n:])
            y = torch.cat((y[:, :, :m], y_mixed), dim=2) if m else y_mixed
        rows = rows + attn.out(y)
        return rows + self.mlp(self.post_attention_layernorm(rows))


class PLTBackbone(nn.Module):
    def __init__(self, cfg: PLTConfig):
        super().__init__()
        # zeros, not nn.init (loaders set it; nn.init on meta imports torch._dynamo, 2 s)
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.zeros(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class PLTForCausalLM(nn.Module):
    """`model(ids)` gives logits `[B, T, vocab]` with the checkpoint's loops, mode and window;
    `model(ids, loops=R, mode=..., window=W)` overrides them."""

    def __init__(self, cfg: PLTConfig):
        super().__init__()
        self.config = cfg
        self.model = PLTBackbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.fused = False

    def fuse(self):
        """Fuse each layer's q/k/v and gate/up projections into one matmul each (idempotent).

        Inference only (with autograd on, the separate projections run). The parameters become
        views of the fused tensors: state-dict keys, memory, and `load_state_dict` copying in
        place are unchanged, and `.to()` re-fuses. Loading with `assign=True` replaces them:
        fuse after loading.
        """
        self.fused = True
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.wqkv is None:
                attn.wqkv = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
            if mlp.w_gate_up is None:
                mlp.w_gate_up = fuse_linears(mlp.gate_proj, mlp.up_proj)
        return self

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: convert the parts, then re-fuse
        fused = self.fused
        for layer in self.model.layers:
            layer.self_attn.wqkv = layer.mlp.w_gate_up = None
        super()._apply(fn, recurse)
        return self.fuse() if fused else self

    # ----- knobs and helpers -----

    def knobs(self, loops=None, mode=None, window=None) -> tuple[int, str, int]:
        """The run-time (loops, mode, window), defaulting to the checkpoint's; checked here."""
        cfg = self.config
        loops = cfg.num_loops if loops is None else loops
        mode = cfg.mode if mode is None else mode
        window = cfg.window if window is None else window
        if not isinstance(loops, int) or loops < 1:
            raise LooptuneError(f"loops must be a positive integer, got {loops!r}")
        if not isinstance(window, int) or window < 1:
            raise LooptuneError(f"window must be a positive integer, got {window!r}")
        if mode not in MODES:
            raise LooptuneError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        return loops, mode, window

    def head(self, h):
        """Final norm and LM head: logits from any loop's hidden state."""
        h = self.model.norm(h)
        if self.config.tie_word_embeddings:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

    def carried(self, h):
        """n(h): what one loop hands to the next."""
        return self.model.norm(h) if self.config.normalize_per_loop else h

    def loop_input(self, emb, carry):
        return self.config.emb_scale * emb + self.config.hidden_scale * carry

    def _positional(self, T, window, dtype, device):
        """RoPE tables `[T, d_h]` for positions 0..T-1 and the local branch's mask `[T, T]`:
        True where key j is among the last `window` positions up to query i (itself included)."""
        i = torch.arange(T, device=device)
        cos, sin = rope_tables(i, self.config.head_dim, self.config.rope_theta, dtype)
        return cos, sin, (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)

    def _loop(self, h, ids, loop1_kv, window):
        """One pass of the shared block over `h` `[B, T, d]` -> (h, every layer's (k, v))."""
        cos, sin, window_mask = self._positional(ids.shape[1], window, h.dtype, ids.device)
        gswa = loop1_kv is not None
        kvs = []
        for i, layer in enumerate(self.model.layers):
            h, kv = layer.forward_seq(h, cos, sin, gswa, loop1_kv[i] if gswa else None, window_mask)
            kvs.append(kv)
        return h, kvs

    # ----- one loop at a time (the full forward, and `diagnose`) -----

    def first_loop(self, input_ids, window=None):
        """Loop 1 over `[B, T]` ids: (h1 `[B, T, d]`, the raw residual state leaving loop 1,
        loop1_kv, every layer's loop-1 (k, v) `[B, H_kv, T, d_h]`, the G-SWA global branch).
        Loop 1 has no local branch: `window` is only checked, as in `next_loop`."""
        W = self.knobs(window=window)[2]
        return self._loop(self.model.embed_tokens(input_ids), input_ids, None, W)

    def next_loop(self, input_ids, h_prev, loop1_kv, shift=True, window=None, return_kv=False):
        """Loop r >= 2 given loop r-1's raw state `h_prev` `[B, T, d]` -> h_r `[B, T, d]`.

        The input is `emb_scale * E + hidden_scale * n(h_prev)`, the carry shifted one token
        right when `shift` (CLP, what `plt` runs) or at its own position (`plt-noshift`, or
        the unshifted oracle). Attention is G-SWA against `loop1_kv` with window W; with
        `loop1_kv=None` it is plain causal attention (the `sequential` baseline). With
        `return_kv`, also this loop's (k, v) of every layer.
        """
        W = self.knobs(window=window)[2]
        carry = self.carried(h_prev)
        if shift:  # CLP: loop r at position i reads loop r-1 at i-1
            carry = F.pad(carry[:, :-1], (0, 0, 1, 0))
        h, kvs = self._loop(
            self.loop_input(self.model.embed_tokens(input_ids), carry), input_ids, loop1_kv, W
        )
        return (h, kvs) if return_kv else h

    # ----- full-sequence forward (training, scoring, prefill) -----

    def forward(
        self,
        input_ids,
        loops=None,
        mode=None,
        window=None,
        return_hidden=False,
        cache: KVCache | None = None,
    ):
        """Logits `[B, T, vocab]`; with `return_hidden`, also every loop's output `[R][B, T, d]`.

        With `cache` (empty, of these knobs, T >= 1 long), this is the prefill: the cache then
        holds what incremental decode needs to continue at T (no prefill: decode from 0)."""
        if input_ids.shape[-1] == 0:
            raise LooptuneError("input_ids holds no tokens (to start from none, decode at 0)")
        R, mode, W = self.knobs(loops, mode, window)
        if cache is not None:
            cache.check_prefill(R, mode, W, len(input_ids), self.model.embed_tokens.weight.dtype)
        h, loop1_kv = self.first_loop(input_ids, W)
        kvs, hidden = loop1_kv, [h]
        for r in range(R):
            if r > 0:
                if cache is not None and mode == "plt":  # loop r+1 of the next token reads it
                    cache.carry[r - 1].copy_(self.carried(h[:, -1]))
                shared = None if mode == "sequential" else loop1_kv
                h, kvs = self.next_loop(input_ids, h, shared, mode == "plt", W, return_kv=True)
                hidden.append(h)
            if cache is not None:
                for layer_idx, kv in enumerate(kvs):
                    cache.fill(layer_idx, r, *kv)
        if cache is not None:
            cache.filled(input_ids.shape[1])
        logits = self.head(h)
        return (logits, hidden) if return_hidden else logits

    # ----- incremental decode -----

    def new_cache(
        self, batch, max_len, loops=None, mode=None, window=None, dtype=None, device=None
    ) -> KVCache:
        R, mode, W = self.knobs(loops, mode, window)
        p = self.model.embed_tokens.weight
        return KVCache(
            self.config, mode, R, W, batch, max_len, dtype or p.dtype, device or p.device
        )

    def decode_step(self, token_ids, cache: KVCache):
        """Logits `[B, vocab]` for one new token per sequence at position `cache.pos`.

        The global branch reads exactly the tokens held (their count is kept on the host), so
        its cost grows with the length, not the cache size, and needs no mask. For CUDA graphs
        and `torch.compile`, see `looptune.model.step`.
        """
        if torch.compiler.is_compiling() or cache.length is None:  # no count in a graph: from
            cache.length = None  # here on it is unknown, and steps read the whole cache
            return self.decode_static(token_ids, cache)
        cache.check_room(self.model.embed_tokens.weight.dtype)
        logits = self.decode_static(token_ids, cache, cache.length + 1, exact=True)
        cache.stepped()
        return logits

    def decode_static(self, token_ids, cache: KVCache, span=None, exact=False):
        """`decode_step` as tensor work only, what CUDA graphs and `torch.compile` capture:
        shapes fixed by the cache and `span` (the full-cache slots read, None: all; see
        `KVCache.begin_step` for `exact`), no host sync, no Python state; `cache.length` is
        the caller's to advance."""
        R, cfg = len(cache.loop_ids), self.config  # (R from a tuple's length: see KVCache)
        loops = range(R)
        cache.begin_step(span, exact)
        emb = self.model.embed_tokens(token_ids)[:, None]  # [B, 1, d]
        cos, sin = rope_tables(cache.pos.view(1), cfg.head_dim, cfg.rope_theta, emb.dtype)
        if cache.mode == "plt":  # the carry is the previous position's: all R loops in one pass
            rows = emb
            if R > 1:  # rows r >= 2: a * E + c * carry[r-1]
                rows = torch.cat((emb, self.loop_input(emb, cache.carry.transpose(0, 1))), dim=1)
            rows = self._step_layers(rows, cos, sin, loops, cache)  # [B, R, d]
            if R > 1:
                cache.carry.copy_(self.carried(rows[:, :-1]).transpose(0, 1))
        else:  # loop r needs loop r-1 of the same token: one pass per loop
            rows = emb
            for r in loops:
                if r > 0:
                    rows = self.loop_input(emb, self.carried(rows))
                rows = self._step_layers(rows, cos, sin, range(r, r + 1), cache)
        cache.pos += 1
        return self.head(rows[:, -1])

    def _step_layers(self, rows, cos, sin, loops: range, cache: KVCache):
        for i, layer in enumerate(self.model.layers):
            rows = layer.forward_step(rows, cos, sin, loops, i, cache)
        return rows

    # ----- costs -----

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

"""The runtime's defining properties: decode equals the full forward, R = 1 is a plain decoder,
causality, and the cache holds exactly what the formula says."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from looptune.errors import LooptuneError
from looptune.model import MODES, generate, kv_bytes
from looptune.model.generate import sample

LOOPS = [1, 2, 3, 4]


@pytest.mark.parametrize("gate", ["hidden", "query"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("W", [5, 32])  # the ring wraps; the window spans the whole context
def test_incremental_decode_equals_full_forward(gate, mode, W):
    model = tiny_model(gate)
    T = 21
    ids = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for R in LOOPS:
            full = model(ids, loops=R, mode=mode, window=W)
            cache = model.new_cache(3, T, loops=R, mode=mode, window=W)
            stepwise = torch.stack([model.decode_step(ids[:, t], cache) for t in range(T)], dim=1)
            torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=0)
            # prefill part of it, then decode the rest
            cache = model.new_cache(3, T, loops=R, mode=mode, window=W)
            prefix = model(ids[:, :13], loops=R, mode=mode, window=W, cache=cache)
            rest = torch.stack([model.decode_step(ids[:, t], cache) for t in range(13, T)], dim=1)
            torch.testing.assert_close(prefix, full[:, :13], atol=1e-5, rtol=0)
            torch.testing.assert_close(rest, full[:, 13:], atol=1e-5, rtol=0)


def test_decode_reads_the_tokens_held_and_fixed_spans_agree():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(ids, loops=2)
        cache = model.new_cache(2, 200, loops=2)
        model(ids[:, :17], loops=2, cache=cache)
        assert (cache.length, cache.span()) == (17, 32)
        rest = [model.decode_step(ids[:, t], cache) for t in range(17, 40)]
        assert (cache.length, cache.span()) == (40, 64)
        torch.testing.assert_close(torch.stack(rest, 1), full[:, 17:], atol=1e-5, rtol=0)
        # what graphs and compile read: a fixed span (or all of it) under a mask
        for span in (None, 64):
            cache.reset()
            static = []
            for t in range(40):
                static.append(model.decode_static(ids[:, t], cache, span))
                cache.stepped()
            torch.testing.assert_close(torch.stack(static, 1), full, atol=1e-5, rtol=0)
        # a count lost to a compiled step: the whole cache is read from then on, still right
        cache.reset()
        model(ids[:, :17], loops=2, cache=cache)
        cache.length = None
        rest = [model.decode_step(ids[:, t], cache) for t in range(17, 40)]
    torch.testing.assert_close(torch.stack(rest, 1), full[:, 17:], atol=1e-5, rtol=0)
    assert cache.length is None and cache.span() == 200


def test_window_override_changes_plt_but_decode_still_matches():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model(ids, loops=3, window=4)
        b = model(ids, loops=3, window=16)
        assert (a - b).abs().max() > 1e-4  # the window really binds
        cache = model.new_cache(2, 20, loops=3, window=4)
        stepwise = torch.stack([model.decode_step(ids[:, t], cache) for t in range(20)], 1)
    torch.testing.assert_close(stepwise, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_first_and_next_loop_chain_to_the_forward(mode):
    model = tiny_model("query" if mode == "plt-noshift" else "hidden")
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(6))
    R, W = 4, 5
    with torch.no_grad():
        logits, hidden = model(ids, loops=R, mode=mode, window=W, return_hidden=True)
        h, loop1_kv = model.first_loop(ids, window=W)
        chained = [h]
        for _ in range(1, R):
            shared = None if mode == "sequential" else loop1_kv
            h = model.next_loop(ids, h, shared, shift=mode == "plt", window=W)
            chained.append(h)
    for ours, theirs in zip(chained, hidden, strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(model.head(h), logits)
    assert len(loop1_kv) == model.config.num_hidden_layers
    assert loop1_kv[0][0].shape == (2, model.config.num_key_value_heads, 19, model.config.head_dim)


def test_unshifted_next_loop_differs_from_the_shifted_one():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        h1, kv = model.first_loop(ids)
        shifted = model.next_loop(ids, h1, kv, shift=True)
        oracle = model.next_loop(ids, h1, kv, shift=False)
        noshift = model(ids, loops=2, mode="plt-noshift", return_hidden=True)[1][1]
    assert (shifted - oracle).abs().max() > 1e-4
    torch.testing.assert_close(oracle, noshift, atol=0, rtol=0)


def reference_llama(model, ids):
    """A plain pre-norm Llama decoder written out independently of looptune's modules."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    H, Hkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    T = ids.shape[1]
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # [T, dh/2]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # rotate-half: pairs (i, i + dh/2)
        x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    h = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = norm(h, sd[p + "input_layernorm.weight"])
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).unflatten(-1, (H, dh)).transpose(1, 2)
        k = (x @ sd[p + "self_attn.k_proj.weight"].T).unflatten(-1, (Hkv, dh)).transpose(1, 2)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).unflatten(-1, (Hkv, dh)).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -math.inf)
        y = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        h = h + y @ sd[p + "self_attn.o_proj.weight"].T
        x = norm(h, sd[p + "post_attention_layernorm.weight"])
        gate = x @ sd[p + "mlp.gate_proj.weight"].T
        up = x @ sd[p + "mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return norm(h, sd["model.norm.weight"]) @ sd["model.embed_tokens.weight"].T


@pytest.mark.parametrize("mode", MODES)
def test_one_loop_is_a_plain_decoder(mode):
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids, loops=1, mode=mode).double()
    torch.testing.assert_close(ours, reference_llama(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_causal(mode):
    model = tiny_model("query")
    ids = torch.randint(0, 256, (2, 18), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    t = 11
    changed[:, t] = (changed[:, t] + 7) % 256
    with torch.no_grad():
        for R in LOOPS:
            a, b = model(ids, loops=R, mode=mode), model(changed, loops=R, mode=mode)
            torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
            assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_equal_formula(mode, dtype):
    model = tiny_model()
    for R in LOOPS:
        for context, window, batch in [(5, 8, 1), (40, 8, 3), (40, 64, 2)]:
            cache = model.new_cache(batch, context, loops=R, mode=mode, window=window, dtype=dtype)
            expected = kv_bytes(model.config, mode, R, window, context, batch, dtype)
            assert cache.nbytes() == expected, (mode, R, context, window, batch)
            # one storage per layer (and group), exactly its size: a view of a shared tensor
            # made inductor copy the whole cache at every compiled step
            held = [t for t in cache.tensors() if t.numel()]
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
            assert len(storages) == len(held) and sum(storages.values()) == expected


def test_formula_matches_the_architecture_doc():
    from looptune.model import preset_config

    cfg = preset_config("loopcoder-v2-7b")
    # 56 KiB per token of global cache in bf16 (architecture doc, section 4)
    assert kv_bytes(cfg, "plt", 1, 64, 1) == 56 * 1024
    base = kv_bytes(cfg, "plt-noshift", 1, 64, 4096)
    overhead = kv_bytes(cfg, "plt-noshift", 2, 64, 4096) / base - 1
    assert abs(overhead - 64 / 4096) < 1e-12  # W / S = 1.56%
    assert kv_bytes(cfg, "sequential", 4, 64, 4096) == 4 * base


def test_greedy_generate_matches_full_forward_argmax():
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    for mode in MODES:
        out = generate(model, prompt, 10, loops=3, mode=mode)
        seq = prompt
        with torch.no_grad():
            for _ in range(10):
                nxt = model(seq, loops=3, mode=mode)[:, -1].argmax(-1)
                seq = torch.cat([seq, nxt[:, None]], 1)
        assert torch.equal(out, seq[:, 6:])


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, 0.7, gen).item() for _ in range(300)}
    assert draws == {0, 1}
    assert sample(logits, 0.0).item() == 0


def test_fused_projections_keep_weights_and_decode_equal_to_forward():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        full = model(ids, loops=3)
    model.fuse().fuse()  # idempotent
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.wqkv[attn.q_proj.out_features :].data_ptr()
    with torch.no_grad():
        cache = model.new_cache(2, 15, loops=3)
        stepwise = torch.stack([model.decode_step(ids[:, t], cache) for t in range(15)], 1)
        torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids, loops=3), full, atol=1e-5, rtol=0)
    # loading in place writes through to the fused tensors; .to() re-fuses
    model.load_state_dict(
        {k: torch.zeros_like(v) if "k_proj" in k else v for k, v in before.items()}
    )
    assert not attn.wqkv[attn.q_proj.out_features :][: attn.k_proj.out_features].any()
    model.load_state_dict(before)
    model.to(torch.float64)
    assert attn.wqkv.dtype == torch.float64 and model.state_dict().keys() == before.keys()
    assert attn.q_proj.weight.data_ptr() == attn.wqkv.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, loops=3).float(), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gate", ["hidden", "query"])
def test_state_dict_names_are_the_checkpoint_names(gate):
    """The checkpoint loader maps tensor spellings onto exactly these names; fusing adds none."""
    model = tiny_model(gate).fuse()
    keys = set(model.state_dict())
    p = "model.layers.1."
    expected = {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
    expected |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    expected |= {"model.embed_tokens.weight", "model.norm.weight"}
    if gate == "hidden":
        expected |= {p + f"self_attn.plt_gate.{x}" for x in ("weight", "bias")}
        expected.add(p + "self_attn.plt_gate.gate_norm.weight")
    else:
        expected |= {p + f"self_attn.gate_projection.{x}" for x in ("weight", "bias")}
    assert expected <= keys
    assert not [k for k in keys if "wqkv" in k or "w_gate_up" in k]
    per_layer = len([k for k in keys if k.startswith("model.layers.0.")])
    assert len(keys) == 2 + 2 * per_layer  # embeddings, final norm (the head is tied)


def test_a_prefill_into_a_cache_made_for_other_knobs_is_one_line():
    """The prefill fills the cache with the loops, mode and window it is given, the decode
    reads it with the cache's: another window filled it silently with what the next steps
    then read as the cache's (no error, wrong logits); another R, batch or dtype was an
    IndexError or RuntimeError traceback."""
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(9))
    cache = model.new_cache(2, 12, loops=2, window=4)
    for wrong, said in [
        ({"loops": 2, "window": 8}, "window 8"),
        ({"loops": 3, "window": 4}, "loops 3"),
        ({"loops": 2, "window": 4, "mode": "sequential"}, "mode 'sequential'"),
    ]:
        with pytest.raises(LooptuneError, match=f"{said}, but the cache was made for"):
            model(ids[:, :5], cache=cache, **wrong)
    with pytest.raises(LooptuneError, match="3 sequences, but the cache holds 2"):
        model(ids[:1].expand(3, -1), loops=2, window=4, cache=cache)
    half = model.new_cache(2, 12, loops=2, window=4, dtype=torch.bfloat16)
    with pytest.raises(LooptuneError, match="float32, but the cache is bfloat16"):
        model(ids[:, :5], loops=2, window=4, cache=half)
    assert cache.length == 0  # nothing was filled
    with torch.no_grad():  # the sequential cache does not depend on the window
        full = model(ids, loops=2, mode="sequential", window=4)
        cache = model.new_cache(2, 12, loops=2, mode="sequential", window=8)
        model(ids[:, :5], loops=2, mode="sequential", window=4, cache=cache)
        rest = torch.stack([model.decode_step(ids[:, t], cache) for t in range(5, 12)], 1)
    torch.testing.assert_close(rest, full[:, 5:], atol=1e-5, rtol=0)


def test_a_prompt_of_no_tokens_is_one_clear_error():
    model = tiny_model()
    ids = torch.zeros((2, 0), dtype=torch.long)
    with pytest.raises(LooptuneError, match="no tokens"):
        model(ids, loops=2, cache=model.new_cache(2, 8, loops=2))
    with pytest.raises(LooptuneError, match="no tokens"):
        model(ids, loops=2)


def test_plt_step_makes_one_attention_call_per_layer_whatever_R():
    """What keeps PLT's extra loops cheap where launches cost (eager on a GPU): the G-SWA
    rows' global and local branches share the loop-1 rows' attention call, and R = 3, 4 add no
    operator over R = 2."""

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.ops[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    model = tiny_model(num_hidden_layers=3).fuse()
    counts = {}
    for R in (1, 2, 3, 4):
        cache = model.new_cache(1, 40, loops=R, window=8)
        cache.filled(20)
        with torch.no_grad(), Ops() as ops:
            model.decode_step(torch.zeros(1, dtype=torch.long), cache)
        attention = sum(n for op, n in ops.ops.items() if "scaled_dot_product" in op)
        assert attention == 3  # one per layer
        counts[R] = sum(ops.ops.values())
    assert counts[2] == counts[3] == counts[4]
    assert counts[2] < 1.3 * counts[1]


def test_a_decode_on_a_cache_of_another_dtype_is_one_line():
    """With no prefill to check it first, a step on a cache of another dtype than the model's
    was a RuntimeError traceback from attention; every runner refuses it in one line."""
    from looptune.model.step import make_decode_step

    model = tiny_model()
    cache = model.new_cache(1, 8, loops=2, dtype=torch.bfloat16)
    with torch.no_grad(), pytest.raises(LooptuneError, match="model in float32, but the cache"):
        model.decode_step(torch.zeros(1, dtype=torch.long), cache)
    with pytest.raises(LooptuneError, match="model in float32, but the cache"):
        make_decode_step(model, cache, "compile", backend="eager")

"""The decode step runners: every way of running the step gives the eager logits."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from looptune.errors import LooptuneError
from looptune.model import MODES, PLTForCausalLM, preset_config
from looptune.model.step import make_decode_step


def _decode(model, ids, R, mode, how, prefix=5, **kw):
    """Prefill `prefix` tokens, then decode the rest with a `how` runner: `[B, T - prefix, V]`."""
    B, T = ids.shape
    cache = model.new_cache(B, T, loops=R, mode=mode, window=4)
    model(ids[:, :prefix], loops=R, mode=mode, window=4, cache=cache)
    step, setup_ms = make_decode_step(model, cache, how, **kw)
    assert setup_ms >= 0
    out = [step(ids[:, t]).clone() for t in range(prefix, T)]
    assert cache.length == T
    return torch.stack(out, dim=1)


@pytest.mark.slow  # dynamo's first trace takes seconds; decode_static == forward is in the fast run
@pytest.mark.parametrize("mode", MODES)
def test_compiled_step_equals_the_full_forward(mode):
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        full = model(ids, loops=3, mode=mode, window=4)
    compiled = _decode(model, ids, 3, mode, "compile", backend="eager")  # spans 16, 32, 40
    eager = _decode(model, ids, 3, mode, "eager")
    torch.testing.assert_close(eager, full[:, 5:], atol=1e-5, rtol=0)
    torch.testing.assert_close(compiled, full[:, 5:], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_one_compile_serves_other_batches_and_contexts():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    gen = torch.Generator().manual_seed(12)
    for B, T in [(2, 9), (3, 9), (3, 14), (5, 11)]:
        ids = torch.randint(0, 256, (B, T), generator=gen)
        with torch.no_grad():
            full = model(ids, loops=2, window=4)
        got = _decode(model, ids, 2, "plt", "compile", backend="eager")
        torch.testing.assert_close(got, full[:, 5:], atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow  # a real inductor compile, a minute on a 2-core CPU
def test_inductor_step_equals_the_full_forward_from_one_compile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        full = model(ids, loops=2, window=4)
    backend = CompileCounterWithBackend("inductor")
    got = _decode(model, ids, 2, "plt", "compile", backend=backend)  # spans 16, 32, 40
    assert backend.frame_count == 1
    torch.testing.assert_close(got, full[:, 5:], atol=1e-5, rtol=0)


class _Compiles:
    """A dynamo backend (no inductor) that counts compiles and records, for every call of the
    compiled step, the key length of each attention call: the cache slots it reads."""

    def __init__(self):
        self.compiles, self.keys_read, self.unbacked = 0, [], []

    def __call__(self, gm, example_inputs):
        from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

        self.compiles += 1
        self.unbacked.append(bool(free_unbacked_symbols(example_inputs)))  # the span's kind
        for node in gm.graph.nodes:
            if node.target is F.scaled_dot_product_attention:
                node.target = self._attend
        gm.recompile()

        def run(*args):
            self.keys_read.append([])
            return gm(*args)

        return run

    def _attend(self, q, k, v, *args, **kwargs):
        self.keys_read[-1].append(k.shape[-2])  # k [B, H_kv, S, d_h]
        return F.scaled_dot_product_attention(q, k, v, *args, **kwargs)


def _prefilled(batch, T, prefix, seed):
    """A fresh dynamo, a one-layer model (the trace is what these tests wait on), ids
    `[batch, T]`, their full forward at R = 2, W = 4, and a cache holding the first `prefix`."""
    torch._dynamo.reset()
    model = tiny_model(num_hidden_layers=1)
    ids = torch.randint(0, 256, (batch, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(ids, loops=2, window=4)
        cache = model.new_cache(batch, T, loops=2, window=4)
        model(ids[:, :prefix], loops=2, window=4, cache=cache)
    return model, ids, full, cache


def test_compiled_step_reads_the_span_and_never_recompiles_as_the_length_grows():
    """The compiled step costs what the length needs, not the cache size: it reads exactly
    the tokens held plus the new one (6, 7, ..., 70) and the ring, from one compile made in
    set-up."""
    T, prefix = 70, 5
    model, ids, full, cache = _prefilled(2, T, prefix, seed=15)
    backend = _Compiles()
    step, _ = make_decode_step(model, cache, "compile", backend=backend)
    assert backend.compiles == 1 and cache.length == prefix  # set-up compiled, then put back
    assert backend.unbacked == [True]
    out = [step(ids[:, t]) for t in range(prefix, T)]
    assert backend.compiles == 1
    read = [max(keys) for keys in backend.keys_read[1:]]  # [0]: the set-up step
    ring = 4  # the one ring of R = 2 (W = 4) is read in the same call, before loop 1's keys
    assert read == [ring + n for n in range(prefix + 1, T + 1)]
    torch.testing.assert_close(torch.stack(out, 1), full[:, prefix:], atol=1e-5, rtol=0)


def test_a_batch_of_one_fed_column_by_column_compiles_once():
    """`ids[:, t]` of batch 1 has stride T (size-1 tensors count as contiguous): the runner
    must not recompile on it, nor on int32 ids; a recompile after set-up also took the span as
    a constant and recompiled again as it grew (three compiles, at 7B 30-40 s each)."""
    T, prefix = 12, 3
    model, ids, full, cache = _prefilled(1, T, prefix, seed=17)
    backend = _Compiles()
    step, _ = make_decode_step(model, cache, "compile", backend=backend)
    out = [step(ids[:, t] if t % 2 else ids[:, t].int()).clone() for t in range(prefix, T)]
    assert backend.compiles == 1
    torch.testing.assert_close(torch.stack(out, 1), full[:, prefix:], atol=1e-5, rtol=0)


def test_one_runner_serves_a_cache_reset_and_refilled_and_refuses_a_full_one():
    """A runner built before any prefill decodes every prompt put in its cache afterwards
    (lengths 0, 1 and 6 here) to the last slot, without recompiling; a step past the last
    slot is one `LooptuneError` (on a GPU it would be a device-side assert), in every runner."""
    torch._dynamo.reset()
    model = tiny_model(num_hidden_layers=1)
    T = 9
    ids = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(18))
    with torch.no_grad():
        full = model(ids, loops=3, window=4)
    cache = model.new_cache(3, T, loops=3, window=4)
    backend = _Compiles()
    step, _ = make_decode_step(model, cache, "compile", backend=backend)
    for prefix in (6, 0, 1):
        cache.reset()
        if prefix:
            with torch.no_grad():
                model(ids[:, :prefix], loops=3, window=4, cache=cache)
        out = [step(ids[:, t]).clone() for t in range(prefix, T)]
        torch.testing.assert_close(torch.stack(out, 1), full[:, prefix:], atol=1e-5, rtol=0)
    assert backend.compiles == 1
    eager, _ = make_decode_step(model, cache, "eager")
    for full_step in (step, eager, lambda t: model.decode_step(t, cache)):
        with pytest.raises(LooptuneError, match="the cache is full"):
            full_step(ids[:, 0])
    with pytest.raises(LooptuneError, match="the cache is full"):
        make_decode_step(model, cache, "compile", backend=backend)  # set-up steps too
    assert cache.length == T
    cache.reset()  # one id for a batch of 3 would be broadcast by the compiled step's copy
    for runner in (step, eager):
        for wrong in (ids[:1, 0], ids[:2, 0], ids[:, :2]):
            with pytest.raises(LooptuneError, match=r"one id per sequence, shape \(3,\)"):
                runner(wrong)
    assert cache.length == 0 and backend.compiles == 1


def test_a_runner_set_up_without_a_count_compiles_once_more_when_it_gets_one():
    """A runner set up on a cache whose count is unknown (the whole cache read under a mask)
    and later refilled compiles the exact step once, its span unbacked too: not a constant
    span that recompiles again as the length grows."""
    T = 12
    model, ids, full, cache = _prefilled(2, T, 3, seed=19)
    cache.length = None  # as after a compiled `decode_step`
    backend = _Compiles()
    step, _ = make_decode_step(model, cache, "compile", backend=backend)
    whole = [step(ids[:, t]).clone() for t in range(3, 6)]
    cache.reset()
    with torch.no_grad():
        model(ids[:, :6], loops=2, window=4, cache=cache)
    exact = [step(ids[:, t]).clone() for t in range(6, T)]
    assert backend.compiles == 2 and backend.unbacked == [True, True]
    torch.testing.assert_close(torch.stack(whole + exact, 1), full[:, 3:], atol=1e-5, rtol=0)


@pytest.mark.slow  # three compiles, 6 s; one runner's single compile is in the fast run
def test_runners_of_one_process_reuse_compiles_across_loops_windows_and_lengths():
    """What a profile of R = 2, 3, 2 relies on: going back to a loop count reuses its compile,
    and after one ring of another size, the windows and cache lengths share one compile."""
    torch._dynamo.reset()
    model = tiny_model(num_hidden_layers=1)
    backend = _Compiles()
    compiles = []
    for R, W, T in [(2, 4, 6), (3, 4, 6), (2, 4, 6), (2, 8, 30), (2, 16, 7)]:
        ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(R * T + W))
        with torch.no_grad():
            full = model(ids, loops=R, window=W)
            cache = model.new_cache(2, T, loops=R, window=W)
            model(ids[:, :3], loops=R, window=W, cache=cache)
        step, _ = make_decode_step(model, cache, "compile", backend=backend)
        out = torch.stack([step(ids[:, t]) for t in range(3, T)], 1)
        torch.testing.assert_close(out, full[:, 3:], atol=1e-5, rtol=0)
        compiles.append(backend.compiles)
    assert compiles == [1, 2, 2, 3, 3]


@pytest.mark.parametrize("mode", MODES)
def test_the_static_step_never_reads_a_value_on_the_host(mode):
    """What a CUDA graph needs: on the meta device (shapes, no values) any host read, a
    `.item()` or a branch on a tensor, would raise."""
    with torch.device("meta"):
        model = PLTForCausalLM(preset_config("tiny"))
    model.fuse()
    cache = model.new_cache(2, 32, loops=3, mode=mode)
    tokens = torch.zeros(2, dtype=torch.long, device="meta")
    with torch.no_grad():
        for span, exact in ((None, False), (16, False), (6, True)):  # graphs; compile
            logits = model.decode_static(tokens, cache, span, exact)
            assert logits.shape == (2, model.config.vocab_size)


def test_graphs_are_refused_off_cuda_and_bad_how_is_one_line():
    model = tiny_model()
    cache = model.new_cache(1, 8, loops=2)
    with pytest.raises(LooptuneError, match="CUDA"):
        make_decode_step(model, cache, "graphs")
    with pytest.raises(LooptuneError, match="how must be one of"):
        make_decode_step(model, cache, "jit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_graph_replay_equals_eager_on_cuda(mode):
    model = tiny_model().cuda()
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(13)).cuda()
    with torch.no_grad():
        full = model(ids, loops=3, mode=mode, window=4)
    graphed = _decode(model, ids, 3, mode, "graphs", prefix=17)
    eager = _decode(model, ids, 3, mode, "eager", prefix=17)
    torch.testing.assert_close(eager, full[:, 17:], atol=1e-4, rtol=0)
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_step_equals_eager_on_cuda():
    model = tiny_model().cuda()
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(14)).cuda()
    eager = _decode(model, ids, 2, "plt", "eager", prefix=9)
    compiled = _decode(model, ids, 2, "plt", "compile", prefix=9)  # inductor
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)

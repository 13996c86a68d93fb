"""The decode step three ways, behind one call: `make_decode_step(model, cache, how)`.

    step, setup_ms = make_decode_step(model, cache, "graphs")
    logits = step(token_ids)  # [B] ids -> [B, vocab]; the cache advances one position

- `eager`: `PLTForCausalLM.decode_step`, one kernel launch per op. The global branch reads
  exactly the tokens held (counted on the host), so its cost grows with the length rather than
  the cache size.
- `graphs`: the static-shape step (`decode_static`) captured in `torch.cuda.CUDAGraph`s, no
  inductor; each call copies the ids into a static input buffer and replays, so launch
  overhead goes. One graph per span the cache can still need (`cache.span()` now, doubling up
  to `max_len`): the cost still grows with the length, in steps of two. CUDA only.
- `compile`: `torch.compile` of the same static step (inductor, no CUDA graphs), reading
  exactly the tokens held plus the new one with no mask, as eager does (unlike a graph, a
  compiled step has no fixed shapes to keep). The span is an unbacked int of the one compiled
  step: it never recompiles as the length grows. (A cache whose count is unknown, after a
  compiled `decode_step`, is read whole under a mask: one more compile, when it happens.)

Every runner first fuses the model's q/k/v and gate/up projections (`PLTForCausalLM.fuse()`:
one matmul each, parameters and state dict unchanged).

`setup_ms` is what the runner costs before its first step: capture (with its warm-up) or
compilation, timed after a device sync; 0 for eager. Setting up runs the step at the cache's
current position and then puts `pos`, `carry` and the host count back, so the cache holds what
it held (the keys written at `pos` are rewritten by the first real step before anything reads
them). Build the runner after the cache is allocated; prefill may come before or after.

The logits returned by `graphs` live in the graph's static output: the next call overwrites
them, so clone what you keep.

Compile reuse: dynamo keeps compiled code per function, so every runner of one process shares
it, and each runner compiles at most once, in set-up, never while decoding. The batch and
cache-length dimensions and the span are dynamic, so one compile serves every batch size above
1, every cache size and every length held, and members of one shape share it (the weights are
inputs). It recompiles for a new architecture (shape, gate), dtype, mode or loop count R (going
back to one already compiled, R = 2 after R = 3, reuses that one), once for batch 1 (dynamo
specialises sizes of 1) and once for the first ring of another size (a new window, or a cache
shorter than the window; the ring is dynamic from then on). Inductor's on-disk cache then
makes a second process's compile of the same shapes cheap.

A step past the cache's last slot raises `LooptuneError` in every runner (on a GPU the write
would be a device-side assert).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from looptune.errors import LooptuneError
from looptune.model.cache import KVCache
from looptune.model.plt import PLTForCausalLM

HOWS = ("eager", "graphs", "compile")

# Room for one compiled graph per (member, dtype, mode, R, window) of a whole profile.
_RECOMPILE_LIMIT = 64

# dynamo's name for the `span` argument of `PLTForCausalLM.decode_static` (a frame local).
_SPAN_SOURCE = "L['span']"


def make_decode_step(
    model: PLTForCausalLM,
    cache: KVCache,
    how: str = "eager",
    backend: str | Callable = "inductor",
) -> tuple[Callable, float]:
    """`(step, setup_ms)`: `step(token_ids [B]) -> logits [B, vocab]` decodes one token per
    sequence at `cache.pos` and advances the cache. `how` is one of `HOWS`; `backend` is the
    `torch.compile` backend for `compile`, a name or a callable (the CPU tests use "eager",
    dynamo alone, or a backend that counts compiles)."""
    if how not in HOWS:
        raise LooptuneError(f"how must be one of {', '.join(HOWS)}, got {how!r}")
    if how == "graphs" and cache.pos.device.type != "cuda":
        raise LooptuneError(
            f"how='graphs' needs a CUDA device; the cache is on {cache.pos.device.type}"
        )
    model.fuse()
    if how == "eager":
        return _no_grad(lambda ids: model.decode_step(_one_per_sequence(ids, cache), cache)), 0.0
    cache.check_room(model.model.embed_tokens.weight.dtype)  # set-up runs a step here
    if how == "graphs":
        return _graphed(model, cache)
    return _compiled(model, cache, backend)


def _no_grad(fn):
    def step(token_ids):
        with torch.no_grad():
            return fn(token_ids)

    return step


def _one_per_sequence(token_ids, cache: KVCache):
    """The ids, checked to be one per sequence: graphs and compile copy them into a buffer of
    the cache's batch, where one id would be broadcast to every sequence without an error."""
    if tuple(token_ids.shape) != (cache.batch,):
        raise LooptuneError(
            f"token_ids must hold one id per sequence, shape ({cache.batch},); "
            f"got {tuple(token_ids.shape)}"
        )
    return token_ids


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Saved:
    """The cache state a warm-up or capture step changes, to put back afterwards."""

    def __init__(self, cache: KVCache):
        self.cache, self.pos, self.carry = cache, cache.pos.clone(), cache.carry.clone()
        self.length = cache.length

    def restore(self):
        self.cache.pos.copy_(self.pos)  # in place: captured graphs keep their addresses
        self.cache.carry.copy_(self.carry)
        self.cache.length = self.length


@torch.no_grad()
def _graphed(model, cache: KVCache):
    device = cache.pos.device
    tokens = torch.zeros(cache.batch, dtype=torch.long, device=device)  # the static input
    spans = [cache.span()]  # one graph per span a later step may need, from here to max_len
    while spans[-1] < cache.max_len:
        spans.append(min(2 * spans[-1], cache.max_len))
    saved = _Saved(cache)
    _sync(device)
    t0 = time.perf_counter()
    graphs = {}
    side = torch.cuda.Stream(device)  # warm up off the capture stream, as torch's docs advise
    for span in spans:
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                model.decode_static(tokens, cache, span)
                saved.restore()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model.decode_static(tokens, cache, span)  # [B, vocab], static output
        saved.restore()
        graphs[span] = (graph, logits)
    _sync(device)
    setup_ms = (time.perf_counter() - t0) * 1e3

    def step(token_ids):
        cache.check_room()
        need = cache.span()  # below the first captured span only after a new prefill
        graph, logits = graphs.get(need) or graphs[spans[0]]
        tokens.copy_(_one_per_sequence(token_ids, cache))
        graph.replay()
        cache.stepped()
        return logits

    step.graphs = graphs  # the graphs (and their memory pools) live as long as the step
    return step, setup_ms


def _compiled(model, cache: KVCache, backend: str):
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, _RECOMPILE_LIMIT)
    cache.mark_dynamic()
    fn = torch.compile(model.decode_static, backend=backend)
    # The ids go through one buffer: dynamo guards on their strides and dtype, and a column
    # `ids[:, t]` of batch 1 is "contiguous" with stride T. A recompile after set-up would
    # take the span as a constant, and then recompile as it grows.
    tokens = torch.zeros(cache.batch, dtype=torch.long, device=cache.pos.device)
    torch._dynamo.maybe_mark_dynamic(tokens, 0)

    traced = set()  # the variants (`exact` or not) traced so far, each with an unbacked span

    def raw(token_ids):
        cache.check_room()
        tokens.copy_(_one_per_sequence(token_ids, cache))
        exact = cache.length is not None  # known: read exactly what is held, with no mask
        span = cache.length + 1 if exact else cache.max_len
        if exact in traced:  # no config patch on the hot path (it costs ~60 us a call)
            logits = fn(tokens, cache, span, exact)
        else:  # the first call of a variant compiles it
            with torch.compiler.config.patch(unbacked_sources=_SPAN_SOURCE):
                logits = fn(tokens, cache, span, exact)
            traced.add(exact)
        cache.stepped()
        return logits

    step = _no_grad(raw)
    device = cache.pos.device
    saved = _Saved(cache)
    _sync(device)
    t0 = time.perf_counter()
    # dynamo takes an int argument as a constant, made dynamic only when a second value comes,
    # with a second compile (at 7B, another 30-40 s); and a dynamic span is still guarded on as
    # it reaches max_len (the keys' slice turns contiguous): a third. An unbacked span is never
    # guarded on (`KVCache` states its bounds where it slices), so this one compile serves every
    # span and none is left for the measured steps (see the module's doc for what does compile).
    # A runner set up without a count compiles the exact variant at its first counted step.
    step(torch.zeros(cache.batch, dtype=torch.long, device=device))  # compiles
    _sync(device)
    setup_ms = (time.perf_counter() - t0) * 1e3
    saved.restore()
    return step, setup_ms

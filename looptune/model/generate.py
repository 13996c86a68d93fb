"""Generation as small functions, so each part can be timed on its own (gpt-fast style)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from looptune.model.cache import KVCache
from looptune.model.plt import PLTForCausalLM


@torch.no_grad()
def prefill(model: PLTForCausalLM, input_ids, cache: KVCache):
    """Run the prompt `[B, T]` into an empty cache; logits `[B, vocab]` for the next token."""
    cache.reset()
    return model(input_ids, loops=cache.loops, mode=cache.mode, window=cache.window, cache=cache)[
        :, -1
    ]


@torch.no_grad()
def decode_one(model: PLTForCausalLM, token_ids, cache: KVCache):
    return model.decode_step(token_ids, cache)


def sample(logits, temperature: float = 0.0, top_p: float = 1.0, generator=None):
    """Greedy at temperature 0; otherwise temperature and nucleus (top-p) sampling. `[B]` ids."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def decode_n(
    model,
    first_token,
    cache: KVCache,
    n: int,
    temperature=0.0,
    top_p=1.0,
    generator=None,
    on_token: Callable | None = None,
    stop_id: int | None = None,
):
    """Feed `first_token` and n-1 more sampled tokens; returns `[B, n]` (stops early at
    `stop_id` when every sequence has produced it)."""
    out, token = [first_token], first_token
    done = token == stop_id if stop_id is not None else None
    if on_token:
        on_token(token)
    for _ in range(n - 1):
        if done is not None and bool(done.all()):
            break
        token = sample(model.decode_step(token, cache), temperature, top_p, generator)
        out.append(token)
        if on_token:
            on_token(token)
        if done is not None:
            done |= token == stop_id
    return torch.stack(out, dim=1)


@torch.no_grad()
def generate(
    model: PLTForCausalLM,
    input_ids,
    max_new_tokens: int,
    loops=None,
    mode=None,
    window=None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_id: int | None = None,
    on_token: Callable | None = None,
):
    """Prompt ids `[B, T]` -> new ids `[B, <= max_new_tokens]` with the given loop settings."""
    B, T = input_ids.shape
    cache = model.new_cache(B, T + max_new_tokens, loops, mode, window)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    first = sample(prefill(model, input_ids, cache), temperature, top_p, generator)
    return decode_n(
        model, first, cache, max_new_tokens, temperature, top_p, generator, on_token, stop_id
    )

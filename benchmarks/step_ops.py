"""Operators one eager decode step dispatches, per mode and loop count, counted on the meta
device: how much launch overhead each loop adds, for any preset, with no GPU and no weights.

    python benchmarks/step_ops.py --preset loopcoder-v2-7b --context 512

An eager step on a GPU is launch-bound (issue #13: 8 ms for a 7B step at batch 1, about twice
what reading its weights takes), so the extra operators of PLT's loops 2..R are, to first
order, its extra time there. Views are not counted (they launch nothing). The count is exact
and the same on every machine; what each operator costs is not, which is what
`decode_latency.py` times. The step counted is the fused one the runners use, at `--context`
tokens held (batch and context change no count; a context shorter than the window adds the
mask update of a ring not yet full).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from looptune.model.config import preset_config
from looptune.model.plt import PLTForCausalLM


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside it, views left out."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and not self.paused:
            self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


class AttentionAsOne(TorchFunctionMode):
    """SDPA counted as the one fused kernel it is on a GPU or CPU: on the meta device it runs
    its math decomposition (matmuls, softmax), whose operators are not counted."""

    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.counter.ops["scaled_dot_product_attention"] += 1
        self.counter.paused = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.paused = False


def step_ops(model, mode: str, R: int, window: int, context: int) -> Counter:
    cache = model.new_cache(1, context + 1, R, mode, window, device="meta")
    cache.filled(context)
    counter = OpCounter()
    with torch.no_grad(), counter, AttentionAsOne(counter):
        model.decode_step(torch.zeros(1, dtype=torch.long, device="meta"), cache)
    return counter.ops


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="loopcoder-v2-7b")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--window", type=int, help="G-SWA window (default: the preset's)")
    p.add_argument("--loops", default="1,2,3,4")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = p.parse_args()
    cfg = preset_config(args.preset)
    window = args.window or cfg.window
    with torch.device("meta"):
        model = PLTForCausalLM(cfg)
    model.fuse()
    rows = []
    for R in [int(v) for v in args.loops.split(",")]:
        for mode in ("plt", "sequential") if R > 1 else ("plt",):
            ops = step_ops(model, mode, R, window, args.context)
            rows.append({"mode": mode, "loops": R, "ops": sum(ops.values()), "by_op": dict(ops)})
    base = rows[0]["ops"]
    if args.json:
        print(json.dumps({"preset": args.preset, "context": args.context, "rows": rows}))
        return
    L = cfg.num_hidden_layers
    print(f"{args.preset}, {L} layers, window {window}, context {args.context}, eager, fused")
    print("| mode | R | ops per step | per layer | x R=1 |\n|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["ops"] / base
        print(f"| {r['mode']} | {r['loops']} | {r['ops']} | {r['ops'] / L:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()

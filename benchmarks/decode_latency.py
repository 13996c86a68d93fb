"""Per-token decode latency of the same weights as `plt` and `sequential`, R = 1..4, as a
ratio to R = 1, side by side, at batch 1 and 8, in one interleaved run.

    python benchmarks/decode_latency.py --preset small --device cpu --threads 1

A random checkpoint of the preset is written to a temporary directory (latency does not depend
on the weights' values) and measured with `looptune.measure.profile_candidates`: warm-up apart,
candidates interleaved, each until --min-repeats runs and --min-time seconds; the decode steps
run at positions context .. context + gen. The expectation (architecture doc, section 3): PLT
runs all R loops of a token in one batched pass, so its latency grows far slower with R than
sequential's, which runs the loops one after the other (about R x).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from looptune.measure.latency import profile_candidates
from looptune.model.checkpoint import init_checkpoint

MODES = ("plt", "sequential")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="model shape (looptune.model.PRESETS)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (float32, bfloat16 for 7B), float32, "
                                                   "bfloat16 or float16")
    p.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    p.add_argument("--gen", type=int, default=32, help="decode steps timed per run")
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    p.add_argument("--loops", default="1,2,3,4", help="loop counts, comma-separated")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=2.0, help="measured seconds per candidate")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loops = [int(v) for v in args.loops.split(",")]
    batches = [int(v) for v in args.batch.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / args.preset
        made = init_checkpoint(ckpt, args.preset, dtype=args.dtype, device=args.device)
        ms = profile_candidates([ckpt], loops=loops, modes=MODES, batches=batches,
                                prompt_len=args.context, gen_len=args.gen, dtype=args.dtype,
                                device=args.device, compile=args.compile, fresh=True,
                                min_repeats=args.min_repeats, min_time_s=args.min_time,
                                progress=lambda line: print(line, file=sys.stderr))
    if args.json:
        print(json.dumps([m.to_dict() for m in ms], indent=2, default=str))
        return
    env = ms[0].environment
    print(f"decode latency per token, same weights: preset {args.preset} "
          f"({made['parameters'] / 1e6:.2f}M parameters), context {args.context}, "
          f"{args.gen} steps per run, {env['dtype']}, {env['device']} ({env['device_name']}), "
          f"torch {env['torch']}, {env['threads']} thread(s), compile {args.compile}")
    print("tpot = median ms per decode step [95% CI]; x R=1 = ratio to the same mode and batch "
          "at R = 1")
    by = {(m.batch, m.mode, m.loops): m for m in ms}
    print(f"{'batch':>5} {'R':>2}   " + "   ".join(f"{mode + ' tpot':>27} {'x R=1':>6}"
                                                    for mode in MODES))
    for b in batches:
        for R in loops:
            cells = []
            for mode in MODES:
                m, base = by[b, mode, R], by.get((b, mode, loops[0]))
                if m.tpot_ms_p50 is None:
                    cells.append(f"{m.status:>27} {'-':>6}")
                    continue
                lo, hi = m.tpot_ms_p50_ci95
                ratio = m.tpot_ms_p50 / base.tpot_ms_p50 if base and base.tpot_ms_p50 else None
                cells.append(f"{m.tpot_ms_p50:9.3f} [{lo:7.3f}, {hi:7.3f}] "
                             + (f"{ratio:6.2f}" if ratio else f"{'-':>6}"))
            print(f"{b:>5} {R:>2}   " + "   ".join(cells))
    load = env.get("loadavg")
    if load:
        print(f"load average at the end: {load[0]:.2f} on {env['cpu_count']} CPUs")


if __name__ == "__main__":
    main()

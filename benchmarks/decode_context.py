"""Decode TPOT against the length held, in ONE cache: does a step cost what the length needs, or
what the cache holds? (issue #13, item 4)

    OMP_NUM_THREADS=1 python benchmarks/decode_context.py --preset base --layers 4 --device cpu
    python benchmarks/decode_context.py --preset loopcoder-v2-7b --device cuda --dtype bfloat16 \
        --how eager,graphs,compile --out results/

One cache of max(--context) + --gen positions serves every context. Each runner
(`make_decode_step`) is measured two ways: `span`, as it runs (eager and compile read exactly
the tokens held; graphs read `cache.span()`, the tokens held rounded up to a power of two), and
`whole`, with the cache's host count unset, so that every step reads the whole cache under a
mask, as the compiled step did before it was length-aware: the reference. Per (how, read,
context): the cache is marked as holding `context` tokens without a prefill (latency depends on
neither the weights' nor the cache's values), the runner is built there (`setup_ms`: capture or
compile, apart), then one warm-up run of --gen greedy steps (kept apart) and timed runs until
--min-repeats runs and --min-time seconds; TPOT is the median step, with p10 and p90. Ratios are
to the first context of the same row. `compiles` counts graphs dynamo compiled during the timed
runs: 0 means the set-up compile served every span.

With --out, results are appended to `decode_context.jsonl` as they come and `decode_context.md`
(the table of every result in that file) is rewritten.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from step_timing import failure, ints, outcome, say, summary, time_runs
from torch._dynamo.utils import counters

from looptune.errors import LooptuneError
from looptune.measure.env import environment
from looptune.measure.timers import synchronize
from looptune.model.checkpoint import build_model, resolve_device, resolve_dtype, run_dtype
from looptune.model.config import preset_config
from looptune.model.step import HOWS, make_decode_step
from looptune.store import atomic_write_text

READS = ("span", "whole")


def measure(model, cache, how, read, context, args) -> dict:
    """One (how, read, context) -> a result dict (status "ok", "oom" or "error")."""
    device = cache.pos.device
    row = {"how": how, "read": read, "context": context, "max_len": cache.max_len}

    def start():  # every run decodes positions context .. context + gen
        cache.filled(context)
        if read == "whole":
            cache.length = None  # count unknown: every step reads the whole cache under a mask

    step = None
    try:
        start()
        step, row["setup_ms"] = make_decode_step(model, cache, how)
        graphs_before = counters["stats"]["unique_graphs"]
        runs, _ = time_runs(
            step, start, cache.batch, device, args.gen, args.min_repeats, args.min_time
        )
        row["compiles"] = counters["stats"]["unique_graphs"] - graphs_before
    except (torch.OutOfMemoryError, RuntimeError) as e:  # recorded; the next one runs
        return row | failure(e)
    finally:
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row | summary(runs)


def table(rows) -> str:
    """Markdown: one line per (how, read); TPOT per context, then ratios to the first context."""
    contexts = sorted({r["context"] for r in rows})
    by = {(r["how"], r["read"], r["context"]): r for r in rows}
    heads = [f"ms @{c}" for c in contexts] + [f"{c}/{contexts[0]}" for c in contexts[1:]]
    lines = [
        "| how | read | " + " | ".join(heads) + " | setup ms | compiles |",
        "|---|---|" + "---:|" * (len(heads) + 2),
    ]
    keys = sorted({k[:2] for k in by}, key=lambda k: (HOWS.index(k[0]), READS.index(k[1])))
    for how, read in keys:
        got = [by.get((how, read, c)) for c in contexts]
        tpot = [r.get("tpot_ms_p50") if r else None for r in got]
        cells = [f"{t:.3f}" if t else (r["status"] if r else "-") for t, r in zip(tpot, got)]
        cells += [f"{t / tpot[0]:.2f}x" if t and tpot[0] else "-" for t in tpot[1:]]
        done = [r for r in got if r]
        cells.append(f"{max(r.get('setup_ms') or 0.0 for r in done):.0f}")
        cells.append(str(sum(r.get("compiles") or 0 for r in done)))
        lines.append(f"| {how} | {read} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def keep(out: Path, row: dict):
    with open(out / "decode_context.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in (out / "decode_context.jsonl").read_text().splitlines()]
    atomic_write_text(out / "decode_context.md", table(rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base", help="model shape (looptune.model.PRESETS)")
    p.add_argument("--layers", type=int, default=None, help="layers (default: the preset's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--dtype", default="auto", help="auto (float32 on the CPU), float32, bfloat16 or float16"
    )
    p.add_argument("--how", default="eager,compile", help=f"comma-separated, of {', '.join(HOWS)}")
    p.add_argument("--read", default="span,whole", help="span (as the runner reads), whole")
    p.add_argument("--context", default="512,4096,16384", help="tokens held, comma-separated")
    p.add_argument("--gen", type=int, default=16, help="decode steps timed per run")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--loops", type=int, default=2, help="loop count R")
    p.add_argument("--mode", default="plt", help="plt, plt-noshift or sequential")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--min-time", type=float, default=1.0, help="measured seconds per row cell")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSONL and markdown")
    p.add_argument("--json", action="store_true", help="print the results as one JSON document")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hows, reads, contexts = args.how.split(","), args.read.split(","), ints(args.context)
    if bad := [h for h in hows if h not in HOWS] + [r for r in reads if r not in READS]:
        p.error(f"unknown {', '.join(bad)}: --how is of {', '.join(HOWS)}, --read of span, whole")
    if not contexts or min(contexts) < 1 or args.gen < 1:
        p.error("--context needs positive token counts and --gen at least 1")
    max_len = max(contexts) + args.gen
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(run_dtype(args.dtype, device)) or (
            torch.bfloat16 if args.preset == "loopcoder-v2-7b" else torch.float32
        )
        # random weights: the positions table is only a bound, so it may grow to the cache
        positions = max(preset_config(args.preset).max_position_embeddings, max_len)
        cfg = preset_config(
            args.preset, num_hidden_layers=args.layers, max_position_embeddings=positions
        )
    except (LooptuneError, ValueError, KeyError) as e:
        p.error(str(e.args[0] if e.args else e))
    if "graphs" in hows and device.type != "cuda":
        p.error(f"--how graphs needs a CUDA device, not {device.type}")
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype).eval()
    synchronize(device)
    say(
        f"{args.preset}: {cfg.num_hidden_layers} layers, {model.num_params() / 1e6:.2f}M "
        f"parameters, {str(dtype).removeprefix('torch.')} on {device}, built in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    cache = model.new_cache(args.batch, max_len, args.loops, args.mode)
    env = environment(device, dtype)
    head = {
        "preset": args.preset,
        "layers": cfg.num_hidden_layers,
        "parameters": model.num_params(),
        "mode": args.mode,
        "loops": args.loops,
        "batch": args.batch,
        "max_len": max_len,
        "cache_bytes": cache.nbytes(),
        "environment": env,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            args.out / "decode_context_env.json", json.dumps(head, indent=2, default=str)
        )
    rows = []
    try:
        for how, read, context in itertools.product(hows, reads, contexts):
            row = measure(model, cache, how, read, context, args)
            rows.append(row)
            say(f"{how} {read} context {context}: {outcome(row)}")
            if args.out:
                keep(args.out, row)
    except KeyboardInterrupt:
        kept = f", kept in {args.out}" if args.out else ""
        say(f"interrupted: {len(rows)} measured{kept}")
        sys.exit(130)
    if args.json:
        print(json.dumps({**head, "results": rows}, indent=2, default=str))
        return
    print(
        f"decode TPOT against context, one cache of {max_len} positions "
        f"({cache.nbytes() / 2**20:.0f} MiB): preset {args.preset}, {cfg.num_hidden_layers} "
        f"layers, {args.mode} R={args.loops}, batch {args.batch}, {env['dtype']}, "
        f"{env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} "
        f"thread(s), {args.gen} steps per run; TPOT p50 in ms, then ratios to context "
        f"{min(contexts)}"
    )
    print(table(rows), end="")


if __name__ == "__main__":
    main()

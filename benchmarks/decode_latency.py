"""Per-token decode latency of the same weights as `plt` and `sequential`, R = 1..4, run eager,
as a CUDA graph or compiled, at several batch sizes and contexts.

    python benchmarks/decode_latency.py --preset small --device cpu --threads 1
    python benchmarks/decode_latency.py --preset loopcoder-v2-7b --device cuda --dtype bfloat16 \
        --how eager,graphs,compile --batch 1,8,32 --context 512,4096,16384 --out results/

Random weights of the preset's shape are built on the device, and each cache is marked as
holding `context` tokens without running a prefill: decode latency depends on neither the
weights' nor the cache's values, and a 16k context at batch 32 then costs no prefill time or
activation memory. One candidate (how, batch, context, mode, R): `make_decode_step` (its
`setup_ms`: capture or compile), one warm-up run of --gen greedy steps (kept apart), then timed
runs of --gen steps (CUDA events on a GPU, `perf_counter` after a sync elsewhere) until
--min-repeats runs and --min-time seconds; TPOT is the median step, with p10 and p90. R = 1 is
measured once (as `plt`; `sequential` runs the same code) and is the base of both modes' ratios.

With --out, every candidate is appended to `decode_latency.jsonl` as soon as it is measured,
and `decode_latency.md` (a markdown table of every result in that file, so several runs into
one folder make one table) is rewritten, so a run cut short keeps what it had.
A candidate that runs out of memory is recorded as "oom" (another failure as "error", with its
message) and the run goes on.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from step_timing import failure, ints, outcome, say, summary, time_runs

from looptune.errors import LooptuneError
from looptune.measure.env import environment
from looptune.measure.timers import LapTimer, synchronize
from looptune.model.checkpoint import build_model, resolve_device, resolve_dtype, run_dtype
from looptune.model.config import preset_config
from looptune.model.step import HOWS, make_decode_step
from looptune.store import atomic_write_text


def candidates(loops, seq_loops):
    """(mode, R) pairs: R = 1 once, then plt at every R > 1 and sequential at seq_loops > 1."""
    out = [("plt", 1)] if 1 in loops else []
    out += [("plt", R) for R in loops if R > 1]
    return out + [("sequential", R) for R in seq_loops if R > 1]


def copy_bandwidth(device, nbytes=1 << 30) -> float | None:
    """Device-to-device copy bandwidth in GB/s (bytes read + written per second), CUDA only."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    with LapTimer(device) as laps:
        for _ in range(10):
            dst.copy_(src)
            laps.lap()
    del src, dst
    return 2 * nbytes / (statistics.median(laps.ms) / 1e3) / 1e9


def measure(model, how, batch, context, mode, R, window, args):
    """One candidate -> a result dict (status "ok", "oom" or "error")."""
    gen, min_repeats, min_time_s = args.gen, args.min_repeats, args.min_time
    device = model.model.embed_tokens.weight.device
    row = {
        "how": how,
        "batch": batch,
        "context": context,
        "mode": mode,
        "loops": R,
        "window": window,
        "gen": gen,
    }
    cache = step = None
    try:
        cache = model.new_cache(batch, context + gen, R, mode, window)
        cache.filled(context)  # before set-up: graphs are captured for the spans still ahead
        step, row["setup_ms"] = make_decode_step(model, cache, how)
        start = functools.partial(cache.filled, context)  # each run decodes context .. + gen
        runs, token = time_runs(step, start, batch, device, gen, min_repeats, min_time_s)
        if args.kernels and args.out:
            cache.filled(context)
            row["kernels"] = kernel_table(step, token, gen, device)
    except (torch.OutOfMemoryError, RuntimeError) as e:  # recorded; the next candidate runs
        return row | failure(e)
    finally:
        del cache, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row | summary(runs)


def kernel_table(step, token, n, device) -> str:
    """torch.profiler's table of the ops and kernels of `n` more steps, by time on the device."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(n):
            token = step(token).argmax(-1)
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def table(rows, weight_bytes=None, copy_gbs=None) -> str:
    """Markdown: one line per (how, batch, context); R = 1 in ms, the rest as ratios to it."""
    by = {(r["how"], r["batch"], r["context"], r["mode"], r["loops"]): r for r in rows}
    pairs = sorted({k[3:] for k in by}, key=lambda p: (p[0] != "plt", p[1]))
    heads = [
        "R=1 ms" if (m, R) == ("plt", 1) else f"{'PLT' if m == 'plt' else 'seq'} R={R}"
        for m, R in pairs
    ]
    extra = ["PLT-2 / seq-2"] if ("plt", 2) in pairs and ("sequential", 2) in pairs else []
    if weight_bytes and copy_gbs:
        extra.append("R=1 % copy bw")
    lines = [
        "| how | batch | context | " + " | ".join(heads + extra + ["setup ms"]) + " |",
        "|---|---:|---:|" + "---:|" * (len(heads) + len(extra) + 1),
    ]
    keys = sorted({k[:3] for k in by}, key=lambda k: (HOWS.index(k[0]), k[1], k[2]))
    for how, batch, context in keys:

        def get(mode, R, how=how, batch=batch, context=context):
            r = by.get((how, batch, context, mode, R))
            return r.get("tpot_ms_p50") if r else None

        base, cells = get("plt", 1), []
        for mode, R in pairs:
            r, t = by.get((how, batch, context, mode, R)), get(mode, R)
            if t is None:
                cells.append(r["status"] if r else "-")
            elif (mode, R) == ("plt", 1):
                cells.append(f"{t:.3f}")
            else:
                cells.append(f"{t / base:.2f}x" if base else f"{t:.3f} ms")
        if "PLT-2 / seq-2" in extra:
            p, s = get("plt", 2), get("sequential", 2)
            cells.append(f"{p / s:.2f}" if p and s else "-")
        if "R=1 % copy bw" in extra:
            cells.append(
                f"{100 * weight_bytes / (base / 1e3) / 1e9 / copy_gbs:.0f}%" if base else "-"
            )
        setups = [r.get("setup_ms") or 0.0 for k, r in by.items() if k[:3] == (how, batch, context)]
        cells.append(f"{max(setups):.0f}")
        lines.append(f"| {how} | {batch} | {context} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def keep(out: Path, row: dict, weight_bytes, copy_gbs):
    """Append one result to the JSONL and rewrite the table of every result in the folder."""
    kernels = row.pop("kernels", None)
    if kernels:
        with open(out / "decode_latency_kernels.txt", "a") as f:
            f.write(
                f"== {row['how']} batch {row['batch']} context {row['context']} "
                f"{row['mode']} R={row['loops']}\n{kernels}\n"
            )
    with open(out / "decode_latency.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in (out / "decode_latency.jsonl").read_text().splitlines()]
    atomic_write_text(out / "decode_latency.md", table(rows, weight_bytes, copy_gbs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="model shape (looptune.model.PRESETS)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--dtype", default="auto", help="auto (float32 on the CPU), float32, bfloat16 or float16"
    )
    p.add_argument("--how", default="eager", help=f"comma-separated, of {', '.join(HOWS)}")
    p.add_argument("--compile", action="store_true", help="the same as --how compile")
    p.add_argument("--context", default="512", help="tokens held before decoding, comma-separated")
    p.add_argument("--gen", type=int, default=32, help="decode steps timed per run")
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    p.add_argument("--loops", default="1,2,3,4", help="loop counts, comma-separated")
    p.add_argument("--seq-loops", default=None, help="sequential's loop counts (default --loops)")
    p.add_argument("--window", type=int, default=None, help="G-SWA window (default: preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=2.0, help="measured seconds per candidate")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSONL and markdown")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="with --out: also profile --gen "
        "steps per candidate into decode_latency_kernels.txt (torch.profiler)",
    )
    p.add_argument("--json", action="store_true", help="print the results as one JSON document")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hows = ["compile"] if args.compile else args.how.split(",")
    bad = [h for h in hows if h not in HOWS]
    if bad:
        p.error(f"--how: unknown {', '.join(bad)} (choose from {', '.join(HOWS)})")
    loops = ints(args.loops)
    pairs = candidates(loops, ints(args.seq_loops) if args.seq_loops else loops)
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(run_dtype(args.dtype, device)) or (
            torch.bfloat16 if args.preset == "loopcoder-v2-7b" else torch.float32
        )
        cfg = preset_config(args.preset)
    except (LooptuneError, ValueError, KeyError) as e:
        p.error(str(e.args[0] if e.args else e))
    if "graphs" in hows and device.type != "cuda":
        p.error(f"--how graphs needs a CUDA device, not {device.type}")
    longest = max(ints(args.context)) + args.gen
    if longest > cfg.max_position_embeddings:
        p.error(
            f"--context + --gen = {longest} exceeds the preset's "
            f"{cfg.max_position_embeddings} positions"
        )
    window = args.window or cfg.window
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype).eval()
    synchronize(device)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    say(
        f"{args.preset}: {model.num_params() / 1e6:.2f}M parameters, {weight_bytes / 1e9:.2f} GB "
        f"{str(dtype).removeprefix('torch.')} on {device}, built in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    env = environment(device, dtype)
    copy_gbs = copy_bandwidth(device)
    if copy_gbs:
        say(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    head = {
        "preset": args.preset,
        "parameters": model.num_params(),
        "weight_bytes": weight_bytes,
        "copy_gb_per_s": copy_gbs,
        "environment": env,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            args.out / "decode_latency_env.json", json.dumps(head, indent=2, default=str)
        )
    rows = []
    try:
        for how, context, batch, (mode, R) in itertools.product(
            hows, ints(args.context), ints(args.batch), pairs
        ):
            row = measure(model, how, batch, context, mode, R, window, args)
            rows.append(row)
            say(f"{how} batch {batch} context {context} {mode} R={R}: {outcome(row)}")
            if args.out:
                keep(args.out, row, weight_bytes, copy_gbs)
    except KeyboardInterrupt:
        kept = f", kept in {args.out}" if args.out else ""
        say(f"interrupted: {len(rows)} candidate(s) measured{kept}")
        sys.exit(130)
    if args.json:
        print(json.dumps({**head, "results": rows}, indent=2, default=str))
        return
    print(
        f"decode latency per token: preset {args.preset}, {env['dtype']}, {env['device']} "
        f"({env['device_name']}), torch {env['torch']}, {env['threads']} thread(s), "
        f"{args.gen} steps per run; R=1 in ms, the rest as ratios to it"
    )
    print(table(rows, weight_bytes, copy_gbs), end="")


if __name__ == "__main__":
    main()

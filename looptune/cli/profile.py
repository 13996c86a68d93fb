"""`looptune profile`: latency and memory per loop count, mode and batch on the target device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from looptune.cli.app import app, console, emit_json, parse_choice_list, parse_int_list


@app.command()
def profile(
    checkpoints: Annotated[Optional[list[Path]], typer.Argument(
        help="Checkpoint directories (default: the bundled model).")] = None,
    loops: Annotated[str, typer.Option(help="Loop counts R, comma-separated.")] = "1,2,3,4",
    mode: Annotated[str, typer.Option(help="Execution modes: plt, plt-noshift, sequential.")] = "plt,sequential",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    prompt_len: Annotated[int, typer.Option(min=1, help="Prompt tokens (prefill).")] = 512,
    gen_len: Annotated[int, typer.Option(min=1, help="Decode steps timed per run.")] = 64,
    window: Annotated[Optional[int], typer.Option(
        min=1, help="G-SWA window W (default: each checkpoint's trained W).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (as stored on a GPU, float32 on the CPU), "
                                            "float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the decode step (CUDA graphs on a GPU).")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore cached results.")] = False,
    min_repeats: Annotated[int, typer.Option(min=1, help="Measured runs per candidate, at least.")] = 5,
    min_time: Annotated[float, typer.Option(min=0.0, help="Measured seconds per candidate, at "
                                                          "least.")] = 2.0,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up runs per candidate.")] = 1,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads (default: "
                                                               "torch's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Also write the JSON document here.")] = None,
):
    """Measure latency and memory per loop count, mode and batch on the target device.

    For every combination of checkpoint, mode, loops and batch: TTFT, per-token decode latency
    (p50/p90/p99), tokens/s, KV bytes (measured and analytic) and peak memory.

    Candidates are run interleaved (A B C, C B A, ...) after a warm-up, each until both
    --min-repeats runs and --min-time seconds are reached. Results are cached by model hash,
    candidate, device and versions (--fresh re-measures). Out of memory marks a candidate
    infeasible and goes on; Ctrl-C prints what was measured (exit 130). Exit 1 if a cache's
    measured bytes differ from the formula (a bug)."""
    import torch

    from looptune.bundled import resolve_checkpoints
    from looptune.measure.env import environment
    from looptune.measure.latency import document, dumps, profile_candidates
    from looptune.model.checkpoint import resolve_device
    from looptune.model.config import MODES
    from looptune.store import atomic_write_text

    loop_list = parse_int_list(loops, "--loops")
    mode_list = parse_choice_list(mode, "--mode", MODES)
    batch_list = parse_int_list(batch, "--batch")
    paths = resolve_checkpoints(checkpoints)
    if threads:
        torch.set_num_threads(threads)
    settings = {"checkpoints": [str(p) for p in paths], "loops": loop_list, "modes": mode_list,
                "batches": batch_list, "prompt_len": prompt_len, "gen_len": gen_len,
                "window": window, "dtype": dtype, "device": device, "compile": compile,
                "fresh": fresh, "min_repeats": min_repeats, "min_time_s": min_time,
                "warmup": warmup, "threads": torch.get_num_threads()}
    with console.status("profiling...") as status:
        def progress(message: str):
            if console.is_terminal:
                status.update(message)
            else:
                console.print(message, style="dim", highlight=False)

        results = profile_candidates(paths, loops=loop_list, modes=mode_list, batches=batch_list,
                                     prompt_len=prompt_len, gen_len=gen_len, window=window,
                                     dtype=dtype, device=device, compile=compile, fresh=fresh,
                                     progress=progress, min_repeats=min_repeats,
                                     min_time_s=min_time, warmup=warmup)
    env = environment(resolve_device(device), results[0].dtype if results else dtype)
    interrupted = any((m.error or "").startswith("interrupted") for m in results)
    doc = document(results, settings, env, interrupted)
    if out is not None:
        atomic_write_text(out, dumps(doc))
    _print(results, env)
    if json_out:
        emit_json(doc)
    if interrupted:
        raise typer.Exit(130)
    if any(m.kv_match is False for m in results):
        raise typer.Exit(1)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def _ms(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _print(results, env):
    console.print(_describe(env), highlight=False)
    base = {(m.checkpoint, m.mode, m.batch, m.window, m.dtype, m.compile): m
            for m in results if m.loops == 1 and m.tpot_ms_p50}
    table = Table(title="profile (times in ms)")
    for name, justify in [("model", "left"), ("mode", "left"), ("R", "right"), ("B", "right"),
                          ("TTFT", "right"), ("TPOT p50 [95% CI]", "right"), ("p90", "right"),
                          ("p99", "right"), ("x R=1", "right"), ("tok/s", "right"),
                          ("KV", "right"), ("peak", "right"), ("runs", "right"),
                          ("status", "left")]:
        table.add_column(name, justify=justify)
    for m in results:
        ref = base.get((m.checkpoint, m.mode, m.batch, m.window, m.dtype, m.compile))
        ratio = f"{m.tpot_ms_p50 / ref.tpot_ms_p50:.2f}" if ref and m.tpot_ms_p50 else "-"
        ci = m.tpot_ms_p50_ci95
        tpot = "-" if m.tpot_ms_p50 is None else f"{m.tpot_ms_p50:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        kv = _bytes(m.kv_bytes_analytic)
        if m.kv_match is False:
            kv = f"[bold red]{_bytes(m.kv_bytes)} != {kv}[/]"
        status = {"ok": "ok", "infeasible": "[red]out of memory[/]",
                  "partial": "[yellow]partial[/]", "not-measured": "[yellow]not measured[/]"}[m.status]
        if m.cached:
            status += " (cached)"
        table.add_row(Path(m.checkpoint).name, m.mode, str(m.loops), str(m.batch),
                      _ms(m.ttft_ms, 2), tpot, _ms(m.tpot_ms_p90), _ms(m.tpot_ms_p99), ratio,
                      _ms(m.tokens_per_s, 1), kv, _bytes(m.peak_mem_bytes), str(m.repeats), status)
    # Not a terminal (a log, CI): print the table whole rather than squeezed to 80 columns.
    (console if console.is_terminal else Console(stderr=True, width=200)).print(table)
    for m in results:
        if m.kv_match is False:
            console.print(f"[bold red]KV MISMATCH (a bug): {m.label} holds {m.kv_bytes:,} bytes, "
                          f"the formula says {m.kv_bytes_analytic:,}[/]")
    warm = [m for m in results if m.warmup_ms and not m.cached]
    if any(m.compile_ms for m in warm):
        console.print("compile (first calls, apart from the statistics): " + ", ".join(
            f"{m.label} {m.compile_ms / 1e3:.1f} s" for m in warm if m.compile_ms), highlight=False)


def _describe(env: dict) -> str:
    parts = [f"{env['device']}: {env['device_name']}", f"torch {env['torch']}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    parts += [env["dtype"], f"{env['threads']} thread(s)"]
    if env.get("loadavg"):
        parts.append(f"load {env['loadavg'][0]:.1f} on {env['cpu_count']} CPUs")
    gpu = env.get("gpu_state")
    if gpu and "error" not in gpu:
        reasons = gpu.get("throttle_reasons")
        parts.append(f"SM {gpu.get('sm_clock_mhz')}/{gpu.get('max_sm_clock_mhz')} MHz, "
                     f"{gpu.get('power_w')}/{gpu.get('power_limit_w')} W, "
                     f"{gpu.get('temperature_c')} C, throttle: {', '.join(reasons or []) or 'none'}")
    elif gpu:
        parts.append(f"GPU state unavailable ({gpu['error']})")
    return ", ".join(parts)

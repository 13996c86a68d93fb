"""`looptune profile`: latency and memory per loop count, mode and batch on the target device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from looptune.cli.app import app, console, emit_json, parse_choice_list, parse_int_list


@app.command()
def profile(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(help="Checkpoint directories (default: the bundled model)."),
    ] = None,
    loops: Annotated[str, typer.Option(help="Loop counts R, comma-separated.")] = "1,2,3,4",
    mode: Annotated[
        str, typer.Option(help="Execution modes: plt, plt-noshift, sequential.")
    ] = "plt,sequential",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    prompt_len: Annotated[int, typer.Option(min=1, help="Prompt tokens (prefill).")] = 512,
    gen_len: Annotated[int, typer.Option(min=1, help="Decode steps timed per run.")] = 64,
    window: Annotated[
        int | None,
        typer.Option(min=1, help="G-SWA window W (default: each checkpoint's trained W)."),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            help="auto (as stored on a GPU, float32 on the CPU), float32, bfloat16 or float16."
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the decode step (inductor; its compile time is reported apart).",
        ),
    ] = False,
    graphs: Annotated[
        bool,
        typer.Option(
            "--graphs",
            help="Capture the eager decode step in a CUDA graph, no compiler (GPU only).",
        ),
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore cached results.")] = False,
    min_repeats: Annotated[
        int, typer.Option(min=1, help="Measured runs per candidate, at least.")
    ] = 5,
    min_time: Annotated[
        float, typer.Option(min=0.0, help="Measured seconds per candidate, at least.")
    ] = 2.0,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up runs per candidate.")] = 1,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="torch CPU threads (default: the faster of 1 and all cores for the model, "
            "probed once per shape and machine).",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Also write the JSON document here (.json).")
    ] = None,
):
    """Measure latency and memory per loop count, mode and batch on the target device.

    For every combination of checkpoint, mode, loops and batch: TTFT, per-token decode latency
    (p50/p90/p99), tokens/s, KV bytes (measured and analytic) and peak memory. R = 1 is the
    same plain decoder in every mode: it is measured once and shown under each mode asked.

    Candidates are run interleaved (A B C, C B A, ...) after a warm-up, each until both
    --min-repeats runs and --min-time seconds are reached; measurements on one device are
    serialised between looptune processes. A measurement taken while the machine was busy
    (load, other processes, dispersion of the runs) is flagged "interference" and not cached.
    Results are cached by model hash, candidate, device and versions (--fresh re-measures). Out
    of memory marks a candidate infeasible and goes on. Ctrl-C or SIGTERM: one line, exit 130;
    the candidates finished before it are cached, nothing is written to --out. Exit 1 if a
    cache's measured bytes differ from the formula (a bug)."""
    from looptune.bundled import resolve_checkpoints
    from looptune.errors import LooptuneError
    from looptune.measure.env import environment
    from looptune.measure.latency import profile_candidates
    from looptune.measure.measurement import document, dumps
    from looptune.model.checkpoint import resolve_device
    from looptune.model.config import MODES
    from looptune.store import atomic_write_text, check_output_path

    loop_list = parse_int_list(loops, "--loops")
    mode_list = parse_choice_list(mode, "--mode", MODES)
    batch_list = parse_int_list(batch, "--batch")
    if out is not None:
        check_output_path(out, (".json",), "--out")
    dev = resolve_device(device)
    if graphs and compile:
        raise LooptuneError("--graphs and --compile are two ways to build the step: choose one")
    if graphs and dev.type != "cuda":
        raise LooptuneError(f"--graphs needs a CUDA device; this run's device is {dev}")
    paths = resolve_checkpoints(checkpoints)
    with console.status("profiling...") as status:

        def progress(message: str):
            if console.is_terminal:
                status.update(message)
            else:
                console.print(message, style="dim", highlight=False)

        results = profile_candidates(
            paths,
            loops=loop_list,
            modes=mode_list,
            batches=batch_list,
            prompt_len=prompt_len,
            gen_len=gen_len,
            window=window,
            dtype=dtype,
            device=device,
            compile=compile,
            graphs=graphs,
            fresh=fresh,
            progress=progress,
            min_repeats=min_repeats,
            min_time_s=min_time,
            warmup=warmup,
            threads=threads,
        )
    env = results[0].environment if results else environment(dev, dtype)
    settings = {
        "checkpoints": [str(p) for p in paths],
        "loops": loop_list,
        "modes": mode_list,
        "batches": batch_list,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "window": window,
        "dtype": dtype,
        "device": device,
        "compile": compile,
        "graphs": graphs,
        "fresh": fresh,
        "min_repeats": min_repeats,
        "min_time_s": min_time,
        "warmup": warmup,
        "threads": threads,
        "threads_used": sorted({m.threads for m in results if m.threads}),
    }
    doc = document(results, settings, env)
    _print(results, env)  # first: a failed write below must not lose the results
    if json_out:
        emit_json(doc)
    if out is not None:
        try:
            atomic_write_text(out, dumps(doc))
        except OSError as e:
            raise LooptuneError(
                f"cannot write --out {out}: {e.strerror or e}; the results are above"
            ) from None
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
    base = {
        (m.checkpoint, m.mode, m.batch, m.window, m.dtype, m.step): m
        for m in results
        if m.loops == 1 and m.tpot_ms_p50
    }
    table = Table(title="profile (times in ms)")
    for name, justify in [
        ("model", "left"),
        ("mode", "left"),
        ("R", "right"),
        ("B", "right"),
        ("TTFT", "right"),
        ("TPOT p50 [95% CI]", "right"),
        ("p90", "right"),
        ("p99", "right"),
        ("x R=1", "right"),
        ("tok/s", "right"),
        ("KV", "right"),
        ("peak", "right"),
        ("runs", "right"),
        ("status", "left"),
    ]:
        table.add_column(name, justify=justify)
    for m in results:
        ref = base.get((m.checkpoint, m.mode, m.batch, m.window, m.dtype, m.step))
        ratio = f"{m.tpot_ms_p50 / ref.tpot_ms_p50:.2f}" if ref and m.tpot_ms_p50 else "-"
        ci = m.tpot_ms_p50_ci95
        tpot = "-" if m.tpot_ms_p50 is None else f"{m.tpot_ms_p50:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        kv = _bytes(m.kv_bytes_analytic)
        if m.kv_match is False:
            kv = f"[bold red]{_bytes(m.kv_bytes)} != {kv}[/]"
        status = {
            "ok": "ok",
            "infeasible": "[red]out of memory[/]",
            "not-measured": "[yellow]not measured[/]",
        }[m.status]
        if m.interference:
            status = f"[yellow]interference: {', '.join(m.interference)}[/]"
        if m.cached:
            status += " (cached)"
        table.add_row(
            Path(m.checkpoint).name,
            m.mode,
            str(m.loops),
            str(m.batch),
            _ms(m.ttft_ms, 2),
            tpot,
            _ms(m.tpot_ms_p90),
            _ms(m.tpot_ms_p99),
            ratio,
            _ms(m.tokens_per_s, 1),
            kv,
            _bytes(m.peak_mem_bytes),
            str(m.repeats),
            status,
        )
    # Not a terminal (a log, CI): print the table whole rather than squeezed to 80 columns.
    (console if console.is_terminal else Console(stderr=True, width=200)).print(table)
    for m in results:
        if m.kv_match is False:
            console.print(
                f"[bold red]KV MISMATCH (a bug): {m.label} holds {m.kv_bytes:,} bytes, "
                f"the formula says {m.kv_bytes_analytic:,}[/]"
            )
    built = [m for m in results if m.setup_ms and not m.cached]
    if built:
        console.print(
            f"{built[0].step} setup (apart from the statistics): "
            + ", ".join(f"{m.label} {m.setup_ms / 1e3:.1f} s" for m in built),
            highlight=False,
        )
    flagged = [m for m in results if m.interference]
    if flagged:
        console.print(
            f"[yellow]{len(flagged)} measurement(s) taken under interference (the "
            "machine was busy or the runs dispersed): not cached; measure again on "
            "a quiet machine[/]"
        )


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
        parts.append(
            f"SM {gpu.get('sm_clock_mhz')}/{gpu.get('max_sm_clock_mhz')} MHz, "
            f"{gpu.get('power_w')}/{gpu.get('power_limit_w')} W, "
            f"{gpu.get('temperature_c')} C, "
            f"throttle: {', '.join(reasons or []) or 'none'}"
        )
    elif gpu:
        parts.append(f"GPU state unavailable ({gpu['error']})")
    return ", ".join(parts)

"""`looptune pareto`: the study, the Pareto set, the recommendation and the deployable profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from looptune.cli.app import app, console, emit_json, parse_choice_list, parse_int_list


@app.command()
def pareto(
    checkpoints: Annotated[Optional[list[Path]], typer.Argument(
        help="Family members to choose from (default: the bundled family).")] = None,
    budget_ms: Annotated[float, typer.Option(
        "--budget-ms", min=0.0, help="Per-token decode latency budget, ms (the --metric).")] = ...,
    budget_kv_mib: Annotated[Optional[float], typer.Option(
        "--budget-kv-mib", min=0.0, help="KV-cache budget per batch, MiB.")] = None,
    budget_ttft_ms: Annotated[Optional[float], typer.Option(
        "--budget-ttft-ms", min=0.0, help="Time-to-first-token budget, ms.")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together.")] = 1,
    prompt_len: Annotated[int, typer.Option(min=1, help="Prompt tokens.")] = 128,
    gen_len: Annotated[int, typer.Option(min=2, help="Generated tokens per measurement.")] = 32,
    metric: Annotated[str, typer.Option(help="Latency objective: tpot-p50 or tpot-p90.")] = "tpot-p50",
    quality_set: Annotated[str, typer.Option("--set", help="Quality set: code, humaneval-nll "
                                                          "or a JSONL path.")] = "code",
    limit: Annotated[int, typer.Option(min=1, help="Items of the quality set (seeded subset).")] = 16,
    loops: Annotated[str, typer.Option(help="Loop counts to cover (all of them are tried).")] = "1,2,3,4",
    windows: Annotated[Optional[str], typer.Option(
        help="G-SWA windows to search (default: the trained W and W/2).")] = None,
    dtypes: Annotated[Optional[str], typer.Option(
        help="dtypes to search (default: float32 on CPU, bfloat16 on GPU).")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Trials in the study; a grid no larger is "
                                                    "covered whole, a larger one is sampled.")] = 32,
    storage: Annotated[Optional[str], typer.Option(
        help="Optuna storage URL (default: an SQLite file beside --out). Use postgresql://... "
             "with the same --study on every worker to share one study.")] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name (default: the --out name).")] = None,
    out: Annotated[Path, typer.Option(help="The deployable profile to write.")] = Path("profiles/pareto.yaml"),
    plot: Annotated[Optional[Path], typer.Option(help="Write the front as .png or .html.")] = None,
    min_time: Annotated[float, typer.Option(
        "--min-time", min=0.0, help="Seconds of measured decoding per latency candidate.")] = 0.5,
    repeats: Annotated[int, typer.Option(min=1, help="Minimum measured runs per latency "
                                                     "candidate.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and the quality subset.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
):
    """Find the best setting within budgets and write it as a deployable profile.

    An Optuna study over loop count, window, dtype (and compile on a GPU). Rerunning the same command resumes the study; several workers with one --storage and
    --study share it. Exit code 3 when nothing fits (the nearest miss is reported)."""
    from looptune.bundled import resolve_checkpoints
    from looptune.search.choice import Budgets
    from looptune.search.pareto import METRICS, Workload, nothing_fits_message, run_pareto

    parse_choice_list(metric, "--metric", list(METRICS))
    budgets = Budgets(budget_ms, budget_kv_mib, budget_ttft_ms)
    work = Workload(batch=batch, prompt_len=prompt_len, gen_len=gen_len, metric=metric,
                    quality_set=quality_set, limit=limit, seed=seed, device=device,
                    min_time_s=min_time, min_repeats=repeats)
    members = resolve_checkpoints(checkpoints, family=True)
    dtype_list = parse_choice_list(dtypes, "--dtypes", ["float32", "bfloat16", "float16"]) if dtypes else None
    window_list = parse_int_list(windows, "--windows") if windows else None

    with console.status("running the study...") as status:
        def on_trial(t):
            status.update(f"study: trial {t.number} {t.state.name.lower()} {t.params}")

        result = run_pareto(members, budgets, work, windows=window_list,
                            loops=parse_int_list(loops, "--loops"), dtypes=dtype_list,
                            trials=trials, storage=storage, study_name=study, out=out,
                            plot=plot, on_trial=on_trial)
    if json_out:
        emit_json(result.to_dict())
    else:
        _print(result, work)
    if result.choice.best is None:
        raise nothing_fits_message(result, budgets)


def _print(result, work):
    best = result.choice.best
    table = Table(title=f"Pareto set ({'within budgets' if best else 'nothing fits: unconstrained'})")
    for col in ("member", "R", "W", "dtype", "compile", "quality", f"{work.metric} ms", "KV MiB", ""):
        table.add_column(col)
    for o in sorted(result.front, key=lambda o: o.latency_ms):
        mark = "[bold green]<- choice[/]" if best is not None and o.knobs == best.knobs else ""
        table.add_row(Path(o.knobs.checkpoint).name, str(o.knobs.loops), str(o.knobs.window),
                      o.knobs.dtype, str(o.knobs.compile),
                      f"{o.quality:.4f} ±{(o.quality_ci[1] - o.quality_ci[0]) / 2:.4f}",
                      f"{o.latency_ms:.3f}", f"{o.kv_bytes / 2**20:.3f}", mark)
    console.print(table)
    m = result.measured
    console.print(f"study {result.study_name!r} in {result.storage}: {result.trials} trials over a "
                  f"grid of {result.grid_size}; new measurements: {m.get('latency', 0)} latency, "
                  f"{m.get('quality_passes', 0)} quality passes")
    for bad in result.infeasible:
        console.print(f"[yellow]infeasible[/] {bad['params']}: {bad['reason']}")
    if best is not None:
        console.print(f"[bold]choice[/]: {Path(best.knobs.checkpoint).name} at R={best.knobs.loops}, "
                      f"W={best.knobs.window}, {best.knobs.dtype} -> {best.quality:.4f} quality, "
                      f"{best.latency_ms:.3f} ms/token; profile written to {result.profile_path}")

"""`looptune pareto`: the study, the Pareto set, the recommendation and the deployable profile."""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from looptune.cli.app import app, console, emit_json, parse_choice_list, parse_int_list
from looptune.errors import LooptuneError

BUDGET_FLAGS = {
    "latency_ms": "--budget-ms",
    "kv_mib": "--budget-kv-mib",
    "ttft_ms": "--budget-ttft-ms",
}
COMPILE_CHOICES = {"off": [False], "on": [True], "both": [False, True]}


@app.command()
def pareto(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(help="Family members to choose from (default: the bundled family)."),
    ] = None,
    budget_ms: Annotated[
        float,
        typer.Option("--budget-ms", help="Per-token decode latency budget, ms (the --metric)."),
    ] = ...,
    budget_kv_mib: Annotated[
        float | None, typer.Option("--budget-kv-mib", help="KV-cache budget per batch, MiB.")
    ] = None,
    budget_ttft_ms: Annotated[
        float | None, typer.Option("--budget-ttft-ms", help="Time-to-first-token budget, ms.")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together.")] = 1,
    prompt_len: Annotated[int, typer.Option(min=1, help="Prompt tokens.")] = 128,
    gen_len: Annotated[int, typer.Option(min=2, help="Generated tokens per measurement.")] = 32,
    metric: Annotated[
        str, typer.Option(help="Latency objective: tpot-p50 or tpot-p90.")
    ] = "tpot-p50",
    quality_set: Annotated[
        str, typer.Option("--set", help="Quality set: code, humaneval-nll or a JSONL path.")
    ] = "code",
    limit: Annotated[
        int, typer.Option(min=1, help="Items of the quality set (seeded subset).")
    ] = 16,
    loops: Annotated[
        str, typer.Option(help="Loop counts to cover (all of them are tried).")
    ] = "1,2,3,4",
    windows: Annotated[
        str | None, typer.Option(help="G-SWA windows to search (default: the trained W and W/2).")
    ] = None,
    dtypes: Annotated[
        str | None,
        typer.Option(help="dtypes to search (default: float32 on CPU, bfloat16 on GPU)."),
    ] = None,
    compile_: Annotated[
        str | None,
        typer.Option(
            "--compile",
            help="Compiled decode steps to search: off, on or both (default: both on a GPU, "
            "off on the CPU). Each compiled setting costs a compile (30-40 s at 7B).",
        ),
    ] = None,
    trials: Annotated[
        int,
        typer.Option(
            min=1,
            help="Trials in the study; a grid no larger is covered whole, a larger one is sampled.",
        ),
    ] = 32,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL (default: an SQLite file beside --out). Use postgresql://... "
            "with the same --study on every worker to share one study."
        ),
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(help="Study name (default: named after everything that decides its numbers)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="The deployable profile to write (.yaml).")] = Path(
        "profiles/pareto.yaml"
    ),
    plot: Annotated[Path | None, typer.Option(help="Write the front as .png or .html.")] = None,
    fresh: Annotated[
        bool,
        typer.Option("--fresh", help="Measure again: ignore the caches and start the study over."),
    ] = False,
    min_time: Annotated[
        float,
        typer.Option(
            "--min-time", min=0.0, help="Seconds of measured decoding per latency candidate."
        ),
    ] = 0.5,
    repeats: Annotated[
        int, typer.Option(min=1, help="Minimum measured runs per latency candidate.")
    ] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and the quality subset.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
):
    """Find the best setting within budgets and write it as a deployable profile.

    An Optuna study over loop count, window, dtype (and compile on a GPU, see --compile).
    Rerunning the same command resumes the study and measures only what is missing; other
    budgets re-choose from what was measured. Several workers with one --storage and --study share it. Exit code 3
    when nothing fits (the nearest miss is reported)."""
    from looptune.bundled import resolve_checkpoints
    from looptune.search.choice import Budgets, check_budgets
    from looptune.search.pareto import (
        METRICS,
        Workload,
        check_paths,
        nothing_fits_message,
        run_pareto,
        write_outputs,
    )

    # Every argument is checked before any work, with the flags' names.
    check_budgets(budget_ms, budget_kv_mib, budget_ttft_ms, BUDGET_FLAGS)
    check_paths(out, plot, ("--out", "--plot"))
    parse_choice_list(metric, "--metric", list(METRICS))
    dtype_list = (
        parse_choice_list(dtypes, "--dtypes", ["float32", "bfloat16", "float16"])
        if dtypes
        else None
    )
    window_list = parse_int_list(windows, "--windows") if windows else None
    if compile_ is not None and compile_ not in COMPILE_CHOICES:
        raise LooptuneError(
            f"--compile must be one of {', '.join(COMPILE_CHOICES)}; got {compile_!r}"
        )
    compile_options = COMPILE_CHOICES.get(compile_)
    loop_list = parse_int_list(loops, "--loops")
    if quality_set == "humaneval":
        raise LooptuneError(
            "--set humaneval (pass@1, higher is better) cannot be a study "
            "objective; use --set humaneval-nll"
        )
    budgets = Budgets(budget_ms, budget_kv_mib, budget_ttft_ms)
    work = Workload(
        batch=batch,
        prompt_len=prompt_len,
        gen_len=gen_len,
        metric=metric,
        quality_set=quality_set,
        limit=limit,
        seed=seed,
        device=device,
        min_time_s=min_time,
        min_repeats=repeats,
    )
    members = resolve_checkpoints(checkpoints, family=True)
    storage = storage or f"sqlite:///{out.with_suffix('.db')}"

    with _progress() as on_trial:
        result = run_pareto(
            members,
            budgets,
            work,
            windows=window_list,
            loops=loop_list,
            dtypes=dtype_list,
            compile_options=compile_options,
            trials=trials,
            storage=storage,
            study_name=study,
            on_trial=on_trial,
            fresh=fresh,
            command=shlex.join(["looptune", *sys.argv[1:]]),
        )
    problem = write_outputs(result, budgets, work, out, plot, ("--out", "--plot"))
    if json_out:
        emit_json(result.to_dict())
        _say_busy(result)
    else:
        _print(result, work)
    if problem:
        raise LooptuneError(problem)
    if result.choice.best is None:
        raise nothing_fits_message(result, budgets)


@contextlib.contextmanager
def _progress():
    """A progress bar on a terminal; one line per finished trial on stderr otherwise."""
    if not console.is_terminal:

        def line(r):
            head = f"trial {r.number}: {_name(r.knobs)} {r.state}" if r.knobs else r.state
            console.print(
                f"{head}{': ' + r.detail if r.detail else ''} ({r.measured}/{r.target})",
                highlight=False,
                soft_wrap=True,
            )

        yield line
        return
    columns = (
        TextColumn("study"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("measuring the first setting", total=None)

        def update(r):
            bar.update(
                task,
                completed=r.measured,
                total=r.target,
                description=f"{_name(r.knobs)} {r.state}" if r.knobs else r.detail,
            )

        yield update


def _say_busy(result):
    """One line when latencies were measured under load (with --json too: it is a warning)."""
    busy = result.under_load()
    if not busy["settings"]:
        return
    if busy["still_busy"]:
        said = (
            f"the machine is still busy ({', '.join(busy['reasons'])}): a measurement taken "
            f"again was flagged again, so {busy['settings']} of {busy['of']} settings keep"
        )
    else:
        said = (
            f"{busy['settings']} of {busy['of']} settings were measured while the machine "
            f"was busy ({', '.join(busy['reasons'])}), and keep"
        )
    console.print(
        f"[yellow]busy[/]: {said} latencies marked as measured under load (table, --json, "
        "profile); a run on an idle machine measures them again",
        highlight=False,
        soft_wrap=True,  # one line, whatever the width
    )


def _name(knobs) -> str:
    return f"{Path(knobs.checkpoint).name} R={knobs.loops} W={knobs.window} {knobs.dtype}" + (
        " compiled" if knobs.compile else ""
    )


def _print(result, work):
    best = result.choice.best
    table = Table(
        title="Pareto set (" + ("within budgets" if best else "nothing fits: unconstrained") + ")"
    )
    for col in (
        "member",
        "R",
        "W",
        "dtype",
        "compile",
        "quality",
        f"{work.metric} ms",
        "KV MiB",
        "",
    ):
        table.add_column(col)
    for o in sorted(result.front, key=lambda o: o.latency_ms):
        mark = "[bold green]<- choice[/]" if best is not None and o.knobs == best.knobs else ""
        if o.interference:
            mark = " ".join(filter(None, ["[yellow]busy[/]", mark]))
        table.add_row(
            Path(o.knobs.checkpoint).name,
            str(o.knobs.loops),
            str(o.knobs.window),
            o.knobs.dtype,
            str(o.knobs.compile),
            f"{o.quality:.4f} ±{(o.quality_ci[1] - o.quality_ci[0]) / 2:.4f}",
            f"{o.latency_ms:.3f}",
            f"{o.kv_bytes / 2**20:.3f}",
            mark,
        )
    console.print(table)
    m = result.measured
    console.print(
        f"study {result.study_name!r} in {result.storage}: {result.trials} trials over a "
        f"grid of {result.grid_size}; new measurements: {m.get('latency', 0)} latency, "
        f"{m.get('quality_passes', 0)} quality passes",
        highlight=False,
    )
    for bad in result.infeasible:
        console.print(f"[yellow]infeasible[/] {bad['knobs']}: {bad['reason']}", highlight=False)
    for f in result.failed:
        then = "given up" if f.gave_up else "retried on the next run"
        console.print(
            f"[yellow]not measured[/] {_name(f.knobs)}: {f.attempts} failed "
            f"attempt(s), last: {f.reason}; {then}",
            highlight=False,
        )
    _say_busy(result)
    if best is not None:
        console.print(
            f"[bold]choice[/]: {_name(best.knobs)} -> {best.quality:.4f} quality, "
            f"{best.latency_ms:.3f} ms/token"
            + (" (measured under load)" if best.interference else "")
            + "; profile "
            + (f"written to {result.profile_path}" if result.profile_path else "not written"),
            highlight=False,
            soft_wrap=True,
        )

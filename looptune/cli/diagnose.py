"""`looptune diagnose`: per-loop diagnostics and the verdict on another loop."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from looptune.cli.app import app, console, emit_json

WIDTH = 100  # both tables fit in 100 columns, headers whole


@app.command()
def diagnose(
    checkpoint: Annotated[
        str | None,
        typer.Argument(
            help="Checkpoint directory or bundled member (plt-r1..plt-r4; default: plt-r2)."
        ),
    ] = None,
    loops: Annotated[
        int | None, typer.Option(min=1, help="Loops to run (default: the checkpoint's trained R).")
    ] = None,
    set_name: Annotated[
        str,
        typer.Option(
            "--set",
            help='code (held-out code), humaneval-nll, or a .jsonl file of {"text"} or '
            '{"prompt", "completion"} records, as for score.',
        ),
    ] = "code",
    limit: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Use a seeded subset of N items, stratified by size, as score does "
            "(default: 32 of the 512-byte pieces of code, every item of the other "
            "sets; 0: every item).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the subset and of the effective-rank sample.")
    ] = 0,
    family: Annotated[
        bool | None,
        typer.Option(
            "--family/--no-family",
            help="Score the bundled members at their own R on the same "
            "items to check the prediction (cached). Default: use cached scores only; "
            "--no-family: none.",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(help="auto (float32 on a CPU, else as stored), float32, bfloat16 or float16."),
    ] = "auto",
    plot: Annotated[
        Path | None,
        typer.Option(help="Draw the gain, its parts and the effective rank per loop to this PNG."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
):
    """Explain where a loop count wins: each loop's gain in bits per byte and its parts.

    Per loop: bits per byte if decoding stopped there, the gain over the loop before, split
    exactly into refinement (the loop rerun with its carry unshifted) minus the cross-loop
    offset's cost, the effective rank, and geometric indicators (step size, KL, update cosine,
    offset distance) that the verdict reports but does not use. The verdict gives the best
    loop, where the paper's rule stops, and a prediction for one more trained loop.
    Definitions: looptune/diagnose/measure.py."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from looptune.diagnose import diagnose as run_diagnose
    from looptune.store import cache_root

    if plot is not None and plot.suffix.lower() != ".png":
        raise typer.BadParameter(f"{plot} must end in .png", param_hint="--plot")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
        disable=json_out or not console.is_terminal,
    ) as bar:
        tasks = {}

        def progress(label, done, total):
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        diag = run_diagnose(
            checkpoint,
            loops,
            set_name,
            limit,
            seed,
            device,
            dtype,
            family=bool(family),
            cache_dir=None if family is False else cache_root(),
            progress=progress,
        )
    if plot:
        from looptune.diagnose.plot import plot_diagnosis

        plot_diagnosis(diag, plot)
    if json_out:
        emit_json(diag.to_dict())
    else:
        print_diagnosis(diag, console if console.is_terminal else Console(stderr=True, width=WIDTH))
    if plot:
        console.print(f"plot: {plot}")


def print_diagnosis(diag, out: Console) -> None:
    """Two tables (bits per byte, then the geometry) and the verdict."""
    out.print(
        f"[bold]{diag.checkpoint}[/]  trained R={diag.trained_loops}, mode {diag.mode}, "
        f"W={diag.window}; {diag.texts} of {diag.set_items} items of {diag.set_name}, "
        f"{diag.tokens:,} scored tokens ({diag.bytes:,} bytes) in windows of "
        f"{diag.context}; {diag.device} {diag.dtype}"
    )
    bits = Table(
        title="bits per byte if decoding stopped at loop r; gain = refinement - offset cost"
    )
    for name in (
        "loop",
        "bpb",
        "gain",
        "refinement",
        "offset cost",
        "unshifted bpb",
        "eff. rank",
        "rule",
    ):
        bits.add_column(name, justify="right", no_wrap=True)
    bits.add_row("0 (E)", "", "", "", "", "", f"{diag.embedding_effective_rank:.1f}", "")
    for r in diag.rows:
        bits.add_row(
            _loop(r),
            _f(r.bits_per_byte, 4),
            _f(r.gain_bits_per_byte, 4, True),
            _f(r.refinement_bits_per_byte, 4, True),
            _f(r.offset_cost_bits_per_byte, 4, True),
            _f(r.bits_per_byte_unshifted, 4),
            _f(r.effective_rank, 1),
            "" if r.rule_holds is None else ("holds" if r.rule_holds else "fails"),
        )
    out.print(bits)
    geometry = Table(title="indicators (residual stream; not used by the verdict)")
    for name in ("loop", "step |dh|", "|h|", "KL nats", "cos(dh, dh')", "Omega", "Omega/|h'|"):
        geometry.add_column(name, justify="right", no_wrap=True)
    for r in diag.rows:
        geometry.add_row(
            _loop(r),
            _f(r.step_size, 2),
            _f(r.hidden_norm, 2),
            _f(r.kl_nats, 3),
            _f(r.update_cosine, 2),
            _f(r.offset_distance, 2),
            _f(r.offset_distance_relative, 3),
        )
    out.print(geometry)
    if any(not r.trained for r in diag.rows):
        out.print("* beyond the checkpoint's trained loop count")
    out.print(diag.verdict.text)


def _loop(r) -> str:
    return f"{r.loop}" + ("" if r.trained else "*")


def _f(x, digits, sign=False) -> str:
    if x is None:
        return ""
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"

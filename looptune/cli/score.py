"""`looptune score`: quality per loop count on small validation sets of real code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from looptune.cli.app import app, console, emit_json, parse_int_list
from looptune.errors import LooptuneError


@app.command()
def score(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(help="Checkpoint directories (default: the bundled model)."),
    ] = None,
    loops: Annotated[str, typer.Option(help="Loop counts R to score.")] = "1,2,3,4",
    window: Annotated[
        str | None,
        typer.Option(help="G-SWA windows W to score, comma-separated (default: the checkpoint's)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Validation set, repeatable: code (default), humaneval-nll, humaneval "
            '(pass@1, needs --execute), or a .jsonl file of {"text"} or '
            '{"prompt", "completion"} records.',
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Score a seeded random subset of N items per set, stratified by size "
            "(default: 32 of the 512-byte pieces of code, every item of the other "
            "sets; 0: every item).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the subset and the bootstrap.")] = 0,
    mode: Annotated[
        str | None, typer.Option(help="plt, plt-noshift or sequential (default: the checkpoint's).")
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Tokens per scoring window (default: the context the checkpoint was "
            "trained with, else its max_position_embeddings); windows advance by "
            "half.",
        ),
    ] = None,
    family: Annotated[
        bool,
        typer.Option(
            "--family", help="Score every bundled family member (when no checkpoint is given)."
        ),
    ] = False,
    execute: Annotated[
        bool,
        typer.Option(
            "--execute", help="Allow running generated code (needed by the humaneval set)."
        ),
    ] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute cached results.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="auto (as stored on a GPU, float32 on the CPU), float32, bfloat16, float16."
        ),
    ] = "auto",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
):
    """Measure quality per loop count on small validation sets of real code.

    Per (checkpoint, loops, window, set): bits per byte of held-out code, HumanEval NLL per
    byte, HumanEval pass@1, or your own JSONL.

    Every value has a 95% bootstrap interval over items, and each R is compared with the
    checkpoint's trained R on the same items (paired bootstrap; top-1 next-token agreement).
    Results are cached by model hash, knobs and set, and reused by `pareto`."""
    from looptune.bundled import resolve_checkpoints
    from looptune.quality.score import score_checkpoints, scores_document

    if "humaneval" in (set_ or []) and not execute:  # the library's check, in the flag's words
        raise LooptuneError(
            "the humaneval set runs model-generated code; pass --execute to allow it"
        )
    paths = resolve_checkpoints(checkpoints, family=family)
    with _progress(json_out) as report:
        scores = score_checkpoints(
            paths,
            loops=parse_int_list(loops, "--loops"),
            windows=parse_int_list(window, "--window") if window else None,
            sets=set_ or ["code"],
            limit=limit,
            seed=seed,
            mode=mode,
            device=device,
            dtype=dtype,
            execute=execute,
            context=context,
            use_cache=not no_cache,
            progress=report,
        )
    if json_out:
        emit_json(scores_document(scores))
    else:
        # a pipe or a file gets the whole table, not one cut to 80 columns
        out = console if console.is_terminal else Console(stderr=True, width=160)
        out.print(_table(scores))
        kinds = sorted({s.sandbox for s in scores if s.sandbox})
        if kinds:
            out.print(f"generated code ran in the sandbox: {', '.join(kinds)}")


def _table(scores) -> Table:
    table = Table(
        title="quality per loop count (95% bootstrap intervals over items; "
        "* = the trained R, which each R is compared with)"
    )
    for name in (
        "checkpoint",
        "set",
        "unit",
        "W",
        "R",
        "score",
        "95% CI",
        "R - trained",
        "95% CI",
        "top-1 agree",
        "items",
        "tok/s",
    ):
        table.add_column(
            name, justify="left" if name in ("checkpoint", "set", "unit") else "right", no_wrap=True
        )
    unit = {"bits_per_byte": "bits/byte", "nll_per_byte": "nats/byte", "pass_at_1": "pass@1"}
    for s in scores:
        f = "{:.3f}" if s.metric == "pass_at_1" else "{:.4f}"
        d = "{:+.3f}" if s.metric == "pass_at_1" else "{:+.4f}"
        trained = s.diff_vs_trained is None
        table.add_row(
            Path(s.checkpoint).name,
            Path(s.set).name,
            unit[s.metric],
            str(s.window),
            f"{s.loops}{'*' if s.loops == s.trained_loops else ''}",
            f.format(s.value),
            f"{f.format(s.ci95_low)}-{f.format(s.ci95_high)}",
            "-" if trained else d.format(s.diff_vs_trained),
            "-" if trained else f"{d.format(s.diff_ci95_low)} {d.format(s.diff_ci95_high)}",
            "-" if s.top1_agreement is None else f"{s.top1_agreement:.3f}",
            str(s.items) if s.items == s.set_items else f"{s.items}/{s.set_items}",
            f"{s.tokens_per_s:,.0f}" + (" (cached)" if s.cached else ""),
        )
    return table


class _progress:
    """A rich progress bar on stderr, one task per pass; silent under --json."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self):
        if self.quiet or not console.is_terminal:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.bar = Progress(
            "{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.bar.start()
        self.tasks = {}

        def report(label, done, total):
            if label not in self.tasks:
                self.tasks[label] = self.bar.add_task(label, total=total)
            self.bar.update(self.tasks[label], completed=done)

        return report

    def __exit__(self, *exc):
        if getattr(self, "bar", None) is not None:
            self.bar.stop()
        return False

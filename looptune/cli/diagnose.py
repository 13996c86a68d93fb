"""`looptune diagnose`: per-loop diagnostics and the verdict on another loop."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from looptune.cli.app import app, console, emit_json


@app.command()
def diagnose(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint directory (default: "
                                                              "the bundled model).")] = None,
    loops: Annotated[Optional[int], typer.Option(min=1, help="Loops to run (default: the "
                                                             "checkpoint's trained R).")] = None,
    set_name: Annotated[str, typer.Option(
        "--set", help="code (the held-out code corpus) or a JSONL file of {\"text\": ...} "
                      "lines.")] = "code",
    limit: Annotated[int, typer.Option(min=1, help="Texts to use: a seeded random subset.")] = 16,
    max_bytes: Annotated[int, typer.Option(min=0, help="Keep the first N bytes of each text "
                                                       "(0: whole texts).")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of the subset and the effective-rank "
                                           "sample.")] = 0,
    family: Annotated[bool, typer.Option(help="Score the bundled family at their own R on the "
                                              "same texts and compare.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float32 on a CPU, else the checkpoint's), "
                                            "float32, bfloat16 or float16.")] = "auto",
    oracle: Annotated[bool, typer.Option(help="Also rerun each loop r >= 2 with its carry "
                                              "unshifted and report the bits that changes (R - 1 "
                                              "more loops of compute).")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Draw gain and cost per loop to this "
                                                      "PNG.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on "
                                                          "stdout.")] = False,
):
    """Explain why a loop count wins: per-loop gain against the offset cost.

    Per loop: step size, output change (KL), effective rank, update direction, offset cost and
    bits per byte if decoding stopped there, then a verdict on whether another loop is likely
    to help.

    The offset cost Omega is put in bits at each loop's own exchange rate (bits gained per unit
    of step), so the verdict compares like with like; see looptune.diagnose.run for every
    definition."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from looptune.diagnose import diagnose as run_diagnose
    from looptune.diagnose.plot import plot_diagnosis

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("diagnosing", total=None)

        def progress(kind, value):
            if kind == "windows":
                bar.update(task, total=value)
            elif kind == "window":
                bar.advance(task, value)
            else:
                bar.update(task, description=f"scored family member {Path(value).name}")

        diag = run_diagnose(checkpoint, loops, set_name, limit, seed, device, dtype,
                            family=family, max_bytes=max_bytes or None, oracle=oracle,
                            progress=progress)
    if plot:
        plot_diagnosis(diag, plot)
    if json_out:
        emit_json(diag.to_dict())
    else:
        _print(diag)
    if plot:
        console.print(f"plot: {plot}")


def _print(diag) -> None:
    console.print(f"[bold]{diag.checkpoint}[/]  trained R={diag.trained_loops}, mode "
                  f"{diag.mode}, W={diag.window}; {diag.texts} texts from {diag.set_name}, "
                  f"{diag.tokens:,} scored tokens "
                  f"({diag.bytes:,} bytes) in windows of {diag.context}; {diag.device} "
                  f"{diag.dtype}")
    table = Table(title="per loop (h_0 = embeddings; norms on the raw residual stream)")
    oracle = any(r.unshifted_cost_bits_per_byte is not None for r in diag.rows)
    names = ["loop", "step ||dh||", "||h||", "KL nats", "eff. rank", "cos(dh_r, dh_r-1)",
             "Omega", "Omega/||h||", "bpb", "gain bpb", "offset cost bpb", "rule"]
    for name in names + (["unshifted: cost bpb"] if oracle else []):
        table.add_column(name, justify="right")
    table.add_row("0", "", "", "", f"{diag.embedding_effective_rank:.1f}",
                  *[""] * (len(names) - 5 + oracle))
    for r in diag.rows:
        table.add_row(f"{r.loop}" + ("" if r.trained else "*"), _f(r.step_size, 3),
                      _f(r.hidden_norm, 3), _f(r.kl_nats, 3), _f(r.effective_rank, 1),
                      _f(r.update_cosine, 2), _f(r.offset_cost, 3), _f(r.offset_cost_relative, 3),
                      _f(r.bits_per_byte, 4), _f(r.gain_bits_per_byte, 4, sign=True),
                      _f(r.offset_cost_bits_per_byte, 4, sign=True),
                      "" if r.rule_holds is None else ("holds" if r.rule_holds else "fails"),
                      *([_f(r.unshifted_cost_bits_per_byte, 4, sign=True)] if oracle else []))
    console.print(table)
    if any(not r.trained for r in diag.rows):
        console.print("* beyond the checkpoint's trained loop count")
    console.print(diag.verdict.text)


def _f(x, digits, sign=False) -> str:
    if x is None:
        return ""
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"

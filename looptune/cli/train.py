"""`looptune train`: train a PLT model on code (the CPython standard library by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from looptune.cli.app import app, console, emit_json


@app.command()
def train(
    out: Annotated[
        Path,
        typer.Argument(
            help="Output directory: the checkpoint, its README.md "
            "card, and train_state/ for resuming."
        ),
    ],
    loops: Annotated[int, typer.Option(min=1, help="Loop count R to train with.")],
    preset: Annotated[
        str, typer.Option(help="Model shape (see `looptune init --help`).")
    ] = "family",
    steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps.")] = None,
    tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Token budget instead of --steps (rounded up to whole steps)."),
    ] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="Train on this folder of source files instead of the CPython standard library."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the weights and of the data order.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per step.")] = 4,
    context: Annotated[int, typer.Option(min=2, help="Tokens per window (bytes).")] = 128,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate.")] = 3e-3,
    save_dtype: Annotated[
        str, typer.Option(help="Stored weights: float32 or bfloat16.")
    ] = "float32",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch.")] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON on stdout.")
    ] = False,
):
    """Train a PLT model with AdamW, warm-up and cosine decay; loss on the last loop only.

    The model is checkpointed every minute and on Ctrl-C; rerun the same command with the same
    OUT to resume, with the same result as an uninterrupted run. When done, OUT holds a normal
    looptune checkpoint and a model card (README.md) with the held-out bits per byte.
    """
    import time
    from dataclasses import asdict

    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from looptune.train.card import command_line
    from looptune.train.trainer import train as run_training

    if threads:
        torch.set_num_threads(threads)
    live = console.is_terminal
    bar = Progress(
        TextColumn("[bold]R={task.fields[R]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn(
            "loss {task.fields[loss]}  held-out {task.fields[held]} bpb  {task.fields[tps]} tok/s"
        ),
        TimeRemainingColumn(),
        console=console,
        disable=not live,
    )
    task = None
    state = {"held": "-", "last_log": 0.0}

    def on_step(p):
        nonlocal task
        if task is None:
            task = bar.add_task(
                "train",
                total=p.steps,
                completed=p.resumed_from,
                R=loops,
                loss="-",
                held="-",
                tps="-",
            )
        if p.heldout_bpb is not None:
            state["held"] = f"{p.heldout_bpb:.3f}"
        bar.update(
            task,
            completed=p.step,
            loss=f"{p.loss:.3f}",
            held=state["held"],
            tps=f"{p.tokens_per_s:,.0f}",
        )
        now = time.monotonic()
        if not live and (now - state["last_log"] > 30 or p.step == p.steps or p.heldout_bpb):
            state["last_log"] = now
            console.print(
                f"step {p.step}/{p.steps} loss {p.loss:.4f} held-out {state['held']} "
                f"bpb {p.tokens_per_s:,.0f} tok/s, {p.eta_s / 60:.1f} min left",
                highlight=False,
            )

    with bar:
        result = run_training(
            out,
            loops=loops,
            preset=preset,
            steps=steps,
            tokens=tokens,
            corpus=corpus,
            seed=seed,
            device=device,
            batch_size=batch_size,
            context=context,
            lr=lr,
            save_dtype=save_dtype,
            command=command_line(),
            on_step=on_step,
            on_note=lambda m: console.print(m, highlight=False),
        )
    if json_out:
        emit_json(asdict(result) | {"history": None})
    else:
        console.print(
            f"wrote {result.out}: {result.steps} steps, {result.tokens:,} tokens, "
            f"{result.wall_s:.0f} s, held-out {result.heldout_bpb:.4f} bits per byte"
        )

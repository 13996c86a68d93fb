"""`looptune init` and `looptune info`: make and inspect checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from looptune.cli.app import app, console, emit_json


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")],
    preset: Annotated[
        str,
        typer.Option(
            help="Model shape: tiny, small, family, base, or "
            "loopcoder-v2-7b (the exact LoopCoder-V2 7B shape)."
        ),
    ] = "tiny",
    loops: Annotated[int | None, typer.Option(min=1, help="Trained loop count R.")] = None,
    window: Annotated[
        int | None, typer.Option(min=1, help="G-SWA window W (keys, self included).")
    ] = None,
    arch: Annotated[
        str,
        typer.Option(
            help="plt (LoopCoder-V2 layout, gate "
            "`self_attn.plt_gate.*`) or iquest-loop "
            "(IQuest-Coder-V1-Loop, gate `model.gate_projections.{i}.*`"
            ", as vLLM and mlx-lm load it)."
        ),
    ] = "plt",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    dtype: Annotated[
        str,
        typer.Option(help="auto (bfloat16 for 7B, else float32), float32, bfloat16 or float16."),
    ] = "auto",
    device: Annotated[
        str, typer.Option(help="Where the weights are created: auto, cpu, cuda[:N].")
    ] = "auto",
    shard_mib: Annotated[
        int, typer.Option(min=1, help="Shard the weights above this size.")
    ] = 2048,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON on stdout.")
    ] = False,
):
    """Write a randomly initialised PLT checkpoint, for trying things and for GPU profiling.

    Latency and memory of a random checkpoint equal the real model's of the same shape. Large
    presets are created directly on the device and in the dtype, never on the CPU first.
    """
    from looptune.model.checkpoint import init_checkpoint

    info = init_checkpoint(
        directory,
        preset,
        loops=loops,
        window=window,
        arch=arch,
        seed=seed,
        dtype=dtype,
        device=device,
        shard_bytes=shard_mib << 20,
    )
    if json_out:
        emit_json(info)
    else:
        console.print(
            f"wrote {info['path']}: {info['preset']} preset, "
            f"{info['parameters'] / 1e6:.2f}M parameters, R={info['loops']}, "
            f"W={info['window']}, {info['dtype']}"
        )


@app.command()
def info(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint directory (default: the bundled model).")
    ] = None,
    contexts: Annotated[
        str, typer.Option(help="Context lengths for the KV table.")
    ] = "512,2048,8192",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
):
    """Architecture, parameters, trained loops and window, and KV bytes per sequence.

    The KV table covers each mode and R = 1..4 at a few context lengths; only the config and the
    safetensors headers are read."""
    from looptune.bundled import resolve_checkpoints
    from looptune.cli.app import parse_int_list
    from looptune.model.info import describe_checkpoint

    path = resolve_checkpoints([checkpoint] if checkpoint else None)[0]
    doc = describe_checkpoint(path, parse_int_list(contexts, "--contexts"))
    if json_out:
        emit_json(doc)
        return
    c = doc["config"]
    console.print(f"[bold]{doc['path']}[/]  {c['architecture']}  ({doc['dtype']})")
    console.print(
        f"parameters {doc['parameters']:,} ({doc['parameters_non_embedding']:,} "
        f"non-embedding)  layers {c['num_hidden_layers']}  hidden {c['hidden_size']}  "
        f"heads {c['num_attention_heads']}/{c['num_key_value_heads']}  head_dim "
        f"{c['head_dim']}  vocab {c['vocab_size']}"
    )
    tokenizer = (
        c["tokenizer"] if doc["tokenizer_found"] else "tokenizer.json missing (token ids only)"
    )
    console.print(
        f"trained: mode {c['mode']}, R = {c['num_loops']}, W = {c['window']} "
        f"(keys, self included), gate from {c['gate']}, tokenizer {tokenizer}",
        soft_wrap=True,
    )
    lay = doc["layout"]
    console.print(
        f"layout: {lay['label']}; gate tensors {lay['gate_tensors'][0]} ...", soft_wrap=True
    )
    console.print(f"  written by: {'; '.join(lay['written_by'])}", soft_wrap=True)
    console.print(
        f"  loaded by: {', '.join(lay['loaded_by']) or 'looptune only'}"
        + (f" ({lay['note']})" if lay["note"] else ""),
        soft_wrap=True,
    )
    table = Table(title=f"KV bytes per sequence ({doc['dtype']})")
    table.add_column("mode")
    table.add_column("R", justify="right")
    for s in doc["contexts"]:
        table.add_column(f"S={s}", justify="right")
    for row in doc["kv_bytes"]:
        table.add_row(
            row["mode"], str(row["loops"]), *[_mib(row["bytes"][str(s)]) for s in doc["contexts"]]
        )
    console.print(table)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"

"""`looptune show`, `export` and `generate`: use a deployable profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from looptune.cli.app import app, console, emit_json, write_out


@app.command()
def show(
    profile: Annotated[Path, typer.Argument(help="A profile written by `looptune pareto`.")],
    check: Annotated[
        bool, typer.Option(help="Check that the model on disk still has the measured content hash.")
    ] = True,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the profile as JSON on stdout.")
    ] = False,
):
    """Print a deployable profile: the chosen setting, its measured objectives and the front."""
    from looptune.export.deployable import check_model, model_path, read_profile

    prof = read_profile(profile)
    if check and model_path(prof).exists():
        check_model(prof, model_path(prof), profile)
    if json_out:
        emit_json(prof.to_dict())
        return
    k, o, m = prof.knobs, prof.objectives, prof.model
    console.print(f"[bold]{profile}[/]  (made {prof.created or '?'})")
    console.print(f"model    {m.path}  {m.architecture}  sha256 {m.content_hash[:16]}…")
    console.print(
        f"setting  loops {k.loops}  mode {k.mode}  window {k.window}  dtype {k.dtype}  "
        f"compile {k.compile}  batch {k.batch}"
    )
    q, lat = o.quality, o.latency_ms
    ttft = f"{o.ttft_ms:.1f} ms" if o.ttft_ms is not None else "?"
    console.print(
        f"measured {q.metric} {q.value:.4f} [{q.ci[0]:.4f}, {q.ci[1]:.4f}]  "
        f"{lat.metric} {lat.value:.3f} ms [{lat.ci[0]:.3f}, {lat.ci[1]:.3f}]  "
        f"ttft {ttft}  KV {o.kv_bytes / 2**20:.3f} MiB"
    )
    if prof.budgets:
        b = prof.budgets
        limits = [f"{b.metric} <= {b.latency_ms:g} ms"]
        limits += [f"KV <= {b.kv_mib:g} MiB"] if b.kv_mib is not None else []
        limits += [f"ttft <= {b.ttft_ms:g} ms"] if b.ttft_ms is not None else []
        console.print(f"budgets  {'  '.join(limits)}")
    dev = prof.device
    console.print(
        f"device   {dev.get('device_name', dev.get('device', '?'))}  torch "
        f"{dev.get('torch_version', dev.get('torch', '?'))}"
    )
    table = Table(title="Pareto set")
    for col in ("member", "R", "W", "dtype", q.metric, f"{lat.metric} ms", "KV MiB"):
        table.add_column(col)
    for p in prof.pareto_set:
        table.add_row(
            Path(p["knobs"]["checkpoint"]).name,
            str(p["knobs"]["loops"]),
            str(p["knobs"]["window"]),
            p["knobs"]["dtype"],
            f"{p['quality']:.4f}",
            f"{p['latency_ms']:.3f}",
            f"{p['kv_bytes'] / 2**20:.3f}",
        )
    console.print(table)


@app.command()
def export(
    profile: Annotated[Path, typer.Argument(help="A profile written by `looptune pareto`.")],
    to: Annotated[
        str,
        typer.Option(
            help="vllm, vllm-plt (the LoopCoder-V2 fork), sglang "
            "(each a --config YAML) or hf (a transformers directory)."
        ),
    ] = "vllm",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output directory (default: beside the profile, named after it and the target)."
        ),
    ] = None,
    max_model_len: Annotated[
        int | None,
        typer.Option(
            min=1, help="Context to serve (default: the model's max_position_embeddings)."
        ),
    ] = None,
    max_concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Sequences served at once (default: the measured batch, the largest the "
            "latency budget was checked at).",
        ),
    ] = None,
    write_weights: Annotated[
        bool,
        typer.Option(
            "--write-weights",
            help="Also write the model beside the config, gate tensors renamed "
            "to the target's spelling, unchanged shards hard-linked.",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Write even when the model changed since it was measured or the engine cannot "
            "serve the setting as measured; each is recorded in the file. Never past a profile "
            "that cannot be read (a malformed knob), a bad option, or a model copy without the "
            "model.",
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print what was written as JSON.")
    ] = False,
):
    """Write a serving engine's config for a profile's measured setting.

    Loops, window (in the engine's own convention), dtype and eager/CUDA graphs are the measured
    ones; context and concurrency are the deployment's. Refuses, one line and exit 2, when the
    model changed since it was measured or the engine cannot serve it as stored (--force
    writes anyway, but never from a profile it cannot read)."""
    from looptune.export.deployable import ProfileError, read_profile
    from looptune.export.serving import export_profile

    try:
        prof = read_profile(profile)
    except ProfileError as e:
        if not force:
            raise
        raise ProfileError(
            f"{e} (--force writes past a changed model or an engine that cannot serve the "
            "setting, never past a profile it cannot read)"
        ) from None
    out = out or profile.parent / f"{profile.stem}-{to}"
    result = export_profile(
        prof,
        profile,
        to,
        out,
        max_model_len=max_model_len,
        max_concurrency=max_concurrency,
        write_weights=write_weights,
        force=force,
        names={
            "force": "--force",
            "write_weights": "--write-weights",
            "max_model_len": "--max-model-len",
        },
    )
    for problem in result.forced:
        console.print(f"forced past: {problem}", soft_wrap=True, highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", soft_wrap=True, highlight=False)
    if json_out:
        emit_json(result.to_dict())
        return
    for p in result.files:
        console.print(f"wrote {p}", soft_wrap=True, highlight=False)
    console.print(f"serve: {result.command}", soft_wrap=True, highlight=False, markup=False)


@app.command()
def generate(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint (default: the profile's model).")
    ] = None,
    profile: Annotated[Path, typer.Option(help="The profile whose settings to run.")] = ...,
    prompt: Annotated[str, typer.Option(help="The prompt text.")] = ...,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
):
    """Run the model with a profile's loops, window and dtype, streaming tokens to stdout."""
    from looptune.export.runtime import load_profiled

    runner = load_profiled(profile, checkpoint, device)
    echoed = []  # the prompt goes out with the first piece, so a refusal prints nothing

    def put(piece: str):
        if not echoed:
            echoed.append(prompt)
            write_out(prompt)
        write_out(piece)  # a reader gone (`| head`) ends the generation quietly, as SIGPIPE would

    runner.generate(
        prompt,
        on_text=put,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    write_out(("" if echoed else prompt) + "\n")

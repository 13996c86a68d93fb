"""`looptune info`: what a checkpoint holds, from its config and safetensors headers alone."""

from __future__ import annotations

from pathlib import Path

from looptune.model.arch import ARCHITECTURES, ENGINES, Spelling
from looptune.model.checkpoint import _meta_model, read_config, read_layout, weight_files
from looptune.model.config import PLTConfig


def describe_layout(cfg: PLTConfig, spelling: Spelling) -> dict:
    """The layout and gate spelling a checkpoint uses and the engines known to load it."""
    arch = ARCHITECTURES[cfg.architecture]
    return {
        "architecture": arch.name,
        "family": arch.family,
        "spelling": spelling.key,
        "label": spelling.label,
        "gate_tensors": spelling.names(cfg.gate),
        "gate": cfg.gate,
        "gate_rule": arch.gate_rule,
        "written_by": list(spelling.writers),
        "loaded_by": [ENGINES[e] for e in spelling.loaders],
        "note": spelling.note,
        "looptune_writes": arch.spelling(arch.written).names(cfg.gate),
    }


def describe_checkpoint(path, contexts=(512, 2048, 8192)) -> dict:
    """`looptune info`: the config, the layout and gate spelling, parameter counts and KV bytes
    per sequence by mode and R.

    Reads only the config and the safetensors headers: nothing is loaded."""
    from dataclasses import asdict

    from looptune.model.cache import kv_bytes
    from looptune.model.config import MODES

    directory = Path(path)
    cfg, _ = read_config(directory)
    model, expected = _meta_model(cfg)
    layout = read_layout(directory, cfg, weight_files(directory), expected)
    dtype = layout.dtype
    rows = []
    for mode in MODES:
        for R in range(1, 5):
            rows.append(
                {
                    "mode": mode,
                    "loops": R,
                    "bytes": {
                        str(S): kv_bytes(cfg, mode, R, cfg.window, S, 1, dtype) for S in contexts
                    },
                }
            )
    return {
        "path": str(directory),
        "config": asdict(cfg),
        "dtype": str(dtype).removeprefix("torch."),
        # False: the config names tokenizer.json but it is not there, so the model takes ids only
        "tokenizer_found": cfg.tokenizer != "tokenizer.json"
        or (directory / "tokenizer.json").is_file(),
        "layout": describe_layout(cfg, layout.spelling),
        "parameters": model.num_params(),
        "parameters_non_embedding": model.num_params(False),
        "contexts": list(contexts),
        "kv_bytes": rows,
    }

"""Serving-engine configs for a profile's setting.

- vLLM: a `vllm serve --config FILE` YAML; keys are the long option names (`model`, `dtype`,
  `max-num-seqs`, `max-model-len`, `enforce-eager`, `hf-overrides` as a JSON string).
- SGLang: a `python -m sglang.launch_server --config FILE` YAML (`model-path`, `dtype`,
  `max-running-requests`, `context-length`, `disable-cuda-graph`, `json-model-override-args`).
- transformers: the model's `config.json` with the loop keys overridden, plus the overlay alone.

The loop keys follow the checkpoint's architecture: LoopCoder-V2 takes `plt_num_loops` and
`plt_window_size` as flash-attention's `[left, 0]` (left = W - 1, see the window convention in
`looptune.model.config`); IQuest-Loop takes `loop_num` and `loop_window_size` = W.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from looptune.errors import LooptuneError
from looptune.export.deployable import Profile, model_path
from looptune.model.config import LOOP_ARCH
from looptune.store import atomic_write_text

ENGINES = ("vllm", "sglang", "hf")


def loop_overrides(architecture: str, loops: int, window: int) -> dict:
    if architecture == LOOP_ARCH:
        return {"loop_num": loops, "loop_window_size": window}
    return {"plt_num_loops": loops, "plt_window_size": [window - 1, 0]}


def _serving(document: Profile):
    knobs, model = document.knobs, document.model
    overrides = loop_overrides(model.architecture, knobs.loops, knobs.window)
    context = (knobs.prompt_len or 0) + (knobs.gen_len or 0)
    return knobs, overrides, context


def vllm_config(document: Profile) -> dict:
    knobs, overrides, context = _serving(document)
    config = {"model": str(model_path(document)), "dtype": knobs.dtype,
              "max-num-seqs": knobs.batch, "trust-remote-code": True,
              "enforce-eager": not knobs.compile, "hf-overrides": json.dumps(overrides)}
    if context:
        config["max-model-len"] = context
    return config


def sglang_config(document: Profile) -> dict:
    knobs, overrides, context = _serving(document)
    config = {"model-path": str(model_path(document)), "dtype": knobs.dtype,
              "max-running-requests": knobs.batch, "trust-remote-code": True,
              "disable-cuda-graph": not knobs.compile,
              "json-model-override-args": json.dumps(overrides)}
    if context:
        config["context-length"] = context
    return config


def hf_overlay(document: Profile) -> dict:
    knobs, overrides, _ = _serving(document)
    return {**overrides, "torch_dtype": knobs.dtype}


def export_profile(document: Profile, engine: str, out_dir) -> list[Path]:
    """Write the engine's files into `out_dir`; returns their paths."""
    out = Path(out_dir)
    if engine == "vllm":
        return [atomic_write_text(out / "vllm.yaml", _yaml(vllm_config(document), "vllm serve"))]
    if engine == "sglang":
        return [atomic_write_text(out / "sglang.yaml",
                                  _yaml(sglang_config(document), "python -m sglang.launch_server"))]
    if engine == "hf":
        overlay = hf_overlay(document)
        written = [atomic_write_text(out / "config.overlay.json", json.dumps(overlay, indent=2) + "\n")]
        base = model_path(document) / "config.json"
        if base.exists():
            merged = {**json.loads(base.read_text()), **overlay}
            written.append(atomic_write_text(out / "config.json", json.dumps(merged, indent=2) + "\n"))
        return written
    raise LooptuneError(f"--to must be one of {', '.join(ENGINES)}, got {engine!r}")


def _yaml(config: dict, launcher: str) -> str:
    header = f"# made by looptune export; run with: {launcher} --config <this file>\n"
    return header + yaml.safe_dump(config, sort_keys=False)

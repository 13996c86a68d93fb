"""The resumable training state in `OUT/train_state/`: weights, optimiser moments and torch RNG
states as safetensors plus `state.json` (step, tokens, wall time, the run's settings).

Files carry the step in their names and `state.json` is replaced last, so a crash mid-save leaves
the previous state readable. Never pickles.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from looptune.errors import LooptuneError
from looptune.store import atomic_write_text, atomic_write_with
from looptune.train.settings import TrainSettings

STATE_DIR = "train_state"


def _state_paths(out: Path, step: int) -> tuple[Path, Path]:
    d = out / STATE_DIR
    return d / f"model-{step:08d}.safetensors", d / f"optim-{step:08d}.safetensors"


def save_state(out: Path, model, opt, s: TrainSettings, step: int, meta: dict):
    d = out / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    mpath, opath = _state_paths(out, step)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_with(mpath, partial(save_file, tensors))
    osd = opt.state_dict()
    otensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        otensors["rng.cuda"] = torch.cuda.get_rng_state()
    for idx, st in osd["state"].items():
        for k, v in st.items():
            otensors[f"{idx}.{k}"] = torch.as_tensor(v).detach().contiguous().cpu()
    atomic_write_with(opath, partial(save_file, otensors))
    doc = dict(meta, step=step, settings=asdict(s), model=mpath.name, optimizer=opath.name)
    atomic_write_text(d / "state.json", json.dumps(doc, indent=1) + "\n")
    for f in d.glob("*.safetensors"):  # older states, now superseded
        if f not in (mpath, opath):
            f.unlink(missing_ok=True)


def read_state(out: Path) -> dict | None:
    path = out / STATE_DIR / "state.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LooptuneError(f"{path}: unreadable training state ({e}); move {out} aside") from None


def load_state(out: Path, doc: dict, model, opt, device):
    d = out / STATE_DIR
    try:
        weights = load_file(str(d / doc["model"]), device=str(device))
        otensors = load_file(str(d / doc["optimizer"]))
    except Exception as e:  # noqa: BLE001 (safetensors raises several types for a bad file)
        raise LooptuneError(f"{d}: cannot read training state ({e}); move {out} aside") from None
    model.load_state_dict(weights)
    osd = opt.state_dict()
    state: dict = {}
    for key, t in otensors.items():
        if key.startswith("rng."):
            continue
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t.to(device) if name != "step" else t
    osd["state"] = state
    opt.load_state_dict(osd)
    torch.set_rng_state(otensors["rng.torch"])
    if "rng.cuda" in otensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(otensors["rng.cuda"])


def check_out(out: Path, s: TrainSettings) -> dict | None:
    """The saved state to resume from, None to start fresh; errors for an OUT that is not ours."""
    if out.exists() and not out.is_dir():
        raise LooptuneError(f"{out} is a file; OUT must be a directory")
    doc = read_state(out) if out.exists() else None
    if doc is None:
        if out.exists() and (out / "config.json").exists():
            raise LooptuneError(
                f"{out} already holds a checkpoint that this command did not "
                "start (no train_state/); choose another OUT"
            )
        return None
    saved = doc.get("settings", {})
    diffs = [
        f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in asdict(s).items() if saved.get(k) != v
    ]
    if diffs:
        raise LooptuneError(
            f"{out} holds a different training run ({'; '.join(diffs[:4])}); "
            "rerun with the same settings to resume, or choose another OUT"
        )
    return doc

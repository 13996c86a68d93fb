"""What decides a training run (`TrainSettings`), what it reports (`Progress`, `TrainResult`),
and the learning-rate schedule, a pure function of the settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from looptune.errors import LooptuneError
from looptune.model.config import PRESETS


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights; a resumed run must match it exactly."""

    preset: str
    loops: int
    steps: int
    batch_size: int = 4
    context: int = (
        128  # tokens per training window (> the G-SWA window, so the local branch matters)
    )
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0  # 0: 5% of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    corpus: str = "stdlib"  # "stdlib" or the --corpus folder
    manifest_sha256: str = ""
    save_dtype: str = "float32"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    @property
    def warmup(self) -> int:
        return self.warmup_steps or max(1, round(0.05 * self.steps))


@dataclass
class Progress:
    """What the progress callback sees after each step."""

    step: int
    steps: int
    loss: float
    lr: float
    tokens: int
    tokens_per_s: float
    eta_s: float
    heldout_bpb: float | None = None  # set on the steps that evaluated
    resumed_from: int = 0


@dataclass
class TrainResult:
    out: str
    settings: dict
    steps: int
    tokens: int
    wall_s: float
    final_loss: float
    heldout_bpb: float
    eval_bytes: int
    skipped_files: int
    history: list = field(default_factory=list)


def settings_for(
    preset: str,
    loops: int,
    steps: int | None,
    tokens: int | None,
    corpus_path: Path | None,
    seed: int,
    batch_size: int = 4,
    context: int = 128,
    lr: float = 3e-3,
    save_dtype: str = "float32",
    manifest_sha256: str = "",
) -> TrainSettings:
    if preset not in PRESETS:
        raise LooptuneError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if (steps is None) == (tokens is None):
        raise LooptuneError("give exactly one of steps and tokens")
    if loops < 1:
        raise LooptuneError(f"loops must be >= 1, got {loops}")
    if context < 2:
        raise LooptuneError(f"context must be at least 2 tokens, got {context}")
    if save_dtype not in ("float32", "bfloat16"):
        raise LooptuneError(f"save_dtype must be float32 or bfloat16, got {save_dtype!r}")
    if steps is None:
        steps = math.ceil(tokens / (batch_size * context))
    if steps < 1:
        raise LooptuneError(f"steps or tokens must give at least one step, got {steps}")
    return TrainSettings(
        preset=preset,
        loops=loops,
        steps=steps,
        batch_size=batch_size,
        context=context,
        lr=lr,
        seed=seed,
        corpus=str(Path(corpus_path).resolve()) if corpus_path else "stdlib",
        manifest_sha256=manifest_sha256,
        save_dtype=save_dtype,
    )


def lr_at(s: TrainSettings, step: int) -> float:
    """Linear warm-up, then cosine from lr to min_lr_ratio * lr at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

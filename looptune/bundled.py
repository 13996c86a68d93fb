"""The bundled PLT family that ships inside the package (see `looptune/models/`)."""

from __future__ import annotations

from pathlib import Path

from looptune.errors import LooptuneError

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MEMBER = "plt-r2"


def family_members() -> list[Path]:
    """The bundled members, R = 1..4 in order; empty if none is installed."""
    return sorted(p for p in MODELS_DIR.glob("plt-r*") if (p / "config.json").exists())


def default_checkpoint() -> Path:
    path = MODELS_DIR / DEFAULT_MEMBER
    if not (path / "config.json").exists():
        raise LooptuneError(
            "no checkpoint given and no bundled model is installed; pass a "
            "checkpoint directory (make one with `looptune init`)"
        )
    return path


def resolve_checkpoints(paths: list[Path] | None, family: bool = False) -> list[Path]:
    """The user's checkpoints, or the bundled default (the whole family when `family`)."""
    if paths:
        return [Path(p) for p in paths]
    if family and family_members():
        return family_members()
    return [default_checkpoint()]

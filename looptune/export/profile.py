"""The deployable profile: one YAML file with the chosen setting and the evidence beside it.

A `Profile` is what `looptune pareto` writes and `show`, `export` and `generate` read. It is
written atomically; reading checks the schema version and, when asked, that the model on disk
is still the one that was measured (content hash).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from looptune.errors import LooptuneError
from looptune.store import atomic_write_text

SCHEMA_VERSION = 1
KIND = "looptune-profile"
REQUIRED = {
    "model": ("path", "architecture", "content_hash"),
    "knobs": ("loops", "mode", "window", "dtype", "compile", "batch"),
    "objectives": ("quality", "latency_ms", "kv_bytes"),
}


class ProfileError(LooptuneError):
    pass


def write_profile(path, document: dict) -> Path:
    document = {"kind": KIND, "schema_version": SCHEMA_VERSION, **document}
    validate(document, path)
    return atomic_write_text(path, yaml.safe_dump(document, sort_keys=False, width=100))


def read_profile(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile")
    try:
        document = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProfileError(f"{path}: not valid YAML ({first})") from None
    validate(document, path)
    return document


def validate(document, path) -> None:
    if not isinstance(document, dict) or document.get("kind") != KIND:
        raise ProfileError(f"{path}: not a looptune profile (kind is not {KIND!r})")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ProfileError(f"{path}: profile schema version {version!r} is not supported "
                           f"(this looptune reads version {SCHEMA_VERSION})")
    for section, keys in REQUIRED.items():
        block = document.get(section)
        if not isinstance(block, dict):
            raise ProfileError(f"{path}: missing section {section!r}")
        missing = [k for k in keys if k not in block]
        if missing:
            raise ProfileError(f"{path}: section {section!r} lacks {', '.join(missing)}")


BUNDLED = "bundled:"  # a bundled member is recorded by name, so a profile travels with the repo


def portable_path(checkpoint) -> str:
    """How a profile records a checkpoint: `bundled:NAME` for a bundled member, else absolute."""
    from looptune.bundled import MODELS_DIR

    path = Path(checkpoint).resolve()
    if path.parent == MODELS_DIR.resolve():
        return BUNDLED + path.name
    return str(path)


def model_path(document: dict) -> Path:
    """The checkpoint directory a profile names, with `bundled:NAME` resolved."""
    from looptune.bundled import MODELS_DIR

    recorded = document["model"]["path"]
    if recorded.startswith(BUNDLED):
        return MODELS_DIR / recorded.removeprefix(BUNDLED)
    return Path(recorded)


def check_model(document: dict, checkpoint, profile_path="profile") -> None:
    """Fail unless `checkpoint` has the content hash the profile was measured on."""
    from looptune.model.checkpoint import content_hash

    expected = document["model"]["content_hash"]
    actual = content_hash(checkpoint)
    if actual != expected:
        raise ProfileError(f"{profile_path}: measured on model {expected[:12]}, but {checkpoint} "
                           f"is {actual[:12]}; rerun `looptune pareto` for this model")

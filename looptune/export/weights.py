"""A servable copy of a checkpoint directory: the engine's config.json, the engine's spelling of
the gate tensors, and everything else shared with the original.

Shards with no tensor to rename are hard links to the original (copies across file systems),
as are the tokenizer and remote-code files; only a shard holding a renamed tensor is
rewritten. A later save of the original replaces its files, so the copy keeps its bytes; a tool
that rewrites an original file in place (not looptune) would change the copy's too. Every file
is staged under a temporary name and put in place only when all are written, config.json last
(looptune.model.save.StagedFiles): a copy interrupted half-way leaves the directory as it was,
an earlier copy still loadable. A copy goes only into a new or empty
directory or an earlier copy (marked by MARK, which lists the files the copy wrote): it removes
the earlier copy's files that the new one does not write, never another model's or the user's.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from looptune.errors import LooptuneError
from looptune.model.checkpoint import INDEX, weight_files
from looptune.model.save import StagedFiles

MARK = ".looptune-export"  # in every copy's directory: a later export may replace its files


def tensor_names(directory: Path) -> dict[str, Path]:
    """Every stored tensor name -> its file, from the safetensors headers alone."""
    names = {}
    for f in weight_files(Path(directory)):
        try:
            with safe_open(str(f), framework="pt") as handle:
                names.update({name: f for name in handle.keys()})  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            raise LooptuneError(f"{f}: corrupt or truncated safetensors ({e})") from None
    return names


def write_model_dir(source: Path, target: Path, renames: dict[str, str], config: dict) -> dict:
    """Write `target` as `source` with tensors renamed by `renames` and `config` as config.json.
    An earlier copy in `target` stays loadable until the new one is complete (StagedFiles).

    Returns {"linked": [...], "rewritten": [...], "config": path} (file names)."""
    source, target = Path(source).resolve(), Path(target).resolve()
    if source == target:
        raise LooptuneError(f"{target}: the copy cannot replace the checkpoint it is made from")
    if target.is_relative_to(source):  # its files would join the checkpoint (and its hash)
        raise LooptuneError(f"{target}: the copy cannot go inside the checkpoint it is made from")
    _claim(target)
    shards = weight_files(source)
    linked, rewritten = [], []
    others = [f for f in sorted(source.iterdir()) if f.is_file() and not f.name.startswith(".")]
    keep = {s.name for s in shards} | {"config.json"}
    if (source / INDEX).exists():
        keep.add(INDEX)
    others = [f for f in others if f.name not in keep]  # tokenizer, generation config, code
    written = keep | {f.name for f in others}
    with StagedFiles(target) as staged:
        earlier = _written_before(target)  # read under the lock: a copy made meanwhile counts
        # first, the list names every file this copy may put in: stopped among the renames
        # (SIGKILL, a full disk), it leaves none that a later copy would not remove
        staged.write_bytes(MARK, (json.dumps(sorted(earlier | written)) + "\n").encode())
        staged.flush = (target / "config.json").exists()  # a copy to replace: flush the new
        if (target / "config.json").exists():  # the earlier copy's shards have the same names:
            staged.remove("config.json")  # killed among their renames, no config, not a mix
        for shard in shards:
            with safe_open(str(shard), framework="pt") as handle:
                names = list(handle.keys())
                if any(n in renames for n in names):
                    tensors = {renames.get(n, n): handle.get_tensor(n) for n in names}
                    metadata = handle.metadata() or {"format": "pt"}
                    staged.write(shard.name, partial(save_file, tensors, metadata=metadata))
                    rewritten.append(shard.name)
                    continue
            staged.link(shard.name, shard)
            linked.append(shard.name)
        if INDEX in keep:
            index = json.loads((source / INDEX).read_text())
            index["weight_map"] = {renames.get(k, k): v for k, v in index["weight_map"].items()}
            staged.write_bytes(INDEX, (json.dumps(index, indent=2) + "\n").encode())
        for f in others:
            staged.link(f.name, f)
            linked.append(f.name)
        for name in sorted(earlier - written):
            staged.remove(name)  # left by an earlier copy of another checkpoint
        staged.write_bytes(MARK, (json.dumps(sorted(written)) + "\n").encode())
        staged.write_bytes("config.json", (json.dumps(config, indent=2) + "\n").encode())
        staged.commit()
    return {"linked": linked, "rewritten": rewritten, "config": str(target / "config.json")}


def _claim(target: Path) -> None:
    """Make `target` a copy's directory; refuse one that holds anything but an earlier copy."""
    if target.is_dir() and any(target.iterdir()) and not _is_copy(target):
        raise LooptuneError(
            f"{target}: not empty and not made by looptune export; choose a new or empty directory"
        )
    target.mkdir(parents=True, exist_ok=True)
    (target / MARK).touch()


def _written_before(target: Path) -> set[str]:
    """The files an earlier copy in `target` wrote: MARK's list; a copy from before the list
    (MARK empty) is known to have written its weights and index."""
    try:
        names = json.loads((target / MARK).read_text())
    except (OSError, ValueError):
        names = [f.name for f in target.iterdir() if f.suffix == ".safetensors" or f.name == INDEX]
    if not isinstance(names, list):
        names = []
    return {n for n in names if isinstance(n, str) and "/" not in n and (target / n).is_file()}


def _is_copy(directory: Path) -> bool:
    if (directory / MARK).exists():
        return True
    try:  # a copy made before MARK: its config.json carries the export header
        return "looptune_export" in json.loads((directory / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False

"""Checkpoint directories: `config.json` + safetensors (one file or index-sharded) + optional
`tokenizer.json`. Never unpickles. Every failure is a one-line `CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from looptune.errors import CheckpointError, LooptuneError
from looptune.model.arch import (
    ARCHITECTURES,
    PLT,
    Spelling,
    detect_spelling,
    from_canonical,
    gate_kind_of_shape,
    to_canonical,
)
from looptune.model.config import PLTConfig, from_hf_dict
from looptune.model.plt import PLTForCausalLM
from looptune.model.save import INDEX, SINGLE, STAGING, save_checkpoint
from looptune.model.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None/"auto" keeps the stored dtype; a name or a torch.dtype picks one."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype in (None, "auto") else dtype
    if dtype not in DTYPES:
        raise LooptuneError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def run_dtype(dtype, device: torch.device):
    """The dtype to compute in: "auto" keeps the stored dtype, except on the CPU, where it is
    float32 (CPUs without bf16 units emulate half-precision matmuls, 3-5x slower)."""
    if dtype in (None, "auto") and device.type == "cpu":
        return "float32"
    return dtype


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LooptuneError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LooptuneError(f"device {device} requested but CUDA is not available here")
    return dev


def read_config(directory: Path) -> tuple[PLTConfig, dict]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    path = directory / "config.json"
    if not path.exists():
        if any(directory.glob(f"{STAGING}*")):  # left by a save that was killed
            raise CheckpointError(
                f"{path}: missing: a save into this directory was stopped while putting its "
                "files in place (or is doing so now); save the checkpoint again"
            )
        raise CheckpointError(f"{path}: missing (a checkpoint needs config.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise _unreadable(path, e) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    cfg = from_hf_dict(raw, str(path))
    if cfg.tokenizer == "bytes" and cfg.vocab_size < 259:
        raise CheckpointError(
            f"{path}: vocab_size {cfg.vocab_size} is too small for the byte tokenizer (needs 259)"
        )
    return cfg, raw


def _unreadable(path: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"{path}: cannot read it ({e.strerror or e})")


def _dangling(f: Path) -> None:
    """Refuse a link to nothing (a hub snapshot whose blob is gone) in one line naming both."""
    if f.is_symlink() and not f.exists():
        raise CheckpointError(f"{f}: a symbolic link to {os.readlink(f)}, which does not exist")


def weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        except OSError as e:
            raise _unreadable(index, e) from None
        files = sorted({directory / f for f in weight_map.values()})
        for f in files:
            _dangling(f)
            if not f.exists():
                raise CheckpointError(f"{index}: names {f.name}, which is missing")
        return files
    if (directory / SINGLE).exists() or (directory / SINGLE).is_symlink():
        _dangling(directory / SINGLE)
        return [directory / SINGLE]
    shards = sorted(directory.glob("*.safetensors"))
    for f in shards:
        _dangling(f)
    if shards:
        return shards
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory}: only pickle weights (.bin/.pt) found; looptune loads "
            "safetensors only (convert them first)"
        )
    raise CheckpointError(f"{directory}: no weights ({SINGLE} or {INDEX}) found")


@dataclass
class Layout:
    """What the safetensors headers hold, checked against the config: nothing loaded yet."""

    spelling: Spelling  # how the gate tensors are named
    tensors: dict[str, tuple[Path, str]]  # looptune's state-dict key -> (file, stored name)
    dtype: torch.dtype  # the stored dtype of the weights


def _fail_count(kind: str, where, names: list[str]):
    more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
    raise CheckpointError(f"{where}: {kind} tensors: {', '.join(names[:5])}{more}")


def read_layout(directory: Path, cfg: PLTConfig, files: list[Path], expected: dict) -> Layout:
    """Names, shapes and gate spelling from the headers alone; `expected` maps each state-dict
    key of the model to its shape. Raises a one-line CheckpointError on any disagreement."""
    stored: dict[str, tuple[Path, tuple, str]] = {}
    for f in files:
        try:
            with open(f, "rb"):  # safetensors says 'No such file' of one it may not read
                pass
        except OSError as e:
            raise _unreadable(f, e) from None
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    part = handle.get_slice(name)
                    stored[name] = (f, tuple(part.get_shape()), part.get_dtype())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors ({e})") from None
    spelling = detect_spelling(cfg.architecture, stored, str(directory))
    _check_gate_kind(directory, cfg, spelling, stored)
    renames = to_canonical(spelling, cfg.gate, stored)
    tensors = {renames.get(name, name): (f, name) for name, (f, _, _) in stored.items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied checkpoints sometimes store the copy
    missing = sorted(set(expected) - set(tensors))
    if missing:  # named as this checkpoint's spelling would name them
        as_stored = from_canonical(spelling, cfg.gate, missing)
        _fail_count("missing", directory, sorted(as_stored.get(k, k) for k in missing))
    unexpected = sorted(tensors[k][1] for k in set(tensors) - set(expected))
    if unexpected:
        _fail_count("unexpected", directory, unexpected)
    for key, shape in expected.items():
        f, name = tensors[key]
        if tuple(shape) != stored[name][1]:
            raise CheckpointError(
                f"{f}: tensor {name} has shape {list(stored[name][1])}, "
                f"the config implies {list(shape)}"
            )
    first = tensors["model.embed_tokens.weight"][1]
    return Layout(spelling, tensors, _ST_DTYPES.get(stored[first][2], torch.float32))


def _check_gate_kind(directory, cfg: PLTConfig, spelling: Spelling, stored: dict):
    """The gate kind the config gives must match the stored gate's shape (one line naming both)."""
    weight = f"{spelling.prefix.format(i=0)}.weight"
    shape = stored[weight][1]
    kind = gate_kind_of_shape(shape, cfg.hidden_size, cfg.head_dim)
    if kind is None and f"{spelling.prefix.format(i=0)}.gate_norm.weight" in stored:
        kind = "hidden"
    if kind is None or kind == cfg.gate:
        return
    arch = ARCHITECTURES[cfg.architecture]
    said = (
        f"plt_gate_use_hidden_states: {str(cfg.gate == 'hidden').lower()}"
        if arch is PLT
        else f"{arch.name} (always a query gate)"
    )
    width = cfg.hidden_size if cfg.gate == "hidden" else cfg.head_dim
    raise CheckpointError(
        f"{directory}: config.json says {said}, a {cfg.gate} gate with weight "
        f"[{cfg.num_attention_heads}, {width}], but {weight} has shape {list(shape)}, "
        f"a {kind} gate"
    )


def _meta_model(cfg: PLTConfig) -> tuple[PLTForCausalLM, dict]:
    with torch.device("meta"):
        model = PLTForCausalLM(cfg)
    return model, {k: v.shape for k, v in model.state_dict().items()}


def load_model(path, device="auto", dtype="auto", eval_mode: bool = True):
    """Load a checkpoint directory: returns `(model, tokenizer)`; tokenizer may be None.

    The model is built on the meta device; then each shard is opened in turn and its tensors
    are read onto `device`, converted to `dtype` and assigned in place, and the shard is closed
    before the next one. So the weights exist once, on the target device, plus one tensor in
    flight and the open shard's mapped pages; the CPU never holds a full copy of a GPU-bound
    model.

    A save into the directory while it is read (another process's) that changes config.json
    or the index makes the read start again, so what loads is one checkpoint, never the config
    of one and the weights of the next.
    """
    directory = Path(path)
    return _read_whole(directory, lambda: _load(directory, device, dtype, eval_mode))


_READS = 3


def _read_whole(directory: Path, read):
    """`read()` of one checkpoint: run again when a save into `directory` changed it meanwhile
    (`_stamp`), or when `read` returns None (it saw a file rewritten), three times at most."""
    for _ in range(_READS):
        before = _stamp(directory)
        try:
            result = read()
        except (CheckpointError, RuntimeError):  # a file gone, a tensor of another shape
            if _stamp(directory) == before:
                raise
            continue  # the save's doing: read the new checkpoint
        if result is not None and _stamp(directory) == before:
            return result
    raise CheckpointError(
        f"{directory}: changed by a save while it was read, {_READS} times; read it again "
        "when the save is done"
    )


def _stamp(directory: Path) -> list[bytes | None]:
    """What a save changes when it puts another checkpoint in place: config.json, the index and
    the tokenizer, by content (small files; a file's inode and mtime can repeat when saves come
    quickly)."""
    stamp = []
    for name in ("config.json", INDEX, "tokenizer.json"):
        try:
            stamp.append((directory / name).read_bytes())
        except OSError:
            stamp.append(None)
    return stamp


def _load(directory: Path, device, dtype, eval_mode: bool):
    cfg, _ = read_config(directory)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    files = weight_files(directory)
    model, expected = _meta_model(cfg)
    layout = read_layout(directory, cfg, files, expected)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for key, (f, name) in layout.tensors.items():
        by_file.setdefault(f, []).append((key, name))
    for f, names in by_file.items():
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as handle:
                shard = {}
                for key, name in names:
                    t = handle.get_tensor(name)
                    shard[key] = t if dtype is None else t.to(dtype)
                model.load_state_dict(shard, strict=False, assign=True)
                del shard
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read its tensors ({e})") from None
    model.checkpoint_dir = directory
    return (model.eval() if eval_mode else model), load_tokenizer(directory, cfg.tokenizer)


def init_weights(model: PLTForCausalLM, seed: int = 0, std: float = 0.02):
    """Random init in place, on whatever device and dtype the model already lives in."""
    gen = torch.Generator(device=model.model.embed_tokens.weight.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "plt_gate" in name or "gate_projection" in name:
                p.zero_()  # g = 0.5, as in the released models
            else:
                p.normal_(0.0, std, generator=gen)
    return model


def build_model(cfg: PLTConfig, device="cpu", dtype=torch.float32, seed: int = 0):
    """A randomly initialised model created directly on `device` in `dtype`."""
    with torch.device("meta"):
        model = PLTForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    return init_weights(model, seed)


_HASHES: dict[tuple, str] = {}


def content_hash(path) -> str:
    """sha256 over config.json and the weight files, in name order (memoised per process on
    each file's identity, size and times). Caches and profiles key on it, so a changed model
    never reuses results. A save into the directory while it is hashed makes it start again
    (config.json or the index changed, as `load_model` tells): the hash is of one checkpoint,
    never of a mix."""
    directory = Path(path)

    def read() -> str | None:
        files, key = _file_stamps(directory)
        if key not in _HASHES:
            digest = _digest(files)
            if _file_stamps(directory)[1] != key:
                return None  # a file rewritten while it was read
            _HASHES[key] = digest
        return _HASHES[key]

    return _read_whole(directory, read)


def _file_stamps(directory: Path) -> tuple[list[Path], tuple]:
    """The files `content_hash` reads, and what tells a file replaced or rewritten: inode,
    size, mtime and ctime (a copy that keeps the mtime, `cp -p`, still moves the ctime)."""
    if not (directory / "config.json").is_file():
        read_config(directory)  # says why, in one line
    files = [directory / "config.json"] + weight_files(directory)
    try:
        stats = [(str(f), f.stat()) for f in files]
    except OSError as e:
        raise _unreadable(Path(e.filename), e) from None
    key = tuple((n, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for n, s in stats)
    return files, key


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        try:
            with open(f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    h.update(block)
        except OSError as e:
            raise _unreadable(f, e) from None
    return h.hexdigest()


INIT_ARCHS = {a.init_name: a for a in ARCHITECTURES.values()}  # `looptune init --arch`


def init_checkpoint(
    directory,
    preset: str,
    loops=None,
    window=None,
    arch: str = "plt",
    seed: int = 0,
    dtype="auto",
    device="auto",
    shard_bytes: int = 2 << 30,
) -> dict:
    """`looptune init`: a random checkpoint of a preset shape; returns what was written."""
    from looptune.model.config import preset_config

    if arch not in INIT_ARCHS:
        raise LooptuneError(f"arch must be one of {', '.join(INIT_ARCHS)}, got {arch!r}")
    directory = Path(directory)
    if (directory / "config.json").exists():
        raise LooptuneError(f"{directory} already holds a checkpoint; choose an empty directory")
    try:
        cfg = preset_config(
            preset,
            num_loops=loops,
            window=window,
            architecture=INIT_ARCHS[arch].name,
            **INIT_ARCHS[arch].init_config,
        )
    except ValueError as e:
        raise LooptuneError(str(e)) from None
    big = cfg.hidden_size >= 2048
    torch_dtype = resolve_dtype(dtype) or (torch.bfloat16 if big else torch.float32)
    model = build_model(cfg, resolve_device(device), torch_dtype, seed)
    save_checkpoint(model, directory, max_shard_bytes=shard_bytes)
    return {
        "path": str(directory),
        "preset": preset,
        "parameters": model.num_params(),
        "loops": cfg.num_loops,
        "window": cfg.window,
        "architecture": cfg.architecture,
        "dtype": str(torch_dtype).removeprefix("torch."),
    }

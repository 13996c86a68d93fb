"""`looptune export`: a profile's measured setting as one serving engine's own config.

What is exported is what was measured: the loop count, the window in the target's convention,
the dtype, and CUDA graphs only when the latency was measured compiled. The deployment's shape is
the deployment's: the context is the model's `max_position_embeddings` unless `max_model_len` is
given (never the study's prompt + generated length), and the concurrency is the measured batch
unless `max_concurrency` is given; the latency budget was only checked up to that batch.

Before writing, the profile is checked like `generate` checks it (model content hash; the knobs
were validated on reading) and the target like a deployment would meet it: does it register the
architecture, run it in the measured mode, load the checkpoint's gate tensors, read head_dim as
stored. Each failure is one line; `force` writes anyway and records every one in the file.

Exports into one directory run one at a time between processes; one that fails removes what
it made and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from safetensors import SafetensorError

from looptune.errors import LooptuneError
from looptune.export.deployable import Profile, ProfileError, check_model, model_path
from looptune.export.engines import CONCURRENCY, TARGETS, LoopKeys, Target, window_value
from looptune.store import atomic_write_text, cache_root, flock_waiting, warn

CONVENTIONS = {
    "keys": "W keys, the token included",
    "exclusive": "W - 1, which this engine's attention reads as W keys",
    "flash": "flash-attention's (left, right) = (W - 1, 0), i.e. W keys",
}


class ExportRefused(LooptuneError):
    """The target cannot serve what was measured, or the profile fails its checks."""


@dataclass
class Export:
    target: Target
    out: Path
    files: list[Path] = field(default_factory=list)
    command: str = ""  # the exact serve (or load) command
    settings: dict = field(default_factory=dict)  # the engine options written
    overrides: dict = field(default_factory=dict)  # the loop keys, in the engine's convention
    context: int = 0
    context_from: str = ""  # where the context came from
    concurrency: int = 0
    forced: list[str] = field(default_factory=list)  # problems written past with `force`
    notes: list[str] = field(default_factory=list)  # caveats that do not stop a deployment
    weights: dict | None = None  # what write_model_dir linked and rewrote

    def to_dict(self) -> dict:
        return {
            "engine": self.target.key,
            "files": [str(p) for p in self.files],
            "command": self.command,
            "settings": self.settings,
            "loop_keys": self.overrides,
            "context": self.context,
            "concurrency": self.concurrency,
            "forced": self.forced,
            "notes": self.notes,
            "weights": self.weights,
        }


@dataclass
class _Model:
    """What export reads of the profile's model: nothing when it is not there."""

    path: Path
    cfg: object = None  # PLTConfig
    raw: dict | None = None  # config.json as stored
    names: dict = field(default_factory=dict)  # stored tensor name -> file


def export_profile(
    profile: Profile,
    profile_path,
    to: str,
    out,
    *,
    max_model_len=None,
    max_concurrency=None,
    write_weights: bool = False,
    force: bool = False,
    names: dict[str, str] | None = None,
) -> Export:
    """Write `to`'s config for `profile` into directory `out`; see the module docstring.
    `names` says how the messages call the parameters (the CLI passes its flags)."""
    said = _Names(names or {})
    if to not in TARGETS:
        raise LooptuneError(f"target must be one of {', '.join(TARGETS)}, got {to!r}")
    for name, value in (("max_model_len", max_model_len), ("max_concurrency", max_concurrency)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise LooptuneError(f"{name} must be a positive integer, got {value!r}")
    result = Export(TARGETS[to], Path(out).resolve())
    model = _read_model(model_path(profile))
    problems: list[str] = []
    try:
        check_model(profile, model.path, profile_path)
    except ProfileError as e:
        problems.append(str(e))
    keys = _check_target(result, profile, model, problems)
    renames = _check_gates(result, profile, model, write_weights, problems, said)
    _shape(result, profile, model, max_model_len, max_concurrency, problems, said)
    if problems and not force:
        more = f"and {len(problems) - 1} more; " if len(problems) > 1 else ""
        more = f" ({more}{said['force']} writes anyway)"
        raise ExportRefused(problems[0] + more)
    result.forced = problems
    result.notes += list(result.target.caveats)
    device = profile.device.get("device_type") or profile.device.get("device")
    if device and device != "cuda":
        result.notes.append(
            f"measured on {device}: the latency numbers are that device's; "
            "rerun `looptune pareto` on the serving GPU before relying on them"
        )
    result.overrides = {
        keys.loops: profile.knobs.loops,
        keys.window: window_value(keys.convention, profile.knobs.window),
    }
    with one_export_into(result.out):
        made = _first_missing(result.out)
        try:
            _write(result, profile, profile_path, model, keys, renames, write_weights)
        except BaseException as e:  # a full or unwritable disk, Ctrl-C: keep nothing half-made
            if made is not None:
                _remove_made(result.out, made)
            if isinstance(e, (OSError, SafetensorError)):
                reason = f"{e.strerror}: {e.filename}" if getattr(e, "strerror", None) else str(e)
                if getattr(e, "filename2", None):  # a copy's: from filename to filename2
                    reason += f" -> {e.filename2}"
                raise LooptuneError(f"{result.out}: cannot write the export ({reason})") from None
            raise
    return result


@contextlib.contextmanager
def one_export_into(out: Path):
    """Exports into one directory one at a time, between processes: one that fails removes the
    directory it made, which would hold a second one's files."""
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:16]
    path = cache_root() / "locks" / f"export-{digest}.lock"  # flock: the kernel frees it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        warn(f"cannot use the lock {path} ({e.strerror or e}); exporting without it")
        yield
        return
    try:
        said = f"{out}: another export into it is under way; waiting for it to end"
        flock_waiting(fd, lambda: warn(said))
        yield
    finally:
        os.close(fd)


def _remove_made(out: Path, made: Path) -> None:
    """Remove `out` (no other export writes there meanwhile), then the directories above it
    that this export made, each only while empty: another export may be writing beside it."""
    shutil.rmtree(out, ignore_errors=True)
    for directory in out.parents:
        if directory == made.parent:
            break
        try:
            directory.rmdir()
        except OSError:  # not empty: not ours alone
            break


class _Names(dict):
    """A parameter's name as the caller spells it: its own unless the caller said otherwise."""

    def __missing__(self, key: str) -> str:
        return key


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (what the export creates)."""
    missing = None
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing, path = path, path.parent
    return missing


def _read_model(path: Path) -> _Model:
    from looptune.export.weights import tensor_names
    from looptune.model.checkpoint import read_config

    if not (path / "config.json").is_file():
        return _Model(path)
    cfg, raw = read_config(path)
    return _Model(path, cfg, raw, tensor_names(path))


def _check_target(result: Export, profile: Profile, model: _Model, problems: list) -> LoopKeys:
    """Registered architecture, mode, head_dim; returns the loop keys to write."""
    from looptune.model.arch import ARCHITECTURES

    target, arch = result.target, profile.model.architecture
    keys = target.architectures.get(arch)
    if keys is None:
        others = [t.key for t in TARGETS.values() if arch in t.architectures]
        problems.append(
            f"{target.name} does not register {arch} (it registers "
            f"{', '.join(target.architectures)}); targets that do: "
            f"{', '.join(others) or 'none'}"
        )
        keys = next(t.architectures[arch] for t in TARGETS.values() if arch in t.architectures)
    elif profile.knobs.mode != ARCHITECTURES[arch].mode:
        problems.append(
            f"{target.name} runs {arch} as mode {ARCHITECTURES[arch].mode}, but the "
            f"profile measured mode {profile.knobs.mode}"
        )
    cfg = model.cfg
    if (
        cfg is not None
        and target.head_dim_from_hidden
        and (cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size)
    ):
        problems.append(
            f"{target.name} takes head_dim = hidden_size / num_attention_heads = "
            f"{cfg.hidden_size // cfg.num_attention_heads}, but this model's "
            f"head_dim is {cfg.head_dim}"
        )
    return keys


def _check_gates(
    result: Export,
    profile: Profile,
    model: _Model,
    write_weights: bool,
    problems: list,
    said: _Names,
) -> dict:
    """Can the target load the stored gate tensors? Returns the renames that make it load them."""
    from looptune.model.arch import ARCHITECTURES, detect_spelling, from_canonical, to_canonical

    target, cfg = result.target, model.cfg
    if cfg is None or cfg.architecture not in target.architectures:
        return {}
    if target.drops_gates:
        message = f"{target.name} drops the gate tensors: {target.drops_gates}"
        if profile.knobs.loops >= 2:
            problems.append(message)
        else:
            result.notes.append(message + " (harmless at 1 loop, where no gate is used)")
        return {}
    arch = ARCHITECTURES[cfg.architecture]
    stored = detect_spelling(cfg.architecture, model.names, str(model.path))
    if target.loader in stored.loaders:
        return {}
    accepted = [s for s in arch.spellings if target.loader in s.loaders]
    if not accepted:
        problems.append(
            f"{target.name}'s loader maps no known spelling of the {arch.family} gate tensors"
        )
        return {}
    want = accepted[0]
    canonical = to_canonical(stored, cfg.gate, model.names)
    back = from_canonical(want, cfg.gate, canonical.values())
    if not write_weights:
        problems.append(
            f"{target.name}'s loader skips the gate tensors as stored "
            f"({stored.prefix.format(i=0)}.*); renaming them to "
            f"{want.prefix.format(i=0)}.* is all it takes ({said['write_weights']})"
        )
    else:
        result.notes.append(
            f"gate tensors renamed {stored.prefix}.* -> {want.prefix}.* ({want.label})"
        )
    return {name: back[key] for name, key in canonical.items()}


def _shape(
    result: Export,
    profile: Profile,
    model: _Model,
    max_model_len,
    max_concurrency,
    problems: list,
    said: _Names,
) -> None:
    """The deployment's context and concurrency (never the benchmark's prompt length)."""
    limit = model.cfg.max_position_embeddings if model.cfg is not None else None
    if max_model_len is not None and limit is not None and max_model_len > limit:
        raise LooptuneError(
            f"{said['max_model_len']} {max_model_len} exceeds the model's "
            f"max_position_embeddings ({limit})"
        )
    if max_model_len is not None:
        result.context, result.context_from = max_model_len, "as given"
    elif limit is not None:
        result.context, result.context_from = limit, "the model's max_position_embeddings"
    else:
        problems.append(
            f"{model.path}: the model is not there, so its context length is "
            f"unknown; give {said['max_model_len']}"
        )
    result.concurrency = max_concurrency or profile.knobs.batch


def _write(
    result: Export,
    profile: Profile,
    profile_path,
    model: _Model,
    keys: LoopKeys,
    renames: dict,
    write_weights: bool,
) -> None:
    from looptune.export.weights import write_model_dir

    target, knobs = result.target, profile.knobs
    copy = target.key == "hf" or write_weights
    if copy and model.cfg is None:
        raise LooptuneError(f"{model.path}: the model is not there, so no copy can be written")
    model_dir = (result.out if target.key == "hf" else result.out / "model") if copy else model.path
    config_path = result.out / target.filename
    if target.key == "hf":
        result.command = (
            'python -c "from transformers import AutoModelForCausalLM; '
            f"AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, "
            "trust_remote_code=True, torch_dtype='auto')\""
        )
        if "auto_map" not in model.raw:
            result.notes.append(
                "config.json has no auto_map: put IQuest's "
                "configuration_iquestloopcoder.py and modeling_iquestloopcoder.py "
                "beside it and name them in auto_map"
            )
        result.settings = {"torch_dtype": knobs.dtype, **result.overrides}
    else:
        result.command = f"{target.launcher} --config {shlex.quote(str(config_path))}"
        result.settings = _engine_options(target, model_dir, knobs, result)
    header = _header(profile, profile_path, result, keys)
    if copy:
        # the header goes in as the first key: transformers keeps unknown config keys
        config = {
            "looptune_export": header,
            **model.raw,
            **result.overrides,
            "torch_dtype": knobs.dtype,
        }
        result.weights = write_model_dir(model.path, model_dir, renames, config)
        result.files.append(model_dir / "config.json")
    if target.key != "hf":
        text = "".join(f"# {line}\n" for line in header)
        text += yaml.safe_dump(result.settings, sort_keys=False, width=100)
        result.files.insert(0, atomic_write_text(config_path, text))


def _engine_options(target: Target, model_dir: Path, knobs, result: Export) -> dict:
    f = target.flags
    options = {f["model"]: str(model_dir), f["dtype"]: knobs.dtype}
    if result.context:  # unknown only when forced past a missing model: the engine's default
        options[f["context"]] = result.context
    options[f["concurrency"]] = result.concurrency
    for name, value in (target.graphs if knobs.compile else target.eager).items():
        options[name] = result.concurrency if value == CONCURRENCY else value
    options[f["remote_code"]] = True
    options[f["overrides"]] = json.dumps(result.overrides)
    return options


def _header(profile: Profile, profile_path, result: Export, keys: LoopKeys) -> list[str]:
    t, k, o, m = result.target, profile.knobs, profile.objectives, profile.model
    q, lat = o.quality, o.latency_ms
    device = profile.device.get("device_name") or profile.device.get("device") or "?"
    ttft = f"{o.ttft_ms:.4g} ms" if o.ttft_ms is not None else "?"
    shape = f" at {k.prompt_len} + {k.gen_len} tokens" if k.prompt_len and k.gen_len else ""
    lines = [
        f"looptune export for {t.name}: {t.versions}",
        f"facts from {t.source}",
        f"profile {Path(profile_path).resolve()} (made {profile.created or '?'})",
        f"model {m.path} {m.architecture} sha256 {m.content_hash}",
        f"reproduces: loops {k.loops}, window {k.window} keys, mode {k.mode}, {k.dtype}, "
        + ("compiled (CUDA graphs)" if k.compile else "eager"),
        (
            f"measured at batch {k.batch} on {device}: {lat.metric} {lat.value:.4g} ms "
            f"[{lat.ci[0]:.4g}, {lat.ci[1]:.4g}], ttft {ttft}, {q.metric} {q.value:.4g} "
            f"[{q.ci[0]:.4g}, {q.ci[1]:.4g}] on {q.set}, KV {o.kv_bytes} bytes per sequence{shape}"
        ),
        f"loop keys {json.dumps(result.overrides)}: window as {CONVENTIONS[keys.convention]}",
        (
            f"context {result.context} tokens ({result.context_from})"
            if result.context
            else "context: the engine's default (the model was not there to read its maximum)"
        ),
        (
            f"concurrency {result.concurrency}: the latency budget holds only up to the measured "
            f"batch of {k.batch}"
        ),
        f"serve: {result.command}",
    ]
    lines += [f"FORCED past: {p}" for p in result.forced]
    return lines + [f"note: {n}" for n in result.notes]

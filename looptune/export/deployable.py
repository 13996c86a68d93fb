"""The deployable profile: one YAML file with the chosen setting and the evidence beside it.

A `Profile` is what `looptune pareto` writes and `show`, `export` and `generate` read (the
profiler's results are `Measurement`s; "profile" here always means this file). Reading checks
the schema version, the type and range of every field a command uses, and, when asked, that the
model on disk is still the one that was measured (content hash). Writing is atomic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from looptune.errors import LooptuneError
from looptune.model.config import ARCHITECTURES, MODES
from looptune.store import atomic_write_text

SCHEMA_VERSION = 1
KIND = "looptune-profile"
DTYPES = ("float32", "bfloat16", "float16")  # looptune.model.checkpoint.DTYPES, without torch
BUNDLED = "bundled:"  # a bundled member is recorded by name, so a profile travels with the repo


class ProfileError(LooptuneError):
    pass


@dataclass(frozen=True)
class ModelRef:
    path: str  # absolute, or `bundled:NAME` (see portable_path)
    architecture: str
    content_hash: str  # sha256 of config.json and weights (looptune.model.checkpoint)
    trained_loops: int | None = None
    trained_window: int | None = None


@dataclass(frozen=True)
class Setting:
    """The chosen knobs, exactly as they were measured."""

    loops: int
    mode: str
    window: int  # keys the local branch sees, the token itself included (model/config.py)
    dtype: str
    compile: bool  # torch.compile was on when latency was measured (CUDA graphs on a GPU)
    batch: int  # sequences decoded together when latency was measured
    prompt_len: int | None = None  # the benchmark's shape, never a deployment limit
    gen_len: int | None = None


@dataclass(frozen=True)
class Quality:
    set: str
    metric: str  # e.g. bits_per_byte (lower is better)
    value: float
    ci: tuple[float, float]  # 95% interval
    limit: int | None = None  # items scored (None: all)
    seed: int = 0


@dataclass(frozen=True)
class Latency:
    metric: str  # tpot_ms_p50 or tpot_ms_p90
    value: float
    ci: tuple[float, float]


@dataclass(frozen=True)
class Objectives:
    quality: Quality
    latency_ms: Latency
    kv_bytes: int  # per sequence, at the measured shape
    ttft_ms: float | None = None
    tokens_per_s: float | None = None


@dataclass(frozen=True)
class StudyBudgets:
    latency_ms: float
    kv_mib: float | None = None
    ttft_ms: float | None = None
    metric: str = "tpot-p50"


@dataclass(frozen=True)
class Profile:
    model: ModelRef
    knobs: Setting
    objectives: Objectives
    budgets: StudyBudgets | None = None
    created: str = ""
    command: str = ""  # the command line that made it
    device: dict = field(default_factory=dict)  # where it was measured (measure/env.py)
    pareto_set: list = field(default_factory=list)  # the front, as search's Outcome.to_dict()
    study: dict = field(default_factory=dict)  # storage, name, trials, measurements

    def to_dict(self) -> dict:
        m, k, o = self.model, self.knobs, self.objectives
        q, lat = o.quality, o.latency_ms
        doc = {
            "kind": KIND,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "command": self.command,
            "model": _some(
                {
                    "path": m.path,
                    "architecture": m.architecture,
                    "content_hash": m.content_hash,
                    "trained_loops": m.trained_loops,
                    "trained_window": m.trained_window,
                }
            ),
            "knobs": _some(
                {
                    "loops": k.loops,
                    "mode": k.mode,
                    "window": k.window,
                    "dtype": k.dtype,
                    "compile": k.compile,
                    "batch": k.batch,
                    "prompt_len": k.prompt_len,
                    "gen_len": k.gen_len,
                }
            ),
            "objectives": {
                "quality": {
                    "set": q.set,
                    "metric": q.metric,
                    "value": q.value,
                    "ci": list(q.ci),
                    "limit": q.limit,
                    "seed": q.seed,
                },
                "latency_ms": {"metric": lat.metric, "value": lat.value, "ci": list(lat.ci)},
                "ttft_ms": o.ttft_ms,
                "kv_bytes": o.kv_bytes,
                "tokens_per_s": o.tokens_per_s,
            },
        }
        if self.budgets is not None:
            b = self.budgets
            doc["budgets"] = {
                "latency_ms": b.latency_ms,
                "kv_mib": b.kv_mib,
                "ttft_ms": b.ttft_ms,
                "metric": b.metric,
            }
        doc.update(
            device=dict(self.device), pareto_set=list(self.pareto_set), study=dict(self.study)
        )
        return doc

    @classmethod
    def from_dict(cls, doc, path="profile") -> Profile:
        """Validate a parsed YAML document; every problem is one ProfileError naming the field."""
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            raise ProfileError(f"{path}: not a looptune profile (kind is not {KIND!r})")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProfileError(
                f"{path}: profile schema version {version!r} is not supported "
                f"(this looptune reads version {SCHEMA_VERSION})"
            )
        top = _Section(
            doc,
            "",
            path,
            optional=("created", "command", "budgets", "device", "pareto_set", "study"),
        )
        top.only(Profile, "kind", "schema_version")
        m = top.section("model", optional=("trained_loops", "trained_window")).only(ModelRef)
        model = ModelRef(
            m.text("path"),
            m.choice("architecture", ARCHITECTURES),
            m.sha256("content_hash"),
            m.integer("trained_loops", 1),
            m.integer("trained_window", 1),
        )
        k = top.section("knobs", optional=("prompt_len", "gen_len")).only(Setting)
        knobs = Setting(
            k.integer("loops", 1),
            k.choice("mode", MODES),
            k.integer("window", 1),
            k.choice("dtype", DTYPES),
            k.boolean("compile"),
            k.integer("batch", 1),
            k.integer("prompt_len", 1),
            k.integer("gen_len", 1),
        )
        o = top.section("objectives", optional=("ttft_ms", "tokens_per_s")).only(Objectives)
        q = o.section("quality", optional=("set", "limit", "seed")).only(Quality)
        lat = o.section("latency_ms").only(Latency)
        objectives = Objectives(
            Quality(
                q.text("set") or "code",
                q.text("metric"),
                q.number("value"),
                q.interval("ci"),
                q.integer("limit", 1),
                q.integer("seed", 0) or 0,
            ),
            Latency(lat.text("metric"), lat.number("value", 0), lat.interval("ci")),
            o.integer("kv_bytes", 0),
            o.number("ttft_ms", 0),
            o.number("tokens_per_s", 0),
        )
        budgets = None
        if doc.get("budgets") is not None:
            b = top.section("budgets", optional=("kv_mib", "ttft_ms", "metric")).only(StudyBudgets)
            budgets = StudyBudgets(
                b.number("latency_ms", 0),
                b.number("kv_mib", 0),
                b.number("ttft_ms", 0),
                b.text("metric") or "tpot-p50",
            )
        pareto = top.listing("pareto_set")
        for i, entry in enumerate(pareto):
            _check_outcome(entry, f"pareto_set[{i}]", path)
        return cls(
            model,
            knobs,
            objectives,
            budgets,
            top.text("created") or "",
            top.text("command") or "",
            top.mapping("device"),
            pareto,
            top.mapping("study"),
        )


def _some(d: dict) -> dict:
    """Leave out optional fields that were never recorded."""
    return {k: v for k, v in d.items() if v is not None}


class _Section:
    """Typed reads from one mapping of the document; errors say `path: where.key ...`."""

    def __init__(self, block, where: str, path, optional=()):
        self.block, self.where, self.path, self.optional = block, where, path, set(optional)

    def only(self, cls, *more) -> _Section:
        """Refuse keys `cls` has no field for: a misspelt knob must not be silently ignored."""
        known = {f.name for f in fields(cls)} | set(more)
        unknown = [k for k in self.block if k not in known]
        if unknown:
            raise ProfileError(
                f"{self.path}: {self.where or 'the profile'} has unknown key "
                f"{unknown[0]!r} (known: {', '.join(sorted(known))})"
            )
        return self

    def _value(self, key):
        if key not in self.block:
            if key in self.optional:
                return None
            raise ProfileError(f"{self.path}: {self._name(key) or 'profile'} is missing")
        return self.block[key]

    def _name(self, key) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _bad(self, key, wanted, value):
        return ProfileError(f"{self.path}: {self._name(key)} must be {wanted}, got {value!r}")

    def section(self, key, optional=()) -> _Section:
        value = self._value(key)
        if not isinstance(value, dict):
            raise ProfileError(
                f"{self.path}: section {self._name(key)!r} is missing or not a mapping"
            )
        return _Section(value, self._name(key), self.path, optional)

    def integer(self, key, low: int):
        value = self._value(key)
        if value is None and key in self.optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self._bad(key, f"an integer >= {low}", value)
        return value

    def number(self, key, low: float | None = None):
        value = self._value(key)
        if value is None and key in self.optional:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or (low is not None and value < low):
            raise self._bad(
                key, "a finite number" + (f" >= {low}" if low is not None else ""), value
            )
        return float(value)

    def boolean(self, key) -> bool:
        value = self._value(key)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def text(self, key):
        value = self._value(key)
        if value is None and key in self.optional:
            return None
        if not isinstance(value, str) or not (value or key in self.optional):
            raise self._bad(key, "a non-empty string", value)
        return value

    def choice(self, key, choices):
        value = self._value(key)
        if value not in choices:
            raise self._bad(key, f"one of {', '.join(choices)}", value)
        return value

    def sha256(self, key) -> str:
        value = self._value(key)
        hexdigits = set("0123456789abcdef")
        if not isinstance(value, str) or len(value) != 64 or not set(value) <= hexdigits:
            raise self._bad(key, "a sha256 hex digest", value)
        return value

    def interval(self, key) -> tuple[float, float]:
        value = self._value(key)
        ok = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        )
        if not ok or not value[0] <= value[1]:
            raise self._bad(key, "[low, high]", value)
        return (float(value[0]), float(value[1]))

    def mapping(self, key) -> dict:
        value = self._value(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._bad(key, "a mapping", value)
        return value

    def listing(self, key) -> list:
        value = self._value(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._bad(key, "a list", value)
        return value


def _check_outcome(entry, where: str, path) -> None:
    """A front member as `show` prints it: its knobs and its three objectives."""
    if not isinstance(entry, dict):
        raise ProfileError(f"{path}: {where} must be a mapping, got {entry!r}")
    s = _Section(entry, where, path, optional=("quality_ci", "latency_ci", "ttft_ms", "trial"))
    knobs = s.section("knobs", optional=("compile",))
    knobs.text("checkpoint")
    knobs.integer("loops", 1)
    knobs.integer("window", 1)
    knobs.choice("dtype", DTYPES)
    s.number("quality")
    s.number("latency_ms", 0)
    s.integer("kv_bytes", 0)


def write_profile(path, profile: Profile) -> Path:
    """Write `profile` as YAML, atomically; returns the path."""
    doc = profile.to_dict()
    Profile.from_dict(doc, path)  # what is written must read back
    return atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, width=100))


def read_profile(path) -> Profile:
    path = Path(path)
    if not path.exists():
        raise ProfileError(f"{path}: no such profile")
    if not path.is_file():  # a directory, or a pipe whose reading could wait for ever
        raise ProfileError(f"{path}: not a file, so not a profile")
    try:
        text = path.read_text()
    except OSError as e:  # unreadable: its rights, or the disk
        raise ProfileError(f"{path}: cannot read the profile ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not valid YAML ({e})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProfileError(f"{path}: not valid YAML ({first})") from None
    return Profile.from_dict(doc, path)


def portable_path(checkpoint) -> str:
    """How a profile records a checkpoint: `bundled:NAME` for a bundled member, else absolute."""
    from looptune.bundled import MODELS_DIR

    path = Path(checkpoint).resolve()
    if path.parent == MODELS_DIR.resolve():
        return BUNDLED + path.name
    return str(path)


def model_path(profile: Profile) -> Path:
    """The checkpoint directory a profile names, with `bundled:NAME` resolved."""
    from looptune.bundled import MODELS_DIR

    recorded = profile.model.path
    if recorded.startswith(BUNDLED):
        return MODELS_DIR / recorded.removeprefix(BUNDLED)
    return Path(recorded)


def check_model(profile: Profile, checkpoint, profile_path="profile") -> None:
    """Fail unless `checkpoint` has the content hash the profile was measured on."""
    from looptune.model.checkpoint import content_hash

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise ProfileError(
            f"{profile_path}: its model {checkpoint} is not there (moved or deleted?)"
        )
    expected = profile.model.content_hash
    actual = content_hash(checkpoint)
    if actual != expected:
        raise ProfileError(
            f"{profile_path}: measured on model {expected[:12]}, but {checkpoint} "
            f"is {actual[:12]}; rerun `looptune pareto` for this model"
        )

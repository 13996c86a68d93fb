"""`looptune pareto`: from a model family and budgets to one deployable setting.

`run_pareto(...)` is the Python API: it returns a `ParetoResult` (plain dataclasses, the
deployable `Profile` in it) and writes nothing unless given a path. Every measurement goes
through `profile`'s and `score`'s result caches, so a resumed or repeated study, or a second
worker on the same machine, measures nothing twice; quality is scored once per (member, window,
dtype) for every loop count of the space in one pass, and knobs that change only speed (compile)
never re-score it. What identifies a study is in `search/identity.py`; Optuna stays in
`search/study.py` and its helpers `trials.py` and `storage.py`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from looptune.errors import LooptuneError, NothingFitsError
from looptune.export.deployable import Profile
from looptune.search.choice import Budgets, Choice, Knobs, Outcome, choose, pareto_front
from looptune.search.identity import study_identity
from looptune.search.identity import study_name as default_study_name
from looptune.search.storage import redact
from looptune.search.study import Infeasible, Space, TrialReport, run_study
from looptune.search.trials import Failure

METRICS = {"tpot-p50": "tpot_ms_p50", "tpot-p90": "tpot_ms_p90"}


@dataclass
class Workload:
    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 32
    metric: str = "tpot-p50"
    quality_set: str = "code"
    limit: int | None = 16
    seed: int = 0
    device: str = "auto"
    min_time_s: float = 0.5  # per candidate: profile's stopping rule (both must be reached)
    min_repeats: int = 3

    def check(self) -> None:
        """Raise LooptuneError on a value no study can use (before any work)."""

        def positive(name, value, low=1):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise LooptuneError(f"{name} must be an integer >= {low}, got {value!r}")

        positive("batch", self.batch)
        positive("prompt_len", self.prompt_len)
        positive("gen_len", self.gen_len, 2)
        positive("min_repeats", self.min_repeats)
        if self.limit is not None:
            positive("limit", self.limit, 0)
        if self.metric not in METRICS:
            raise LooptuneError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not self.min_time_s >= 0:
            raise LooptuneError(f"min_time_s must be >= 0, got {self.min_time_s!r}")
        if self.quality_set == "humaneval":  # pass@1 is higher-is-better and runs code
            raise LooptuneError(
                "quality_set 'humaneval' (pass@1) cannot be a study objective; use 'humaneval-nll'"
            )


@dataclass
class Evaluator:
    """Turns knobs into an Outcome through the profile and score libraries, counting the
    measurements that were not already cached. `fresh` measures again instead of reading the
    caches."""

    space: Space
    work: Workload
    fresh: bool = False
    # new (uncached) measurements: latency candidates, and quality passes (one scores every R)
    measured: dict = field(default_factory=lambda: {"latency": 0, "quality_passes": 0})
    _quality: dict = field(default_factory=dict)

    def quality(self, knobs: Knobs):
        from looptune.quality.score import score_checkpoints

        key = (knobs.checkpoint, knobs.window, knobs.dtype)
        if key not in self._quality:
            # A pass is counted when the model ran (score reports progress only then): it also
            # scores the trained R, whose cache entry may be the one missing, and no requested
            # R then reads as uncached.
            ran = []
            scores = score_checkpoints(
                [knobs.checkpoint],
                loops=list(self.space.loops),
                windows=[knobs.window],
                sets=[self.work.quality_set],
                limit=self.work.limit,
                seed=self.work.seed,
                device=self.work.device,
                dtype=knobs.dtype,
                use_cache=not self.fresh,
                progress=lambda *_: ran.append(True),
            )
            self.measured["quality_passes"] += bool(ran)
            self._quality[key] = {s.loops: s for s in scores}
        return self._quality[key][knobs.loops]

    def latency(self, knobs: Knobs):
        from looptune.measure.latency import profile_candidates

        (m,) = profile_candidates(
            [knobs.checkpoint],
            loops=[knobs.loops],
            modes=None,
            batches=[self.work.batch],
            prompt_len=self.work.prompt_len,
            gen_len=self.work.gen_len,
            window=knobs.window,
            dtype=knobs.dtype,
            device=self.work.device,
            compile=knobs.compile,
            min_repeats=self.work.min_repeats,
            min_time_s=self.work.min_time_s,
            seed=self.work.seed,
            fresh=self.fresh,
        )
        if m.status not in ("ok", "infeasible"):  # Ctrl-C raises; never record a partial run
            raise LooptuneError(f"{m.label}: {m.status} ({m.error or 'no reason given'})")
        self.measured["latency"] += not m.cached
        return m

    def __call__(self, knobs: Knobs) -> Outcome:
        m = self.latency(knobs)
        if not m.feasible:
            raise Infeasible(m.error or "infeasible")
        s = self.quality(knobs)
        field_name = METRICS[self.work.metric]
        flags = getattr(m, "interference", None)
        return Outcome(
            knobs,
            quality=s.value,
            quality_ci=(s.ci95_low, s.ci95_high),
            latency_ms=getattr(m, field_name),
            latency_ci=tuple(getattr(m, f"{field_name}_ci95")),
            ttft_ms=m.ttft_ms,
            kv_bytes=m.kv_bytes,
            extra={
                "metric": s.metric,
                "tokens_per_s": m.tokens_per_s,
                "mode": m.mode,
                "environment": m.environment,
            },
            interference=", ".join(flags) if flags else None,
        )


@dataclass
class ParetoResult:
    outcomes: list[Outcome]
    front: list[Outcome]  # the Pareto set within the budgets (unconstrained when nothing fits)
    choice: Choice
    infeasible: list[dict]
    study_name: str
    storage: str
    trials: int
    grid_size: int
    measured: dict
    failed: list[Failure] = field(default_factory=list)  # settings not measured (see study.py)
    still_busy: bool = False  # this run measured again what was measured under load: so again
    profile: Profile | None = None  # the deployable profile of the choice
    profile_path: Path | None = None  # where it was written, if anywhere

    def under_load(self) -> dict:
        """How many of the outcomes were measured under interference, why, and whether this
        run found the machine still busy; the choice's own flag is on the choice."""
        flagged = [o for o in self.outcomes if o.interference]
        reasons = sorted({r for o in flagged for r in o.interference.split(", ")})
        best = self.choice.best
        return {
            "settings": len(flagged),
            "of": len(self.outcomes),
            "reasons": reasons,
            "choice": best.interference if best else None,
            "still_busy": self.still_busy,
        }

    def to_dict(self) -> dict:
        best, miss = self.choice.best, self.choice.nearest_miss
        return {
            "recommendation": best.to_dict() if best else None,
            "nearest_miss": miss.to_dict() if miss else None,
            "overshoot": self.choice.overshoot,
            "pareto_set": [o.to_dict() for o in self.front],
            "outcomes": [o.to_dict() for o in self.outcomes],
            "infeasible": self.infeasible,
            "failed": [f.to_dict() for f in self.failed],
            "measured_under_load": self.under_load(),
            "study": self.study_name,
            "storage": self.storage,
            "trials": self.trials,
            "grid_size": self.grid_size,
            "measurements": self.measured,
            "profile": str(self.profile_path) if self.profile_path else None,
        }


PROFILE_SUFFIXES = (".yaml", ".yml")
PLOT_SUFFIXES = (".png", ".html", ".htm")


def check_paths(out=None, plot=None, names=("out", "plot")) -> None:
    """Raise LooptuneError unless `out` and `plot` can be written (suffix, directory, rights);
    `names` says how the message calls them (the CLI passes its flags)."""
    from looptune.store import check_output_path

    if out is not None:
        check_output_path(out, PROFILE_SUFFIXES, names[0])
    if plot is not None:
        check_output_path(plot, PLOT_SUFFIXES, names[1])


def run_pareto(
    checkpoints: list[Path],
    budgets: Budgets,
    work: Workload | None = None,
    windows=None,
    loops=(1, 2, 3, 4),
    dtypes=None,
    compile_options=None,
    trials: int = 32,
    storage: str | None = None,
    study_name: str | None = None,
    out: Path | None = None,
    plot: Path | None = None,
    on_trial: Callable[[TrialReport], None] | None = None,
    evaluator=None,
    sampler_seed: int | None = None,
    fresh: bool = False,
    command: str = "",
) -> ParetoResult:
    """Run or resume the study; return the choice, the Pareto set and the profile (`profile`).

    Writes nothing unless given a path: `out` (the profile, when something fits), `plot` (.png
    or .html), `storage` (an Optuna storage URL; default: an SQLite file beside `out`, else
    memory). The study is named after what decides its numbers (`search/identity.py`) unless
    `study_name` is given; budgets only filter, so other budgets re-choose without measuring.
    `fresh` measures again (the stored study of that name is started over). `command` is
    recorded in the profile (the CLI passes its command line). `work.seed` seeds the quality
    subset and, unless `sampler_seed` is given, the sampler. Every argument is checked before
    any measurement."""
    from looptune.model.checkpoint import read_config, resolve_device

    work = work or Workload()
    if not isinstance(budgets, Budgets):
        raise LooptuneError(f"budgets must be a Budgets, got {type(budgets).__name__}")
    work.check()
    check_paths(out, plot)
    if not checkpoints:
        raise LooptuneError("checkpoints is empty")
    if not isinstance(trials, int) or trials < 1:
        raise LooptuneError(f"trials must be an integer >= 1, got {trials!r}")
    configs = [read_config(Path(c))[0] for c in checkpoints]  # fail early on a bad checkpoint
    device = resolve_device(work.device)
    if windows is None:
        trained = sorted({c.window for c in configs})
        windows = sorted(set(trained) | {max(w // 2, 1) for w in trained})
    dtypes = dtypes or (["bfloat16"] if device.type == "cuda" else ["float32"])
    compile_options = compile_options or ([False, True] if device.type == "cuda" else [False])
    for name, values in (("loops", loops), ("windows", windows)):
        if not values or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values
        ):
            raise LooptuneError(f"{name} must be integers >= 1, got {list(values)!r}")
    space = Space(
        tuple(str(c) for c in checkpoints),
        tuple(loops),
        tuple(windows),
        tuple(dtypes),
        tuple(compile_options),
    )
    if evaluator is None:
        from looptune.quality.sets import load_set

        load_set(work.quality_set, work.limit, work.seed)  # a bad set fails now, not in a trial
    identity = study_identity(checkpoints, work, space, device)
    study_name = study_name or default_study_name(identity)
    if storage is None and out is not None:
        storage = f"sqlite:///{Path(out).with_suffix('.db')}"
    if storage is not None and storage.startswith("sqlite:///"):
        try:
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LooptuneError(f"cannot open study storage {storage}: {e.strerror or e}") from None
    evaluate = evaluator or Evaluator(space, work, fresh=fresh)
    seed = work.seed if sampler_seed is None else sampler_seed
    record = run_study(
        space, evaluate, trials, storage, study_name, identity, seed, on_trial, fresh=fresh
    )
    outcomes = record.outcomes
    if not outcomes:
        why = [i["reason"] for i in record.infeasible] + [f.reason for f in record.failed]
        raise LooptuneError("no setting could be measured" + (f": {why[0]}" if why else ""))
    choice = choose(outcomes, budgets)
    # Budgets only filter: the set is recomputed from the stored outcomes with today's budgets.
    front = pareto_front([o for o in outcomes if budgets.fits(o)]) or pareto_front(outcomes)
    result = ParetoResult(
        outcomes,
        front,
        choice,
        record.infeasible,
        study_name,
        redact(storage),
        record.trials,
        space.size,
        getattr(evaluate, "measured", {}),
        record.failed,
        record.still_busy,
    )
    if choice.best is not None:
        result.profile = build_profile(
            result, budgets, work, configs, checkpoints, command or "run_pareto (Python API)"
        )
    problem = write_outputs(result, budgets, work, out, plot, ("out", "plot"))
    if problem:
        raise LooptuneError(problem)
    return result


def write_outputs(result, budgets, work, out=None, plot=None, names=("out", "plot")) -> str:
    """Write the profile (when something fits), then the plot. A write that fails (a full disk)
    does not stop the other; returns what failed in one line, "" when all went well."""
    from looptune.export.deployable import write_profile
    from looptune.search.plot import write_plot

    problems = []

    def attempt(name, path, write):
        try:
            return write()
        except OSError as e:
            problems.append(f"cannot write {name} {path}: {e.strerror or e}")

    if out is not None and result.profile is not None:
        result.profile_path = attempt(names[0], out, lambda: write_profile(out, result.profile))
    if plot is not None:
        quality = _quality_name(work)
        best = result.choice.best
        attempt(
            names[1],
            plot,
            lambda: write_plot(plot, result.outcomes, best, budgets, quality, work.metric),
        )
    if not problems:
        return ""
    return "; ".join(problems) + " (the study is kept: a rerun measures nothing)"


def _quality_name(work: Workload) -> str:
    return "bits_per_byte" if work.quality_set == "code" else f"{work.quality_set} score"


def build_profile(
    result: ParetoResult, budgets: Budgets, work: Workload, configs, checkpoints, command: str = ""
) -> Profile:
    """The deployable profile of the study's recommendation (which must exist); writes nothing."""
    from looptune.export import deployable as d
    from looptune.model.checkpoint import content_hash

    best = result.choice.best
    cfg = configs[[str(c) for c in checkpoints].index(best.knobs.checkpoint)]
    return d.Profile(
        model=d.ModelRef(
            d.portable_path(best.knobs.checkpoint),
            cfg.architecture,
            content_hash(best.knobs.checkpoint),
            cfg.num_loops,
            cfg.window,
        ),
        knobs=d.Setting(
            best.knobs.loops,
            cfg.mode,
            best.knobs.window,
            best.knobs.dtype,
            best.knobs.compile,
            work.batch,
            work.prompt_len,
            work.gen_len,
        ),
        objectives=d.Objectives(
            d.Quality(
                work.quality_set,
                best.extra.get("metric", "quality"),
                best.quality,
                tuple(best.quality_ci),
                work.limit,
                work.seed,
            ),
            d.Latency(METRICS[work.metric], best.latency_ms, tuple(best.latency_ci)),
            kv_bytes=int(best.kv_bytes),
            ttft_ms=best.ttft_ms,
            tokens_per_s=best.extra.get("tokens_per_s"),
        ),
        budgets=d.StudyBudgets(budgets.latency_ms, budgets.kv_mib, budgets.ttft_ms, work.metric),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        command=command,
        device=best.extra.get("environment", {}),
        pareto_set=[{k: v for k, v in o.to_dict().items() if k != "extra"} for o in result.front],
        study={
            "storage": result.storage,
            "name": result.study_name,
            "trials": result.trials,
            "grid_size": result.grid_size,
            "measurements": result.measured,
            # Latencies taken while the machine was busy are never to pass for clean ones.
            "measured_under_load": result.under_load(),
        },
    )


def nothing_fits_message(result: ParetoResult, budgets: Budgets) -> NothingFitsError:
    miss = result.choice.nearest_miss
    parts = ", ".join(f"{k} over by {v:.3g}" for k, v in result.choice.overshoot.items())
    return NothingFitsError(
        f"no setting fits the budgets; nearest miss: {Path(miss.knobs.checkpoint).name} "
        f"R={miss.knobs.loops} W={miss.knobs.window} {miss.knobs.dtype} at "
        f"{miss.latency_ms:.3f} ms, {miss.kv_bytes / 2**20:.3f} MiB KV ({parts})"
    )

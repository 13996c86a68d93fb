"""`looptune pareto`: from a model family and budgets to one deployable setting.

`run_pareto(...)` is the Python API. Every measurement goes through `profile`'s and `score`'s
result caches, so a resumed or repeated study, or a second worker on the same machine, measures
nothing twice; quality is scored once per (member, window, dtype) for every loop count of the
space in one pass, and knobs that change only speed (compile) never re-score it.
"""

from __future__ import annotations

import datetime as dt
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from looptune.errors import LooptuneError, NothingFitsError
from looptune.export.deployable import Profile
from looptune.search.choice import Budgets, Choice, Knobs, Outcome, choose, pareto_front
from looptune.search.study import Infeasible, Space, collect, redact, run_study

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


@dataclass
class Evaluator:
    """Turns knobs into an Outcome through the profile and score libraries, counting the
    measurements that were not already cached."""

    space: Space
    work: Workload
    # new (uncached) measurements: latency candidates, and quality passes (one scores every R)
    measured: dict = field(default_factory=lambda: {"latency": 0, "quality_passes": 0})
    _quality: dict = field(default_factory=dict)

    def quality(self, knobs: Knobs):
        from looptune.quality.score import score_checkpoints

        key = (knobs.checkpoint, knobs.window, knobs.dtype)
        if key not in self._quality:
            scores = score_checkpoints([knobs.checkpoint], loops=list(self.space.loops),
                                       windows=[knobs.window], sets=[self.work.quality_set],
                                       limit=self.work.limit, seed=self.work.seed,
                                       device=self.work.device, dtype=knobs.dtype)
            self.measured["quality_passes"] += any(not s.cached for s in scores)
            self._quality[key] = {s.loops: s for s in scores}
        return self._quality[key][knobs.loops]

    def latency(self, knobs: Knobs):
        from looptune.measure.latency import profile_candidates

        (m,) = profile_candidates([knobs.checkpoint], loops=[knobs.loops], modes=None,
                                  batches=[self.work.batch], prompt_len=self.work.prompt_len,
                                  gen_len=self.work.gen_len, window=knobs.window,
                                  dtype=knobs.dtype, device=self.work.device,
                                  compile=knobs.compile, min_repeats=self.work.min_repeats,
                                  min_time_s=self.work.min_time_s, seed=self.work.seed)
        self.measured["latency"] += not m.cached
        return m

    def __call__(self, knobs: Knobs) -> Outcome:
        m = self.latency(knobs)
        if not m.feasible:
            raise Infeasible(m.error or "infeasible")
        s = self.quality(knobs)
        field_name = METRICS[self.work.metric]
        return Outcome(knobs, quality=s.value, quality_ci=(s.ci95_low, s.ci95_high),
                       latency_ms=getattr(m, field_name),
                       latency_ci=tuple(getattr(m, f"{field_name}_ci95")),
                       ttft_ms=m.ttft_ms, kv_bytes=m.kv_bytes,
                       extra={"metric": s.metric, "tokens_per_s": m.tokens_per_s,
                              "mode": m.mode, "environment": m.environment})


@dataclass
class ParetoResult:
    outcomes: list[Outcome]
    front: list[Outcome]
    choice: Choice
    infeasible: list[dict]
    study_name: str
    storage: str
    trials: int
    grid_size: int
    measured: dict
    profile_path: Path | None = None

    def to_dict(self) -> dict:
        best, miss = self.choice.best, self.choice.nearest_miss
        return {"recommendation": best.to_dict() if best else None,
                "nearest_miss": miss.to_dict() if miss else None,
                "overshoot": self.choice.overshoot,
                "pareto_set": [o.to_dict() for o in self.front],
                "outcomes": [o.to_dict() for o in self.outcomes],
                "infeasible": self.infeasible, "study": self.study_name, "storage": self.storage,
                "trials": self.trials, "grid_size": self.grid_size,
                "measurements": self.measured,
                "profile": str(self.profile_path) if self.profile_path else None}


def run_pareto(checkpoints: list[Path], budgets: Budgets, work: Workload, windows=None,
               loops=(1, 2, 3, 4), dtypes=None, compile_options=None, trials: int = 32,
               storage: str | None = None, study_name: str | None = None,
               out: Path | None = None, plot: Path | None = None,
               on_trial: Callable | None = None, evaluator=None,
               sampler_seed: int | None = None) -> ParetoResult:
    """Run or resume the study and write the profile (when something fits) and the plot.

    `work.seed` seeds the quality subset and, unless `sampler_seed` is given, the sampler."""
    from looptune.model.checkpoint import read_config, resolve_device

    configs = [read_config(Path(c))[0] for c in checkpoints]  # fail early on a bad checkpoint
    on_gpu = resolve_device(work.device).type == "cuda"
    if windows is None:
        trained = sorted({c.window for c in configs})
        windows = sorted(set(trained) | {max(w // 2, 1) for w in trained})
    dtypes = dtypes or (["bfloat16"] if on_gpu else ["float32"])
    compile_options = compile_options or ([False, True] if on_gpu else [False])
    space = Space(tuple(str(c) for c in checkpoints), tuple(loops), tuple(windows), tuple(dtypes),
                  tuple(compile_options))
    out = Path(out) if out else Path("profiles") / "pareto.yaml"
    study_name = study_name or out.stem
    storage = storage or f"sqlite:///{out.with_suffix('.db')}"
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    evaluate = evaluator or Evaluator(space, work)
    seed = work.seed if sampler_seed is None else sampler_seed
    study = run_study(space, evaluate, budgets, trials, storage, study_name, seed, on_trial)
    outcomes, front, infeasible = collect(study)
    if not outcomes:
        raise LooptuneError("no setting could be measured" +
                            (f": {infeasible[0]['reason']}" if infeasible else ""))
    choice = choose(outcomes, budgets)
    if not front:  # nothing fits: show the unconstrained front instead
        front = pareto_front(outcomes)
    result = ParetoResult(outcomes, front, choice, infeasible, study_name, redact(storage),
                          len(study.trials), space.size, getattr(evaluate, "measured", {}))
    if plot:
        from looptune.search.plot import write_plot

        write_plot(plot, outcomes, front, choice.best, budgets, _quality_name(work),
                   work.metric)
    if choice.best is not None:
        from looptune.export.deployable import write_profile

        command = shlex.join(["looptune", *sys.argv[1:]]) if sys.argv else ""
        profile = build_profile(result, budgets, work, configs, checkpoints, command)
        result.profile_path = write_profile(out, profile)
    return result


def _quality_name(work: Workload) -> str:
    return "bits_per_byte" if work.quality_set == "code" else f"{work.quality_set} score"


def build_profile(result: ParetoResult, budgets: Budgets, work: Workload, configs, checkpoints,
                  command: str = "") -> Profile:
    """The deployable profile of the study's recommendation (which must exist); writes nothing."""
    from looptune.export import deployable as d
    from looptune.model.checkpoint import content_hash

    best = result.choice.best
    cfg = configs[[str(c) for c in checkpoints].index(best.knobs.checkpoint)]
    return d.Profile(
        model=d.ModelRef(d.portable_path(best.knobs.checkpoint), cfg.architecture,
                         content_hash(best.knobs.checkpoint), cfg.num_loops, cfg.window),
        knobs=d.Setting(best.knobs.loops, cfg.mode, best.knobs.window, best.knobs.dtype,
                        best.knobs.compile, work.batch, work.prompt_len, work.gen_len),
        objectives=d.Objectives(
            d.Quality(work.quality_set, best.extra.get("metric", "quality"), best.quality,
                      tuple(best.quality_ci), work.limit, work.seed),
            d.Latency(METRICS[work.metric], best.latency_ms, tuple(best.latency_ci)),
            kv_bytes=int(best.kv_bytes), ttft_ms=best.ttft_ms,
            tokens_per_s=best.extra.get("tokens_per_s")),
        budgets=d.StudyBudgets(budgets.latency_ms, budgets.kv_mib, budgets.ttft_ms, work.metric),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        command=command,
        device=best.extra.get("environment", {}),
        pareto_set=[{k: v for k, v in o.to_dict().items() if k != "extra"} for o in result.front],
        study={"storage": result.storage, "name": result.study_name, "trials": result.trials,
               "grid_size": result.grid_size, "measurements": result.measured})


def nothing_fits_message(result: ParetoResult, budgets: Budgets) -> NothingFitsError:
    miss = result.choice.nearest_miss
    parts = ", ".join(f"{k} over by {v:.3g}" for k, v in result.choice.overshoot.items())
    return NothingFitsError(
        f"no setting fits the budgets; nearest miss: {Path(miss.knobs.checkpoint).name} "
        f"R={miss.knobs.loops} W={miss.knobs.window} {miss.knobs.dtype} at "
        f"{miss.latency_ms:.3f} ms, {miss.kv_bytes / 2**20:.3f} MiB KV ({parts})")

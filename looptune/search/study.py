"""The one module that owns Optuna: the multi-objective study over the inference knobs.

- Objectives (all minimised): quality (e.g. bits per byte), per-token latency, KV bytes.
- Budgets are Optuna 5 constraints, set in the objective with `trial.set_constraint`
  (value - budget, feasible when <= 0); `study.best_trials` then is the feasible Pareto set.
- The space is a finite grid. When it fits in `--trials` a `GridSampler` covers all of it;
  otherwise the loop axis is still covered exhaustively (trials are enqueued round-robin over the
  loop counts) and TPE samples the other knobs.
- Storage is any URL Optuna's RDBStorage takes (an SQLite file by default). Several workers
  running the same command against one storage and study name share the work: whichever
  creates the study enqueues the plan (creation is atomic in the database), all of them stop
  when the study has its trials, and heartbeats turn a killed worker's trial into a retry.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from looptune.errors import LooptuneError
from looptune.search.choice import Budgets, Knobs, Outcome

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial it runs


@dataclass(frozen=True)
class Space:
    checkpoints: tuple[str, ...]
    loops: tuple[int, ...]
    windows: tuple[int, ...]
    dtypes: tuple[str, ...]
    compile: tuple[bool, ...] = (False,)

    def grid(self) -> dict[str, list]:
        return {"checkpoint": list(self.checkpoints), "loops": list(self.loops),
                "window": list(self.windows), "dtype": list(self.dtypes),
                "compile": list(self.compile)}

    @property
    def size(self) -> int:
        return len(list(itertools.product(*self.grid().values())))


class Infeasible(Exception):
    """A setting that cannot run (out of memory, context too long): a pruned trial."""


def open_storage(url: str, attempts: int = 5) -> RDBStorage:
    """RDBStorage with heartbeats: a killed worker's trial is failed and retried by the others."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=2, grace_period=10,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                      max_retry=2))
        except Exception as e:  # sqlalchemy raises many kinds for a bad URL or a dead server
            # Workers starting together race to create the tables; the loser just retries.
            racing = any(m in str(e) for m in ("already exists", "UNIQUE constraint", "duplicate key"))
            if racing and attempt + 1 < attempts:
                time.sleep(0.5 * (attempt + 1))
                continue
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LooptuneError(f"cannot open study storage {redact(url)}: {first}") from None


def redact(url: str) -> str:
    """The storage URL without its password, for profiles and messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_study(storage: RDBStorage, name: str, space: Space, trials: int, seed: int):
    """Create the study and enqueue its plan, or join it if another worker made it."""
    grid_mode = space.size <= trials
    sampler = (optuna.samplers.GridSampler(space.grid(), seed=seed) if grid_mode
               else optuna.samplers.TPESampler(seed=seed, multivariate=True))
    directions = ["minimize"] * 3
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                    directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        _check_same_space(study, space, trials)
        return study
    study.set_user_attr("space", space.grid())
    study.set_user_attr("trials", trials)
    if not grid_mode:
        for i in range(trials):  # the loop axis is small: cover it round-robin
            study.enqueue_trial({"loops": space.loops[i % len(space.loops)]})
    return study


def _check_same_space(study, space: Space, trials: int):
    stored = study.user_attrs.get("space")
    if stored is not None and stored != space.grid():
        raise LooptuneError(f"study {study.study_name!r} already exists with another search space "
                            f"({stored}); pick a new --study name or the same arguments")


def trial_outcome(trial) -> Outcome:
    return Outcome.from_dict(trial.user_attrs["outcome"])


def run_study(space: Space, evaluate: Callable[[Knobs], Outcome], budgets: Budgets,
              trials: int, storage_url: str, name: str, seed: int = 0,
              on_trial: Callable | None = None):
    """Run (or resume, or join) the study until it has measured `trials` distinct settings (the
    whole grid when that is smaller). Returns the study; `collect` reads the outcomes back."""
    optuna.logging.set_verbosity(logging.WARNING)
    storage = open_storage(storage_url)
    study = open_study(storage, name, space, trials, seed)
    target = min(trials, space.size)
    grid = space.grid()

    def tried() -> set[tuple]:
        """Settings already measured in this study (by any worker), infeasible ones included."""
        done = study.get_trials(deepcopy=False, states=DONE)
        return {tuple(sorted(t.params.items())) for t in done if not t.user_attrs.get("repeat")}

    def objective(trial: optuna.Trial):
        params = {k: trial.suggest_categorical(k, v) for k, v in grid.items()}
        trial.set_user_attr("worker", WORKER)
        if tuple(sorted(params.items())) in tried():
            # A sampler may propose a setting twice; a repeat costs nothing and is not counted.
            trial.set_user_attr("repeat", True)
            raise optuna.TrialPruned("repeat of a measured setting")
        knobs = Knobs(**params)
        try:
            outcome = evaluate(knobs)
        except Infeasible as e:
            trial.set_user_attr("infeasible", str(e))
            raise optuna.TrialPruned(str(e)) from None
        outcome.trial = trial.number
        trial.set_user_attr("outcome", outcome.to_dict())
        for key, value in budgets.overshoot(outcome).items():
            trial.set_constraint(key, value)
        return outcome.values

    def stop_when_measured(study, trial):
        if on_trial:
            on_trial(trial)
        if len(tried()) >= target:
            study.stop()

    if len(tried()) < target:
        # Repeats are skipped cheaply, so allow many more attempts than distinct settings.
        study.optimize(objective, n_trials=max(10 * target, 50), callbacks=[stop_when_measured],
                       catch=())
    return study


def collect(study) -> tuple[list[Outcome], list[Outcome], list[dict]]:
    """(every measured outcome, the feasible Pareto set as Optuna computes it, infeasible trials).
    Repeated settings (a retried or duplicated trial) count once."""
    seen, outcomes = set(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        o = trial_outcome(t)
        if o.knobs not in seen:
            seen.add(o.knobs)
            outcomes.append(o)
    front, front_seen = [], set()
    for t in study.best_trials:
        o = trial_outcome(t)
        if o.knobs not in front_seen:
            front_seen.add(o.knobs)
            front.append(o)
    pruned = [{"params": t.params, "reason": t.user_attrs.get("infeasible", "")}
              for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
              if not t.user_attrs.get("repeat")]
    return outcomes, front, pruned

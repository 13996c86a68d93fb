"""The one module that owns Optuna: the multi-objective study over the inference knobs.

Nothing Optuna-shaped leaves this module: `run_study` returns a `StudyRecord` of plain
dataclasses, and `on_trial` receives a `TrialReport` per finished trial.

- Objectives (all minimised): quality (e.g. bits per byte), per-token latency, KV bytes. Budgets
  are not part of the study: the caller picks the Pareto set and the choice from the stored
  outcomes with the budgets of the day, so changing a budget re-chooses without measuring.
- The space is a finite grid. When it fits in `trials` every setting is enqueued (the plan);
  otherwise the loop axis is still covered exhaustively (trials are enqueued round-robin over the
  loop counts) and TPE samples the other knobs. No GridSampler: it counts a failed trial as
  visited, so a setting interrupted once would be lost for good.
- A setting whose trial failed (interrupted, crashed, its worker killed) is enqueued again by the
  next run, up to MAX_ATTEMPTS attempts; the reason of each failure is kept on its trial and a
  setting that used up its attempts is reported, never dropped silently.
- Storage is any URL Optuna's RDBStorage takes, or None for memory. Several workers running the
  same command against one storage and study name share the work: whichever creates the study
  enqueues the plan (creation is atomic in the database), the others take trials from the queue,
  and a killed worker's trial is failed by its missing heartbeat and retried.
- The study's identity (what decides its numbers) is stored with it; opening a study of the
  same name for another identity is refused with what changed (`identity.describe_change`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.storages import InMemoryStorage, RDBStorage
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from looptune.errors import Interrupted, LooptuneError
from looptune.search.choice import Knobs, Outcome
from looptune.search.identity import describe_change, plain

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial it runs
MAX_ATTEMPTS = 3  # failed trials of one setting before the study gives it up
POLL_S = 0.5  # while the last settings are measured by other workers


@dataclass(frozen=True)
class Space:
    checkpoints: tuple[str, ...]
    loops: tuple[int, ...]
    windows: tuple[int, ...]
    dtypes: tuple[str, ...]
    compile: tuple[bool, ...] = (False,)

    def grid(self) -> dict[str, list]:
        return {
            "checkpoint": list(self.checkpoints),
            "loops": list(self.loops),
            "window": list(self.windows),
            "dtype": list(self.dtypes),
            "compile": list(self.compile),
        }

    def settings(self) -> list[Knobs]:
        grid = self.grid()
        return [Knobs(**dict(zip(grid, values))) for values in itertools.product(*grid.values())]

    @property
    def size(self) -> int:
        return len(self.settings())


class Infeasible(Exception):
    """A setting that cannot run (out of memory, context too long): a pruned trial."""


@dataclass(frozen=True)
class TrialReport:
    """One finished trial, for progress output."""

    number: int
    knobs: Knobs
    state: str  # "measured", "infeasible" or "repeat" (a setting measured already)
    detail: str  # the outcome in a few words, or why it was infeasible
    measured: int  # distinct settings the study holds now (measured or infeasible)
    target: int  # distinct settings it needs


@dataclass(frozen=True)
class Failure:
    """A setting not measured yet because its trials failed; retried while attempts remain."""

    knobs: Knobs
    attempts: int
    reason: str  # of the last failure
    gave_up: bool  # MAX_ATTEMPTS used: it will not be retried

    def to_dict(self) -> dict:
        return {
            "knobs": vars(self.knobs).copy(),
            "attempts": self.attempts,
            "reason": self.reason,
            "gave_up": self.gave_up,
        }


@dataclass
class StudyRecord:
    """What a study holds, read back as plain data."""

    name: str
    outcomes: list[Outcome]  # one per measured setting
    infeasible: list[dict]  # {"knobs", "reason"} of settings that cannot run
    failed: list[Failure] = field(default_factory=list)
    trials: int = 0  # trials in the storage, repeats and failures included


def open_storage(url: str | None, attempts: int = 5):
    """Memory for None; else RDBStorage with heartbeats, so a killed worker's trial is failed."""
    if url is None:
        return InMemoryStorage()
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=2, grace_period=10)
        except (SQLAlchemyError, ValueError, ImportError, OSError) as e:  # bad URL, dead server
            # Workers starting together race to create the tables; the loser just retries.
            racing = any(
                m in str(e) for m in ("already exists", "UNIQUE constraint", "duplicate key")
            )
            if racing and attempt + 1 < attempts:
                time.sleep(0.5 * (attempt + 1))
                continue
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LooptuneError(f"cannot open study storage {redact(url)}: {first}") from None


def redact(url: str | None) -> str:
    """The storage URL without its password, for profiles and messages ("memory" for None)."""
    if url is None:
        return "memory"
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return url


def _sampler(space: Space, trials: int, seed: int):
    # In grid mode every trial is enqueued, so the sampler is never asked.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def open_study(
    storage, name: str, space: Space, trials: int, seed: int, identity: dict, fresh: bool = False
):
    """Create the study and enqueue its plan, or join it if another worker made it."""
    sampler = _sampler(space, trials, seed)
    if fresh:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=storage)
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, sampler=sampler, directions=["minimize"] * 3
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        for _ in range(20):  # the worker that created it may not have stored its identity yet
            stored = study.user_attrs.get("identity")
            if stored is not None:
                break
            time.sleep(0.25)
        if stored is None:
            raise LooptuneError(
                f"study {name!r} in this storage was not made by this version of "
                f"looptune; give another study name"
            ) from None
        change = describe_change(stored, plain(identity))
        if change:
            raise LooptuneError(
                f"study {name!r} was measured for another question ({change}); "
                f"give another study name, or none to have one named after "
                f"the settings"
            ) from None
        return study
    if space.size <= trials:
        for knobs in space.settings():
            study.enqueue_trial(vars(knobs).copy())
        study.set_user_attr("planned", "grid")
    else:
        for i in range(trials):  # the loop axis is small: cover it round-robin
            study.enqueue_trial({"loops": space.loops[i % len(space.loops)]})
    study.set_user_attr("identity", plain(identity))  # last: joiners wait for it, plan complete
    return study


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna logs every failed trial with its traceback (55 lines for a Ctrl-C); we report
    failures ourselves."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


@dataclass
class _State:
    """The study's trials, by setting."""

    done: dict  # Knobs -> FrozenTrial (measured or infeasible)
    queued: set  # Knobs or partial-params tuples of WAITING trials
    running: dict  # Knobs (or partial params) -> FrozenTrial
    failures: dict  # Knobs -> [reason, ...] of its FAIL trials, oldest first
    flagged: dict  # Knobs -> its complete trials measured under interference


def _knobs(params: dict) -> Knobs | None:
    try:
        return Knobs(**params)
    except TypeError:  # a partial plan entry ({"loops": r}) until the sampler fills it in
        return None


def _read(study) -> _State:
    s = _State({}, set(), {}, {}, {})
    for t in study.get_trials(deepcopy=False):
        # A queued setting's knobs are its fixed params until the trial suggests them (a trial
        # interrupted before it did has only those).
        params = {**t.system_attrs.get("fixed_params", {}), **t.params}
        if t.state in (TrialState.WAITING, TrialState.RUNNING):
            key = _knobs(params) or tuple(sorted(params.items()))
            if t.state == TrialState.WAITING:
                s.queued.add(key)
            else:
                s.running[key] = t
        elif (k := _knobs(params)) is None:
            continue
        elif t.state == TrialState.FAIL:
            reason = t.user_attrs.get("failure", "its worker stopped (no heartbeat)")
            s.failures.setdefault(k, []).append(reason)
        elif not t.user_attrs.get("repeat"):
            if _flagged(t):
                s.flagged.setdefault(k, []).append(t)
            if k not in s.done or _flagged(s.done[k]):  # a clean measurement wins, else the last
                s.done[k] = t
    return s


def _flagged(t) -> bool:
    """A measurement taken under interference (see looptune.measure.interference)."""
    return t.state == TrialState.COMPLETE and bool(t.user_attrs["outcome"].get("interference"))


def run_study(
    space: Space,
    evaluate: Callable[[Knobs], Outcome],
    trials: int,
    storage_url: str | None,
    name: str,
    identity: dict | None = None,
    seed: int = 0,
    on_trial: Callable[[TrialReport], None] | None = None,
    fresh: bool = False,
) -> StudyRecord:
    """Run (or resume, or join) the study until it holds `trials` distinct settings (the whole
    grid when that is smaller), then read it back. `evaluate` raises `Infeasible` for a setting
    that cannot run; any other exception (KeyboardInterrupt included) fails the trial, keeps its
    reason for the next run's retry, and propagates. `fresh` deletes a stored study of this
    name first."""
    identity = identity if identity is not None else {"space": space.grid()}
    storage = open_storage(storage_url)
    with _quiet_optuna():
        study = open_study(storage, name, space, trials, seed, identity, fresh)
        heartbeat = isinstance(storage, RDBStorage)
        target = min(trials, space.size)
        try:
            _Worker(study, space, evaluate, target, on_trial, heartbeat).run()
            return collect(study)
        except KeyboardInterrupt:  # say what is kept, not what one measurement had done
            raise Interrupted(_kept(study, target)) from None
        except Exception as e:
            cause = _storage_error(e)
            if cause is None:
                raise
            raise LooptuneError(
                f"the study storage failed: {cause}; what was measured is cached and kept, "
                "a rerun resumes"
            ) from None


def _storage_error(e: BaseException | None) -> str | None:
    """The first line of the database error behind `e` (a full disk, a server gone), which
    Optuna may hide behind its own errors; None when `e` is not one."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        if isinstance(e, SQLAlchemyError):
            return str(e).strip().splitlines()[0]
        e = e.__cause__ or e.__context__
    storage = [x for x in seen if isinstance(x, optuna.exceptions.StorageInternalError)]
    return _one_line(storage[0]) if storage else None


def _kept(study, target: int) -> str:
    try:
        done = len(_read(study).done)
    except (SQLAlchemyError, OSError):  # the storage went away too: the rerun will know
        return "a rerun measures what is missing"
    return f"{done} of {target} settings measured and kept; a rerun measures the rest"


class _Worker:
    """One process's share of a study: plan what is missing, measure one trial at a time."""

    def __init__(self, study, space, evaluate, target, on_trial, heartbeat: bool):
        self.study, self.space, self.evaluate = study, space, evaluate
        self.target, self.on_trial, self.heartbeat = target, on_trial, heartbeat
        self.run_id = uuid.uuid4().hex  # this call's trials: flagged ones are redone once a run
        # A study made to be sampled that is now to cover its grid (a larger `trials`).
        self.unplanned = target == space.size and study.user_attrs.get("planned") != "grid"
        self.report: TrialReport | None = None

    def run(self):
        attempts = 10 * self.target + 50  # bounds a sampler that keeps repeating itself
        while attempts > 0 and (state := self._plan()) is not None:
            planned = len(state.done) + len(state.running) + len(state.queued)
            if not state.queued and (planned >= self.target or self.target == self.space.size):
                if not state.running:
                    return  # nothing left to try: the rest gave up (reported by collect)
                time.sleep(POLL_S)  # other workers are measuring the last settings
                continue
            attempts -= 1
            self._one_trial()

    def _plan(self) -> _State | None:
        """Queue the retries of failed settings and the re-measurements of flagged ones; None
        when the study is complete."""
        study = self.study
        if self.heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        state = _read(study)
        if not self.heartbeat and state.running:  # memory: a running trial is an abandoned one
            for t in state.running.values():
                study._storage.set_trial_user_attr(t._trial_id, "failure", "interrupted")
                study.tell(t.number, state=TrialState.FAIL)
            state = _read(study)
        busy = state.queued | set(state.running)
        for knobs in self.space.settings() if self.unplanned else list(state.failures):
            tried = len(state.failures.get(knobs, []))
            if knobs not in state.done and knobs not in busy and tried < MAX_ATTEMPTS:
                study.enqueue_trial(vars(knobs).copy(), user_attrs={"attempt": tried + 1})
                state.queued.add(knobs)
        redo = {
            k
            for k, ts in state.flagged.items()
            if _flagged(state.done[k])
            and len(ts) < MAX_ATTEMPTS
            and all(t.user_attrs.get("run") != self.run_id for t in ts)
        }
        for knobs in redo - busy - state.queued:
            study.enqueue_trial(
                vars(knobs).copy(), user_attrs={"remeasure": True, "run": self.run_id}
            )
            state.queued.add(knobs)
        if len(state.done) >= self.target and not redo & (state.queued | set(state.running)):
            return None
        return state

    def _one_trial(self):
        self.report = None
        try:
            self.study.optimize(self._objective, n_trials=1, catch=())
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as e:
            # Two workers popped one queued trial (SQLite cannot lock the row) and the other
            # finished it first: its result stands, and this worker goes on.
            if isinstance(e, ValueError) and not str(e).startswith("Cannot tell a"):
                raise
            return
        if self.on_trial and self.report:
            measured = len(_read(self.study).done)
            self.on_trial(dataclasses.replace(self.report, measured=measured))

    def _objective(self, trial: optuna.Trial):
        knobs = Knobs(**{k: trial.suggest_categorical(k, v) for k, v in self.space.grid().items()})
        trial.set_user_attr("worker", WORKER)
        trial.set_user_attr("run", self.run_id)

        def report(state, detail=""):
            self.report = TrialReport(trial.number, knobs, state, detail, 0, self.target)

        if knobs in _read(self.study).done and not trial.user_attrs.get("remeasure"):
            # A sampler may propose a setting twice; a repeat costs nothing and is not counted.
            trial.set_user_attr("repeat", True)
            report("repeat")
            raise optuna.TrialPruned("repeat of a measured setting")
        try:
            outcome = self.evaluate(knobs)
        except Infeasible as e:
            trial.set_user_attr("infeasible", str(e))
            report("infeasible", str(e))
            raise optuna.TrialPruned(str(e)) from None
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM (the CLI turns it into one line, 130)
            trial.set_user_attr("failure", "interrupted")
            raise
        except BaseException as e:
            trial.set_user_attr("failure", _one_line(e))
            raise
        outcome.trial = trial.number
        trial.set_user_attr("outcome", outcome.to_dict())
        report("measured", f"quality {outcome.quality:.4f}, {outcome.latency_ms:.3f} ms")
        return outcome.values


def collect(study) -> StudyRecord:
    """Every measured outcome (a setting measured twice, by a race of workers, counts once),
    the infeasible settings, and the settings whose trials failed."""
    state = _read(study)
    outcomes, infeasible = [], []
    for knobs, t in state.done.items():
        if t.state == TrialState.COMPLETE:
            outcomes.append(Outcome.from_dict(t.user_attrs["outcome"]))
        else:
            infeasible.append(
                {"knobs": vars(knobs).copy(), "reason": t.user_attrs.get("infeasible", "")}
            )
    failed = [
        Failure(k, len(r), r[-1], len(r) >= MAX_ATTEMPTS)
        for k, r in state.failures.items()
        if k not in state.done and k not in state.running
    ]
    return StudyRecord(
        study.study_name, outcomes, infeasible, failed, len(study.get_trials(deepcopy=False))
    )

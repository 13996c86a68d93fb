"""The study runner: the multi-objective Optuna study over the inference knobs.

Optuna stays inside this module and its two helpers, `trials.py` (the trials read back as plain
data, the retry queue) and `storage.py` (opening the storage, naming its failures): `run_study`
returns a `StudyRecord` of plain dataclasses, and `on_trial` receives a `TrialReport` per
finished trial.

- Objectives (all minimised): quality (e.g. bits per byte), per-token latency, KV bytes. Budgets
  are not part of the study: the caller picks the Pareto set and the choice from the stored
  outcomes with the budgets of the day, so changing a budget re-chooses without measuring.
- The space is a finite grid. When it fits in `trials` every setting is enqueued (the plan);
  otherwise the loop axis is still covered exhaustively (trials are enqueued round-robin over the
  loop counts) and TPE samples the other knobs. No GridSampler: it counts a failed trial as
  visited, so a setting interrupted once would be lost for good. Failed settings are retried
  (`trials.py`).
- Several workers running the same command against one storage and study name share the work:
  whichever creates the study enqueues the plan (creation is atomic in the database), the others
  take trials from the queue, and a killed worker's trial is failed and retried. A plan its
  creator did not finish (interrupted, killed) is finished by the next worker, each entry once.
- The study's identity (what decides its numbers) is stored with it; opening a study of the
  same name for another identity is refused with what changed (`identity.describe_change`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.storages import RDBStorage
from sqlalchemy.exc import SQLAlchemyError

from looptune.errors import Interrupted, LooptuneError
from looptune.search.choice import Knobs, Outcome
from looptune.search.identity import describe_change, plain
from looptune.search.storage import (
    claim,
    one_line,
    open_storage,
    replaced,
    storage_failure,
)
from looptune.search.trials import (
    INTERRUPTED,
    StudyRecord,
    collect,
    enqueue_once,
    fail_abandoned,
    fill_key,
    mark_worker,
    measured_earlier,
    plan,
    read_state,
    running_here,
)

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

    number: int  # -1 for "waiting"
    knobs: Knobs | None  # None for "waiting"
    state: str  # "measured", "infeasible", "repeat" (a setting measured already) or "waiting"
    detail: str  # the outcome in a few words, or why it was infeasible
    measured: int  # distinct settings the study holds now (measured or infeasible)
    target: int  # distinct settings it needs


def _sampler(space: Space, trials: int, seed: int):
    # In grid mode every trial is enqueued, so the sampler is never asked.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def open_study(
    storage, name: str, space: Space, trials: int, seed: int, identity: dict, fresh: bool = False
):
    """Create the study and enqueue its plan, or join it if another worker made it. The identity
    is stored first and every plan entry is claimed (`storage.claim`), so a plan that its
    creator did not finish (interrupted, killed) is finished by the next worker, once."""
    sampler = _sampler(space, trials, seed)
    if fresh:
        _start_over(storage, name, sampler)
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, sampler=sampler, directions=["minimize"] * 3
        )
        study.set_user_attr("instance", uuid.uuid4().hex)  # tells it from a study made again
        study.set_user_attr("identity", plain(identity))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        change = describe_change(_stored_identity(study, identity), plain(identity))
        if change:
            raise LooptuneError(
                f"study {name!r} was measured for another question ({change}); "
                f"give another study name, or none to have one named after "
                f"the settings"
            ) from None
    attrs = study.user_attrs
    # A plan not marked done is finished; but a study of an earlier looptune (no "instance")
    # marked only a grid plan, and its sampled plan is done once it has trials.
    if attrs.get("planned") is None and (attrs.get("instance") or not study.get_trials()):
        _enqueue_plan(study, space, trials)
    return study


def _start_over(storage, name: str, sampler) -> None:
    """Delete the stored study `name`, unless another worker is measuring in it (deleting it
    from under that worker would end it with an error, and its results in the new study)."""
    try:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
    except KeyError:
        return
    fail_abandoned(study, isinstance(storage, RDBStorage))
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:
        who = running[0].user_attrs.get("worker", "unknown")
        raise LooptuneError(
            f"study {name!r} is being measured by another worker ({who}); fresh would start it "
            "over under it: wait for it to end, or stop it first"
        )
    optuna.delete_study(study_name=name, storage=storage)


def _stored_identity(study, identity: dict) -> dict:
    """The identity stored with `study`. A study left without one (its creator stopped right
    after creating it) and without trials is taken over; one with trials and none was made
    by another program."""
    for attempt in range(41):  # the worker creating it may not have stored its identity yet
        stored = study.user_attrs.get("identity")
        if stored is not None:
            return stored
        taken = attempt % 20 == 19 and not study.get_trials(deepcopy=False)
        if taken and claim(study, "looptune:identity", plain(identity)):
            study.set_user_attr("identity", plain(identity))
            return plain(identity)
        time.sleep(0.25)
    raise LooptuneError(
        f"study {study.study_name!r} in this storage was not made by this version of "
        f"looptune; give another study name"
    )


def _enqueue_plan(study, space: Space, trials: int) -> None:
    """Enqueue every setting (the grid fits in `trials`), or `trials` entries that cover the
    loop axis round-robin while the sampler picks the other knobs; each entry once."""
    if space.size <= trials:
        for knobs in space.settings():
            enqueue_once(study, vars(knobs).copy(), fill_key(knobs))
    else:
        for i in range(trials):  # the loop axis is small: cover it round-robin
            enqueue_once(study, {"loops": space.loops[i % len(space.loops)]}, f"plan:{i}")
    study.set_user_attr("planned", "grid" if space.size <= trials else "sampled")


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
    that cannot run; any other exception fails the trial, keeps its reason for the next run's
    retry (one of MAX_ATTEMPTS), and propagates. A KeyboardInterrupt (Ctrl-C, SIGTERM) fails it
    as interrupted, which is no attempt, and is raised as `Interrupted`. A storage that fails or
    holds damaged data is one LooptuneError. `fresh` deletes a stored study of this name first."""
    identity = identity if identity is not None else {"space": space.grid()}
    storage = open_storage(storage_url)
    study = None
    with _quiet_optuna():
        try:
            study = open_study(storage, name, space, trials, seed, identity, fresh)
            instance = study.user_attrs.get("instance")
            target = min(trials, space.size)
            worker = _Worker(
                study, space, evaluate, target, on_trial, isinstance(storage, RDBStorage)
            )
            try:
                with worker.interrupts:
                    worker.run()
                return dataclasses.replace(collect(study), still_busy=worker.still_busy)
            except KeyboardInterrupt:  # say what is kept, not what one measurement had done
                _fail_interrupted(study, worker.trial)
                raise Interrupted(_kept(study, target)) from None
        except LooptuneError:
            raise
        except Exception as e:
            failure = storage_failure(e)
            if failure is None and study is not None and replaced(study, instance):
                failure = _started_over(name)
            if failure is None:
                raise
            raise failure from None


def _started_over(name: str) -> LooptuneError:
    return LooptuneError(
        f"study {name!r} was deleted or started over (fresh) by another process while this "
        "one measured; what it measured is cached: run it again"
    )


def _fail_interrupted(study, trial) -> None:
    """Fail this worker's trial as interrupted if the interrupt left it running (it came while
    Optuna stored the trial, not while it was measured): an interrupt is never an attempt."""
    if trial is None:
        return
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, SQLAlchemyError):
        if study._storage.get_trial(trial._trial_id).state != optuna.trial.TrialState.RUNNING:
            return
        study._storage.set_trial_user_attr(trial._trial_id, "failure", INTERRUPTED)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def _kept(study, target: int) -> str:
    try:
        done = len(read_state(study).done)
    except (SQLAlchemyError, OSError, ValueError):  # the storage failed too: a rerun will say
        return "a rerun measures what is missing"
    return f"{done} of {target} settings measured and kept; a rerun measures the rest"


def _interrupt_behind(e: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the exceptions that led to `e`."""
    seen = []
    while e is not None and e not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.append(e)
        e = e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__
    return False


class _Interrupts:
    """Counts the Ctrl-Cs and SIGTERMs that come while a study runs, calling the handlers in
    place, so a trial whose interrupt a library turned into an error of its own (safetensors'
    get_tensor makes a ValueError of it) is still known to be interrupted, not failed."""

    def __init__(self):
        self.count = 0
        self.handlers = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(sig)
                if callable(handler):  # Python's (KeyboardInterrupt) or the CLI's; not SIG_DFL
                    self.handlers[sig] = handler
                    signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        self.count += 1
        return self.handlers[signum](signum, frame)

    def __exit__(self, *exc):
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        self.handlers = {}


class _Worker:
    """One process's share of a study: plan what is missing, measure one trial at a time."""

    def __init__(self, study, space, evaluate, target, on_trial, heartbeat: bool):
        self.study, self.space, self.evaluate = study, space, evaluate
        self.target, self.on_trial, self.heartbeat = target, on_trial, heartbeat
        self.run_id = uuid.uuid4().hex  # this call's trials (see `trials.running_here`)
        self.earlier: set[int] | None = None  # trials of finished workers, when this run began
        # A grid study's plan queues every setting missing from it: one sampled before that now
        # covers its grid (a larger `trials`), or whose plan entry a worker on another machine
        # claimed and stopped before it queued (taken over once the claim is old: `trials`).
        self.fills = target == space.size
        self.instance = study.user_attrs.get("instance")
        self.report: TrialReport | None = None
        self.trial: optuna.Trial | None = None  # the trial this worker measures now
        self.interrupts = _Interrupts()
        # Whether this run's latest measurement was taken under interference (None: none yet),
        # and whether a re-measurement of one so taken was too: the machine stays busy.
        self.busy: bool | None = None
        self.still_busy = False

    def run(self):
        attempts = 10 * self.target + 50  # bounds a sampler that keeps repeating itself
        waiting_for = 0  # settings other workers hold, as last reported
        with running_here(self.run_id):
            while attempts > 0 and (state := self._plan()) is not None:
                planned = len(state.done) + len(state.running) + len(state.queued)
                if not state.queued and (planned >= self.target or self.target == self.space.size):
                    if not state.running:
                        return  # nothing left to try: the rest gave up (reported by collect)
                    if len(state.running) != waiting_for and self.on_trial:  # not a silent wait
                        waiting_for = len(state.running)
                        self.on_trial(self._waiting(state))
                    time.sleep(POLL_S)  # other workers are measuring the last settings
                    continue
                attempts -= 1
                self._one_trial()

    def _waiting(self, state) -> TrialReport:
        n = len(state.running)
        detail = f"{n} setting{'s' if n > 1 else ''} being measured by other workers"
        return TrialReport(-1, None, "waiting", detail, len(state.done), self.target)

    def _plan(self):
        """Fail the trials of workers that are gone, queue what is missing (`trials.plan`);
        None when the study is complete."""
        if replaced(self.study, self.instance):  # its trial numbers are another study's now
            raise _started_over(self.study.study_name)
        fail_abandoned(self.study, self.heartbeat)
        settings = self.space.settings() if self.fills else None
        if self.earlier is None:
            self.earlier = measured_earlier(self.study)
        # Re-measure what earlier runs measured under load only while it helps: one first,
        # the rest once a measurement of this run came out clean, none while they come out
        # flagged (the machine is still busy: each would be flagged again, at full cost).
        remeasure = {None: 1, False: None, True: 0}[self.busy]
        return plan(self.study, settings, self.target, self.earlier, remeasure)

    def _one_trial(self):
        self.report = None
        try:
            self.study.optimize(self._objective, n_trials=1, catch=())
        except Exception as e:
            if _interrupt_behind(e):
                # A Ctrl-C while Optuna stored the trial: Optuna 5.0's `_run_trial` then fails
                # in its `finally` on a variable the interrupt left unset (UnboundLocalError).
                raise KeyboardInterrupt from None
            # Two workers popped one queued trial (SQLite cannot lock the row) and the other
            # finished it first: its result stands, and this worker goes on.
            if not isinstance(e, optuna.exceptions.UpdateFinishedTrialError) and not (
                isinstance(e, ValueError) and str(e).startswith("Cannot tell a")
            ):
                raise
            return
        if self.on_trial and self.report:
            measured = len(read_state(self.study).done)
            self.on_trial(dataclasses.replace(self.report, measured=measured))

    def _objective(self, trial: optuna.Trial):
        self.trial, interrupts = trial, self.interrupts.count
        try:
            mark_worker(trial, self.run_id)
            return self._measure(trial)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM (the CLI turns it into one line, 130)
            trial.set_user_attr("failure", INTERRUPTED)  # not an attempt: retried freely
            raise
        except optuna.TrialPruned:
            raise
        except BaseException as e:
            if self.interrupts.count == interrupts:
                raise
            trial.set_user_attr("failure", INTERRUPTED)  # an interrupt in another guise
            raise KeyboardInterrupt from e

    def _measure(self, trial: optuna.Trial):
        knobs = Knobs(**{k: trial.suggest_categorical(k, v) for k, v in self.space.grid().items()})

        def report(state, detail=""):
            self.report = TrialReport(trial.number, knobs, state, detail, 0, self.target)

        if knobs in read_state(self.study).done and not trial.user_attrs.get("remeasure"):
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
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            trial.set_user_attr("failure", one_line(e))
            raise
        outcome.trial = trial.number
        self.busy = bool(outcome.interference)
        self.still_busy |= self.busy and bool(trial.user_attrs.get("remeasure"))
        trial.set_user_attr("outcome", outcome.to_dict())
        report("measured", f"quality {outcome.quality:.4f}, {outcome.latency_ms:.3f} ms")
        return outcome.values

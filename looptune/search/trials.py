"""A study's trials as plain data, and its queue: what is retried, re-measured or given up.

- A setting whose trial failed (crashed, its worker killed) is enqueued again by the next plan,
  up to MAX_ATTEMPTS attempts; the reason of each failure is kept on its trial and a setting
  that used up its attempts is reported, never dropped silently. An interrupted trial (Ctrl-C,
  SIGTERM) is no attempt: the setting did not fail, and it is enqueued again without limit.
- A setting measured under interference is measured again by a later run, not by the run that
  measured it (`measured_earlier`), and only while re-measuring helps: a run whose own
  measurements come out flagged too finds the machine still busy, and stops (see `plan`).
- Every entry a plan adds to the queue is claimed first (`storage.claim`, keyed by the trial it
  replaces), so however many workers plan at once, each retry is queued exactly once.
- A running trial whose worker is gone is failed (and so retried) at once when the worker ran
  on this machine, or earlier in this process (its run ended when the storage failed); a worker
  on another machine is known to be gone only by its missing heartbeat (`storage.GRACE_S`).
  "This machine" is this boot (its boot_id) and PID namespace, and a worker is its pid with its
  process's start time (`mark_worker`): never a hostname alone, never a pid alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from looptune.search.choice import Knobs, Outcome
from looptune.search.storage import GRACE_S, claim

MAX_ATTEMPTS = 3  # failed trials of one setting before the study gives it up
INTERRUPTED = "interrupted"  # a failed trial's reason when it was stopped, not failing
NO_HEARTBEAT = "its worker stopped (no heartbeat)"
UNREADABLE = "its stored result is unreadable (the study storage was damaged)"
PROC = Path("/proc")
_RUNS_HERE: set[str] = set()  # the runs of this process in progress (see `running_here`)


def machine_id(proc: Path = PROC) -> str | None:
    """This boot of this machine and its PID namespace: where a process id names one process.
    None without /proc: a hostname alone names no machine (containers on many hosts share
    `localhost` or their image's name), so a worker is then known gone only by its heartbeat."""
    try:
        boot = (proc / "sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.readlink(proc / "self/ns/pid")
        ours = os.readlink(proc / "self") == str(os.getpid())  # not another namespace's /proc
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{pid_namespace}" if boot and ours else None


def started(pid: int, proc: Path = PROC) -> int | None:
    """When process `pid` of this machine started (clock ticks since boot), None when it does
    not run (no such process, or a zombie): with the pid it names one process, as a pid that
    the system gave again to another process no longer does."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in (), may hold spaces
    if len(fields) < 20 or fields[0] in "ZXx":
        return None
    return int(fields[19])


MACHINE = machine_id()


def this_process() -> tuple[int, int | None]:
    """This process's pid and start time: read now, as a forked child (a multiprocessing pool's
    worker) is another process than the one that imported this module."""
    pid = os.getpid()
    return pid, started(pid) if MACHINE else None


@dataclass(frozen=True)
class Failure:
    """A setting not measured yet because its trials failed; retried while attempts remain."""

    knobs: Knobs
    attempts: int  # failed trials, interrupted ones not counted
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
    still_busy: bool = False  # this run measured again what was measured under load: so again


@dataclass
class StudyState:
    """The study's trials, by setting."""

    done: dict  # Knobs -> FrozenTrial (measured or infeasible)
    queued: set  # Knobs or partial-params tuples of WAITING trials
    running: dict  # Knobs (or partial params) -> FrozenTrial
    failures: dict  # Knobs -> its FAIL trials, oldest first
    flagged: dict  # Knobs -> its complete trials measured under interference
    outcomes: dict = field(default_factory=dict)  # trial number -> its Outcome (complete ones)


def knobs_of(params: dict) -> Knobs | None:
    try:
        return Knobs(**params)
    except TypeError:  # a partial plan entry ({"loops": r}) until the sampler fills it in
        return None


def read_state(study) -> StudyState:
    s = StudyState({}, set(), {}, {}, {})
    for t in study.get_trials(deepcopy=False):
        # A queued setting's knobs are its fixed params until the trial suggests them (a trial
        # interrupted before it did has only those).
        params = {**t.system_attrs.get("fixed_params", {}), **t.params}
        if t.state in (TrialState.WAITING, TrialState.RUNNING):
            key = knobs_of(params) or tuple(sorted(params.items()))
            if t.state == TrialState.WAITING:
                s.queued.add(key)
            else:
                s.running[key] = t
        elif (k := knobs_of(params)) is None:
            continue
        elif t.state == TrialState.FAIL or (
            t.state == TrialState.COMPLETE and (o := _outcome(t, k)) is None
        ):  # a result that cannot be read back is no result: the setting is measured again
            s.failures.setdefault(k, []).append(t)
        elif not t.user_attrs.get("repeat"):
            if t.state == TrialState.COMPLETE:
                s.outcomes[t.number] = o
            if flagged(t):
                s.flagged.setdefault(k, []).append(t)
            if k not in s.done or _better(t, s.done[k]):
                s.done[k] = t
    return s


def _outcome(t, knobs: Knobs) -> Outcome | None:
    """The outcome complete trial `t` stored for `knobs`; None when it is not one (a damaged
    storage, or one edited by hand)."""
    try:
        o = Outcome.from_dict(t.user_attrs["outcome"])
        numbers = (o.quality, o.latency_ms, *o.quality_ci, *o.latency_ci, o.ttft_ms, o.kv_bytes)
        good = all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    ok = o.knobs == knobs and good and o.latency_ms > 0 and o.kv_bytes >= 0
    return o if ok and (o.interference is None or isinstance(o.interference, str)) else None


def reason(t) -> str:
    """Why the failed trial `t` failed (or why a complete one counts as failed)."""
    if t.state == TrialState.COMPLETE:
        return UNREADABLE
    return t.user_attrs.get("failure", NO_HEARTBEAT)


def attempts(failed: list) -> int:
    """The failed trials that count against a setting: an interrupted one is no attempt."""
    return sum(reason(t) != INTERRUPTED for t in failed)


def _better(t, than) -> bool:
    """A clean measurement wins; else the fastest measured under interference (interference
    only ever slows a run down, so the fastest is the nearest to the truth)."""
    if not flagged(than):
        return False
    return not flagged(t) or _latency(t) < _latency(than)


def _latency(t) -> float:
    return t.user_attrs["outcome"]["latency_ms"]


def flagged(t) -> bool:
    """A measurement taken under interference (see looptune.measure.interference)."""
    return t.state == TrialState.COMPLETE and bool(t.user_attrs["outcome"].get("interference"))


class running_here:
    """While a run of this process is in progress: its trials are not abandoned ones."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def __enter__(self):
        _RUNS_HERE.add(self.run_id)

    def __exit__(self, *exc):
        _RUNS_HERE.discard(self.run_id)


def mark_worker(trial: optuna.Trial, run_id: str) -> None:
    """Record who runs `trial`, so a later plan can tell whether its worker is gone."""
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("run", run_id)
    # Last (see `_worker_alive`): the machine, the pid and when that process started.
    trial.set_user_attr("process", [MACHINE, *this_process()])


def _worker_alive(t) -> bool | None:
    """Whether the worker that ran trial `t` still runs; None when that is not known here (it ran
    on another machine, no machine is known, or it has not said who it is yet: `mark_worker`
    says it last, so a trial of this process whose run is not marked yet is not taken for an
    abandoned one)."""
    process = t.user_attrs.get("process")
    if not isinstance(process, list) or len(process) != 3 or MACHINE is None:
        return None
    machine, pid, start = process
    if machine != MACHINE or not isinstance(pid, int) or pid <= 0 or not isinstance(start, int):
        return None
    if (pid, start) == this_process():
        return t.user_attrs.get("run") in _RUNS_HERE
    return _runs(pid, start)


def _runs(pid: int, start: int) -> bool:
    """Whether the process `pid` of this machine that started at `start` still runs."""
    now = started(pid)
    if now is not None:
        return now == start  # else its pid is now another process's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's, hidden from this one (/proc mounted hidepid=2)
        return True
    return False  # a zombie: killed, not reaped yet


def _abandoned(t) -> str | None:
    """Why the running trial `t` will never finish, or None when that is not known here."""
    if _worker_alive(t) is not False:
        return None  # running, or another machine's (its heartbeat tells)
    _, pid, start = t.user_attrs["process"]
    if (pid, start) == this_process():
        return "its run stopped before it ended"
    return f"its worker (process {pid}) stopped before it ended"


def measured_earlier(study) -> set[int]:
    """The complete trials measured by workers that no longer run (earlier runs), or on another
    machine: the ones a run may measure again when they were taken under interference."""
    return {
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not _worker_alive(t)
    }


def fail_abandoned(study, heartbeat: bool) -> None:
    """Fail the running trials whose worker is gone, so that they are retried now: a worker of
    this machine at once, another machine's once its heartbeat is stale. Without heartbeats (a
    memory storage, this process's own) a trial running between two trials is abandoned."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = _abandoned(t) if heartbeat else INTERRUPTED
        if why is None:
            continue
        if t.user_attrs.get("failure") != INTERRUPTED:  # its worker said so before it ended
            try:
                study._storage.set_trial_user_attr(t._trial_id, "failure", why)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker failed it first
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)  # or now
    if heartbeat:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def plan(
    study,
    settings: list[Knobs] | None,
    target: int,
    earlier: set[int],
    remeasure: int | None = None,
) -> StudyState | None:
    """Queue the retries of failed settings (and every missing one of `settings`, for a study
    sampled before that now covers its grid) and the re-measurements of the settings measured
    under interference by the `earlier` trials, up to `remeasure` of them waiting or running at
    once (None: all). `earlier` is `measured_earlier` when this run began: a worker running
    alongside on this machine flags its results as this one would, and measuring them again
    would only double the work. None when the study is complete. Each is queued by the one
    worker that claims it (`storage.claim`)."""
    state = read_state(study)
    busy = state.queued | set(state.running)
    for knobs in settings if settings is not None else list(state.failures):
        failed = state.failures.get(knobs, [])
        tried = attempts(failed)
        if knobs in state.done or knobs in busy or tried >= MAX_ATTEMPTS:
            continue
        replaces = f"retry:{failed[-1].number}" if failed else fill_key(knobs)
        since = failed[-1].number if failed else None
        _enqueue(study, state, knobs, replaces, {"attempt": tried + 1}, since)
    redo = remeasurable(state, earlier)
    room = None if remeasure is None else max(0, remeasure - len(redo & busy))
    for knobs in sorted(redo - busy - state.queued, key=str)[:room]:
        # Claimed after the setting's latest trial: a re-measurement that was interrupted (no
        # attempt) or failed is queued again, as a first measurement would be (keyed by the
        # flagged one alone, its claim stood for good and no run measured the setting again).
        flagged_last = state.flagged[knobs][-1].number
        failed = [t for t in state.failures.get(knobs, []) if t.number > flagged_last]
        if attempts(failed) >= MAX_ATTEMPTS:
            continue  # the flagged measurement stands
        last = max([flagged_last, *(t.number for t in failed)])
        _enqueue(study, state, knobs, f"remeasure:{last}", {"remeasure": True}, last)
    if len(state.done) >= target and not redo & (state.queued | set(state.running)):
        return None
    return state


def remeasurable(state: StudyState, earlier: set[int]) -> set[Knobs]:
    """The settings whose every measurement was flagged, all taken by `earlier` trials."""
    return {
        k
        for k, ts in state.flagged.items()
        if flagged(state.done[k]) and all(t.number in earlier for t in ts)
    }


def fill_key(knobs: Knobs) -> str:
    """The claim of a setting's first trial (the plan's, or a grid's missing one): hashed, as
    a checkpoint's path may be longer than the 512 characters a database key column holds."""
    text = json.dumps(vars(knobs), sort_keys=True)
    return f"fill:{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def _enqueue(study, state: StudyState, knobs: Knobs, replaces: str, attrs: dict, since=None):
    if enqueue_once(study, vars(knobs).copy(), replaces, attrs, since):
        state.queued.add(knobs)


def enqueue_once(
    study, params: dict, replaces: str, attrs: dict | None = None, since: int | None = None
) -> bool:
    """Queue a trial of `params` unless another worker claimed `replaces` first (it queues
    it). A claim whose worker stopped before it queued (it is gone, and no trial of `params`
    waits, runs or came after trial `since`) is taken over under the next key, so an entry is
    never lost either. False when a trial that came after `since` made the entry needless:
    nothing is queued, and a plan must not count it as waiting (its worker sampled instead)."""
    key = f"looptune:{replaces}"
    me = {"process": [MACHINE, *this_process()], "at": time.time()}
    while not claim(study, key, me):
        holder = study._storage.get_study_system_attrs(study._study_id).get(key, {})
        if not _gone(holder):
            return True  # its holder queues it
        if _superseded(study, params, since):
            return False
        key += "+"
    study.enqueue_trial(params, user_attrs=attrs)
    return True


def _gone(holder: dict) -> bool:
    """Whether the worker that made claim `holder` stopped before it queued: a process of this
    machine that no longer runs, or this one (which claims and queues in one go, so a claim of
    its own left unqueued is from a run that stopped). Of another machine's worker only the
    claim's age tells: it queues right after it claims, so a claim older than `GRACE_S` was
    left (were that worker only slow, the entry is queued twice: measured twice at worst)."""
    process = holder.get("process") if isinstance(holder, dict) else None
    if not isinstance(process, list) or len(process) != 3 or MACHINE is None:
        process = [None, None, None]
    machine, pid, start = process
    if machine != MACHINE or not isinstance(pid, int) or pid <= 0 or not isinstance(start, int):
        at = holder.get("at") if isinstance(holder, dict) else None
        return isinstance(at, (int, float)) and time.time() - at > GRACE_S
    return (pid, start) == this_process() or not _runs(pid, start)


def _superseded(study, params: dict, since: int | None) -> bool:
    """Whether a trial of `params` waits or runs, or came after trial `since` (any, for None)."""
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("repeat"):  # a sampler's proposal of a measured setting: no trial
            continue
        if params.items() <= {**t.system_attrs.get("fixed_params", {}), **t.params}.items():
            unfinished = t.state in (TrialState.WAITING, TrialState.RUNNING)
            if unfinished or since is None or t.number > since:
                return True
    return False


def collect(study) -> StudyRecord:
    """Every measured outcome (a setting measured twice, by a race of workers, counts once),
    the infeasible settings, and the settings whose trials failed."""
    state = read_state(study)
    outcomes, infeasible = [], []
    for knobs, t in state.done.items():
        if t.state == TrialState.COMPLETE:
            outcomes.append(state.outcomes[t.number])
        else:
            infeasible.append(
                {"knobs": vars(knobs).copy(), "reason": t.user_attrs.get("infeasible", "")}
            )
    failed = [
        Failure(k, attempts(ts), reason(ts[-1]), attempts(ts) >= MAX_ATTEMPTS)
        for k, ts in state.failures.items()
        if k not in state.done and k not in state.running
    ]
    return StudyRecord(
        study.study_name, outcomes, infeasible, failed, len(study.get_trials(deepcopy=False))
    )

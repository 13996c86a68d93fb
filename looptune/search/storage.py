"""Where a study lives: opening its Optuna storage, and naming it and its failures for the user.

Storage is any URL Optuna's RDBStorage takes, or None for memory. An RDB storage records a
heartbeat per running trial, so the trial of a worker killed on another machine is failed after
`GRACE_S` and retried (a worker on this machine is seen to be gone at once: `trials.py`).
"""

from __future__ import annotations

import json
import time
import warnings

import optuna
from optuna.storages import InMemoryStorage, RDBStorage
from sqlalchemy.exc import SQLAlchemyError

from looptune.errors import LooptuneError

HEARTBEAT_S = 2  # a running trial's worker writes its heartbeat this often
GRACE_S = 10  # and its trial is failed when none came for this long


def open_storage(url: str | None, attempts: int = 5):
    """Memory for None; else RDBStorage with heartbeats, so a killed worker's trial is failed."""
    if url is None:
        return InMemoryStorage()
    if "://" not in url:  # a path: Optuna's journal files keep no heartbeat (a killed worker's
        # trial on another machine would never be retried), so only databases are taken
        raise LooptuneError(
            f"cannot open study storage {url!r}: not a database URL "
            f"(sqlite:///{url if url.endswith('.db') else 'study.db'}, postgresql://...)"
        )
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except (SQLAlchemyError, ValueError, ImportError, OSError) as e:  # bad URL, dead server
            # Workers starting together race to create the tables; the loser just retries.
            racing = any(
                m in str(e) for m in ("already exists", "UNIQUE constraint", "duplicate key")
            )
            if racing and attempt + 1 < attempts:
                time.sleep(0.5 * (attempt + 1))
                continue
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if any(m in first for m in ("malformed", "not a database")):
                first += "; the file is damaged: move it away or give another storage"
            raise LooptuneError(f"cannot open study storage {redact(url)}: {first}") from None


def claim(study, key: str, value) -> bool:
    """Record `key` (with `value`) in the study unless some worker recorded it first: True for
    exactly one caller however many workers race, on any machine. In a database it is a plain
    INSERT into Optuna's study attributes, whose (study, key) pair is unique: the database lets
    one through and refuses the rest (Optuna's own `set_study_system_attr` would overwrite, and
    a read before the write cannot lock rows in SQLite). Memory storage serves one process."""
    storage = study._storage
    storage = getattr(storage, "_backend", storage)  # Optuna wraps RDBStorage in a cache
    study_id = study._study_id
    if not isinstance(storage, RDBStorage):
        if key in storage.get_study_system_attrs(study_id):
            return False
        storage.set_study_system_attr(study_id, key, value)
        return True
    from optuna.storages._rdb.models import StudySystemAttributeModel
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    row = {"study_id": study_id, "key": key, "value_json": json.dumps(value)}
    try:
        with storage.engine.begin() as connection:
            connection.execute(insert(StudySystemAttributeModel).values(**row))
    except IntegrityError:
        return False
    return True


def redact(url: str | None) -> str:
    """The storage URL without its password, for profiles and messages ("memory" for None)."""
    if url is None:
        return "memory"
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return url


def one_line(e: BaseException) -> str:
    """`Type: first line` of an exception, as a failed trial keeps it."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def storage_failure(e: Exception) -> LooptuneError | None:
    """The one-line error for a storage that failed or holds damaged data; None for another
    error (a bug, or the evaluation's own)."""
    if isinstance(e, json.JSONDecodeError):  # Optuna keeps attributes as JSON text
        cause = f"it holds a value that is not JSON ({e})"
    elif (cause := storage_error(e)) is None:
        return None
    elif "readonly database" in cause:  # a rerun would fail the same way
        return LooptuneError(f"cannot write to the study storage: {cause}; give a writable one")
    elif not any(m in cause for m in ("malformed", "not a database")):
        return LooptuneError(
            f"the study storage failed: {cause}; what was measured is cached and kept, "
            "a rerun resumes"
        )
    return LooptuneError(
        f"the study storage is damaged: {cause}; move it away or give another storage "
        "(what was measured is cached: a new study does not measure it again)"
    )


def replaced(study, instance: str | None) -> bool:
    """Whether `study`, opened as `instance` (its "instance" attribute then), was deleted, or
    deleted and made again, since (a database may give the new study the old one's ids)."""
    try:
        return study._storage.get_study_user_attrs(study._study_id).get("instance") != instance
    except KeyError:
        return True


def storage_error(e: BaseException | None) -> str | None:
    """The first line of the database error behind `e` (a full disk, a server gone), which
    Optuna may hide behind its own errors; None when `e` is not one."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        if isinstance(e, SQLAlchemyError):
            return str(e).strip().splitlines()[0]
        e = e.__cause__ or e.__context__
    storage = [x for x in seen if isinstance(x, optuna.exceptions.StorageInternalError)]
    return one_line(storage[0]) if storage else None

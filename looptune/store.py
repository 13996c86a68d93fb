"""Files a user keeps: atomic writes, the on-disk result cache shared by profile, score, diagnose
and pareto (so no measurement is taken twice), and per-device locks between processes.

Files are written with the user's umask (a server running as another user can read them), via
a temporary `.NAME.PID.XXXX.tmp` in the same directory; temporaries left by a killed writer
(whose process is gone, or untouched for a minute) are removed by the next write there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from looptune.errors import LooptuneError

SCHEMA = 2  # of a cache entry's envelope; entries of another schema are measured again
STALE_TMP_S = 60.0
_TMP = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]+\.tmp$")
_WARNED: set = set()  # (place, error) of disk warnings given: pareto asks once per trial


def warn(message: str) -> None:
    """One line on stderr: something went wrong that costs time, not a result."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _warn_once(place, e: OSError, message: str) -> None:
    """`warn` unless this process said it already for this place and this kind of error."""
    if (str(place), type(e), e.errno) not in _WARNED:
        _WARNED.add((str(place), type(e), e.errno))
        warn(message)


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove `.NAME.PID.XXXX.tmp` files of killed writers: the PID is gone or the file has not
    been touched for STALE_TMP_S (a live write touches it as it goes). Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TMP.match(entry.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            stale = not _pid_alive(int(match.group(1))) or now - entry.stat().st_mtime > STALE_TMP_S
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone meanwhile, or not ours to remove
            pass
    return removed


def write_beside(path, write: Callable[[str], None]) -> Path:
    """The first half of `atomic_write_with`: fill a temporary file beside `path`, with the mode
    `path` will have, and return it for the caller to rename (nothing is left on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    try:  # (a temporary left by a signal before this is removed by the next write here)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp, and writers such as save_file, make 0600 whatever the umask
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_with(path, write: Callable[[str], None]) -> Path:
    """Write via a temporary file in the same directory and rename: readers never see half a file.
    `write` fills the temporary file given its path (safetensors' `save_file` wants a path).
    A new file gets the umask's mode (0666 & ~umask); an existing one keeps its mode."""
    tmp = write_beside(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)


def atomic_write_bytes(path, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write_with(path, write)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def check_output_path(path, suffixes: tuple[str, ...], name: str = "path") -> Path:
    """Raise LooptuneError unless `path` can be written later: a supported suffix, not a
    directory, no file in the way of its parent directories, and a writable directory. Run it
    before any work, so a long job does not fail at its end."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise LooptuneError(f"{name} must end in {' or '.join(suffixes)}, got {str(path)!r}")
    if path.is_dir():
        raise LooptuneError(f"{name} {str(path)!r} is a directory")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LooptuneError(f"{name} {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise LooptuneError(f"{name} {str(path)!r} is not writable")
    return path


def cache_root() -> Path:
    """$LOOPTUNE_CACHE_DIR, else $XDG_CACHE_HOME/looptune, else ~/.cache/looptune."""
    if os.environ.get("LOOPTUNE_CACHE_DIR"):
        return Path(os.environ["LOOPTUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "looptune"


def _finite(value, where: str = "result") -> None:
    """Raise ValueError at the first NaN or infinity anywhere in a JSON value."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{k}")
    elif isinstance(value, list):
        for v in value:
            _finite(v, where)


def positive_number(value) -> None:
    """A validator for results that are one finite number > 0 (bits per byte, a latency)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{value!r} is not a number > 0")


class ResultCache:
    """JSON results keyed by a JSON-able dict (model hash, knobs, device, versions...).

    One file per key under `cache_root()/kind/`, holding {"schema", "key", "result"}. `get`
    returns None for a miss; an entry that cannot be trusted (unreadable, another schema, a key
    that does not match, a NaN or infinity, or rejected by `validate`) is a miss too, with a
    one-line warning, so it is measured again. `validate(result)` raises ValueError (or
    KeyError / TypeError) when a result is impossible in its domain (a latency <= 0, bits per
    byte <= 0...). `put` never raises for the disk: a failed write is a warning, the caller
    keeps its result.
    """

    def __init__(
        self, kind: str, root: Path | None = None, validate: Callable[[object], None] | None = None
    ):
        self.kind = kind
        self.dir = (root or cache_root()) / kind
        self.validate = validate

    def _warn_once(self, e: OSError, message: str) -> None:
        _warn_once(self.dir, e, message)  # one per kind of disk failure, not one per entry

    @staticmethod
    def digest(key: dict) -> str:
        text = json.dumps(key, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, key: dict) -> Path:
        return self.dir / f"{self.digest(key)}.json"

    def check(self, result) -> None:
        """Raise ValueError if `result` could not have been measured."""
        _finite(result)
        if self.validate is not None:
            try:
                self.validate(result)
            except (KeyError, TypeError, IndexError, AttributeError) as e:
                raise ValueError(f"unexpected shape ({type(e).__name__}: {e})") from None

    def get(self, key: dict):
        path = self.path(key)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn_once(
                e, f"cannot read the {self.kind} cache ({path}: {e.strerror or e}); measuring again"
            )
            return None
        except UnicodeDecodeError:
            warn(f"ignoring {self.kind} cache entry {path}: not UTF-8; measuring again")
            return None
        try:
            entry = json.loads(text)
            if not isinstance(entry, dict) or "result" not in entry:
                raise ValueError("not a cache entry")
            if entry.get("schema") != SCHEMA:
                raise ValueError(f"schema {entry.get('schema')}, expected {SCHEMA}")
            if entry.get("key") != json.loads(json.dumps(key, default=str)):
                raise ValueError("its key does not match")
            self.check(entry["result"])
        except ValueError as e:  # json's decode errors are ValueErrors too
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            warn(f"ignoring {self.kind} cache entry {path}: {reason}; measuring again")
            return None
        return entry["result"]

    def put(self, key: dict, result) -> bool:
        """Store `result`; False (and a warning) when it is invalid or the write fails."""
        path = self.path(key)
        try:
            self.check(result)
        except ValueError as e:
            warn(f"not caching a {self.kind} result that fails its check ({e})")
            return False
        document = json.dumps({"schema": SCHEMA, "key": key, "result": result}, default=str)
        try:
            atomic_write_text(path, document)
        except OSError as e:
            self._warn_once(
                e,
                f"could not write the {self.kind} cache ({path.parent}: "
                f"{e.strerror or e}); results are kept but not cached",
            )
            return False
        return True


def flock_waiting(fd: int, on_wait: Callable[[], None]) -> None:
    """Take an exclusive flock on `fd`, calling `on_wait()` first when another process holds
    it (then waiting; Ctrl-C stops the wait)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        on_wait()
        fcntl.flock(fd, fcntl.LOCK_EX)


@contextlib.contextmanager
def device_lock(name: str, on_wait: Callable[[str], None] | None = None):
    """Hold an exclusive lock `cache_root()/locks/NAME.lock` between processes (flock; released
    by the kernel if the holder dies). Yields the seconds spent waiting for it, or None when the
    lock directory cannot be used (a warning; the caller goes on unserialised)."""
    path = cache_root() / "locks" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        _warn_once(path, e, f"cannot use the lock {path} ({e.strerror or e}); measuring without it")
        yield None
        return
    start = time.perf_counter()
    try:

        def say_holder():
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            if on_wait:
                on_wait(f"waiting for {name}, held by {holder}")

        flock_waiting(fd, say_holder)
        waited = time.perf_counter() - start
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield waited
    finally:
        os.close(fd)  # releases the flock

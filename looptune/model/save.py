"""Writing checkpoints: `save_checkpoint`, and `StagedFiles`, which replaces the files of a
checkpoint directory as one change, so the old checkpoint stays loadable until the new one is
complete.

Each new file is first written into a staging directory inside the checkpoint directory
(`.looptune-save.PID`, which holds any writer's own temporaries too, and which the next save
there removes if this process was killed), and flushed to disk where it replaces a
checkpoint. Only when every file is written are they renamed into place and the old ones
removed, in the order given, with Ctrl-C and SIGTERM held off until the last step is done. A
failure, a full disk or Ctrl-C while writing removes the staged files, and the directories
this made: the directory holds what it held before. A save holds a lock on the directory, so
two saves into one directory run one after the other.

The renames themselves are not one atomic step (POSIX has none for several files), so the
order matters: callers put a checkpoint's weights (shards under new names first, then the index
or model.safetensors) before its config.json, and a new config removes the old one just before
the weights it describes are replaced. SIGKILL in those few renames leaves either the old
checkpoint or no config.json, which the loader names as an interrupted save; never new weights
under an old config.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from functools import partial
from itertools import count
from pathlib import Path
from typing import Self

from safetensors import SafetensorError
from safetensors.torch import save_file

from looptune.errors import Interrupted, LooptuneError
from looptune.model.arch import ARCHITECTURES, from_canonical
from looptune.model.config import to_hf_dict
from looptune.store import flock_waiting, warn, write_beside

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PT = {"format": "pt"}  # safetensors metadata that transformers expects
_HELD = (signal.SIGINT, signal.SIGTERM)
_SHARD = re.compile(r"model-\d+-of-\d+(-\d+)?\.safetensors")
STAGING = ".looptune-save."  # + PID: the directory a save stages its files in


class StagedFiles:
    """Use as `with StagedFiles(directory) as staged:`, `staged.write(...)` each file, then
    `staged.commit()`; leaving the block by an exception before `commit` discards the writes.

    The block holds an exclusive lock on the directory (flock), so a second save into it waits
    for the first to finish instead of mixing its files with the first one's: the last save
    wins whole. A file system without flock (some network ones) goes on unlocked."""

    def __init__(self, directory, flush: bool = True):
        self.directory = Path(directory)
        self.flush = flush  # fsync each file before the switch: False where nothing is replaced
        self._steps: list[tuple[Path | None, Path]] = []  # (staged, final); None: remove final
        self._made: list[Path] = []  # directories this created, deepest last
        self._lock: int | None = None  # the directory's descriptor, flocked
        self.staging = self.directory / f"{STAGING}{os.getpid()}"
        self.committed = False  # True from the first rename on: nothing is discarded then

    def __enter__(self) -> Self:
        missing = [p for p in (self.directory, *self.directory.parents) if not p.exists()]
        if self.directory.is_symlink() and not self.directory.exists():
            where = os.readlink(self.directory)
            raise LooptuneError(
                f"{self.directory}: a symbolic link to {where}, which does not exist"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self._made = missing[::-1]
        try:
            self._lock = _lock(self.directory)
            for left in self.directory.glob(f"{STAGING}*") if self._lock is not None else ():
                shutil.rmtree(left, ignore_errors=True)  # a killed saver's: none holds the lock
            shutil.rmtree(self.staging, ignore_errors=True)  # this PID's, from a killed saver
            self.staging.mkdir()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None and not self.committed:
            self.discard()
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def write(self, name: str, write: Callable[[str], None]) -> None:
        """Stage file `name`: `write(path)` fills a temporary file (flushed to disk if `flush`).
        It keeps the mode of the file it replaces, else gets the umask's."""
        tmp = write_beside(self.staging / name, write)  # any writer's own temporaries go there too
        with contextlib.suppress(OSError):
            os.chmod(tmp, (self.directory / name).stat().st_mode & 0o7777)
        self._steps.append((tmp, self.directory / name))
        if self.flush:  # so a power cut after the switch cannot leave a renamed empty file
            _fsync(tmp)

    def write_bytes(self, name: str, data: bytes) -> None:
        self.write(name, lambda tmp: Path(tmp).write_bytes(data))

    def link(self, name: str, source: Path) -> None:
        """Stage `name` as a hard link to `source`, a copy where no hard link can be made (across
        file systems). Never a symbolic link: it would follow the source's later saves."""
        tmp = self.staging / name
        try:
            os.link(source, tmp)
        except OSError:
            self.write(name, partial(shutil.copyfile, source))
            return
        self._steps.append((tmp, self.directory / name))

    def remove(self, name: str) -> None:
        """Remove `name` at this point of the commit (nothing happens to it before)."""
        self._steps.append((None, self.directory / name))

    def commit(self) -> None:
        """Rename every staged file into place and remove the files named by `remove`, in the
        order they were staged, with Ctrl-C and SIGTERM held until the end."""
        with _signals_held():
            self.committed = True
            steps, self._steps = self._steps, []
            for done, (tmp, final) in enumerate(steps, 1):
                try:
                    if tmp is None:
                        final.unlink(missing_ok=True)
                    else:
                        os.replace(tmp, final)
                        tmp.unlink(missing_ok=True)  # rename is a no-op between two hard links
                except OSError:
                    self._steps = steps[done:]  # not renamed: removed, not left behind
                    self.discard()
                    raise
            shutil.rmtree(self.staging, ignore_errors=True)  # before a held SIGTERM ends us
            with contextlib.suppress(OSError):  # done; the disk has them soon if not now
                _fsync(self.directory)  # the renames are on disk before the caller goes on

    def discard(self) -> None:
        for tmp, _ in self._steps:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        self._steps = []
        shutil.rmtree(self.staging, ignore_errors=True)
        for d in reversed(self._made):
            with contextlib.suppress(OSError):  # not empty: something else is in it now
                d.rmdir()


def _lock(directory: Path) -> int | None:
    """An exclusive flock on `directory`, waited for (Ctrl-C stops the wait); returns the
    descriptor that holds it, or None where the file system has no flock."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        said = f"{directory}: another save into it is under way; waiting for it to end"
        flock_waiting(fd, lambda: warn(said))
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EBADF, errno.ENOTSUP, errno.EINVAL):
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync(path: Path) -> None:
    """Flush a file or a directory to disk; a file system that cannot (EINVAL) is let be."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_held():
    """Defer SIGINT and SIGTERM until the block ends, then act on them as their handlers would.

    Python handlers run in the main thread only, so swapping them defers a signal whichever
    thread the kernel delivers it to (a blocked signal mask would not: torch's threads do not
    block it). Outside the main thread nothing can be swapped, and nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _HELD}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in dict.fromkeys(pending):
            handler = previous[s]
            if callable(handler):
                handler(s, None)  # Python's default for SIGINT raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), s)  # the default action (termination) as if never deferred


def save_checkpoint(
    model,
    directory,
    max_shard_bytes: int | None = None,
    tokenizer_json: Path | None = None,
    extra_config: dict | None = None,
):
    """Write config.json and safetensors (sharded above `max_shard_bytes`) into `directory`.

    A checkpoint already there stays loadable until the new one is complete: every file is
    written under a temporary name first (shards under names the old index does not use), then
    put in place weights first and config.json last, and the old shards are removed
    (StagedFiles), so the disk needs room for both until then. A failure, a full disk or Ctrl-C
    on the way leaves the directory as it was; a disk that refuses the write is a LooptuneError
    naming the directory. Files replacing a checkpoint are flushed to disk before the switch;
    a new one's are not (nothing to lose, and `looptune init` of a 7B model stays fast)."""
    directory = Path(directory)
    cfg = model.config
    arch = ARCHITECTURES[cfg.architecture]
    names = from_canonical(arch.spelling(arch.written), cfg.gate, model.state_dict())
    state = {names.get(k, k): v.detach().contiguous() for k, v in model.state_dict().items()}
    shards: list[dict] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    config = to_hf_dict(model.config)
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    config.update(extra_config or {})
    config_bytes = (json.dumps(config, indent=2) + "\n").encode()
    existed = directory.is_dir()
    staged = StagedFiles(directory)
    kept = "the directory keeps what it held before" if existed else "nothing was kept"
    old = directory / "config.json"
    try:
        with staged:
            # read under the lock: a save that ran while this one waited for it counts
            staged.flush = old.is_file()
            tokenizer = None if tokenizer_json is None else Path(tokenizer_json).read_bytes()
            new_config = not (old.is_file() and old.read_bytes() == config_bytes) or (
                tokenizer is not None and _bytes(directory / "tokenizer.json") != tokenizer
            )  # else weights only
            # A new config (or tokenizer): the old config goes just before the first weight
            # file it does not describe, so a save killed from there on leaves no config.json
            # (a clear error on load, naming the interrupted save), never new weights under the
            # old config or beside the old tokenizer.
            weights = _stage_weights(staged, shards, state, new_config and old.is_file())
            if tokenizer is not None:
                staged.write_bytes("tokenizer.json", tokenizer)
            if new_config:
                staged.write_bytes("config.json", config_bytes)
            for name in sorted(_old_weights(directory) - weights):
                staged.remove(name)  # the old checkpoint's, no longer named by anything
            staged.commit()
    except (OSError, SafetensorError) as e:
        raise LooptuneError(
            f"{directory}: cannot write the checkpoint ({_reason(e)}); {kept}"
        ) from None
    except KeyboardInterrupt as e:
        if str(e):  # a caller's message
            raise
        said = "the new checkpoint was written first" if staged.committed else kept
        raise Interrupted(f"{directory}: {said}") from None
    return directory


def _bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _stage_weights(
    staged: StagedFiles, shards: list[dict], state: dict, old_config: bool
) -> set[str]:
    """Stage the weight files and the index (or its removal); returns the weight file names.
    `old_config`: remove config.json before the first step that replaces what it describes
    (model.safetensors, or the index; new shards go in under unused names before it)."""
    directory = staged.directory
    if len(shards) == 1:
        if old_config:
            staged.remove("config.json")
        staged.write(SINGLE, partial(save_file, shards[0], metadata=PT))
        staged.remove(INDEX)  # an old index would still win over model.safetensors
        return {SINGLE}
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = _unused_shard_name(directory, i, len(shards))
        staged.write(fname, partial(save_file, shard, metadata=PT))
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if old_config:
        staged.remove("config.json")
    staged.write_bytes(INDEX, json.dumps(index, indent=2).encode())
    return set(weight_map.values())


def _old_weights(directory: Path) -> set[str]:
    """The weight files a new save replaces: model.safetensors, the shards the old index names,
    and stray shards of the usual names; other files (model_ema.safetensors...) are the user's."""
    names = {f.name for f in directory.iterdir() if _SHARD.fullmatch(f.name)} | {SINGLE}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        names |= set(json.loads((directory / INDEX).read_text())["weight_map"].values())
    return {n for n in names if isinstance(n, str) and "/" not in n and (directory / n).is_file()}


def _unused_shard_name(directory: Path, i: int, n: int) -> str:
    """`model-0000i-of-0000n.safetensors`, or where that is taken (by the old checkpoint's
    shard) the first free `model-0000i-of-0000n-k.safetensors`."""
    names = (f"model-{i:05d}-of-{n:05d}{f'-{k}' if k else ''}.safetensors" for k in count())
    return next(name for name in names if not (directory / name).exists())


def _reason(e: Exception) -> str:
    """The OS's words: safetensors reports "Error while serializing: I/O error: No space left
    on device (os error 28)"."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    found = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", str(e))
    return found.group(1) if found else str(e)

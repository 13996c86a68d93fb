"""looptune.store: files written with the user's umask, temporaries of killed writers removed,
a result cache that re-measures what it cannot trust and never loses a result to the disk,
the per-device lock, and output paths checked before any work."""

import errno
import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from looptune import store
from looptune.errors import LooptuneError
from looptune.store import ResultCache, atomic_write_text, check_output_path, device_lock


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)

    before = os.umask(0o022)
    yield set_mask
    os.umask(before)


def test_files_get_the_users_umask(tmp_path, umask):
    umask(0o022)
    assert _mode(atomic_write_text(tmp_path / "a.yaml", "a")) == 0o644  # readable by a server
    umask(0o077)
    assert _mode(atomic_write_text(tmp_path / "b.yaml", "b")) == 0o600
    umask(0o002)
    assert _mode(atomic_write_text(tmp_path / "sub" / "c.json", "c")) == 0o664
    os.chmod(tmp_path / "a.yaml", 0o640)
    atomic_write_text(tmp_path / "a.yaml", "again")  # an existing file keeps its mode
    assert _mode(tmp_path / "a.yaml") == 0o640 and (tmp_path / "a.yaml").read_text() == "again"


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout)


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    dead = tmp_path / f".p.yaml.{_dead_pid()}.k2j4_x.tmp"  # its writer is gone
    old = tmp_path / ".p.yaml.1.a1b2c3.tmp"  # pid 1 lives, but untouched for two minutes
    live = tmp_path / ".p.yaml.1.zz9yy8.tmp"  # a writer at work now: kept
    other = tmp_path / ".notes.tmp.txt"  # not ours
    for p in (dead, old, live, other):
        p.write_text("half")
    long_ago = time.time() - 120
    os.utime(old, (long_ago, long_ago))
    atomic_write_text(tmp_path / "q.yaml", "q")
    assert not dead.exists() and not old.exists()
    assert live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [live.name]


def test_a_failed_write_leaves_no_temporary(tmp_path, monkeypatch):
    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "p.yaml", "p")
    assert list(tmp_path.iterdir()) == []


# ----- the result cache -----

KEY = {"model": "abc", "loops": 2}


def _positive(result):
    if not result["ms"] > 0:
        raise ValueError(f"ms {result['ms']} <= 0")


@pytest.fixture
def cache(tmp_path):
    return ResultCache("thing", root=tmp_path, validate=_positive)


def test_round_trip_and_a_quiet_miss(cache, capsys):
    assert cache.get(KEY) is None
    assert cache.put(KEY, {"ms": 1.5})
    assert cache.get(KEY) == {"ms": 1.5}
    assert cache.get({**KEY, "loops": 3}) is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "text, reason",
    [
        ("{not json", "Expecting"),
        ("[1, 2]", "not a cache entry"),
        (json.dumps({"key": KEY, "result": {"ms": 1.0}}), "schema"),  # an older looptune's
        (
            json.dumps({"schema": store.SCHEMA, "key": {**KEY, "loops": 9}, "result": {"ms": 1.0}}),
            "key does not match",
        ),
        (json.dumps({"schema": store.SCHEMA, "key": KEY, "result": {"ms": float("nan")}}), "nan"),
        (json.dumps({"schema": store.SCHEMA, "key": KEY, "result": {"ms": float("inf")}}), "inf"),
        (json.dumps({"schema": store.SCHEMA, "key": KEY, "result": {"ms": -2.0}}), "<= 0"),
        (json.dumps({"schema": store.SCHEMA, "key": KEY, "result": {"sm": 2.0}}), "shape"),
        (json.dumps({"schema": store.SCHEMA, "key": KEY, "result": [2.0]}), "shape"),
    ],
)
def test_an_entry_that_cannot_be_trusted_is_a_one_line_warning_and_a_miss(
    cache, capsys, text, reason
):
    cache.path(KEY).parent.mkdir(parents=True)
    cache.path(KEY).write_text(text)
    assert cache.get(KEY) is None  # (a directory that cannot be read is the same warning)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ignoring thing cache entry")
    assert reason in lines[0] and lines[0].endswith("measuring again")
    assert cache.put(KEY, {"ms": 3.0}) and cache.get(KEY) == {"ms": 3.0}  # re-measured, kept


def test_an_unreadable_entry_is_a_warning(cache, capsys):
    cache.path(KEY).parent.mkdir(parents=True)
    cache.path(KEY).write_bytes(b"\xff\xfe not utf-8")
    assert cache.get(KEY) is None
    assert capsys.readouterr().err.startswith("warning: ignoring thing cache entry")


def test_an_impossible_result_is_not_stored(cache, capsys):
    assert not cache.put(KEY, {"ms": 0.0})
    assert capsys.readouterr().err.startswith("warning: not caching a thing result")
    assert not cache.path(KEY).exists()


@pytest.mark.parametrize("fault", ["no space", "a file in the way"])
def test_a_failed_cache_write_is_a_warning_not_a_lost_result(tmp_path, monkeypatch, capsys, fault):
    if fault == "no space":
        cache = ResultCache("thing", root=tmp_path)

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
    else:
        (tmp_path / "root").write_text("a file where the cache directory should be")
        cache = ResultCache("thing", root=tmp_path / "root")
    result = {"ms": 2.0}
    assert cache.put(KEY, result) is False and result == {"ms": 2.0}
    assert cache.put({**KEY, "loops": 3}, result) is False  # warned once, not per entry
    assert cache.get(KEY) is None  # (a directory that cannot be read is the same warning)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: could not write the thing cache")
    assert "not cached" in lines[0]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


# ----- the device lock -----


def test_the_device_lock_serialises_and_names_its_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPTUNE_CACHE_DIR", str(tmp_path))
    held, release, order, waits = threading.Event(), threading.Event(), [], []

    def holder():
        with device_lock("latency-cpu"):
            order.append("holder in")
            held.set()
            release.wait(10)
            order.append("holder out")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    threading.Timer(0.2, release.set).start()
    with device_lock("latency-cpu", on_wait=waits.append) as waited:
        order.append("second in")
    thread.join()
    assert order == ["holder in", "holder out", "second in"]
    assert waited >= 0.1 and waits == [f"waiting for latency-cpu, held by pid {os.getpid()}"]
    assert (tmp_path / "locks" / "latency-cpu.lock").exists()


def test_an_unusable_lock_directory_is_a_warning(tmp_path, monkeypatch, capsys):
    (tmp_path / "root").write_text("not a directory")
    monkeypatch.setenv("LOOPTUNE_CACHE_DIR", str(tmp_path / "root"))
    with device_lock("latency-cpu") as waited:
        assert waited is None
    assert capsys.readouterr().err.startswith("warning: cannot use the lock")


def test_an_unusable_cache_is_one_warning_per_process_not_one_per_measurement(
    tmp_path, monkeypatch, capsys
):
    """pareto makes a cache and takes the lock per trial: 16 trials, not 64 warnings."""
    (tmp_path / "root").write_text("a file where the cache directory should be")
    monkeypatch.setenv("LOOPTUNE_CACHE_DIR", str(tmp_path / "root"))
    for trial in range(3):
        cache = ResultCache("thing")
        assert cache.get(KEY) is None and not cache.put(KEY, {"ms": 1.0})
        with device_lock("latency-cpu") as waited:
            assert waited is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("warning: cannot read the thing cache")
    assert lines[1].startswith("warning: cannot use the lock")


# ----- output paths -----


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "README.md").write_text("x")
    assert (
        check_output_path(tmp_path / "new" / "deeper" / "p.yaml", (".yaml",))
        == tmp_path / "new" / "deeper" / "p.yaml"
    )
    for path, message in [
        (tmp_path / "README.md" / "p.png", "is a file, not a directory"),
        (tmp_path / "p.jpg", "must end in .png"),
        (tmp_path, "must end in"),
        (tmp_path / "dir.png", "is a directory"),
    ]:
        if path.name == "dir.png":
            path.mkdir()
        with pytest.raises(LooptuneError, match=message):
            check_output_path(path, (".png",), "plot")


# ----- the callers' checks -----


def test_an_edited_score_entry_is_scored_again(tmp_path, capsys):
    from looptune.model.checkpoint import init_checkpoint
    from looptune.quality.score import score_checkpoints
    from looptune.store import cache_root

    ckpt = tmp_path / "tiny"
    init_checkpoint(ckpt, "tiny", loops=2, device="cpu")
    texts = tmp_path / "t.jsonl"
    texts.write_text(
        "".join(
            json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(3)
        )
    )
    args = {"loops": [2], "sets": [str(texts)], "device": "cpu", "n_boot": 50}
    (first,) = score_checkpoints([ckpt], **args)
    assert first.value > 0 and not first.cached
    for entry in (cache_root() / "score").glob("*.json"):  # 0 bits per byte: impossible
        doc = json.loads(entry.read_text())
        doc["result"]["bits"] = [0.0 for _ in doc["result"]["bits"]]
        entry.write_text(json.dumps(doc))
    capsys.readouterr()
    (again,) = score_checkpoints([ckpt], **args)
    assert not again.cached and again.value == pytest.approx(first.value)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings and all(w.startswith("warning: ignoring score cache entry") for w in warnings)
    (third,) = score_checkpoints([ckpt], **args)
    assert third.cached  # the re-scored entry replaced the bad one


def test_positive_number():
    store.positive_number(1.7811)
    for bad in (0, 0.0, -1.0, True, "1.5", None):
        with pytest.raises(ValueError):
            store.positive_number(bad)

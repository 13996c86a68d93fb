"""`looptune train`, the corpus, the n-gram baseline and the bundled family."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from looptune.errors import LooptuneError
from looptune.train import corpus as corpus_mod
from looptune.train.corpus import folder_corpus, heldout_texts, stdlib_corpus
from looptune.train.data import batch_at
from looptune.train.ngram import PAD, KneserNey
from looptune.train.trainer import train

TINY = {"preset": "tiny", "batch_size": 4, "context": 32, "lr": 1e-2, "device": "cpu"}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPTUNE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    """A small folder of real code: a few packaged held-out files."""
    root = tmp_path_factory.mktemp("code")
    for path, text in heldout_texts()[:6]:
        out = root / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text[:6000])
    return root


def weights(path):
    return load_file(str(path / "model.safetensors"))


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----- training -----


def test_few_steps_lower_the_loss_and_seed_fixes_weights(tmp_path, code_dir):
    losses = []
    a = train(
        tmp_path / "a",
        loops=2,
        steps=30,
        corpus=code_dir,
        seed=3,
        on_step=lambda p: losses.append(p.loss),
        **TINY,
    )
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert math.isfinite(a.heldout_bpb) and a.heldout_bpb < 8
    train(tmp_path / "b", loops=2, steps=30, corpus=code_dir, seed=3, **TINY)
    assert same_weights(tmp_path / "a", tmp_path / "b")
    train(tmp_path / "c", loops=2, steps=30, corpus=code_dir, seed=4, **TINY)
    assert not same_weights(tmp_path / "a", tmp_path / "c")


def test_interrupt_and_resume_gives_the_same_weights(tmp_path, code_dir):
    kw = dict(loops=3, steps=8, corpus=code_dir, seed=1, **TINY)
    train(tmp_path / "full", **kw)
    partial = train(tmp_path / "resumed", stop_after=3, **kw)
    assert partial.steps == 3 and not (tmp_path / "resumed" / "config.json").exists()

    def interrupt(p):
        if p.step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C mid-run saves the state on the way out
        train(tmp_path / "resumed", on_step=interrupt, **kw)
    state = json.loads((tmp_path / "resumed" / "train_state" / "state.json").read_text())
    assert state["step"] == 6
    notes = []
    train(tmp_path / "resumed", on_note=notes.append, **kw)
    assert any("resuming" in n for n in notes)
    assert same_weights(tmp_path / "full", tmp_path / "resumed")


def test_sigterm_saves_the_state_like_ctrl_c(tmp_path, code_dir):
    import os
    import signal

    def terminate(p):
        if p.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", loops=1, steps=5, corpus=code_dir, on_step=terminate, **TINY)
    state = json.loads((tmp_path / "run" / "train_state" / "state.json").read_text())
    assert state["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_batches_are_a_function_of_seed_and_step():
    stream = np.arange(1000, dtype=np.uint16)
    assert torch.equal(batch_at(stream, 0, 5, 4, 16), batch_at(stream, 0, 5, 4, 16))
    assert not torch.equal(batch_at(stream, 0, 5, 4, 16), batch_at(stream, 0, 6, 4, 16))


def test_model_card_records_the_run(tmp_path, code_dir):
    runner = CliRunner()
    from looptune.cli import app

    out = tmp_path / "card"
    result = runner.invoke(
        app,
        [
            "train",
            str(out),
            "--loops",
            "2",
            "--preset",
            "tiny",
            "--steps",
            "3",
            "--corpus",
            str(code_dir),
            "--context",
            "32",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["steps"] == 3 and doc["tokens"] == 3 * 2 * 32
    card = (out / "README.md").read_text()
    for needle in (
        "looptune train",
        "manifest sha256",
        "| steps | 3",
        "| tokens | 192",
        "wall time",
        "machine",
        "held-out bits per byte",
    ):
        assert needle in card
    from looptune.model import load_model

    model, _ = load_model(out, device="cpu")
    assert model.config.num_loops == 2


# ----- clear errors -----


def test_bad_corpus_path_is_a_clear_error(tmp_path):
    with pytest.raises(LooptuneError, match="no such file or directory"):
        train(tmp_path / "out", loops=1, steps=1, corpus=tmp_path / "missing", **TINY)


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.bin").write_bytes(b"\x00\x01")
    (empty / "blank.py").write_text("   \n")
    with pytest.raises(LooptuneError, match="no source files found"):
        train(tmp_path / "out", loops=1, steps=1, corpus=empty, **TINY)


def test_out_holding_an_unrelated_checkpoint_is_a_clear_error(tmp_path, code_dir):
    from looptune.model.checkpoint import init_checkpoint

    init_checkpoint(tmp_path / "other", "tiny", device="cpu")
    with pytest.raises(LooptuneError, match="already holds a checkpoint"):
        train(tmp_path / "other", loops=1, steps=1, corpus=code_dir, **TINY)
    train(tmp_path / "run", loops=1, steps=2, corpus=code_dir, **TINY)
    with pytest.raises(LooptuneError, match="different training run"):
        train(tmp_path / "run", loops=2, steps=2, corpus=code_dir, **TINY)


def test_cli_error_is_one_line(tmp_path):
    from looptune.cli import app

    result = CliRunner().invoke(
        app,
        [
            "train",
            str(tmp_path / "o"),
            "--loops",
            "1",
            "--steps",
            "1",
            "--corpus",
            str(tmp_path / "nope"),
        ],
    )
    assert result.exit_code == 2
    assert "error: corpus" in result.output and "Traceback" not in result.output


# ----- corpus -----


def test_heldout_corpus_is_packaged_and_pinned():
    held = heldout_texts()
    manifest = json.loads(corpus_mod.HELDOUT_MANIFEST.read_text())
    assert len(held) == len(manifest["files"]) > 20
    assert 300_000 < sum(len(t.encode()) for _, t in held) <= 1_100_000
    assert manifest["python_version"] and (corpus_mod.HELDOUT_DIR / "LICENSE-PSF.txt").exists()
    train_paths = {f["path"] for f in json.loads(corpus_mod.TRAIN_MANIFEST.read_text())["files"]}
    assert not train_paths & {p for p, _ in held}
    for path in train_paths | {p for p, _ in held}:
        parts = path.split("/")
        assert not {"test", "tests", "idle_test"} & set(parts[:-1]), path
    assert "pydoc_data/topics.py" not in train_paths and "encodings/cp1252.py" not in train_paths


def test_train_files_with_another_hash_are_skipped(tmp_path, monkeypatch):
    manifest = json.loads(corpus_mod.TRAIN_MANIFEST.read_text())
    fake = tmp_path / "Lib"
    for entry in manifest["files"][:3]:
        (fake / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        (fake / entry["path"]).write_bytes((corpus_mod.stdlib_dir() / entry["path"]).read_bytes())
    (fake / manifest["files"][0]["path"]).write_text("# changed\n")
    monkeypatch.setattr(corpus_mod, "stdlib_dir", lambda: fake)
    data = stdlib_corpus()
    assert len(data.train) == 2 and data.skipped == len(manifest["files"]) - 2


def test_folder_corpus_splits_by_file(code_dir):
    data = folder_corpus(code_dir)
    assert data.train and data.heldout
    assert not {p for p, _ in data.train} & {p for p, _ in data.heldout}


# ----- n-gram baseline -----


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_is_normalised(order):
    model = KneserNey.fit(["def f(x):\n    return x\n", "class A:\n    pass\n"], order)
    for ctx in (b"de", b"zq", b"  ", b""):
        ctx = ctx[-(order - 1) :] if order > 1 else b""
        seqs = [
            np.array([PAD] * (order - 1 - len(ctx)) + list(ctx) + [b], dtype=np.int64)
            for b in range(256)
        ]
        assert sum(model.probs(s)[-1] for s in seqs) == pytest.approx(1.0, abs=1e-9)


def test_higher_order_ngrams_predict_code_better():
    texts = [t for _, t in heldout_texts()[:12]]
    train_texts, test_texts = texts[:-2], texts[-2:]
    bpb = {o: KneserNey.fit(train_texts, o).bits_per_byte(test_texts) for o in (1, 3)}
    assert bpb[3] < bpb[1] < 8


# ----- the bundled family -----


def test_bundled_family_matches_its_card():
    from looptune.bundled import MODELS_DIR, default_checkpoint, family_members
    from looptune.model import load_model
    from looptune.train.evaluate import eval_sample, score_sample

    members = family_members()
    assert [p.name for p in members] == ["plt-r1", "plt-r2", "plt-r3", "plt-r4"]
    assert default_checkpoint().name == "plt-r2"
    card = json.loads((MODELS_DIR / "family.json").read_text())
    assert sum(f.stat().st_size for p in members for f in p.iterdir()) < 30e6
    check = eval_sample(heldout_texts())[: card["check_slice"]["files"]]
    assert [p for p, _ in check] == card["check_slice"]["paths"]
    for path in members:
        entry = card["members"][path.name]
        model, _ = load_model(path, device="cpu")
        assert model.config.num_loops == entry["loops"]
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        bpb, _ = score_sample(path, check, entry["loops"], card["context"])
        assert bpb == pytest.approx(entry["check_bpb"], abs=1e-3)
        assert (path / "README.md").exists()

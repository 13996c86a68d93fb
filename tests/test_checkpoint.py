"""Checkpoint io: round trips, shards, and a clear error for each bad input (layouts of other
writers: test_layouts.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from looptune.cli import app
from looptune.errors import CheckpointError, LooptuneError
from looptune.model import load_model, save_checkpoint
from looptune.model.checkpoint import init_checkpoint

runner = CliRunner()


def logits_of(model, seed=0):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids, loops=3)


def test_save_then_load_gives_identical_logits(tmp_path):
    model = tiny_model()
    save_checkpoint(model, tmp_path / "ck")
    loaded, tok = load_model(tmp_path / "ck", device="cpu")
    assert torch.equal(logits_of(model), logits_of(loaded))
    assert tok.decode(tok.encode("héllo")) == "héllo"


def test_sharded_checkpoint_loads(tmp_path):
    model = tiny_model("query")
    save_checkpoint(model, tmp_path / "ck", max_shard_bytes=4096)
    shards = sorted((tmp_path / "ck").glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    # LoopCoder-V2's query gate is written as self_attn.plt_gate, as its makers name it
    written = {k.replace(".gate_projection.", ".plt_gate.") for k in model.state_dict()}
    assert set(index["weight_map"]) == written
    loaded, _ = load_model(tmp_path / "ck", device="cpu")
    assert torch.equal(logits_of(model), logits_of(loaded))


def test_dtype_override_on_load(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    loaded, _ = load_model(tmp_path / "ck", device="cpu", dtype="bfloat16")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_loopcoder_window_list_is_flash_attention_convention(tmp_path):
    init_checkpoint(tmp_path / "ck", "tiny")
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    raw["plt_window_size"] = [64, 0]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(raw))
    model, _ = load_model(tmp_path / "ck", device="cpu")
    assert model.config.window == 65


def corrupt(kind, ck):
    cfg_path, weights = ck / "config.json", ck / "model.safetensors"
    raw = json.loads(cfg_path.read_text())
    if kind == "no-config":
        cfg_path.unlink()
    elif kind == "bad-json":
        cfg_path.write_text("{not json")
    elif kind == "no-weights":
        weights.unlink()
    elif kind == "pickle-only":
        weights.unlink()
        (ck / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    elif kind == "unknown-arch":
        raw["architectures"] = ["GPT2LMHeadModel"]
        cfg_path.write_text(json.dumps(raw))
    elif kind == "out-of-range":
        raw["num_hidden_layers"] = 0
        cfg_path.write_text(json.dumps(raw))
    elif kind == "bad-heads":
        raw["num_key_value_heads"] = 3
        cfg_path.write_text(json.dumps(raw))
    elif kind in ("missing-tensor", "unexpected-tensor", "mis-shaped"):
        state = load_file(weights)
        if kind == "missing-tensor":
            del state["model.layers.1.mlp.up_proj.weight"]
        elif kind == "unexpected-tensor":
            state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
        else:
            state["model.norm.weight"] = torch.ones(17)
        save_file(state, weights)
    elif kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        weights.write_bytes(b"\xff" * 64)


BAD = {
    "no-config": "config.json: missing",
    "bad-json": "not valid JSON",
    "no-weights": "no weights",
    "pickle-only": "safetensors only",
    "unknown-arch": "unknown architecture 'GPT2LMHeadModel'",
    "out-of-range": "num_hidden_layers must be a positive integer",
    "bad-heads": "multiple of num_key_value_heads",
    "missing-tensor": "missing tensors: model.layers.1.mlp.up_proj.weight",
    "unexpected-tensor": "unexpected tensors: model.layers.0.self_attn.rotary_emb.inv_freq",
    "mis-shaped": "tensor model.norm.weight has shape [17]",
    "truncated": "corrupt or truncated",
    "garbage": "corrupt or truncated",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_checkpoint_gives_one_clear_line(tmp_path, kind):
    ck = tmp_path / "ck"
    init_checkpoint(ck, "tiny")
    corrupt(kind, ck)
    with pytest.raises(CheckpointError):
        load_model(ck, device="cpu")
    result = runner.invoke(app, ["info", str(ck)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert BAD[kind] in lines[0]
    assert "Traceback" not in result.output


def test_missing_directory_through_the_console_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "looptune", "info", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope'}: no such checkpoint directory"


def test_init_and_info_through_the_cli(tmp_path):
    result = runner.invoke(
        app,
        [
            "init",
            str(tmp_path / "ck"),
            "--preset",
            "tiny",
            "--loops",
            "3",
            "--window",
            "5",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    made = json.loads(result.stdout)
    assert made["loops"] == 3 and made["window"] == 5
    result = runner.invoke(app, ["info", str(tmp_path / "ck"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["config"]["num_loops"] == 3 and doc["config"]["window"] == 5
    assert doc["parameters"] == made["parameters"]
    rows = {(r["mode"], r["loops"]): r["bytes"] for r in doc["kv_bytes"]}
    assert len(rows) == 12
    # sequential grows R x; PLT adds only (R-1) * min(S, W) keys per layer
    assert rows[("sequential", 4)]["2048"] == 4 * rows[("sequential", 1)]["2048"]
    assert rows[("plt", 4)]["2048"] < 1.02 * rows[("plt", 1)]["2048"]
    human = runner.invoke(app, ["info", str(tmp_path / "ck")])
    assert human.exit_code == 0 and "KV bytes per sequence" in human.stderr
    again = runner.invoke(app, ["init", str(tmp_path / "ck")])
    assert again.exit_code == 2 and "already holds a checkpoint" in again.stderr


def test_init_rejects_unknown_preset(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "ck"), "--preset", "huge"])
    assert result.exit_code == 2
    assert "unknown preset 'huge'" in result.stderr


def test_tokenizer_json_is_read_with_tokenizers(tmp_path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "def": 1, "f": 2, "(": 3, ")": 4, ":": 5, "[UNK]": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated"),
        ]
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    model = tiny_model(vocab_size=len(vocab))
    model.config = model.config.with_(tokenizer="tokenizer.json")
    save_checkpoint(model, tmp_path / "ck", tokenizer_json=tmp_path / "tokenizer.json")
    loaded, tokenizer = load_model(tmp_path / "ck", device="cpu")
    ids = tokenizer.encode("def f():")
    assert ids == [1, 2, 3, 4, 5] and tokenizer.eos_id == 0
    assert tokenizer.vocab_size == loaded.config.vocab_size == 7
    (tmp_path / "ck" / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not a readable tokenizer.json"):
        load_model(tmp_path / "ck", device="cpu")


def test_the_7b_preset_has_loopcoder_v2_shape():
    from looptune.model import PLTForCausalLM, preset_config

    cfg = preset_config("loopcoder-v2-7b")
    with torch.device("meta"):
        model = PLTForCausalLM(cfg)
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.window,
    ) == (14, 5120, 40, 8, 128, 27648, 76800, 64)
    assert 7.0e9 < model.num_params() < 8.0e9


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_weights_are_written_with_the_users_umask(tmp_path, umask, mode):
    """safetensors' writer makes 0600 files; a server running as another user must read them."""
    import os
    import stat

    old = os.umask(umask)
    try:
        save_checkpoint(tiny_model(), tmp_path / "one")
        save_checkpoint(tiny_model(), tmp_path / "sharded", max_shard_bytes=4096)
    finally:
        os.umask(old)
    files = list((tmp_path / "one").iterdir()) + list((tmp_path / "sharded").iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {mode}
    assert not [f for f in files if f.name.endswith(".tmp")]


# Saving into a directory that holds a checkpoint: the old one loads until the new one is whole.


def snapshot(ck):
    """Every file of `ck` (hidden ones too) and its bytes; a directory as None."""
    return {f.name: f.read_bytes() if f.is_file() else None for f in sorted(ck.iterdir())}


def old_and_new(tmp_path, old_shards, new_shards):
    """A directory holding checkpoint A; B differs in weights and config (the window)."""
    ck, old, new = tmp_path / "ck", tiny_model(seed=0), tiny_model(seed=1, window=5)
    save_checkpoint(old, ck, max_shard_bytes=old_shards)
    return ck, old, new, snapshot(ck)


def assert_loads_as(ck, model):
    loaded, _ = load_model(ck, device="cpu")
    assert loaded.config == model.config
    for (k, a), b in zip(loaded.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not [f.name for f in ck.iterdir() if f.name.endswith(".tmp")]


def fail_writing(monkeypatch, name, error):
    """Writing the file whose name starts with `name` raises `error` half-way through."""
    from looptune import store
    from looptune.model import save

    real = store.write_beside

    def half_then_fail(tmp):
        Path(tmp).write_bytes(b"\0" * 64)
        raise error

    def write_beside(path, write):
        return real(path, half_then_fail if Path(path).name.startswith(name) else write)

    monkeypatch.setattr(save, "write_beside", write_beside)


FAILURES = [  # (old shard size, new shard size, the file whose write fails); None: one file
    (None, 4096, "model-00001-of"),
    (4096, 4096, "model-00002-of"),
    (4096, 4096, "model.safetensors.index.json"),
    (None, 4096, "config.json"),
    (4096, None, "model.safetensors"),
    (4096, None, "config.json"),
    (None, None, "model.safetensors"),
]


@pytest.mark.parametrize("old_shards, new_shards, failing", FAILURES)
def test_a_save_that_fails_anywhere_leaves_the_old_checkpoint(
    tmp_path, monkeypatch, old_shards, new_shards, failing
):
    """A full disk (as OSError or as safetensors reports it) or Ctrl-C while writing any file
    of the new checkpoint: the directory is byte for byte what it was and loads as the old one.
    Then a save that succeeds loads as the new one and leaves nothing of the old."""
    import errno

    from safetensors import SafetensorError

    ck, old, new, before = old_and_new(tmp_path, old_shards, new_shards)
    for error in (
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: I/O error: No space left on device"),
    ):
        fail_writing(monkeypatch, failing, error)
        with pytest.raises(LooptuneError, match="No space left on device.*keeps what it held"):
            save_checkpoint(new, ck, max_shard_bytes=new_shards)
        assert snapshot(ck) == before
    fail_writing(monkeypatch, failing, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(new, ck, max_shard_bytes=new_shards)
    assert snapshot(ck) == before
    assert_loads_as(ck, old)
    monkeypatch.undo()
    save_checkpoint(new, ck, max_shard_bytes=new_shards)
    assert_loads_as(ck, new)
    weights = {f.name for f in ck.glob("*.safetensors")}
    if new_shards is None:
        assert weights == {"model.safetensors"} and not (ck / INDEX_NAME).exists()
    else:
        assert weights == set(json.loads((ck / INDEX_NAME).read_text())["weight_map"].values())


def test_shard_names_the_old_checkpoint_uses_are_not_overwritten(tmp_path):
    """The new shards take other names while the old index still names the usual ones; the
    next save takes the usual names back."""
    ck, old, new, _ = old_and_new(tmp_path, 4096, 4096)
    usual = sorted(f.name for f in ck.glob("model-*.safetensors"))
    save_checkpoint(new, ck, max_shard_bytes=4096)
    other = sorted(f.name for f in ck.glob("model-*.safetensors"))
    assert len(other) == len(usual) and not set(other) & set(usual)
    assert other[0] == usual[0].replace(".safetensors", "-1.safetensors")
    save_checkpoint(old, ck, max_shard_bytes=4096)
    assert sorted(f.name for f in ck.glob("model-*.safetensors")) == usual
    assert_loads_as(ck, old)


def test_ctrl_c_while_the_new_files_are_put_in_place_waits_for_the_last_one(tmp_path, monkeypatch):
    """Ctrl-C arriving between two renames of the switch is acted on after it: the directory
    is the whole new checkpoint, not a mix, and the interrupt still ends the caller."""
    import os
    import signal

    from looptune.model import save

    ck, _, new, _ = old_and_new(tmp_path, 4096, 4096)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        real(src, dst)

    monkeypatch.setattr(save.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt, match="the new checkpoint was written first"):
        save_checkpoint(new, ck, max_shard_bytes=4096)
    monkeypatch.undo()
    assert len(calls) > 3  # every shard, the index and config.json were renamed after it
    assert_loads_as(ck, new)
    index = json.loads((ck / INDEX_NAME).read_text())
    assert {f.name for f in ck.glob("*.safetensors")} == set(index["weight_map"].values())


def test_sigterm_held_during_the_switch_ends_the_save_with_nothing_left_over(tmp_path, monkeypatch):
    """SIGTERM in the switch (a library caller, its default action: the process ends as the
    switch does): the directory holds the new checkpoint and no staging directory."""
    import os
    import signal

    from looptune.model import save

    ck, _, new, _ = old_and_new(tmp_path, 4096, 4096)
    real, seen = os.replace, []

    def replace(src, dst):
        if not seen:
            os.kill(os.getpid(), signal.SIGTERM)
        seen.append(dst)
        real(src, dst)

    def terminated(signum, frame):  # the process would end here: what does it leave?
        seen.append(sorted(f.name for f in ck.iterdir() if f.name.startswith(".")))

    monkeypatch.setattr(save.os, "replace", replace)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        save_checkpoint(new, ck, max_shard_bytes=4096)
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert seen[-1] == []
    assert_loads_as(ck, new)


KILLED_SAVE = """
import os, signal, sys
import torch
from looptune.model import save
from looptune.model.checkpoint import build_model
from looptune.model.config import preset_config

real, calls = save.save_file, []
def save_file(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == int(sys.argv[2]):
        open(path, "wb").write(b"half a shard")
        # safetensors 0.8 writes a ".tmpXXXXXX" beside the path it is given, then renames it
        open(os.path.join(os.path.dirname(path), ".tmpAbC123"), "wb").write(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    real(tensors, path, metadata=metadata)
save.save_file = save_file
model = build_model(preset_config("tiny", window=5), "cpu", torch.float32, seed=1)
save.save_checkpoint(model, sys.argv[1], max_shard_bytes=4096)
"""


@pytest.mark.slow  # a second Python with torch (4 s); in process: the test of failures above
def test_a_save_killed_half_way_leaves_the_old_checkpoint(tmp_path):
    """SIGKILL in the middle of the second shard: nothing can clean up, and still the old
    checkpoint loads; the killed writer's temporary files go with the next save."""
    ck, old, new, before = old_and_new(tmp_path, 4096, 4096)
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(ck), "2"], check=False)
    assert proc.returncode == -9
    left = set(snapshot(ck)) - set(before)
    assert [name.split(".")[1] for name in left] == ["looptune-save"]  # one staging directory
    assert {name: data for name, data in snapshot(ck).items() if name in before} == before
    loaded, _ = load_model(ck, device="cpu")
    assert torch.equal(logits_of(loaded), logits_of(old))
    save_checkpoint(new, ck, max_shard_bytes=4096)
    assert_loads_as(ck, new)
    assert not [f.name for f in ck.iterdir() if f.name.startswith(".")]  # safetensors' too


def test_a_failed_re_export_keeps_the_earlier_copy(tmp_path, monkeypatch):
    """`export --write-weights` / `--to hf` into its earlier copy: a full disk or Ctrl-C while
    rewriting a shard leaves the earlier copy loadable; untouched shards stay hard links."""
    import errno
    import os

    from looptune.export import weights
    from looptune.model.arch import LOOP

    def source(name, seed):
        loop = {k: v for k, v in LOOP.init_config.items() if k != "gate"}
        model = tiny_model("query", seed=seed, architecture=LOOP.name, **loop)
        save_checkpoint(model, tmp_path / name, max_shard_bytes=4096)
        config = json.loads((tmp_path / name / "config.json").read_text())
        return model, {**config, "looptune_export": [f"copy of {name}"]}

    def copy(name, config):
        renames = {
            f"model.gate_projections.{i}.{p}": f"model.layers.{i}.gate_projection.{p}"
            for i in range(2)
            for p in ("weight", "bias")
        }  # the HF save spelling
        return weights.write_model_dir(tmp_path / name, tmp_path / "out", renames, config)

    (first, first_config), (second, second_config) = source("a", 0), source("b", 1)
    copy("a", first_config)
    before = snapshot(tmp_path / "out")
    real = weights.save_file
    for error in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):

        def full(tensors, path, metadata=None, error=error):
            real(tensors, path, metadata=metadata)
            raise error

        monkeypatch.setattr(weights, "save_file", full)
        with pytest.raises(type(error)):
            copy("b", second_config)
        assert snapshot(tmp_path / "out") == before
        assert_loads_as(tmp_path / "out", first)
    monkeypatch.undo()
    done = copy("b", second_config)
    assert_loads_as(tmp_path / "out", second)
    assert done["rewritten"] and done["linked"]
    for name in done["linked"]:
        assert os.path.samefile(tmp_path / "out" / name, tmp_path / "b" / name)
    assert not [f for f in (tmp_path / "out").iterdir() if f.name.endswith(".tmp")]


def test_init_stopped_half_way_keeps_nothing_and_says_so_in_one_line(tmp_path, monkeypatch):
    """`looptune init` into a new directory: Ctrl-C is 130 and a full disk is exit 2, each one
    line, and neither leaves the directories it made; into an existing one, its files stay."""
    import errno

    ck = tmp_path / "new" / "ck"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")
    for error, code in ((KeyboardInterrupt(), 130), (OSError(errno.ENOSPC, "No space"), 2)):
        fail_writing(monkeypatch, "model-00002-of", error)
        for where, kept in ((ck, "nothing was kept"), (tmp_path / "old", "keeps what it held")):
            result = runner.invoke(
                app, ["init", str(where), "--shard-mib", "1", "--preset", "small"]
            )
            assert result.exit_code == code, result.output
            assert len(result.stderr.splitlines()) == 1 and kept in result.stderr
        assert not (tmp_path / "new").exists()
        assert [f.name for f in (tmp_path / "old").iterdir()] == ["notes.txt"]


INDEX_NAME = "model.safetensors.index.json"


def test_a_second_save_into_the_directory_waits_for_the_first(tmp_path, capfd):
    """Two saves into one directory at once would rename their shards, under the same new
    names, in turn: a mix of two models that loads. The second waits, saying so, then wins."""
    import threading

    from looptune.model.save import StagedFiles

    ck, _, new, before = old_and_new(tmp_path, 4096, 4096)
    with StagedFiles(ck):  # the first save, between its start and its end
        second = threading.Thread(target=save_checkpoint, args=(new, ck, 4096))
        second.start()
        said = ""
        while "another save into it is under way" not in said and second.is_alive():
            second.join(0.05)
            said += capfd.readouterr().err
        assert second.is_alive(), "the second save did not wait"
        assert {k: v for k, v in snapshot(ck).items() if v is not None} == before
    second.join()
    assert_loads_as(ck, new)
    assert not [f.name for f in ck.iterdir() if f.name.startswith(".")]


def test_other_weight_files_in_the_directory_are_kept(tmp_path):
    """A save replaces the old checkpoint's weights and stray shards of the usual names, never
    a user's own files, model_ema.safetensors included."""
    ck, old, new, _ = old_and_new(tmp_path, 4096, 4096)
    mine = {"model_ema.safetensors": b"ema", "model.fp16.safetensors": b"half", "notes": b"x"}
    for name, data in mine.items():
        (ck / name).write_bytes(data)
    (ck / "model-00009-of-00012.safetensors").write_bytes(b"a stray shard")
    (ck / "train_state").mkdir()  # `looptune train` keeps its resumable state here
    (ck / "train_state" / "model-00000005.safetensors").write_bytes(b"state")
    for shards, model in ((None, new), (4096, old), (None, new)):
        save_checkpoint(model, ck, max_shard_bytes=shards)
        assert_loads_as(ck, model)
        assert {name: (ck / name).read_bytes() for name in mine} == mine
    assert not (ck / "model-00009-of-00012.safetensors").exists()
    assert (ck / "train_state" / "model-00000005.safetensors").read_bytes() == b"state"
    assert {f.name for f in ck.iterdir()} == {
        *mine,
        "config.json",
        "model.safetensors",
        "train_state",
    }


@pytest.mark.parametrize("hard_links", [True, False])
def test_an_export_copy_keeps_its_bytes_when_the_source_is_saved_again(
    tmp_path, monkeypatch, hard_links
):
    """A copy shares its unchanged files with the source (hard links); saving the source again
    must not change the copy, also where no hard link can be made (another file system)."""
    import errno
    import os

    from looptune.export import weights

    first, second = tiny_model(seed=0), tiny_model(seed=1)
    save_checkpoint(first, tmp_path / "src", max_shard_bytes=4096)
    if not hard_links:

        def no_link(src, dst, **kw):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", no_link)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    weights.write_model_dir(tmp_path / "src", tmp_path / "out", {}, config)
    monkeypatch.undo()
    before = snapshot(tmp_path / "out")
    save_checkpoint(second, tmp_path / "src", max_shard_bytes=4096)
    save_checkpoint(second, tmp_path / "src")
    assert snapshot(tmp_path / "out") == before
    assert_loads_as(tmp_path / "out", first)
    assert not [f for f in (tmp_path / "out").iterdir() if f.is_symlink()]


def test_a_re_export_removes_the_earlier_copys_files_and_keeps_the_users(tmp_path):
    """A copy of another checkpoint into an earlier copy: the earlier one's files go (a stale
    shard, a tokenizer file the new source has not), a file the user put there stays."""
    from looptune.export import weights

    save_checkpoint(tiny_model(seed=0), tmp_path / "a", max_shard_bytes=4096)
    (tmp_path / "a" / "generation_config.json").write_text("{}")
    second = tiny_model(seed=1)
    save_checkpoint(second, tmp_path / "b")
    out = tmp_path / "out"
    for name in ("a", "b"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        weights.write_model_dir(tmp_path / name, out, {}, config)
        if name == "a":
            (out / "NOTES.md").write_text("how I serve it")
    assert {f.name for f in out.iterdir() if not f.name.startswith(".")} == {
        "NOTES.md",
        "config.json",
        "model.safetensors",
    }
    assert_loads_as(out, second)


def test_a_symlinked_checkpoint_directory_is_saved_through_and_a_broken_one_named(tmp_path):
    """A checkpoint directory reached by a symbolic link is saved in its target (the link
    stays); a link to nothing is one line saying so, not "File exists"."""
    ck, _, new, _ = old_and_new(tmp_path, 4096, 4096)
    (tmp_path / "link").symlink_to(ck)
    save_checkpoint(new, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert_loads_as(ck, new)
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    result = runner.invoke(app, ["init", str(tmp_path / "broken")])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {tmp_path / 'broken'}: a symbolic link to {tmp_path / 'nowhere'}, "
        "which does not exist\n"
    )


def test_a_re_export_waiting_for_another_removes_what_that_one_wrote(tmp_path, capfd):
    """Two exports into one copy: the second waits for the first, then removes the files the
    first wrote that it does not (it reads the copy's list once it holds the directory)."""
    import threading

    from looptune.export import weights
    from looptune.model.save import StagedFiles

    second = tiny_model(seed=1)
    save_checkpoint(tiny_model(seed=0), tmp_path / "a")
    save_checkpoint(second, tmp_path / "b")
    out = tmp_path / "out"
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    weights.write_model_dir(tmp_path / "a", out, {}, config)
    b_config = json.loads((tmp_path / "b" / "config.json").read_text())
    with StagedFiles(out) as first:  # an export of a checkpoint that has a generation config
        later = threading.Thread(
            target=weights.write_model_dir, args=(tmp_path / "b", out, {}, b_config)
        )
        later.start()
        said = ""
        while "another save into it is under way" not in said and later.is_alive():
            later.join(0.05)
            said += capfd.readouterr().err
        first.write_bytes("generation_config.json", b"{}")
        listed = ["config.json", "generation_config.json", "model.safetensors"]
        first.write_bytes(weights.MARK, json.dumps(listed).encode())
        first.commit()
    later.join()
    assert not (out / "generation_config.json").exists()
    assert_loads_as(out, second)


KILLED_SWITCH = """
import os, signal, sys
import torch
from looptune.model import save
from looptune.model.checkpoint import build_model
from looptune.model.config import preset_config

real = os.replace
def replace(src, dst):
    if os.path.basename(dst) in ("model.safetensors", "model.safetensors.index.json"):
        real(src, dst)  # the new weights are in, their config not yet
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
save.os.replace = replace
model = build_model(preset_config("tiny", window=5), "cpu", torch.float32, seed=1)
save.save_checkpoint(model, sys.argv[1], max_shard_bytes=int(sys.argv[2]) or None)
"""


@pytest.mark.slow  # a second Python with torch per case (4 s each)
@pytest.mark.parametrize("shards", [None, 4096])
def test_a_save_killed_between_weights_and_config_never_loads_as_a_mix(tmp_path, shards):
    """SIGKILL after the new weights went in and before their config: what is left must not
    load as the new weights under the old config (window 32 read as 5's weights, silently),
    but fail in one line that says a save was stopped; the next save makes it whole."""
    ck, _, new, _ = old_and_new(tmp_path, shards, shards)
    cmd = [sys.executable, "-c", KILLED_SWITCH, str(ck), str(shards or 0)]
    assert subprocess.run(cmd, check=False).returncode == -9
    with pytest.raises(LooptuneError, match="save into this directory was stopped"):
        load_model(ck, device="cpu")
    save_checkpoint(new, ck, max_shard_bytes=shards)
    assert_loads_as(ck, new)


KILLED_RE_EXPORT = """
import json, os, signal, sys
from looptune.export import weights
from looptune.model import save

real = os.replace
def replace(src, dst):
    real(src, dst)
    if os.path.basename(dst).startswith("model-00001"):  # one shard of the new copy is in
        os.kill(os.getpid(), signal.SIGKILL)
save.os.replace = replace
source, target = sys.argv[1], sys.argv[2]
config = json.load(open(os.path.join(source, "config.json"))) | {"looptune_export": ["b"]}
weights.write_model_dir(source, target, {}, config)
"""


@pytest.mark.slow  # a second Python with torch (4 s)
def test_a_re_export_killed_among_its_shards_never_loads_as_a_mix(tmp_path):
    """The copy's shards keep the source's names, so a re-export replaces the earlier copy's
    shards one by one: killed after the first, the copy must not load as shard 1 of the new
    checkpoint beside shard 2 of the old under the old config, but fail in one line."""
    from looptune.export import weights

    for name, seed in (("a", 0), ("b", 1)):
        save_checkpoint(tiny_model(seed=seed), tmp_path / name, max_shard_bytes=4096)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    weights.write_model_dir(tmp_path / "a", tmp_path / "out", {}, config | {"looptune_export": []})
    cmd = [sys.executable, "-c", KILLED_RE_EXPORT, str(tmp_path / "b"), str(tmp_path / "out")]
    assert subprocess.run(cmd, check=False).returncode == -9
    with pytest.raises(LooptuneError, match="save into this directory was stopped"):
        load_model(tmp_path / "out", device="cpu")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    weights.write_model_dir(tmp_path / "b", tmp_path / "out", {}, config | {"looptune_export": []})
    assert_loads_as(tmp_path / "out", tiny_model(seed=1))


@pytest.mark.parametrize("shards", [None, 4096])
def test_a_load_that_a_save_overtakes_reads_one_checkpoint_not_a_mix(tmp_path, monkeypatch, shards):
    """Another process saves into the directory while it is loaded, between config.json and
    the weights: what loads is the new checkpoint whole (it was the old config with the new
    weights), and a save that keeps overtaking is one line."""
    from looptune.model import checkpoint

    ck, _, new, _ = old_and_new(tmp_path, shards, shards)
    real, saves = checkpoint.read_layout, []

    def overtaken(*args, **kwargs):
        if len(saves) < 1:
            saves.append(save_checkpoint(new, ck, max_shard_bytes=shards))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "read_layout", overtaken)
    assert_loads_as(ck, new)

    def always(*args, **kwargs):  # each read overtaken by another save
        save_checkpoint(tiny_model(window=10 + len(saves)), ck, max_shard_bytes=shards)
        saves.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "read_layout", always)
    with pytest.raises(LooptuneError, match="changed by a save while it was read, 3 times"):
        load_model(ck, device="cpu")


def test_content_hash_follows_a_file_rewritten_with_its_size_and_mtime_kept(tmp_path):
    """The hash labels every measurement: weights changed in place with the size and mtime
    kept (`cp -p` of another checkpoint of the same shape) must not reuse the old hash."""
    import os

    from looptune.model.checkpoint import content_hash

    save_checkpoint(tiny_model(seed=0), tmp_path / "a")
    save_checkpoint(tiny_model(seed=1), tmp_path / "b")
    weights = tmp_path / "a" / "model.safetensors"
    first, st = content_hash(tmp_path / "a"), weights.stat()
    weights.write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())  # same inode
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size
    assert content_hash(tmp_path / "a") == content_hash(tmp_path / "b") != first


@pytest.mark.parametrize("shards", [None, 4096])
def test_a_save_that_waited_for_another_writes_its_config_over_that_ones(
    tmp_path, monkeypatch, shards
):
    """B's config equals the directory's when B starts, but A (another config) saves while
    B waits for the directory's lock: B, the last save, must win whole with its own config,
    never put its weights under A's config (it decided 'weights only' before the wait)."""
    from looptune.model import save

    ck = tmp_path / "ck"
    save_checkpoint(tiny_model(seed=0), ck, max_shard_bytes=shards)
    a, b = tiny_model(seed=2, window=5), tiny_model(seed=1)  # b: the directory's config
    real, waited = save._lock, []

    def a_saves_first(directory):
        if not waited:  # (A's own lock is the next call)
            waited.append(directory)
            save_checkpoint(a, ck, max_shard_bytes=shards)
        return real(directory)

    monkeypatch.setattr(save, "_lock", a_saves_first)
    save_checkpoint(b, ck, max_shard_bytes=shards)
    assert waited
    assert_loads_as(ck, b)


@pytest.mark.parametrize("what", ["config.json", "model.safetensors", INDEX_NAME])
def test_a_file_that_cannot_be_read_is_one_line_from_load_and_hash(tmp_path, what):
    """A checkpoint file this user may not read (another user's 0600 file; as root, whom
    modes do not stop, a directory in its place) is one line naming it, from the loader and
    from content_hash alike (was a PermissionError traceback, or safetensors' 'No such file')."""
    import os
    import shutil

    from looptune.model.checkpoint import content_hash

    ck = tmp_path / "ck"
    save_checkpoint(tiny_model(), ck, max_shard_bytes=4096 if what == INDEX_NAME else None)
    if os.geteuid() == 0:
        (ck / what).unlink()
        (ck / what).mkdir()
    else:
        (ck / what).chmod(0)
    for read in (lambda: load_model(ck, device="cpu"), lambda: content_hash(ck)):
        with pytest.raises(CheckpointError, match=f"{what}: cannot read it") as e:
            read()
        assert "\n" not in str(e.value)
    shutil.rmtree(ck / what, ignore_errors=True)


def test_a_dangling_weights_link_is_named_not_taken_for_a_save(tmp_path):
    """A hub snapshot whose blob is gone leaves model.safetensors a link to nothing: one line
    that says so (content_hash said a save changed the directory, three times)."""
    import os

    from looptune.model.checkpoint import content_hash

    ck = tmp_path / "ck"
    save_checkpoint(tiny_model(), ck)
    (ck / "model.safetensors").unlink()
    os.symlink(tmp_path / "blobs" / "gone", ck / "model.safetensors")
    for read in (lambda: load_model(ck, device="cpu"), lambda: content_hash(ck)):
        with pytest.raises(CheckpointError, match="model.safetensors: a symbolic link to .*gone"):
            read()


def test_content_hash_overtaken_between_the_index_and_its_shards_starts_again(
    tmp_path, monkeypatch
):
    """A save that replaces the shards just after the hash read the index (the old shards
    gone) makes it start again, as a load does: not 'names ..., which is missing'."""
    import types

    from looptune.model import checkpoint

    ck, _, new, _ = old_and_new(tmp_path, 4096, 4096)
    saved = []

    def loads(text):
        out = json.loads(text)
        if "weight_map" in out and not saved:
            saved.append(save_checkpoint(new, ck, max_shard_bytes=4096))
        return out

    fake = types.SimpleNamespace(loads=loads, JSONDecodeError=json.JSONDecodeError)
    monkeypatch.setattr(checkpoint, "json", fake)
    got = checkpoint.content_hash(ck)
    assert saved
    checkpoint._HASHES.clear()
    assert got == checkpoint.content_hash(ck)


def test_a_new_tokenizer_takes_the_config_out_before_the_weights_go_in(tmp_path, monkeypatch):
    """The same config with another tokenizer.json: killed between the weights and the
    tokenizer, the old tokenizer would be left beside the new weights under a valid config. So
    a new tokenizer is switched like a new config (config.json out before the weights, back
    last); the same tokenizer and config switch the weights alone."""
    from looptune.model import save

    order = []
    real = save.StagedFiles.commit

    def recording(self):
        order.append(
            [("remove " if tmp is None else "") + final.name for tmp, final in self._steps]
        )
        real(self)

    monkeypatch.setattr(save.StagedFiles, "commit", recording)
    (tmp_path / "a.json").write_text('{"a": 1}')
    (tmp_path / "b.json").write_text('{"b": 2}')
    ck = tmp_path / "ck"
    save_checkpoint(tiny_model(seed=0), ck, tokenizer_json=tmp_path / "a.json")
    save_checkpoint(tiny_model(seed=1), ck, tokenizer_json=tmp_path / "b.json")
    save_checkpoint(tiny_model(seed=2), ck, tokenizer_json=tmp_path / "b.json")
    assert order[1][0] == "remove config.json"
    assert order[1].index("tokenizer.json") < order[1].index("config.json") == len(order[1]) - 1
    assert not [step for step in order[2] if "config.json" in step]
    assert (ck / "tokenizer.json").read_text() == '{"b": 2}'


def test_a_load_that_fails_because_a_save_overtook_it_starts_again(tmp_path, monkeypatch):
    """A save of another shape between the layout and the tensors makes `load_state_dict`
    raise a size mismatch (a RuntimeError): that is the same race, read again; the same error
    with nothing changed is the error."""
    from looptune.model import checkpoint

    ck = tmp_path / "ck"
    save_checkpoint(tiny_model(seed=0), ck)
    new = tiny_model(seed=1, window=5)
    real, calls = checkpoint.read_layout, []

    def overtaken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            save_checkpoint(new, ck)
            raise RuntimeError("size mismatch for model.embed_tokens.weight")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "read_layout", overtaken)
    assert_loads_as(ck, new)

    def broken(*args, **kwargs):
        raise RuntimeError("size mismatch for model.embed_tokens.weight")

    monkeypatch.setattr(checkpoint, "read_layout", broken)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(ck, device="cpu")

"""Checkpoint io: round trips, shards, and a clear error for each bad input (layouts of other
writers: test_layouts.py)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from looptune.cli import app
from looptune.errors import CheckpointError
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

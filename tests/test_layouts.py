"""Conformance: checkpoints written exactly as the makers' code saves them load with the right
semantics, and give the logits of the same weights in looptune's own (state-dict) spelling.

Each fixture's config.json carries the keys the maker's config class writes, with its nulls and
`model_type` (configuration_iquestloopcoder.py, configuration_iquestpltcoder.py), and its gate
tensors are named as that writer names them (see looptune/model/arch.py for who writes what).
"""

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import save_file
from typer.testing import CliRunner

from looptune.cli import app
from looptune.errors import CheckpointError
from looptune.model import load_model
from looptune.model.checkpoint import init_checkpoint

runner = CliRunner()
SHAPE = {
    "vocab_size": 264,
    "hidden_size": 16,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
}
HF_COMMON = {
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-05,
    "use_cache": True,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "pad_token_id": None,
    "bos_token_id": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.57.1",
}


def iquest_config(window=5):
    return {
        "architectures": ["IQuestLoopCoderForCausalLM"],
        "model_type": "iquestloopcoder",
        **SHAPE,
        **HF_COMMON,
        "max_position_embeddings": 8192,
        "eos_token_id": 2,
        "loop_num": 2,
        "loop_window_size": window,
    }


def plt_config(**loop):
    """LoopCoder-V2's config class with its defaults, then `loop` on top."""
    defaults = {
        "plt_num_loops": 2,
        "plt_window_size": [64, 0],
        "plt_normalize_per_loop": True,
        "plt_emb_scale": None,
        "plt_hidden_scale": None,
        "plt_gate_use_hidden_states": False,
    }
    return {
        "architectures": ["IQuestPLTCoderForCausalLM"],
        "model_type": "iquestpltcoder",
        **SHAPE,
        **HF_COMMON,
        "max_position_embeddings": 131072,
        "eos_token_id": [2, 75864, 75869],
        **defaults,
        **loop,
    }


def reference(gate, **cfg):
    """The same weights in looptune's spelling: a tiny model built from an explicit config."""
    base = {
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tokenizer": "tokenizer.json",
    }
    return tiny_model(gate, **SHAPE, **{**base, **cfg})


def write(directory, config: dict, model, gate_name) -> None:
    """`model`'s weights under the writer's names; `gate_name(layer, part)` names a gate tensor."""
    directory.mkdir()
    state = {}
    for key, t in model.state_dict().items():
        parts = key.split(".")
        if ".plt_gate." in key or ".gate_projection." in key:
            key = gate_name(int(parts[2]), ".".join(parts[5:]))
        state[key] = t.contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))


IQUEST = {
    "architecture": "IQuestLoopCoderForCausalLM",
    "mode": "plt-noshift",
    "emb_scale": 0.0,
    "hidden_scale": 1.0,
    "normalize_per_loop": False,
    "window": 5,
}
PLT = {
    "architecture": "IQuestPLTCoderForCausalLM",
    "mode": "plt",
    "max_position_embeddings": 131072,
}

# (config.json, reference config, gate kind, gate tensor name) for each layout in the wild.
LAYOUTS = {
    "iquest-hf-save_pretrained": (
        iquest_config(),
        IQUEST,
        "query",
        lambda i, p: f"model.layers.{i}.gate_projection.{p}",
    ),
    "iquest-released-model-level": (
        iquest_config(),
        IQUEST,
        "query",
        lambda i, p: f"model.gate_projections.{i}.{p}",
    ),
    "iquest-engine-parameter-names": (
        iquest_config(),
        IQUEST,
        "query",
        lambda i, p: f"model.gate_projections.{i}.gate_proj.{p}",
    ),
    # Defaults of configuration_iquestpltcoder.py: null scales are 1.0, the query gate, [64, 0]
    # is W = 65 keys.
    "loopcoder-v2-class-defaults": (
        plt_config(),
        dict(PLT, window=65, emb_scale=1.0, hidden_scale=1.0),
        "query",
        lambda i, p: f"model.layers.{i}.self_attn.plt_gate.{p}",
    ),
    "loopcoder-v2-query-gate": (
        plt_config(plt_emb_scale=0.707, plt_hidden_scale=0.053, plt_window_size=[4, 0]),
        dict(PLT, window=5, emb_scale=0.707, hidden_scale=0.053),
        "query",
        lambda i, p: f"model.layers.{i}.self_attn.plt_gate.{p}",
    ),
    "loopcoder-v2-hidden-gate": (
        plt_config(plt_gate_use_hidden_states=True, plt_window_size=[4, 0]),
        dict(PLT, window=5),
        "hidden",
        lambda i, p: f"model.layers.{i}.self_attn.plt_gate.{p}",
    ),
    "loopcoder-v2-loop_gate_proj": (
        plt_config(
            plt_gate_use_hidden_states=True, plt_normalize_per_loop=False, plt_window_size=[4, 0]
        ),
        dict(PLT, window=5, normalize_per_loop=False),
        "hidden",
        lambda i, p: f"model.layers.{i}.self_attn.loop_gate_proj.{p}",
    ),
}


def logits(model, loops=2):
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids, loops=loops)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_layout_loads_and_matches_the_canonical_spelling(tmp_path, name):
    config, ref_cfg, gate, gate_name = LAYOUTS[name]
    ref = reference(gate, **ref_cfg)
    write(tmp_path / "ck", config, ref, gate_name)
    loaded, tokenizer = load_model(tmp_path / "ck", device="cpu")
    assert tokenizer is None  # no tokenizer.json beside the weights: ids only
    for field in (
        "architecture",
        "mode",
        "gate",
        "window",
        "emb_scale",
        "hidden_scale",
        "normalize_per_loop",
        "rope_theta",
        "rms_norm_eps",
    ):
        assert getattr(loaded.config, field) == getattr(ref.config, field), field
    for loops in (1, 2, 3):
        diff = (logits(loaded, loops) - logits(ref, loops)).abs().max().item()
        assert diff < 1e-5, (loops, diff)


def test_info_names_the_layout_and_the_engines_that_load_it(tmp_path):
    config, ref_cfg, gate, gate_name = LAYOUTS["iquest-hf-save_pretrained"]
    write(tmp_path / "ck", config, reference(gate, **ref_cfg), gate_name)
    result = runner.invoke(app, ["info", str(tmp_path / "ck"), "--json"])
    assert result.exit_code == 0, result.output
    layout = json.loads(result.stdout)["layout"]
    assert layout["label"] == "IQuest-Loop, official HF save format"
    assert layout["gate_tensors"] == [
        "model.layers.0.gate_projection.weight",
        "model.layers.0.gate_projection.bias",
    ]
    assert layout["loaded_by"] == ["the Hugging Face remote code"]
    human = runner.invoke(app, ["info", str(tmp_path / "ck")])
    assert human.exit_code == 0
    assert "IQuest-Loop, official HF save format" in human.stderr
    assert "loaded by: the Hugging Face remote code" in human.stderr


@pytest.mark.parametrize(
    "arch, names, engines",
    [
        (
            "iquest-loop",
            ["model.gate_projections.0.weight", "model.gate_projections.0.bias"],
            ["vLLM", "mlx-lm"],
        ),
        (
            "plt",
            [
                "model.layers.0.self_attn.plt_gate.weight",
                "model.layers.0.self_attn.plt_gate.bias",
                "model.layers.0.self_attn.plt_gate.gate_norm.weight",
            ],
            ["the PLT-enabled vLLM fork"],
        ),
    ],
)
def test_init_writes_the_spelling_engines_load(tmp_path, arch, names, engines):
    init_checkpoint(tmp_path / "ck", "tiny", arch=arch, device="cpu")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert set(names) <= stored
    assert not any("self_attn.gate_projection" in n for n in stored)
    doc = json.loads(runner.invoke(app, ["info", str(tmp_path / "ck"), "--json"]).stdout)
    assert doc["layout"]["gate_tensors"] == names
    assert all(e in doc["layout"]["loaded_by"] for e in engines)
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert raw["model_type"] in ("iquestloopcoder", "iquestpltcoder")


def test_unknown_gate_spelling_is_one_line_listing_the_expected_names(tmp_path):
    config, ref_cfg, gate, _ = LAYOUTS["iquest-released-model-level"]
    write(
        tmp_path / "ck",
        config,
        reference(gate, **ref_cfg),
        lambda i, p: f"model.layers.{i}.self_attn.mystery_gate.{p}",
    )
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "ck", device="cpu")
    message = str(err.value)
    assert "\n" not in message
    for expected in (
        "model.gate_projections.0.weight",
        "model.layers.0.gate_projection.weight",
        "model.gate_projections.0.gate_proj.weight",
    ):
        assert expected in message
    result = runner.invoke(app, ["info", str(tmp_path / "ck")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


def test_gate_kind_and_shape_must_agree(tmp_path):
    """plt_gate_use_hidden_states: false with a hidden-state gate's [H, d] weight is an error
    naming both, not a silent misread."""
    config, ref_cfg, _, gate_name = LAYOUTS["loopcoder-v2-hidden-gate"]
    write(
        tmp_path / "ck",
        {**config, "plt_gate_use_hidden_states": False},
        reference("hidden", **ref_cfg),
        gate_name,
    )
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "ck", device="cpu")
    message = str(err.value)
    assert "plt_gate_use_hidden_states: false" in message
    assert "model.layers.0.self_attn.plt_gate.weight has shape [2, 16]" in message
    assert "\n" not in message


def test_bad_null_and_mixed_spellings_are_one_line(tmp_path):
    config, ref_cfg, gate, gate_name = LAYOUTS["loopcoder-v2-query-gate"]
    write(
        tmp_path / "ck", {**config, "plt_emb_scale": "big"}, reference(gate, **ref_cfg), gate_name
    )
    with pytest.raises(CheckpointError, match="plt_emb_scale must be a number or null"):
        load_model(tmp_path / "ck", device="cpu")
    scaled = json.loads((tmp_path / "ck" / "config.json").read_text())
    scaled.update(plt_emb_scale=None, rope_scaling={"rope_type": "linear", "factor": 2.0})
    (tmp_path / "ck" / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(CheckpointError, match="rope_scaling .* is not supported"):
        load_model(tmp_path / "ck", device="cpu")
    config, ref_cfg, gate, _ = LAYOUTS["iquest-released-model-level"]
    write(
        tmp_path / "mixed",
        config,
        reference(gate, **ref_cfg),
        lambda i, p: (
            f"model.gate_projections.{i}.{p}" if i == 0 else f"model.layers.{i}.gate_projection.{p}"
        ),
    )
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_model(tmp_path / "mixed", device="cpu")


def test_info_says_when_the_tokenizer_the_config_names_is_missing(tmp_path):
    """A maker's checkpoint without tokenizer.json takes ids only (score and generate need
    text); `info` says so instead of naming a file that is not there."""
    config, ref_cfg, gate, gate_name = LAYOUTS["iquest-released-model-level"]
    write(tmp_path / "ck", config, reference(gate, **ref_cfg), gate_name)
    human = runner.invoke(app, ["info", str(tmp_path / "ck")])
    assert human.exit_code == 0, human.output
    assert "tokenizer.json missing (token ids only)" in human.stderr
    doc = json.loads(runner.invoke(app, ["info", str(tmp_path / "ck"), "--json"]).stdout)
    assert doc["tokenizer_found"] is False


def test_init_plt_writes_the_window_as_loopcoder_v2s_config_class_does(tmp_path):
    """configuration_iquestpltcoder.py holds plt_window_size as flash-attention's [left, 0]
    pair; a checkpoint looptune makes says W the same way, and reads back as W."""
    init_checkpoint(tmp_path / "ck", "tiny", arch="plt", window=8, device="cpu")
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert raw["plt_window_size"] == [7, 0]
    model, _ = load_model(tmp_path / "ck", device="cpu")
    assert model.config.window == 8


def without_architectures(config: dict, **changes) -> dict:
    """`config` as a hand-written or converted config.json might come: no `architectures`."""
    out = {k: v for k, v in config.items() if k != "architectures"}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize(
    "layout, model_type, family",
    [
        ("loopcoder-v2-query-gate", "my_plt_coder", "LoopCoder-V2"),
        ("iquest-released-model-level", None, "IQuest-Coder-V1-Loop"),
    ],
)
def test_a_config_without_a_known_name_is_read_by_its_loop_keys_with_a_warning(
    tmp_path, capsys, layout, model_type, family
):
    """No `architectures` and an unknown (or no) `model_type`, but loop keys of one family
    only: read as that family, with the same logits, and a warning saying what was assumed."""
    config, ref_cfg, gate, gate_name = LAYOUTS[layout]
    ref = reference(gate, **ref_cfg)
    write(tmp_path / "ck", without_architectures(config, model_type=model_type), ref, gate_name)
    shown = runner.invoke(app, ["info", str(tmp_path / "ck"), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["layout"]["family"] == family  # stdout: the document only
    warning = shown.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: ")
    assert f"read as {family}" in warning[0] and ref_cfg["architecture"] in warning[0]
    loaded, _ = load_model(tmp_path / "ck", device="cpu")
    assert loaded.config.architecture == ref_cfg["architecture"]
    assert loaded.config.mode == ref.config.mode
    assert (logits(loaded) - logits(ref)).abs().max().item() < 1e-5


def test_a_config_that_names_no_known_model_is_one_line_naming_what_looptune_reads(tmp_path):
    """An unknown model_type without loop keys, or with both families' loop keys, is an error
    (exit 2 from the CLI), not a model silently read as LoopCoder-V2."""
    config, ref_cfg, gate, gate_name = LAYOUTS["loopcoder-v2-query-gate"]
    plain = {k: None for k in config if k.startswith("plt_")}
    cases = {
        "model_type 'llama' is unknown, and no loop keys": without_architectures(
            config, model_type="llama", **plain
        ),
        "loop keys of both LoopCoder-V2 and IQuest-Coder-V1-Loop": without_architectures(
            config, model_type=None, loop_num=2
        ),
    }
    for i, (said, bad) in enumerate(cases.items()):
        name = f"ck{i}"
        write(tmp_path / name, bad, reference(gate, **ref_cfg), gate_name)
        with pytest.raises(CheckpointError) as err:
            load_model(tmp_path / name, device="cpu")
        message = str(err.value)
        assert "\n" not in message and "no `architectures`" in message and said in message
        assert "IQuestPLTCoderForCausalLM (model_type iquestpltcoder" in message
        assert "IQuestLoopCoderForCausalLM (model_type iquestloopcoder" in message
        result = runner.invoke(app, ["info", str(tmp_path / name)])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1
        assert result.stderr == f"error: {message}\n"

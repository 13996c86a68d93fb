"""`looptune export`: each engine's file parsed back and checked against its table of facts.

The engines' own argument parsers are not importable here (vLLM's needs the whole GPU build,
SGLang 0.5.23's server_args imports its runtime), so the round trip goes through the option names
the engines document, flattened the way `vllm serve --config` and `launch_server --config` read
a YAML file (true booleans become bare flags, other values `--key value`).
"""

import argparse
import json
import os
import shlex
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from looptune.cli import app
from looptune.export.deployable import (
    Latency,
    ModelRef,
    Objectives,
    Profile,
    Quality,
    Setting,
    read_profile,
    write_profile,
)
from looptune.export.engines import SGLANG, TARGETS
from looptune.model.checkpoint import content_hash, init_checkpoint

runner = CliRunner()
SHIPPED = Path(__file__).parent.parent / "profiles" / "cpu-demo.yaml"

# The option names each engine documents (docs.vllm.ai configuration/serve_args and `vllm serve
# --help=all` of 0.33.0; docs.sglang.io server_arguments and the 0.5.23 ServerArgs fields).
DOCUMENTED = {
    "vllm": {
        "model": str,
        "dtype": str,
        "max-model-len": int,
        "max-num-seqs": int,
        "enforce-eager": bool,
        "no-enforce-eager": bool,
        "trust-remote-code": bool,
        "hf-overrides": json.loads,
    },
    "sglang": {
        "model-path": str,
        "dtype": str,
        "context-length": int,
        "max-running-requests": int,
        "trust-remote-code": bool,
        "json-model-override-args": json.loads,
        "cuda-graph-backend-decode": str,
        "cuda-graph-backend-prefill": str,
        "cuda-graph-max-bs-decode": int,
    },
}
DOCUMENTED["vllm-plt"] = DOCUMENTED["vllm"]


def parse_like_the_engine(engine: str, path: Path) -> argparse.Namespace:
    """The exported YAML as the engine's `--config` turns it into arguments, parsed by a parser
    that knows only the documented option names (an unknown name is an error)."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    for name, kind in DOCUMENTED[engine].items():
        if kind is bool:
            parser.add_argument(f"--{name}", action="store_true")
        else:
            parser.add_argument(f"--{name}", type=kind)
    argv = []
    for key, value in yaml.safe_load(path.read_text()).items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv.append(f"--no-{key}")
        else:
            argv += [f"--{key}", str(value)]
    return parser.parse_args(argv)


def loop_profile(
    tmp_path,
    loops=2,
    window=4,
    compile=False,
    batch=3,
    mode="plt-noshift",
    device="cuda",
    ckpt=None,
):
    """An IQuest-Loop checkpoint (`looptune init --arch iquest-loop`) and a profile of it."""
    ckpt = ckpt or tmp_path / "loop"
    if not ckpt.exists():
        init_checkpoint(ckpt, "tiny", loops=2, window=8, arch="iquest-loop")
    profile = Profile(
        ModelRef(str(ckpt), "IQuestLoopCoderForCausalLM", content_hash(ckpt), 2, 8),
        Setting(loops, mode, window, "bfloat16", compile, batch, prompt_len=128, gen_len=32),
        Objectives(
            Quality("code", "bits_per_byte", 2.5, (2.4, 2.6), 16, 0),
            Latency("tpot_ms_p50", 1.25, (1.2, 1.3)),
            kv_bytes=4096,
            ttft_ms=3.0,
        ),
        device={"device_type": device, "device_name": "test GPU"},
    )
    return ckpt, write_profile(tmp_path / "loop.yaml", profile)


def export(*args):
    result = runner.invoke(app, ["export", *map(str, args)])
    return result


def header(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [line[2:] for line in lines if line.startswith("# ")]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engine_file_reproduces_the_measured_setting(tmp_path, engine):
    ckpt, prof = loop_profile(tmp_path, loops=2, window=4, compile=True, batch=3)
    force = ["--force"] if engine == "sglang" else []  # SGLang's gate loader: see below
    result = export(prof, "--to", engine, "--out", tmp_path / engine, "--json", *force)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    path = Path(doc["files"][0])
    target = TARGETS[engine]
    args = parse_like_the_engine(engine, path)
    f = target.flags
    overrides = getattr(args, f["overrides"].replace("-", "_"))
    # the window in each engine's own convention: vLLM W (FlashAttention gets (W-1, 0)),
    # SGLang W - 1 (its backend passes (w, 0) through, which is w + 1 keys)
    expected_window = {"vllm": 4, "sglang": 3}[engine]
    assert overrides == {"loop_num": 2, "loop_window_size": expected_window}
    # the deployment's context, never the study's prompt + generated length (160)
    assert getattr(args, f["context"].replace("-", "_")) == 512  # tiny: max_position_embeddings
    assert getattr(args, f["concurrency"].replace("-", "_")) == 3  # the measured batch
    assert getattr(args, f["dtype"]) == "bfloat16"
    assert getattr(args, f["model"].replace("-", "_")) == str(ckpt.resolve())
    if engine == "vllm":
        assert args.no_enforce_eager and not args.enforce_eager  # CUDA graphs, as measured
    else:
        assert args.cuda_graph_max_bs_decode == 3 and args.cuda_graph_backend_decode is None
    lines = header(path)
    assert any(str(prof.resolve()) in line for line in lines)
    assert any(content_hash(ckpt) in line for line in lines)
    assert any("tpot_ms_p50 1.25 ms" in line for line in lines)
    assert any("latency budget holds only up to the measured batch of 3" in line for line in lines)
    assert f"serve: {doc['command']}" in lines
    assert shlex.split(doc["command"])[-2:] == ["--config", str(path)]


def test_eager_when_measured_uncompiled_and_overrides(tmp_path):
    _, prof = loop_profile(tmp_path, compile=False, batch=2)
    out = tmp_path / "v"
    result = export(
        prof, "--to", "vllm", "--out", out, "--max-model-len", 256, "--max-concurrency", 8
    )
    assert result.exit_code == 0, result.output
    args = parse_like_the_engine("vllm", out / "vllm.yaml")
    assert args.enforce_eager and args.max_model_len == 256 and args.max_num_seqs == 8
    assert any("measured batch of 2" in line for line in header(out / "vllm.yaml"))
    sgl = tmp_path / "s"
    assert export(prof, "--to", "sglang", "--out", sgl, "--force").exit_code == 0
    args = parse_like_the_engine("sglang", sgl / "sglang.yaml")
    assert args.cuda_graph_backend_decode == args.cuda_graph_backend_prefill == "disabled"
    too_long = export(prof, "--to", "vllm", "--out", out, "--max-model-len", 513)
    assert too_long.exit_code == 2 and "exceeds the model's max_position_embeddings (512)" in (
        too_long.stderr
    )


def test_sglang_refuses_gated_loops_and_force_records_it(tmp_path):
    _, prof = loop_profile(tmp_path, loops=2)
    refused = export(prof, "--to", "sglang", "--out", tmp_path / "s")
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "SGLang drops the gate tensors" in refused.stderr
    assert not (tmp_path / "s").exists()
    forced = export(prof, "--to", "sglang", "--out", tmp_path / "s", "--force")
    assert forced.exit_code == 0, forced.output
    assert "forced past: SGLang drops the gate tensors" in forced.stderr
    assert any(
        line.startswith("FORCED past: SGLang drops")
        for line in header(tmp_path / "s" / "sglang.yaml")
    )
    _, one = loop_profile(tmp_path, loops=1)  # no gate is used at one loop
    assert export(one, "--to", "sglang", "--out", tmp_path / "s1").exit_code == 0


def test_a_refusal_names_the_way_past_it_as_the_caller_spells_it(tmp_path):
    """The command speaks of its flags, the library of its parameters."""
    from looptune.export.serving import ExportRefused, export_profile

    ckpt, prof = loop_profile(tmp_path)
    ckpt.rename(tmp_path / "elsewhere")  # moved: and so its context is unknown too
    refused = export(prof, "--to", "vllm", "--out", tmp_path / "v")
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.rstrip().endswith("(and 1 more; --force writes anyway)")
    forced = export(prof, "--to", "vllm", "--out", tmp_path / "v", "--force")
    assert forced.exit_code == 0 and "unknown; give --max-model-len\n" in forced.stderr
    with pytest.raises(ExportRefused, match=r"\(and 1 more; force writes anyway\)$"):
        export_profile(read_profile(prof), prof, "vllm", tmp_path / "w")
    done = export_profile(read_profile(prof), prof, "vllm", tmp_path / "w", force=True)
    assert done.forced[1].endswith("unknown; give max_model_len")


def test_the_bundled_profile_needs_the_plt_fork(tmp_path):
    """LoopCoder-V2 (IQuestPLTCoderForCausalLM) is registered only by the vLLM fork."""
    for engine in ("vllm", "sglang", "hf"):
        result = export(SHIPPED, "--to", engine, "--out", tmp_path / engine)
        assert result.exit_code == 2, result.output
        assert "does not register IQuestPLTCoderForCausalLM" in result.stderr
        assert "targets that do: vllm-plt" in result.stderr
    result = export(SHIPPED, "--to", "vllm-plt", "--out", tmp_path / "fork", "--json")
    assert result.exit_code == 0, result.output
    path = Path(json.loads(result.stdout)["files"][0])
    args = parse_like_the_engine("vllm-plt", path)
    shipped = read_profile(SHIPPED)
    W = shipped.knobs.window
    assert args.hf_overrides == {"plt_num_loops": 2, "plt_window_size": [W - 1, 0]}
    assert args.max_model_len == 1024 and args.max_num_seqs == 1 and args.enforce_eager
    assert any("measured on cpu" in line for line in header(path))


def test_a_changed_model_or_a_bad_profile_is_refused(tmp_path):
    ckpt, prof = loop_profile(tmp_path)
    config = ckpt / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    try:
        result = export(prof, "--to", "vllm", "--out", tmp_path / "v")
        assert result.exit_code == 2 and "measured on model" in result.stderr
        forced = export(prof, "--to", "vllm", "--out", tmp_path / "v", "--force")
        assert forced.exit_code == 0
        assert any(
            "FORCED past:" in line and "measured on model" in line
            for line in header(tmp_path / "v" / "vllm.yaml")
        )
    finally:
        config.write_text(original)
    doc = yaml.safe_load(prof.read_text())
    doc["knobs"]["window"] = "two"
    prof.write_text(yaml.safe_dump(doc))
    result = export(prof, "--to", "vllm", "--out", tmp_path / "w", "--force")
    assert result.exit_code == 2 and "knobs.window must be an integer >= 1" in result.stderr
    assert export(SHIPPED, "--to", "tgi").exit_code == 2


def test_mode_and_head_dim_the_engine_cannot_run(tmp_path):
    _, prof = loop_profile(tmp_path, mode="sequential")
    result = export(prof, "--to", "vllm", "--out", tmp_path / "v")
    assert result.exit_code == 2 and "runs IQuestLoopCoderForCausalLM as mode plt-noshift" in (
        result.stderr
    )
    # vLLM and SGLang take head_dim = hidden_size / heads; a model stored otherwise is refused
    from looptune.model.arch import LOOP
    from looptune.model.checkpoint import build_model, save_checkpoint
    from looptune.model.config import preset_config

    cfg = preset_config("tiny", head_dim=4, architecture=LOOP.name, **LOOP.init_config)
    save_checkpoint(build_model(cfg), tmp_path / "odd")
    _, odd = loop_profile(tmp_path, ckpt=tmp_path / "odd")
    for engine in ("vllm", "sglang"):
        result = export(odd, "--to", engine, "--out", tmp_path / engine)
        assert result.exit_code == 2
        assert (
            "takes head_dim = hidden_size / num_attention_heads = 8, but this model's "
            "head_dim is 4" in result.stderr
        )
    assert export(odd, "--to", "hf", "--out", tmp_path / "hf").exit_code == 0


def _respell(ckpt: Path, prefix: str) -> None:
    """Rename the gate tensors of a looptune IQuest-Loop checkpoint to `prefix`.{weight,bias}."""
    for shard in ckpt.glob("*.safetensors"):
        tensors = load_file(shard)
        renamed = {}
        for name, t in tensors.items():
            if name.startswith("model.gate_projections."):
                i, part = name.split(".")[2], name.split(".")[-1]
                name = f"{prefix.format(i=i)}.{part}"
            renamed[name] = t
        save_file(renamed, shard, metadata={"format": "pt"})
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        doc = json.loads(index.read_text())
        doc["weight_map"] = {
            (
                f"{prefix.format(i=k.split('.')[2])}.{k.split('.')[-1]}"
                if k.startswith("model.gate_projections.")
                else k
            ): v
            for k, v in doc["weight_map"].items()
        }
        index.write_text(json.dumps(doc))


def test_write_weights_renames_the_gates_and_links_the_rest(tmp_path):
    """A checkpoint in the HF save spelling (model.layers.{i}.gate_projection.*) is skipped by
    vLLM's loader; --write-weights writes vLLM's spelling, sharing the untouched shards."""
    from looptune.model.checkpoint import load_model

    ckpt = tmp_path / "loop"
    init_checkpoint(ckpt, "tiny", arch="iquest-loop", shard_bytes=4096)
    (ckpt / "tokenizer_config.json").write_text("{}")
    _respell(ckpt, "model.layers.{i}.gate_projection")
    _, prof = loop_profile(tmp_path)
    refused = export(prof, "--to", "vllm", "--out", tmp_path / "v")
    assert refused.exit_code == 2 and "--write-weights" in refused.stderr
    assert "model.gate_projections.0.*" in refused.stderr
    result = export(prof, "--to", "vllm", "--out", tmp_path / "v", "--write-weights", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    copy = tmp_path / "v" / "model"
    assert parse_like_the_engine("vllm", Path(doc["files"][0])).model == str(copy)
    names = set(json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.gate_projections.0.weight" in names and "model.gate_projections.1.bias" in names
    assert not any(".gate_projection." in n for n in names)
    linked, rewritten = doc["weights"]["linked"], doc["weights"]["rewritten"]
    assert rewritten and any(n.endswith(".safetensors") for n in linked)
    for name in linked:
        assert os.path.samefile(copy / name, ckpt / name)  # shared, not copied
    for name in rewritten:
        assert not os.path.samefile(copy / name, ckpt / name)
    copied = json.loads((copy / "config.json").read_text())
    assert copied["loop_window_size"] == 4 and copied["loop_num"] == 2
    assert any(line.startswith("serve: vllm serve --config") for line in copied["looptune_export"])
    model, _ = load_model(copy, device="cpu")  # still a loadable checkpoint
    original, _ = load_model(ckpt, device="cpu")
    for (k, a), b in zip(model.state_dict().items(), original.state_dict().values()):
        assert a.equal(b), k


def test_hf_directory_loads_with_the_measured_keys(tmp_path):
    from looptune.model.checkpoint import read_config

    ckpt, prof = loop_profile(tmp_path, loops=2, window=4)
    out = tmp_path / "hf"
    result = export(prof, "--to", "hf", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["loop_num"] == 2 and config["loop_window_size"] == 4  # W keys, self included
    assert config["torch_dtype"] == "bfloat16"
    assert config["max_position_embeddings"] == 512
    head = config["looptune_export"]
    assert any(content_hash(ckpt) in line for line in head)
    assert any("no auto_map" in line for line in head)
    assert os.path.samefile(out / "model.safetensors", ckpt / "model.safetensors")
    cfg, _ = read_config(out)
    assert cfg.num_loops == 2 and cfg.window == 4


def test_export_help_and_default_out(tmp_path):
    shown = runner.invoke(app, ["export", "--help"])
    assert shown.exit_code == 0
    for flag in ("--max-model-len", "--max-concurrency", "--write-weights", "--force"):
        assert flag in shown.output
    _, prof = loop_profile(tmp_path)
    assert export(prof, "--to", "vllm").exit_code == 0
    assert (tmp_path / "loop-vllm" / "vllm.yaml").exists()
    assert SGLANG.architectures["IQuestLoopCoderForCausalLM"].convention == "exclusive"


def test_a_moved_model_is_refused_and_force_needs_a_context(tmp_path):
    ckpt, prof = loop_profile(tmp_path)
    ckpt.rename(tmp_path / "elsewhere")
    refused = export(prof, "--to", "vllm", "--out", tmp_path / "v")
    assert refused.exit_code == 2 and "is not there (moved or deleted?)" in refused.stderr
    forced = export(
        prof, "--to", "vllm", "--out", tmp_path / "v", "--force", "--max-model-len", 128
    )
    assert forced.exit_code == 0, forced.output
    args = parse_like_the_engine("vllm", tmp_path / "v" / "vllm.yaml")
    assert args.max_model_len == 128 and args.model == str(ckpt.resolve())
    hf = export(prof, "--to", "hf", "--out", tmp_path / "hf", "--force")
    assert hf.exit_code == 2 and "no copy can be written" in hf.stderr


def test_an_unwritable_full_or_interrupted_output_is_one_line_and_leaves_nothing(
    tmp_path, monkeypatch
):
    import errno

    from looptune.export import serving, weights

    ckpt = tmp_path / "loop"
    init_checkpoint(ckpt, "tiny", arch="iquest-loop")
    _respell(ckpt, "model.layers.{i}.gate_projection")  # so --write-weights rewrites a shard
    _, prof = loop_profile(tmp_path)
    (tmp_path / "afile").write_text("")
    blocked = export(prof, "--to", "vllm", "--out", tmp_path / "afile" / "x")
    assert blocked.exit_code == 2 and blocked.stderr.startswith("error: ")
    assert len(blocked.stderr.strip().splitlines()) == 1

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # half a shard, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", path)

    out = tmp_path / "new" / "v"
    monkeypatch.setattr(weights, "save_file", full)
    result = export(prof, "--to", "vllm", "--out", out, "--write-weights")
    assert result.exit_code == 2 and "No space left on device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()  # the directories it made are gone too
    monkeypatch.undo()

    def yaml_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(serving, "atomic_write_text", yaml_full)
    result = export(prof, "--to", "vllm", "--out", out, "--write-weights")
    assert result.exit_code == 2 and not (tmp_path / "new").exists()  # no copy without its file
    monkeypatch.undo()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "save_file", interrupted)
    result = export(prof, "--to", "vllm", "--out", out, "--write-weights")
    assert result.exit_code == 130 and not (tmp_path / "new").exists()


def test_a_copy_onto_a_full_disk_names_where_it_was_writing(tmp_path, monkeypatch):
    """Across file systems the weights are copied (shutil's sendfile path), whose error names
    the file read first: the message names both, so the full disk's is there."""
    import errno
    import shutil

    _, prof = loop_profile(tmp_path)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", lambda *a, **k: full())  # another file system
    monkeypatch.setattr(os, "sendfile", full)
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", True)
    result = export(prof, "--to", "hf", "--out", tmp_path / "hf")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    reason = result.stderr.partition("(No space left on device: ")[2]
    assert reason.startswith(f"{tmp_path / 'loop' / 'model.safetensors'} -> {tmp_path / 'hf'}")
    assert not (tmp_path / "hf").exists()


def test_a_failed_export_removes_only_what_it_made(tmp_path, monkeypatch):
    """Two exports into new directories under one new parent: the one that fails removes its
    own directory, and the parent only when nothing else is in it."""
    import errno

    from looptune.export import serving

    _, prof = loop_profile(tmp_path)
    other = tmp_path / "new" / "b" / "vllm.yaml"

    def full_once_the_other_wrote(path, text):
        other.parent.mkdir(parents=True)
        other.write_text("written by the other export\n")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(serving, "atomic_write_text", full_once_the_other_wrote)
    result = export(prof, "--to", "vllm", "--out", tmp_path / "new" / "a", "--write-weights")
    assert result.exit_code == 2 and "No space left on device" in result.stderr
    assert not (tmp_path / "new" / "a").exists()
    assert other.read_text() == "written by the other export\n"


def test_a_second_export_into_a_directory_waits_for_the_first(tmp_path, monkeypatch):
    """The first may fail and remove the directory it made, with the second's files in it."""
    import threading

    from looptune.export import serving

    _, prof = loop_profile(tmp_path)
    out = (tmp_path / "v").resolve()
    waiting = threading.Event()
    monkeypatch.setattr(serving, "warn", lambda message: waiting.set())
    with serving.one_export_into(out):  # as another process's export holds it
        second = threading.Thread(
            target=serving.export_profile, args=(read_profile(prof), prof, "vllm", out)
        )
        second.start()
        assert waiting.wait(30), "the second export did not wait"
        assert not out.exists()
    second.join(30)
    assert (out / "vllm.yaml").is_file()


def test_a_copy_never_replaces_another_checkpoint_nor_keeps_a_stale_index(tmp_path):
    other = tmp_path / "other"
    init_checkpoint(other, "tiny", arch="plt", shard_bytes=4096)
    before = sorted(p.name for p in other.iterdir())
    _, prof = loop_profile(tmp_path)
    refused = export(prof, "--to", "hf", "--out", other)
    assert refused.exit_code == 2 and "not made by looptune export" in refused.stderr
    assert sorted(p.name for p in other.iterdir()) == before
    assert runner.invoke(app, ["info", str(other)]).exit_code == 0
    # re-exporting into its own earlier export is fine, and a single-file model replacing a
    # sharded one leaves no index naming the old shards
    sharded = tmp_path / "sharded"
    init_checkpoint(sharded, "tiny", arch="iquest-loop", shard_bytes=4096)
    _, prof_sharded = loop_profile(tmp_path, ckpt=sharded)
    out = tmp_path / "hf"
    assert export(prof_sharded, "--to", "hf", "--out", out).exit_code == 0
    assert (out / "model.safetensors.index.json").exists()
    _, prof = loop_profile(tmp_path)
    again = export(prof, "--to", "hf", "--out", out)
    assert again.exit_code == 0, again.output
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("model-*.safetensors"))
    assert runner.invoke(app, ["info", str(out)]).exit_code == 0


def test_a_forced_export_without_the_model_says_the_engine_picks_the_context(tmp_path):
    ckpt, prof = loop_profile(tmp_path)
    ckpt.rename(tmp_path / "elsewhere")
    forced = export(prof, "--to", "sglang", "--out", tmp_path / "s", "--force")
    assert forced.exit_code == 0, forced.output
    lines = header(tmp_path / "s" / "sglang.yaml")
    assert "context 0 tokens ()" not in lines
    assert any(line.startswith("context: the engine's default") for line in lines)
    assert "context-length" not in yaml.safe_load((tmp_path / "s" / "sglang.yaml").read_text())


def test_a_copy_stopped_among_its_renames_leaves_no_file_a_later_copy_keeps(tmp_path, monkeypatch):
    """Stopped (SIGKILL, a full disk) after some of a sharded model's shards went in over a
    single-file copy: the next copy removes them, since the copy's list named them before they
    went in (left, an engine that loads every *.safetensors without an index mixes them in)."""
    from looptune.model import save

    _, prof_single = loop_profile(tmp_path)
    sharded = tmp_path / "sharded"
    init_checkpoint(sharded, "tiny", arch="iquest-loop", shard_bytes=4096)
    _, prof_sharded = loop_profile(tmp_path / "s", ckpt=sharded)
    out = tmp_path / "hf"
    assert export(prof_single, "--to", "hf", "--out", out).exit_code == 0
    whole = sorted(p.name for p in out.iterdir())
    replace, renames = os.replace, []

    def stopped_after_three(src, dst):
        renames.append(dst)
        if len(renames) > 3:
            raise OSError(28, "No space left on device", str(dst))
        replace(src, dst)

    monkeypatch.setattr(save.os, "replace", stopped_after_three)
    stopped = export(prof_sharded, "--to", "hf", "--out", out)
    monkeypatch.undo()
    assert stopped.exit_code == 2 and list(out.glob("model-*.safetensors")), stopped.output
    assert export(prof_single, "--to", "hf", "--out", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == whole


def test_a_copy_inside_the_checkpoint_it_is_made_from_is_refused(tmp_path):
    """`--to hf --out <ckpt>/sub`: the copy's files would join the checkpoint (a later copy
    would take them along, and its hash would change); one line, nothing written."""
    ckpt, prof = loop_profile(tmp_path, loops=2, window=4, compile=False, batch=1)
    before = sorted(p.name for p in ckpt.iterdir())
    result = export(prof, "--to", "hf", "--out", ckpt / "sub")
    assert result.exit_code == 2
    assert "cannot go inside the checkpoint it is made from" in result.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == before

"""The deployable profile: written by the study, read by show / export / generate."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from looptune.cli import app
from looptune.model.checkpoint import init_checkpoint
from looptune.search.choice import Budgets, Outcome
from looptune.search.pareto import Workload, run_pareto

runner = CliRunner()
SHIPPED = Path(__file__).parent.parent / "profiles" / "cpu-demo.yaml"


@pytest.fixture(scope="module")
def made_profile(tmp_path_factory):
    """A profile written by `run_pareto` over two real tiny checkpoints; the measurements are a
    deterministic function of the knobs (the real ones are covered in test_pareto_cli.py)."""
    tmp_path = tmp_path_factory.mktemp("deploy")
    ckpts = []
    for r in (1, 2):
        init_checkpoint(tmp_path / f"plt-r{r}", "tiny", loops=r, seed=r)
        ckpts.append(tmp_path / f"plt-r{r}")

    def fake(knobs):
        q = 3.0 - 0.1 * knobs.loops + (0.05 if knobs.checkpoint.endswith("r1") else 0)
        return Outcome(
            knobs,
            q,
            (q - 0.01, q + 0.01),
            1.0 + knobs.loops,
            (0.9, 1.1),
            5.0,
            1024 * knobs.loops,
            extra={"metric": "bits_per_byte"},
        )

    out = tmp_path / "profiles" / "demo.yaml"
    result = run_pareto(
        ckpts,
        Budgets(3.5),
        Workload(),
        trials=50,
        out=out,
        evaluator=fake,
        plot=tmp_path / "front.png",
    )
    assert result.profile_path == out
    return out, result, ckpts


def test_profile_holds_the_choice_and_its_evidence(made_profile):
    out, _, _ = made_profile
    doc = yaml.safe_load(out.read_text())
    assert doc["schema_version"] == 1 and doc["kind"] == "looptune-profile"
    assert doc["knobs"]["loops"] == 2  # best quality within 3.5 ms: R=2 at 3.0 ms
    assert doc["objectives"]["latency_ms"]["value"] == 3.0
    assert len(doc["model"]["content_hash"]) == 64
    assert doc["pareto_set"] and doc["study"]["name"]
    assert (out.parent.parent / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = runner.invoke(app, ["show", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["knobs"] == doc["knobs"]
    human = runner.invoke(app, ["show", str(out)])
    assert human.exit_code == 0 and "Pareto set" in human.stderr


def test_wrong_schema_and_foreign_files_are_refused(made_profile, tmp_path):
    out, _, _ = made_profile
    doc = yaml.safe_load(out.read_text())
    doc["schema_version"] = 99
    bad = tmp_path / "future.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["show", str(bad)])
    assert result.exit_code == 2 and "schema version 99 is not supported" in result.stderr
    foreign = tmp_path / "foreign.yaml"
    foreign.write_text("model: gpt\n")
    result = runner.invoke(app, ["show", str(foreign)])
    assert result.exit_code == 2 and "not a looptune profile" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [unclosed\n")
    result = runner.invoke(app, ["show", str(broken)])
    assert result.exit_code == 2 and "not valid YAML" in result.stderr


def test_a_profile_that_cannot_be_read_is_one_line_for_every_command(tmp_path, monkeypatch):
    """Missing, a directory, a pipe (reading it would wait for ever), truncated, not text, or
    unreadable (its rights, or the disk)."""
    import os

    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "dir.yaml").mkdir()
    text = SHIPPED.read_text()
    (tmp_path / "cut.yaml").write_text(text[: text.index("created: '") + 15])  # in a quote
    (tmp_path / "bytes.yaml").write_bytes(b"\x86\xff" * 50)
    (tmp_path / "locked.yaml").write_text(text)
    real_read = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "locked.yaml":  # chmod 000 would not stop root
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    says = {
        "gone.yaml": "no such profile",
        "dir.yaml": "not a file, so not a profile",
        "pipe.yaml": "not a file, so not a profile",
        "cut.yaml": "not valid YAML",
        "bytes.yaml": "not valid YAML ('utf-8' codec can't decode byte 0x86",
        "locked.yaml": "cannot read the profile (Permission denied)",
    }
    for name, said in says.items():
        path = tmp_path / name
        for argv in (
            ["show", path],
            ["export", path],
            ["generate", "--profile", path, "--prompt", "x"],
        ):
            result = runner.invoke(app, list(map(str, argv)))
            assert result.exit_code == 2, (argv, result.output)
            assert result.stderr.startswith(f"error: {path}: {said}"), (argv, result.stderr)
            assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


def test_a_changed_model_no_longer_matches(made_profile):
    out, _, _ = made_profile
    config = Path(yaml.safe_load(out.read_text())["model"]["path"]) / "config.json"
    original = config.read_text()
    cfg = json.loads(original)
    cfg["rms_norm_eps"] = 1e-5
    try:
        config.write_text(json.dumps(cfg))
        result = runner.invoke(app, ["show", str(out)])
        assert result.exit_code == 2 and "rerun `looptune pareto`" in result.stderr
        result = runner.invoke(app, ["generate", "--profile", str(out), "--prompt", "def"])
        assert result.exit_code == 2 and "measured on model" in result.stderr
    finally:
        config.write_text(original)


def test_export_of_a_study_profile_carries_its_loops_and_window(made_profile, tmp_path):
    """A LoopCoder-V2 profile goes to the vLLM fork (the only engine that registers it) with
    plt_window_size in flash-attention's convention; the others refuse it (tests/test_export)."""
    out, _, _ = made_profile
    doc = yaml.safe_load(out.read_text())
    R, W = doc["knobs"]["loops"], doc["knobs"]["window"]
    result = runner.invoke(
        app, ["export", str(out), "--to", "vllm-plt", "--out", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(Path(json.loads(result.stdout)["files"][0]).read_text())
    assert json.loads(cfg["hf-overrides"]) == {"plt_num_loops": R, "plt_window_size": [W - 1, 0]}
    assert cfg["model"] == doc["model"]["path"] and cfg["max-num-seqs"] == 1
    assert cfg["max-model-len"] == 512  # the tiny model's context, not prompt_len + gen_len


def test_export_to_unknown_engine(made_profile):
    out, _, _ = made_profile
    result = runner.invoke(app, ["export", str(out), "--to", "tgi"])
    assert result.exit_code == 2
    assert "target must be one of vllm, vllm-plt, sglang, hf" in result.stderr


def test_generate_streams_with_the_profile_settings(made_profile):
    out, _, _ = made_profile
    result = runner.invoke(
        app, ["generate", "--profile", str(out), "--prompt", "def f(", "--max-new-tokens", "12"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("def f(")
    from looptune.export.runtime import load_profiled

    runner_model = load_profiled(out, device="cpu")
    pieces = []
    text = runner_model.generate("def f(", on_text=pieces.append, max_new_tokens=12)
    assert "".join(pieces) == text and result.stdout.rstrip("\n") == "def f(" + text


def test_generate_refused_prints_nothing_on_stdout(made_profile):
    """A refused generation (here a prompt plus max_new_tokens past the model's context) is one
    line on stderr and nothing on stdout: no echoed prompt for a script to take as output."""
    out, _, _ = made_profile
    args = ["generate", "--profile", str(out), "--prompt", "def f(", "--max-new-tokens", "9999"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "exceeds the model's context" in result.stderr
    assert result.stdout == ""


def test_nothing_fits_exits_3_with_the_nearest_miss(tmp_path):
    init_checkpoint(tmp_path / "m", "tiny")

    def slow(knobs):
        return Outcome(knobs, 2.0, (2, 2), 5.0 + knobs.loops, (5, 6), 1.0, 100)

    result = run_pareto(
        [tmp_path / "m"],
        Budgets(1.0),
        Workload(),
        loops=(1, 2),
        trials=10,
        out=tmp_path / "p.yaml",
        evaluator=slow,
    )
    assert result.choice.best is None and result.choice.nearest_miss.knobs.loops == 1
    assert not (tmp_path / "p.yaml").exists()


def test_a_bundled_member_is_recorded_by_name():
    from looptune.bundled import default_checkpoint
    from looptune.export.deployable import model_path, portable_path, read_profile

    recorded = portable_path(default_checkpoint())
    assert recorded == "bundled:plt-r2"
    shipped = read_profile(SHIPPED)
    assert shipped.model.path == recorded and model_path(shipped) == default_checkpoint()


@pytest.mark.parametrize(
    "section, key, value, says",
    [
        ("knobs", "loops", -3, "knobs.loops must be an integer >= 1, got -3"),
        ("knobs", "window", "two", "knobs.window must be an integer >= 1, got 'two'"),
        ("knobs", "loops", True, "knobs.loops must be an integer >= 1, got True"),
        ("knobs", "compile", "yes", "knobs.compile must be true or false, got 'yes'"),
        ("knobs", "dtype", "fp8", "knobs.dtype must be one of float32, bfloat16, float16"),
        ("knobs", "mode", "turbo", "knobs.mode must be one of plt, plt-noshift, sequential"),
        ("knobs", "batch", 0, "knobs.batch must be an integer >= 1, got 0"),
        ("model", "content_hash", "abc", "model.content_hash must be a sha256 hex digest"),
        ("model", "architecture", "GPT2", "model.architecture must be one of"),
        ("knobs", "loop", 3, "knobs has unknown key 'loop'"),
    ],
)
def test_hand_edited_knobs_are_one_line_and_exit_2(tmp_path, section, key, value, says):
    doc = yaml.safe_load(SHIPPED.read_text())
    doc[section][key] = value
    bad = tmp_path / "edited.yaml"
    bad.write_text(yaml.safe_dump(doc))
    for command in (
        ["show", str(bad)],
        ["export", str(bad), "--out", str(tmp_path / "x")],
        ["generate", "--profile", str(bad), "--prompt", "def"],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_profile_round_trips_through_the_typed_form(made_profile, tmp_path):
    from looptune.export.deployable import Profile, read_profile, write_profile

    out, _, _ = made_profile
    profile = read_profile(out)
    assert profile.knobs.loops == 2 and profile.objectives.latency_ms.value == 3.0
    again = write_profile(tmp_path / "again.yaml", profile)
    assert yaml.safe_load(again.read_text()) == yaml.safe_load(out.read_text())
    doc = yaml.safe_load(SHIPPED.read_text())
    assert Profile.from_dict(doc, SHIPPED).to_dict() == doc  # the shipped v1 file, unchanged


def test_a_broken_front_member_is_named(tmp_path):
    doc = yaml.safe_load(SHIPPED.read_text())
    doc["pareto_set"][1]["knobs"]["loops"] = 0
    bad = tmp_path / "front.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["show", str(bad)])
    assert result.exit_code == 2
    assert "pareto_set[1].knobs.loops must be an integer >= 1, got 0" in result.stderr


def test_a_completion_that_stops_inside_a_character_keeps_it_as_a_replacement():
    """Streaming never splits a UTF-8 character, so a completion whose last token ends inside
    one held those bytes back; at the end they come out (as U+FFFD), never silently lost."""
    from looptune.export.runtime import _TextStream

    class Bytes:  # the byte tokenizer's interface: one id per byte
        def token_bytes(self, token_id):
            return bytes([token_id])

    pieces = []
    text = _TextStream(Bytes(), pieces.append)
    for b in "aé".encode()[:-1]:  # "a", then the first byte of "é"
        text.push(b)
    assert pieces == ["a"]
    text.end()
    assert pieces == ["a", "\ufffd"]


def test_generate_into_a_pipe_whose_reader_is_gone_ends_quietly_as_sigpipe_would(made_profile):
    """`looptune generate ... | head -c 3`: the reader has what it wanted, so the generation
    stops, with no word and 141 (it was exit 1), as a tool that SIGPIPE ends."""
    import os
    import signal
    import subprocess
    import sys

    out, _, _ = made_profile
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a user runs it
    args = ["generate", "--profile", str(out), "--prompt", "def f(", "--max-new-tokens", "200"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "looptune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stderr) == (128 + signal.SIGPIPE, "")

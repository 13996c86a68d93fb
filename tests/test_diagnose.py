"""Per-loop diagnostics: each metric on hand-made states with known answers, the measuring pass
against separate runs, the exact decomposition of the gain, the verdict, texts shared with
`score`, and the command."""

import io
import json
import math
import os

import pytest
import torch
from conftest import tiny_model
from rich.console import Console
from typer.testing import CliRunner

from looptune.bundled import family_members
from looptune.cli import app
from looptune.diagnose import diagnose, metrics
from looptune.diagnose.measure import measure_loops
from looptune.diagnose.result import FamilyRow, LoopRow
from looptune.diagnose.verdict import verdict
from looptune.model.checkpoint import init_checkpoint
from looptune.model.tokenizer import ByteTokenizer
from looptune.quality.bpb import bits_per_byte, score_texts
from looptune.quality.sets import load_set

TEXTS = [
    "def add(a, b):\n    return a + b\n" * 6,
    "for i in range(10):\n    print(i)\n" * 9,
    "x = 1\n",
]
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("diag") / "ckpt"
    init_checkpoint(ckpt, "tiny", loops=3, device="cpu")
    return ckpt


def _jsonl(path, texts=TEXTS):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# ----- metrics on hand-made states -----


def test_rank_one_states_have_effective_rank_one():
    u, v = torch.randn(50, 1, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)
    assert metrics.effective_rank(u @ v) == pytest.approx(1.0, abs=1e-9)


def test_orthogonal_equal_rows_have_full_effective_rank():
    assert metrics.effective_rank(3 * torch.eye(8)) == pytest.approx(8.0, rel=1e-9)
    # two equal singular values and one twice as large: exp of the entropy of (1/4, 1/4, 1/2)
    expected = math.exp(-(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5)))
    diagonal = torch.diag(torch.tensor([1.0, 1.0, 2.0]))
    assert metrics.effective_rank(diagonal) == pytest.approx(expected)
    assert metrics.effective_rank(torch.zeros(4, 3)) == 0.0


def test_identical_loops_have_zero_step_and_zero_kl():
    h = torch.randn(2, 7, 16)
    logits = torch.randn(2, 7, 30)
    assert metrics.step_size(h, h.clone()) == 0.0
    assert metrics.kl_between(logits, logits.clone()) == pytest.approx(0.0, abs=1e-7)


def test_step_size_and_kl_known_values():
    h_prev = torch.zeros(4, 3)
    h = torch.tensor([[3.0, 4.0, 0.0]]).expand(4, 3)
    assert metrics.step_size(h, h_prev) == pytest.approx(5.0)
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(p || q), nats
    assert metrics.kl_between(p.log(), q.log()) == pytest.approx(expected, rel=1e-5)


def test_update_cosine_sign_flip_and_same_direction():
    h0 = torch.randn(5, 16)
    u = torch.randn(5, 16)
    assert metrics.update_cosine(h0, h0 + u, h0) == pytest.approx(-1.0, abs=1e-6)  # flips back
    assert metrics.update_cosine(h0 + 3 * u, h0 + u, h0) == pytest.approx(1.0, abs=1e-6)
    assert metrics.update_cosine(h0, h0, h0) == 0.0  # no update: counts as 0


def test_offset_distance_on_a_known_sequence():
    v = torch.tensor([0.0, 2.0, 0.0, 0.0])
    seq = torch.arange(6.0)[:, None] * v  # h_i = i * v: every neighbour 2 apart
    assert metrics.offset_distance(seq) == pytest.approx(2.0)
    assert metrics.offset_distance(seq[None].expand(3, 6, 4)) == pytest.approx(2.0)
    assert metrics.offset_distance(torch.ones(5, 4)) == 0.0


# ----- the measuring pass -----


def test_bits_per_byte_at_loop_r_equals_a_run_with_r_loops_and_the_parts_add_up():
    model, tok = tiny_model(), ByteTokenizer()
    m = measure_loops(model, tok, TEXTS, 3, context=64, stride=32)
    assert m["bytes"] == sum(len(t.encode()) for t in TEXTS) and m["tokens"] == m["bytes"]
    for row in m["rows"]:
        direct = bits_per_byte(
            score_texts(model, tok, TEXTS, loops=row["loop"], context=64, stride=32)
        )
        assert row["bits_per_byte"] == pytest.approx(direct, rel=1e-5)
    for prev, row in zip(m["rows"], m["rows"][1:]):
        assert row["gain_bits_per_byte"] == pytest.approx(
            prev["bits_per_byte"] - row["bits_per_byte"], abs=1e-12
        )
        parts = row["refinement_bits_per_byte"] - row["offset_cost_bits_per_byte"]
        assert parts == pytest.approx(row["gain_bits_per_byte"], abs=1e-9)
        assert row["offset_cost_bits_per_byte"] != 0  # the shift matters to these weights
    # loop 2 with its carry unshifted is exactly a 2-loop plt-noshift run of the same weights
    noshift = bits_per_byte(
        score_texts(model, tok, TEXTS, loops=2, mode="plt-noshift", context=64, stride=32)
    )
    assert m["rows"][1]["bits_per_byte_unshifted"] == pytest.approx(noshift, rel=1e-5)


def test_without_the_shift_there_is_no_offset_cost():
    model, tok = tiny_model(mode="plt-noshift"), ByteTokenizer()
    rows = measure_loops(model, tok, TEXTS[:2], 3, context=64, stride=32)["rows"]
    direct = bits_per_byte(score_texts(model, tok, TEXTS[:2], loops=3, context=64, stride=32))
    assert rows[2]["bits_per_byte"] == pytest.approx(direct, rel=1e-5)
    for row in rows[1:]:
        assert row["offset_cost_bits_per_byte"] == 0.0
        assert row["refinement_bits_per_byte"] == row["gain_bits_per_byte"]


def test_prompts_are_context_only():
    model, tok = tiny_model(), ByteTokenizer()
    m = measure_loops(
        model, tok, ["    return 1\n"], 2, context=32, stride=16, prompts=["def f():\n"]
    )
    assert m["bytes"] == m["tokens"] == len("    return 1\n")


# ----- the verdict -----


def _rows(ranks, bpbs, costs=None):
    """Rows as `measure_loops` makes them: refinement - offset cost = gain."""
    rows = []
    for r, (rank, bpb) in enumerate(zip(ranks, bpbs), 1):
        row = LoopRow(
            loop=r,
            trained=True,
            bits_per_byte=bpb,
            effective_rank=rank,
            step_size=1.0,
            hidden_norm=1.0,
        )
        if r > 1:
            gain = rows[-1].bits_per_byte - bpb
            cost = (costs or [0.0] * len(bpbs))[r - 1]
            row.gain_bits_per_byte, row.offset_cost_bits_per_byte = gain, cost
            row.refinement_bits_per_byte = gain + cost
        rows.append(row)
    return rows


def test_rule_and_best_loop_agree_when_bits_fall_and_rank_rises():
    v = verdict(_rows([30, 45, 48, 49], [3.7, 3.0, 2.4, 1.9], [0, -1.2, -1.8, -2.2]), 36.0)
    assert v.rule_loop == v.best_loop == 4 and v.another_loop_helps is True
    assert "overrides" not in v.text and "holds at every loop through 4" in v.text


def test_the_verdict_says_why_the_measurement_overrides_the_rule():
    v = verdict(_rows([30, 45, 44, 49], [3.7, 3.0, 2.4, 1.9]), 36.0)  # rank dips into loop 3
    assert v.rule_loop == 2 and v.best_loop == 4
    assert "effective rank falls into loop 3" in v.text and "overrides the rule" in v.text
    assert v.another_loop_helps is True  # the rule holds again at loop 4
    worse = verdict(_rows([30, 45, 48], [3.0, 2.5, 2.6]), 36.0)
    assert worse.rule_loop == worse.best_loop == 2 and worse.another_loop_helps is False
    assert "does not lower bits per byte" in worse.text
    first = verdict(_rows([30, 45], [2.0, 2.5]), 36.0, trained_loops=1)
    assert first.rule_loop == first.best_loop == 1 and "The rule fails at loop 2" in first.text


def test_prediction_at_one_loop_follows_the_rank_and_only_at_the_trained_r():
    assert verdict(_rows([40], [2.0]), 36.0).another_loop_helps is True
    assert verdict(_rows([30], [2.0]), 36.0).another_loop_helps is False
    untrained = verdict(_rows([30, 45], [3.0, 2.5]), 36.0, trained_loops=1)
    assert untrained.another_loop_helps is None and "never trained" in untrained.text


def test_the_family_checks_the_prediction_of_a_member():
    family = [
        FamilyRow(f"plt-r{r}", r, b, 128) for r, b in zip((1, 2, 3, 4), (2.0, 1.9, 2.1, 1.95))
    ]
    rows = _rows([30, 45], [3.0, 2.5])  # predicts that R=3 beats R=2; it does not
    v = verdict(rows, 36.0, family, 2, is_member=True)
    assert v.family_best_loops == 2 and v.family_agrees is False and "fails" in v.text
    v = verdict(_rows([30, 45, 48], [3.0, 2.5, 2.2]), 36.0, family, 3, is_member=True)
    assert v.family_agrees is True  # R=4 beats R=3, as predicted
    assert verdict(rows, 36.0, family, 2, is_member=False).family_agrees is None


# ----- texts, the library, the command -----


def test_diagnose_reads_the_items_score_reads_and_writes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    texts = _jsonl(tmp_path / "set.jsonl", TEXTS * 3)
    before = set(tmp_path.rglob("*"))
    cache = os.environ["LOOPTUNE_CACHE_DIR"]
    cache_before = sorted(os.walk(cache))
    diag = diagnose(checkpoint, set_name=str(texts), limit=4, seed=3, device="cpu")
    assert diag.items == [x.id for x in load_set(texts, 4, 3).items] and diag.texts == 4
    assert diagnose(checkpoint, set_name=str(texts), limit=0, device="cpu").texts == 9
    assert set(tmp_path.rglob("*")) == before and sorted(os.walk(cache)) == cache_before
    assert diag.verdict.rule_loop <= diag.verdict.best_loop


def test_diagnose_and_score_score_the_same_tokens_the_same_way(checkpoint, tmp_path):
    from looptune.quality.score import score_checkpoints

    texts = _jsonl(tmp_path / "set.jsonl", TEXTS * 2)
    diag = diagnose(checkpoint, set_name=str(texts), limit=4, seed=1, device="cpu")
    scores = score_checkpoints(
        [checkpoint], loops=[1, 2, 3], sets=[str(texts)], limit=4, seed=1, use_cache=False
    )
    assert [s.bytes for s in scores] == [diag.bytes] * 3 and diag.texts == scores[0].items
    for row, s in zip(diag.rows, scores):
        assert row.bits_per_byte == pytest.approx(s.value, rel=1e-5)


def test_cli_diagnose_json_plot_and_tables_within_100_columns(checkpoint, tmp_path):
    from looptune.cli.diagnose import print_diagnosis

    texts = _jsonl(tmp_path / "set.jsonl")
    plot = tmp_path / "gain.png"
    result = runner.invoke(
        app,
        [
            "diagnose",
            str(checkpoint),
            "--set",
            str(texts),
            "--json",
            "--plot",
            str(plot),
            "--limit",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["loops"] == 3 and doc["texts"] == 2 and len(doc["rows"]) == 3
    assert doc["rows"][0]["kl_nats"] is None and doc["rows"][1]["kl_nats"] >= 0
    assert {"rule_loop", "best_loop"} <= set(doc["verdict"]) and doc["verdict"]["text"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = Console(width=100, record=True, file=io.StringIO())
    print_diagnosis(diagnose(checkpoint, set_name=str(texts), device="cpu"), out)
    text = out.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 100
    for header in (
        "refinement",
        "offset cost",
        "unshifted bpb",
        "eff. rank",
        "cos(dh, dh')",
        "Omega/|h'|",
    ):
        assert header in text


def test_cli_diagnose_refuses_bad_input_in_one_line(checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    for command in (["diagnose", str(checkpoint)], ["score", str(checkpoint)]):
        result = runner.invoke(app, [*command, "--set", str(bad)])
        assert result.exit_code == 2 and "bad.jsonl:2: not UTF-8" in result.output
        assert "Traceback" not in result.output and len(result.output.splitlines()) == 1
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    result = runner.invoke(app, ["diagnose", str(checkpoint), "--set", str(empty)])
    assert result.exit_code == 2 and "no records" in result.output
    result = runner.invoke(app, ["diagnose", str(checkpoint), "--plot", str(tmp_path / "x.svg")])
    assert result.exit_code == 2 and ".png" in result.output
    result = runner.invoke(app, ["diagnose", str(checkpoint), "--set", "humaneval"])
    assert result.exit_code == 2 and "humaneval-nll" in result.output


@pytest.mark.skipif(len(family_members()) < 4, reason="the bundled family is not installed")
def test_a_bundled_member_by_name_against_the_family(tmp_path):
    texts = _jsonl(tmp_path / "set.jsonl", TEXTS[:2])
    diag = diagnose(
        "plt-r2", set_name=str(texts), device="cpu", family=True, cache_dir=tmp_path / "cache"
    )
    assert diag.loops == diag.trained_loops == 2 and [m.loops for m in diag.family] == [1, 2, 3, 4]
    own = next(m for m in diag.family if m.loops == 2)
    assert own.bits_per_byte == pytest.approx(diag.rows[-1].bits_per_byte, rel=1e-5)
    assert diag.verdict.family_agrees is not None and "prediction" in diag.verdict.text
    cached = diagnose("plt-r2", set_name=str(texts), device="cpu", cache_dir=tmp_path / "cache")
    assert [m.bits_per_byte for m in cached.family] == [m.bits_per_byte for m in diag.family]
    assert diagnose("plt-r2", set_name=str(texts), device="cpu").family == []

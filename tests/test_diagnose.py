"""Per-loop diagnostics: each metric on hand-made states with known answers, the one-pass
per-loop states against separate runs, the verdict's rule, and one CLI run."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from looptune.bundled import family_members
from looptune.diagnose import metrics
from looptune.diagnose.run import (HELDOUT_DIR, FamilyRow, LoopRow, load_texts, loop1_kv,
                                   loop_with_carry, measure_loops, verdict)
from looptune.model.tokenizer import ByteTokenizer

TEXTS = ["def add(a, b):\n    return a + b\n" * 6, "for i in range(10):\n    print(i)\n" * 9,
         "x = 1\n"]


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


def test_offset_cost_on_a_known_sequence():
    v = torch.tensor([0.0, 2.0, 0.0, 0.0])
    seq = torch.arange(6.0)[:, None] * v  # h_i = i * v: every neighbour 2 apart
    assert metrics.offset_cost(seq) == pytest.approx(2.0)
    assert metrics.offset_cost(seq[None].expand(3, 6, 4)) == pytest.approx(2.0)
    assert metrics.offset_cost(torch.ones(5, 4)) == 0.0


# ----- the one-pass states -----

def test_loop_with_carry_reproduces_the_model_and_the_unshifted_input():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, hidden = model(ids, loops=3, return_hidden=True)
        kvs = loop1_kv(model, ids)
        for r in (2, 3):  # the shifted carry is what the model runs
            torch.testing.assert_close(loop_with_carry(model, ids, hidden[r - 2], kvs, True),
                                       hidden[r - 1], atol=1e-6, rtol=0)
        _, noshift = model(ids, loops=2, mode="plt-noshift", return_hidden=True)
        torch.testing.assert_close(loop_with_carry(model, ids, hidden[0], kvs, False), noshift[1],
                                   atol=1e-6, rtol=0)


def test_bits_per_byte_at_loop_r_equals_a_run_with_r_loops():
    from looptune.quality.bpb import bits_per_byte, score_texts

    model, tok = tiny_model(), ByteTokenizer()
    m = measure_loops(model, tok, TEXTS, 3, context=64, stride=32, oracle=True)
    assert m["bytes"] == sum(len(t.encode()) for t in TEXTS)
    for row in m["rows"]:
        direct = bits_per_byte(score_texts(model, tok, TEXTS, loops=row["loop"], context=64,
                                           stride=32))
        assert row["bits_per_byte"] == pytest.approx(direct, rel=1e-5)
    r2 = m["rows"][1]
    gain = m["rows"][0]["bits_per_byte"] - r2["bits_per_byte"]
    assert r2["gain_bits_per_byte"] == pytest.approx(gain)
    noshift = bits_per_byte(score_texts(model, tok, TEXTS, loops=2, mode="plt-noshift",
                                        context=64, stride=32))
    assert r2["bits_per_byte_unshifted"] == pytest.approx(noshift, rel=1e-5)
    for row in m["rows"][1:]:  # the offset in bits, at the loop's own exchange rate
        gain = row["gain_bits_per_byte"]
        expected = gain * row["offset_cost"] / row["step_size"] if gain > 0 else None
        assert row["offset_cost_bits_per_byte"] == (expected and pytest.approx(expected))


# ----- the verdict -----

def _rows(ranks, bpbs, steps, omegas):
    """Rows as `measure_loops` makes them: the cost is the gain at the step's exchange rate."""
    rows = []
    for r, (rank, bpb, step, omega) in enumerate(zip(ranks, bpbs, steps, omegas), 1):
        row = LoopRow(loop=r, trained=True, step_size=step, hidden_norm=1.0, effective_rank=rank,
                      bits_per_byte=bpb)
        if r > 1:
            row.offset_cost, row.gain_bits_per_byte = omega, rows[-1].bits_per_byte - bpb
            if row.gain_bits_per_byte > 0:
                row.offset_cost_bits_per_byte = row.gain_bits_per_byte * omega / step
        rows.append(row)
    return rows


def test_verdict_follows_the_rule():
    helps = verdict(_rows([10, 12, 13], [3.0, 2.5, 2.3], [5, 4, 3], [0, 2, 2]), 8.0)
    assert helps.another_loop_helps is True and helps.rule_loop == 3 and helps.best_loop == 3
    stalls = verdict(_rows([10, 12, 11], [3.0, 2.5, 2.4], [5, 4, 3], [0, 2, 2]), 8.0)  # rank falls
    assert stalls.another_loop_helps is False and stalls.rule_loop == 2
    costly = verdict(_rows([10, 12, 13], [3.0, 2.5, 2.3], [5, 4, 1], [0, 2, 2]), 8.0)  # step<Omega
    assert costly.another_loop_helps is False and "does not exceed" in costly.text
    worse = verdict(_rows([10, 12, 13], [3.0, 2.5, 2.51], [5, 4, 3], [0, 2, 2]), 8.0)
    assert worse.another_loop_helps is False and worse.best_loop == 2  # no gain: no cost defined
    assert verdict(_rows([10], [3.0], [5], [0]), 8.0).another_loop_helps is None


def test_verdict_compares_with_the_family():
    bpb = (2.6, 2.4, 2.5, 2.55)
    family = [FamilyRow(f"plt-r{r}", r, b, 128) for r, b in zip((1, 2, 3, 4), bpb)]
    v = verdict(_rows([10, 12], [3.0, 2.5], [5, 4], [0, 2]), 8.0, family)  # predicts R=3 helps
    assert v.another_loop_helps is True and v.family_best_loops == 2 and v.family_agrees is False
    assert "disagrees" in v.text
    v = verdict(_rows([10, 12, 11], [3.0, 2.5, 2.4], [5, 4, 3], [0, 2, 2]), 8.0, family)
    assert v.family_agrees is True  # R=4 scores worse than R=3, as predicted


# ----- texts and the command -----

@pytest.mark.skipif(not (HELDOUT_DIR / "MANIFEST.json").exists(), reason="no held-out corpus")
def test_code_set_is_a_seeded_subset_cut_to_max_bytes():
    names, texts = load_texts("code", limit=5, seed=1, max_bytes=300)
    full = load_texts("code", limit=None, max_bytes=None)[0]
    assert len(names) == len(texts) == 5 and names == [n for n in full if n in names]
    assert all(0 < len(t.encode()) <= 300 for t in texts)
    assert load_texts("code", limit=5, seed=1, max_bytes=300) == (names, texts)
    assert load_texts("code", limit=5, seed=2, max_bytes=300)[0] != names


def test_cli_diagnose_json_and_plot(tmp_path):
    from looptune.cli import app
    from looptune.model.checkpoint import init_checkpoint

    ckpt = tmp_path / "ckpt"
    init_checkpoint(ckpt, "tiny", loops=3, device="cpu")
    texts = tmp_path / "set.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    plot = tmp_path / "gain.png"
    result = CliRunner().invoke(app, ["diagnose", str(ckpt), "--set", str(texts), "--json",
                                      "--no-family", "--plot", str(plot), "--limit", "2"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["loops"] == 3 and doc["texts"] == 2 and len(doc["rows"]) == 3
    assert doc["rows"][0]["kl_nats"] is None and doc["rows"][1]["kl_nats"] >= 0
    assert isinstance(doc["verdict"]["text"], str) and doc["verdict"]["text"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    args = ["diagnose", str(ckpt), "--set", str(texts), "--no-family", "--limit", "1",
            "--loops", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "per loop" in result.output and "Another loop is" in result.output
    result = CliRunner().invoke(app, args + ["--oracle", "--json"])
    assert json.loads(result.stdout)["rows"][1]["unshifted_cost_bits_per_byte"] is not None

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = CliRunner().invoke(app, ["diagnose", str(ckpt), "--set", str(empty), "--no-family"])
    assert result.exit_code == 2 and "no texts" in result.output


@pytest.mark.skipif(len(family_members()) < 3, reason="the bundled family is not installed")
def test_diagnose_a_bundled_member_against_the_family(tmp_path):
    from looptune.diagnose import diagnose

    texts = tmp_path / "set.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    diag = diagnose(family_members()[1], set_name=str(texts), device="cpu")
    assert diag.loops == diag.trained_loops == 2
    assert [m.loops for m in diag.family] == [1, 2, 3, 4][:len(diag.family)]
    own = next(m for m in diag.family if m.loops == 2)
    assert own.bits_per_byte == pytest.approx(diag.rows[-1].bits_per_byte, rel=1e-5)
    assert diag.verdict.family_best_loops is not None and diag.verdict.family_agrees is not None
    assert "family" in diag.verdict.text

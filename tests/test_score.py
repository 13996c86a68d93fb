"""`score`: bits per byte, the shared multi-loop pass, sets and subsets, statistics, cache, CLI."""

import collections
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from looptune.cli import app
from looptune.errors import LooptuneError
from looptune.model.checkpoint import build_model, init_checkpoint
from looptune.model.config import preset_config
from looptune.model.tokenizer import ByteTokenizer
from looptune.quality.bpb import bits_per_byte, score_loops, score_texts, windows
from looptune.quality.score import score_checkpoints
from looptune.quality.sets import item_strata, load_set, size_strata, subset
from looptune.quality.stats import paired_ratio_diff_ci, ratio_ci

runner = CliRunner()
CODE = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 6


# ----- bits per byte -----


def test_a_model_that_predicts_bytes_uniformly_scores_exactly_8_bits_per_byte():
    cfg = preset_config(
        "tiny", vocab_size=256, tie_word_embeddings=False, max_position_embeddings=64
    )
    model = build_model(cfg, "cpu", torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: p = 1/256 for every byte
    tok = ByteTokenizer()
    tok.bos_id = None  # a 256-token vocabulary has no BOS; the first byte is context only
    texts = [CODE, "x", "é and ü are two bytes each"]
    for items in score_loops(model, tok, texts, [1, 2, 3], context=32, stride=8).values():
        assert abs(bits_per_byte(items) - 8.0) < 1e-6
    pairs = score_loops(model, tok, ["    return 1\n"], [2], prompts=["def f():\n"])[2]
    assert abs(pairs[0].bits_per_byte - 8.0) < 1e-6 and pairs[0].bytes == 13


def test_one_pass_at_max_loops_equals_separate_runs_per_loop_count():
    model, tok = tiny_model(max_position_embeddings=64), ByteTokenizer()
    texts = [CODE, CODE[:70], "a", ""]
    shared = score_loops(
        model, tok, texts, [1, 2, 3], reference=2, context=32, stride=12, batch_tokens=100
    )
    for r in (1, 2, 3):
        alone = score_texts(model, tok, texts, loops=r, context=32, stride=12, batch_size=1)
        for a, b in zip(shared[r], alone):
            assert a.bytes == b.bytes and a.tokens == b.tokens
            assert math.isclose(a.bits, b.bits, rel_tol=1e-5, abs_tol=1e-6)
    assert all(x.agree == x.tokens for x in shared[2])  # the reference agrees with itself


@pytest.mark.parametrize(
    "n,context,stride,first",
    [(100, 16, 5, 1), (100, 16, 5, 40), (10, 16, 8, 3), (40, 8, 7, 1), (5, 8, 4, 5)],
)
def test_windows_score_each_token_once_with_enough_left_context(n, context, stride, first):
    seen = []
    for start, end, scored in windows(n, context, stride, first):
        assert end - start <= context and start <= scored - 1  # a window sees what it predicts
        if start > 0:
            assert scored - start >= context - stride
        seen += range(scored, end)
    assert seen == list(range(first, n))


# ----- sets and subsets -----


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_subset_is_seeded_stratified_by_size_and_not_the_first_n(tmp_path):
    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in rng.integers(1, 400, size=100)]
    path = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    a, b, c = (load_set(path, limit=20, seed=s) for s in (1, 1, 2))
    assert [x.id for x in a.items] == [x.id for x in b.items]
    assert [x.id for x in a.items] != [x.id for x in c.items]
    assert [x.id for x in a.items] != [x.id for x in load_set(path, limit=0).items][:20]
    assert collections.Counter(a.strata) == {0: 5, 1: 5, 2: 5, 3: 5}  # 25 items per quartile
    sizes = sorted(len(t) for t in texts)
    for x, s in zip(a.items, a.strata):  # each stratum holds the sizes of its quartile
        assert sizes[25 * s] <= len(x.text) <= sizes[25 * s + 24]
    assert len(a.items) == 20 and a.total == 100 and a.content_hash == c.content_hash


def test_subset_allocation_is_proportional_with_largest_remainder():
    strata = [0] * 50 + [1] * 30 + [2] * 20
    picked = subset(strata, 10, seed=3)
    assert collections.Counter(strata[i] for i in picked) == {0: 5, 1: 3, 2: 2}
    assert collections.Counter(strata[i] for i in subset(strata, 7, seed=3)) == {0: 4, 1: 2, 2: 1}
    assert subset(strata, None, 0) == list(range(100)) == subset(strata, 500, 0)
    assert size_strata([5, 1, 3, 3]) == [3, 0, 1, 2]


def _heldout(tmp_path, files):
    root = tmp_path / "heldout"
    entries = []
    for rel, text in files.items():
        (root / (rel + ".txt")).parent.mkdir(parents=True, exist_ok=True)
        (root / (rel + ".txt")).write_text(text)
        entries.append(
            {
                "path": rel,
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
                "bytes": len(text.encode()),
            }
        )
    (root / "LICENSE-PSF.txt").write_text("licence, not code")
    (root / "MANIFEST.json").write_text(json.dumps({"files": entries, "stored_as": "<path>.txt"}))
    return root


def test_code_set_is_the_manifest_files_in_pieces_stratified_by_file_size(tmp_path):
    files = {f"pkg/m{i}.py": f"# module {i}\n" + "x = 1\n" * (30 * (i + 1) ** 2) for i in range(8)}
    root = _heldout(tmp_path, files)
    full = load_set("code", limit=0, heldout_dir=root)
    assert {x.source for x in full.items} == set(files)  # the licence is not code
    for rel, text in files.items():  # the pieces of a file are the file, each with its prefix
        pieces = [x for x in full.items if x.source == rel]
        assert "".join(x.text for x in pieces) == text
        assert all(text.startswith(x.prompt + x.text) or x.prompt + x.text in text for x in pieces)
    assert item_strata(full.items) == full.strata
    small = load_set("code", limit=10, seed=0, heldout_dir=root)
    counts = collections.Counter(full.strata)
    want = {s: round(10 * n / len(full.items)) for s, n in counts.items()}
    assert abs(sum(want.values()) - 10) <= 2
    for s, n in collections.Counter(small.strata).items():
        assert abs(n - want[s]) <= 1
    assert len(load_set("code", heldout_dir=root).items) == 32  # the default sample
    (root / "pkg/m0.py.txt").write_text("tampered")
    with pytest.raises(LooptuneError, match="sha256"):
        load_set("code", heldout_dir=root)


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"text": "ok"}', '{"text": "ok"'], r"bad\.jsonl:2: not valid JSON"),
        (['{"text": "ok"}', "", '["text"]'], r"bad\.jsonl:3: expected an object"),
        (['{"text": 3}'], r"bad\.jsonl:1: expected an object"),
        (['{"prompt": "a"}'], r"bad\.jsonl:1: expected an object"),
        (
            ['{"text": "a"}', '{"prompt": "a", "completion": "b"}'],
            r"bad\.jsonl:2: a prompt/completion",
        ),
        (["", "  "], r"bad\.jsonl: no records"),
    ],
)
def test_malformed_jsonl_names_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LooptuneError, match=message):
        load_set(path)


def test_a_bad_line_stops_scoring_before_any_model_work(tmp_path):
    ck = tmp_path / "ck"
    init_checkpoint(ck, "tiny", loops=2)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(LooptuneError, match=r"bad\.jsonl:2: not UTF-8"):
        score_checkpoints([ck], sets=["code", str(path)])
    with pytest.raises(LooptuneError, match="unknown set"):
        score_checkpoints([ck], sets=["nonsense"])


# ----- statistics -----


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    den = rng.integers(50, 500, size=60).astype(float)
    num = den * rng.normal(2.0, 0.3, size=60)
    value, lo, hi = ratio_ci(num, den, seed=1)
    assert lo < value < hi and hi - lo < 0.3
    assert ratio_ci(num, den, seed=1) == (value, lo, hi)  # seeded
    assert paired_ratio_diff_ci(num, den, num, den) == (0.0, 0.0, 0.0)
    shifted = paired_ratio_diff_ci(num + 0.1 * den, den, num, den)
    assert shifted[1] == pytest.approx(0.1) and shifted[2] == pytest.approx(0.1)
    # paired beats unpaired: the shared between-item variation cancels
    noisy = num + rng.normal(0.05, 0.01, size=60) * den
    d, dlo, dhi = paired_ratio_diff_ci(noisy, den, num, den)
    assert 0 < dlo < d < dhi and dhi - dlo < (hi - lo) / 5


# ----- the library function, its cache and the CLI -----


@pytest.fixture
def checkpoint(tmp_path):
    ck = tmp_path / "ck"
    init_checkpoint(ck, "tiny", loops=2)
    return ck


def test_score_checkpoints_compares_with_trained_r_and_caches(tmp_path, checkpoint):
    texts = _jsonl(tmp_path / "t.jsonl", [{"text": CODE[i : i + 90]} for i in range(0, 400, 40)])
    pairs = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "def f(x):\n", "completion": "    return x\n"},
            {"prompt": "# add\n", "completion": "a + b\n"},
        ],
    )
    scores = score_checkpoints([checkpoint], loops=[1, 2, 3], sets=[str(texts), str(pairs)])
    assert [(s.set, s.loops) for s in scores] == [(str(texts), r) for r in (1, 2, 3)] + [
        (str(pairs), r) for r in (1, 2, 3)
    ]
    by = {(s.metric, s.loops): s for s in scores}
    trained = by["bits_per_byte", 2]
    assert trained.trained_loops == 2 and trained.diff_vs_trained is None
    assert trained.top1_agreement == 1.0
    assert trained.ci95_low <= trained.value <= trained.ci95_high
    other = by["bits_per_byte", 3]
    assert other.diff_vs_trained == pytest.approx(other.value - trained.value)
    assert other.diff_ci95_low <= other.diff_vs_trained <= other.diff_ci95_high
    assert 0 <= other.top1_agreement <= 1 and other.pass_loops == 3
    nll = by["nll_per_byte", 1]
    assert nll.bytes == len("    return x\n") + len("a + b\n") and nll.items == 2
    doc = other.to_dict()
    for key in (
        "bits_per_byte",
        "bits_per_byte_ci95",
        "diff_vs_trained_bits_per_byte",
        "diff_vs_trained_bits_per_byte_ci95",
        "items",
        "tokens_per_s",
    ):
        assert key in doc
    assert "nll_per_byte" in nll.to_dict() and not any(s.cached for s in scores)

    again = score_checkpoints([checkpoint], loops=[1, 2, 3], sets=[str(texts), str(pairs)])
    assert all(s.cached for s in again)
    assert [s.value for s in again] == [s.value for s in scores]
    partly = score_checkpoints([checkpoint], loops=[3, 4], sets=[str(texts)])  # 3 cached, 4 not
    assert [s.cached for s in partly] == [True, False]
    assert partly[0].value == by["bits_per_byte", 3].value


def test_humaneval_pass_at_1_needs_execute_then_runs(checkpoint):
    with pytest.raises(LooptuneError, match="set execute"):
        score_checkpoints([checkpoint], sets=["humaneval"])
    scores = score_checkpoints([checkpoint], loops=[2], sets=["humaneval"], limit=2, execute=True)
    (s,) = scores
    assert s.metric == "pass_at_1" and s.items == 2 and s.set_items == 164
    assert 0.0 <= s.value <= 1.0 and s.tokens > 0 and "pass_at_1" in s.to_dict()


def test_cli_score_json_and_table(tmp_path, checkpoint):
    texts = _jsonl(tmp_path / "t.jsonl", [{"text": CODE[i : i + 60]} for i in range(0, 300, 30)])
    result = runner.invoke(
        app,
        [
            "score",
            str(checkpoint),
            "--set",
            str(texts),
            "--loops",
            "1,2",
            "--limit",
            "4",
            "--seed",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [s["loops"] for s in doc["scores"]] == [1, 2]
    assert doc["scores"][0]["items"] == 4 and doc["scores"][0]["set_items"] == 10
    human = runner.invoke(app, ["score", str(checkpoint), "--set", str(texts), "--loops", "1,2"])
    assert human.exit_code == 0 and "bits/byte" in human.output
    refused = runner.invoke(app, ["score", str(checkpoint), "--set", "humaneval"])
    assert refused.exit_code == 2 and "--execute" in refused.output
    bad = runner.invoke(app, ["score", str(checkpoint), "--set", str(tmp_path / "none.jsonl")])
    assert bad.exit_code == 2 and "none.jsonl" in bad.output


def test_texts_are_scored_in_the_context_the_checkpoint_was_trained_with(tmp_path):
    from looptune.model.checkpoint import save_checkpoint

    ck = save_checkpoint(
        tiny_model(), tmp_path / "ck", extra_config={"looptune_train": {"context": 24}}
    )
    texts = _jsonl(tmp_path / "t.jsonl", [{"text": CODE}])
    (s,) = score_checkpoints([ck], loops=[2], sets=[str(texts)])
    assert (s.context, s.stride) == (24, 12)
    (wide,) = score_checkpoints([ck], loops=[2], sets=[str(texts)], context=64)
    assert (wide.context, wide.stride) == (64, 32) and not wide.cached

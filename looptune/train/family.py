"""The bundled family: train R = 1..4 alike, then bundle them into `looptune/models/`.

    python -m looptune.train.family train runs/family [--tokens N] [--loops 4,1] [--threads 1]
    python -m looptune.train.family bundle runs/family   # bf16 copies, cross-R scores, cards

`train` is resumable and trains the listed members one after another; on 2 cores the shipped
family ran as two such processes side by side (`--loops 4,1` and `--loops 3,2`, one thread
each), which is faster than one 2-thread process for a model this small.

Every member gets the same preset, data, token budget, schedule and seed; only R differs (the
LoopCoder-v2 protocol). `bundle` scores each member at R = 1..4 on the held-out evaluation sample
(weights as stored, loaded in float32), fits the byte n-gram baseline on the train files, and
writes `looptune/models/README.md` (the family card) and `family.json` (the numbers the tests
check). Each score is cached in the run folder, so an interrupted bundle resumes too.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from looptune.bundled import MODELS_DIR
from looptune.store import atomic_write_text

LOOPS = (1, 2, 3, 4)
# The recipe of the shipped family; `train` and the card both read it from here.
RECIPE = {
    "preset": "family",
    "tokens": 1_200_000,
    "batch_size": 4,
    "context": 128,
    "lr": 3e-3,
    "seed": 0,
    "save_dtype": "bfloat16",
}
NGRAM_ORDERS = (3, 5)  # the card's baseline is order 3; order 5 is shown for scale
CHECK_FILES = 4  # the first files of the evaluation sample: the slice the tests rescore


def train_command(out: Path, loops: int, tokens: int | None = None, threads: int = 2) -> str:
    r = dict(RECIPE, tokens=tokens or RECIPE["tokens"])
    return (
        f"looptune train {out / f'plt-r{loops}'} --loops {loops} --preset {r['preset']} "
        f"--tokens {r['tokens']} --batch-size {r['batch_size']} --context {r['context']} "
        f"--lr {r['lr']} --seed {r['seed']} --save-dtype {r['save_dtype']} --threads {threads} "
        "--device cpu"
    )


def train_family(out: Path, tokens: int | None = None, loops=LOOPS):
    from looptune.train.trainer import train

    out = Path(out)
    for R in loops:
        t0 = time.monotonic()
        last = [0.0]

        def log(p, R=R, last=last):
            if time.monotonic() - last[0] > 30 or p.heldout_bpb is not None or p.step == p.steps:
                last[0] = time.monotonic()
                held = f"{p.heldout_bpb:.3f}" if p.heldout_bpb is not None else "-"
                print(
                    f"R={R} step {p.step}/{p.steps} loss {p.loss:.4f} held-out {held} "
                    f"{p.tokens_per_s:,.0f} tok/s eta {p.eta_s / 60:.1f} min",
                    flush=True,
                )

        result = train(
            out / f"plt-r{R}",
            loops=R,
            preset=RECIPE["preset"],
            tokens=tokens or RECIPE["tokens"],
            seed=RECIPE["seed"],
            device="cpu",
            batch_size=RECIPE["batch_size"],
            context=RECIPE["context"],
            lr=RECIPE["lr"],
            save_dtype=RECIPE["save_dtype"],
            command=train_command(out, R, tokens, torch.get_num_threads()),
            on_step=log,
            on_note=print,
        )
        print(
            f"R={R} done: held-out {result.heldout_bpb:.4f} bpb, {result.wall_s:.0f} s "
            f"(this call {time.monotonic() - t0:.0f} s)",
            flush=True,
        )


def _cached(path: Path, key: str, compute):
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key not in cache:
        cache[key] = compute()
        atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return cache[key]


def bundle_family(out: Path, models_dir: Path = MODELS_DIR, full_heldout: bool = False) -> dict:
    """Copy the trained members into the package (bf16 as trained), score them, write the cards."""
    from looptune.train.corpus import stdlib_corpus
    from looptune.train.evaluate import eval_sample, score_sample
    from looptune.train.ngram import KneserNey

    out = Path(out)
    results = {}
    for R in LOOPS:
        run = out / f"plt-r{R}"
        if not (run / "train_result.json").exists():
            raise SystemExit(f"{run} has not finished training; run `train` first")
        results[R] = json.loads((run / "train_result.json").read_text())
        dest = models_dir / f"plt-r{R}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", "README.md"):
            shutil.copyfile(run / name, dest / name)
    settings = {R: {k: v for k, v in results[R]["settings"].items() if k != "loops"} for R in LOOPS}
    if any(settings[R] != settings[1] for R in LOOPS):
        raise SystemExit("the members differ in more than the loop count; retrain them alike")
    st = settings[1]
    recipe = {
        "preset": st["preset"],
        "tokens": results[1]["tokens"],
        "batch_size": st["batch_size"],
        "context": st["context"],
        "lr": st["lr"],
        "seed": st["seed"],
        "save_dtype": st["save_dtype"],
    }
    data = stdlib_corpus()
    sample = eval_sample(data.heldout)
    check = sample[:CHECK_FILES]
    context = recipe["context"]
    scores_path = out / "scores.json"
    cross = {}
    for R in LOOPS:
        for r in LOOPS:
            cross[(R, r)] = _cached(
                scores_path,
                f"r{R}@{r}",
                lambda R=R, r=r: score_sample(models_dir / f"plt-r{R}", sample, r, context)[0],
            )
            print(f"plt-r{R} at R={r}: {cross[(R, r)]:.4f} bpb", flush=True)
    full = (
        {
            R: _cached(
                scores_path,
                f"full r{R}",
                lambda R=R: score_sample(models_dir / f"plt-r{R}", data.heldout, R, context)[0],
            )
            for R in LOOPS
        }
        if full_heldout
        else {R: None for R in LOOPS}
    )
    checks = {
        R: _cached(
            scores_path,
            f"check r{R}",
            lambda R=R: score_sample(models_dir / f"plt-r{R}", check, R, context)[0],
        )
        for R in LOOPS
    }
    sample_bytes = sum(len(t.encode()) for _, t in sample)
    heldout_bytes = sum(len(t.encode()) for _, t in data.heldout)
    ngram = {}
    train_texts = [t for _, t in data.train]
    for order in NGRAM_ORDERS:

        def fit_and_score(order=order):
            model = KneserNey.fit(train_texts, order)
            return {
                "sample": model.bits_per_byte([t for _, t in sample]),
                "heldout": model.bits_per_byte([t for _, t in data.heldout]),
            }

        ngram[order] = _cached(scores_path, f"ngram{order}", fit_and_score)
        print(f"Kneser-Ney order {order}: {ngram[order]}", flush=True)
    doc = {
        "recipe": recipe,
        "context": context,
        "stride": None,
        "eval_sample": {
            "files": len(sample),
            "bytes": sample_bytes,
            "per_file": None,
            "heldout_bytes": heldout_bytes,
        },
        "check_slice": {"files": CHECK_FILES, "paths": [p for p, _ in check]},
        "manifest_sha256": data.manifest_sha256,
        "members": {
            f"plt-r{R}": {
                "loops": R,
                "steps": results[R]["steps"],
                "tokens": results[R]["tokens"],
                "wall_s": round(results[R]["wall_s"], 1),
                "heldout_bpb": round(cross[(R, R)], 6),
                "heldout_bpb_at": {str(r): round(cross[(R, r)], 6) for r in LOOPS},
                "full_heldout_bpb": None if full[R] is None else round(full[R], 6),
                "check_bpb": round(checks[R], 6),
            }
            for R in LOOPS
        },
        "ngram_kneser_ney": {
            str(o): {k: round(v, 6) for k, v in ngram[o].items()} for o in NGRAM_ORDERS
        },
        "machine": results[1].get("machine"),
    }
    from looptune.train.evaluate import PER_FILE, eval_stride

    doc["stride"] = eval_stride(context)
    doc["eval_sample"]["per_file"] = PER_FILE
    atomic_write_text(models_dir / "family.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(models_dir / "README.md", family_card(doc, out))
    return doc


def family_card(doc: dict, out: Path) -> str:
    r = doc["recipe"]
    base = doc["ngram_kneser_ney"]["3"]["sample"]
    members = doc["members"]
    from looptune.model.config import preset_config

    cfg = preset_config(r["preset"])
    rows = []
    for name, m in members.items():
        own = m["heldout_bpb"]
        verdict = (
            "yes" if own < base - 0.05 else ("marginal" if own < base else "**no**")
        ) + f" ({own - base:+.3f})"
        whole = m["full_heldout_bpb"]
        rows.append(
            f"| {name} | {m['loops']} | **{own:.4f}** | "
            + ("-" if whole is None else f"{whole:.4f}")
            + " | "
            + " | ".join(f"{m['heldout_bpb_at'][str(x)]:.4f}" for x in LOOPS)
            + f" | {verdict} | {m['wall_s'] / 60:.1f} |"
        )
    beaten = [n for n, m in members.items() if m["heldout_bpb"] < base - 0.05]
    honest = (
        "Every member beats the order-3 n-gram baseline by more than 0.05 bits per byte."
        if len(beaten) == len(members)
        else f"**Not every member beats the order-3 n-gram baseline clearly** (clearly: "
        f"{', '.join(beaten) or 'none'}). The members are undertrained: the whole family "
        "had to train in under an hour on a shared 2-core CPU, and a byte-level "
        "transformer this small needs several million tokens to overtake counted "
        "trigram statistics. Retrain with a larger `tokens` in the recipe where more "
        "compute is available."
    )
    best5 = doc["ngram_kneser_ney"].get("5", {}).get("sample")
    if best5 is not None:
        beat5 = [n for n, m_ in members.items() if m_["heldout_bpb"] < best5]
        honest += (
            f" For scale, the order-5 Kneser-Ney model ({best5:.4f}) is beaten by "
            f"{', '.join(beat5)}."
            if beat5
            else f" For scale, the order-5 Kneser-Ney model ({best5:.4f}) beats every member: "
            "these are small models trained briefly on a CPU, useful for exercising "
            "looptune, not strong code models."
        )
    own = {n: m_["heldout_bpb"] for n, m_ in members.items()}
    best = min(own, key=own.get)
    honest += (
        f"\n\nAt an equal token budget `{best}` scores best. Every member is far worse at a loop "
        "count it was not trained with, so compare loop counts across members (each at "
        "its own R), not by running one member at several R."
    )
    m = doc["machine"] or {}
    ngram_rows = "\n".join(
        f"| Kneser-Ney, order {o} | {v['sample']:.4f} | {v['heldout']:.4f} |"
        for o, v in doc["ngram_kneser_ney"].items()
    )
    total_wall = sum(m_["wall_s"] for m_ in members.values())
    es = doc["eval_sample"]
    each = train_command(out, 1, r["tokens"], 1)
    each = each.replace("--loops 1", "--loops R").replace("plt-r1", "plt-rR")
    # a line of the card ending in a backslash goes on in the next: one line of the card
    return f"""# The bundled PLT code-model family

Four byte-level Parallel Loop Transformers trained by `looptune train` on the CPython standard
library, differing only in the loop count R (the LoopCoder-v2 protocol: same preset, data, token
budget, schedule and seed). `plt-r2` is the default model of every looptune command.

| | |
|---|---|
| shape (preset `{r["preset"]}`) | d={cfg.hidden_size}, layers={cfg.num_hidden_layers}, \
heads={cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, d_h={cfg.head_dim}, \
mlp={cfg.intermediate_size}, G-SWA window W={cfg.window}, byte vocabulary, tied embeddings |
| data | CPython {m.get("python")} `Lib/` `.py` files without test suites and generated files, \
split by file; manifest sha256 `{doc["manifest_sha256"]}` |
| budget | {r["tokens"]:,} tokens each \
({members["plt-r1"]["steps"]} steps of {r["batch_size"]} x {r["context"]} bytes) |
| schedule | AdamW (0.9, 0.95), peak lr {r["lr"]}, 5% linear warm-up, cosine to 0.1 x lr, \
weight decay 0.1, grad clip 1.0, seed {r["seed"]} |
| loss | the `plt` forward, next-byte cross-entropy on the last loop only |
| stored | bfloat16 safetensors |
| machine | {m.get("cpu")}, {m.get("torch_threads")} torch threads, shared with other work, \
`nice -n 19`; torch {m.get("torch")} |
| wall time | {total_wall / 60:.1f} min summed over the members \
(they ran side by side, one thread each) |

## Held-out bits per byte

Scored on the evaluation sample of the held-out files \
(`looptune/data/heldout/`, {es["heldout_bytes"]:,}
bytes in all): whole lines from the middle of each of the {es["files"]} files, \
about {es["per_file"]} bytes
each, {es["bytes"]:,} bytes in total (the full held-out set is too slow to score at R = 4 on
a CPU sixteen times over). Windows of {doc["context"]} bytes (the training context), stride
{doc["stride"]}; the weights as stored (bf16) loaded by `load_model` in float32. Columns R=1..4
run each member at that loop count; the bold number is its trained R. The "full held-out"
column scores every byte of all {es["files"]} held-out files, at the member's own R only
(`bundle --full-heldout`; "-" where not run). The difference to the baseline is taken on the \
evaluation sample.

| member | trained R | at own R | full held-out, own R | R=1 | R=2 | R=3 | R=4 \
| beats n-gram order 3 (difference)? | train wall (min) |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Baseline: smoothed byte n-grams

Interpolated Kneser-Ney over bytes (`looptune/train/ngram.py`), fitted on the same train files.
The order-3 model is the baseline this family must beat; order 5 is shown for scale.

| model | evaluation sample | full held-out set |
|---|---|---|
{ngram_rows}

{honest}

## Reproduce

```
nice -n 19 python -m looptune.train.family train {out} \
--tokens {r["tokens"]} --loops 4,1 --threads 1 &
nice -n 19 python -m looptune.train.family train {out} \
--tokens {r["tokens"]} --loops 3,2 --threads 1 &
wait; python -m looptune.train.family bundle {out}
```

Both are resumable: rerun the same lines after an interruption. Each member is
`{each}`.
The tests check each member against `family.json` on the first {CHECK_FILES} files of the \
evaluation sample.
"""


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m looptune.train.family",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=("train", "bundle"))
    parser.add_argument("out", type=Path, help="run folder holding plt-r1..plt-r4")
    parser.add_argument("--tokens", type=int, default=RECIPE["tokens"], help="tokens per member")
    parser.add_argument("--loops", default="1,2,3,4", help="members to train, in this order")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    parser.add_argument(
        "--full-heldout",
        action="store_true",
        help="bundle: also score every held-out byte at each member's own R",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.action == "train":
        train_family(args.out, args.tokens, [int(x) for x in args.loops.split(",")])
    else:
        bundle_family(args.out, full_heldout=args.full_heldout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

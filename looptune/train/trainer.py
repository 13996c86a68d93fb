"""`looptune train`: train a PLT model on code, resumably, and write a checkpoint with its card.

- Data: the train files are joined into one byte stream (a <bos> before each file); a step's
  batch is `batch_size` windows of `context + 1` tokens whose starts come from a generator seeded
  by (seed, step). No data-loader state exists, so a resumed run sees exactly the batches an
  uninterrupted one would.
- Model: the `plt` forward at the run's R, loss on the last loop's logits only.
- Optimiser: AdamW (no weight decay on norms, gates and biases), linear warm-up then cosine decay
  to `min_lr_ratio * lr`, gradient clipping.
- State: `OUT/train_state/` (looptune.train.state). A resumed run matches an uninterrupted one
  bit for bit on the same machine, device and torch thread count (float reductions may differ
  across those).

Settings and schedule live in `settings.py`, batches in `data.py`, the saved state in
`state.py`, scoring in `evaluate.py`, the model card in `card.py`; this module is the loop.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from looptune.errors import LooptuneError
from looptune.model.checkpoint import build_model, resolve_device, save_checkpoint
from looptune.model.config import preset_config
from looptune.store import atomic_write_text
from looptune.train.card import machine, model_card
from looptune.train.corpus import Corpus, load_corpus
from looptune.train.data import batch_at, eval_batches, token_stream
from looptune.train.evaluate import score_checkpoint
from looptune.train.settings import Progress, TrainResult, TrainSettings, lr_at, settings_for
from looptune.train.state import check_out, load_state, save_state


def make_optimizer(model, s: TrainSettings) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "gate" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8)


def loss_on(model, batch: torch.Tensor, loops: int) -> torch.Tensor:
    logits = model(batch[:, :-1], loops=loops, mode="plt")  # last loop's logits [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


@torch.no_grad()
def heldout_loss_bits(model, batches: torch.Tensor, loops: int, chunk: int = 8) -> float:
    """Mean next-token loss in bits per token (= bits per byte for the byte tokenizer)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(batches), chunk):
        b = batches[i : i + chunk]
        total += loss_on(model, b, loops).item() * len(b)
    model.train(was_training)
    return total / len(batches) / math.log(2)


def _stop_on_sigterm() -> Callable[[], None]:
    """SIGTERM (a `kill`, a job scheduler) stops training like Ctrl-C, so the state is saved;
    background jobs often ignore SIGINT. Returns the function that restores the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def train(
    out,
    loops: int,
    preset: str = "family",
    steps: int | None = None,
    tokens: int | None = None,
    corpus: Path | None = None,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 4,
    context: int = 128,
    lr: float = 3e-3,
    save_dtype: str = "float32",
    eval_every: int | None = None,
    save_every_s: float = 60.0,
    command: str | None = None,
    on_step: Callable[[Progress], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train (or resume) into `out`; returns the result once the last step is done.

    `stop_after` ends the call after that many steps of this call, leaving a resumable state
    (what an interrupt does; used by tests)."""
    out = Path(out)
    data = load_corpus(corpus)
    s = settings_for(
        preset,
        loops,
        steps,
        tokens,
        corpus,
        seed,
        batch_size,
        context,
        lr,
        save_dtype,
        data.manifest_sha256,
    )
    note = on_note or (lambda msg: None)
    if data.skipped:
        note(
            f"skipped {data.skipped} train files whose sha256 differs from the manifest "
            "(another CPython version)"
        )
    stream = token_stream(data.train)
    if len(stream) < s.context + 2:
        raise LooptuneError(
            f"the train files hold {len(stream)} tokens, fewer than one "
            f"window of {s.context + 1}; use a larger corpus"
        )
    held_stream = token_stream(data.heldout)
    if len(held_stream) < s.context + 2:
        held_stream = np.concatenate(
            [held_stream] * (1 + (s.context + 2) // max(1, len(held_stream)))
        )
    evals = eval_batches(held_stream, s.context)
    eval_every = eval_every or max(1, s.steps // 10)

    dev = resolve_device(device)
    cfg = preset_config(preset, num_loops=loops, mode="plt")
    if s.context > cfg.max_position_embeddings:
        raise LooptuneError(f"context {s.context} exceeds the preset's max_position_embeddings")
    torch.manual_seed(seed)
    model = build_model(cfg, dev, torch.float32, seed)
    model.train()
    opt = make_optimizer(model, s)
    doc = check_out(out, s)
    meta = {
        "wall_s": 0.0,
        "history": [],
        "command": command or "",
        "machine": machine(),
        "skipped_files": data.skipped,
        "corpus_source": data.source,
        "train_bytes": data.train_bytes,
        "train_files": len(data.train),
        "heldout_files": len(data.heldout),
    }
    start = 0
    if doc is not None:
        load_state(out, doc, model, opt, dev)
        start = doc["step"]
        meta.update({k: doc[k] for k in ("wall_s", "history", "command") if k in doc})
        note(f"resuming {out} at step {start}/{s.steps}")
    out.mkdir(parents=True, exist_ok=True)

    restore = _stop_on_sigterm()
    t0, t_save = time.perf_counter(), time.perf_counter()
    wall0 = meta["wall_s"]
    step, loss_val = start, float("nan")
    done_here = 0
    try:
        while step < s.steps:
            if stop_after is not None and done_here >= stop_after:
                break
            lr = lr_at(s, step)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = batch_at(stream, s.seed, step, s.batch_size, s.context).to(dev)
            loss = loss_on(model, batch, loops)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            done_here += 1
            loss_val = loss.item()
            held = None
            if step % eval_every == 0 or step == s.steps:
                held = heldout_loss_bits(model, evals.to(dev), loops)
            elapsed = time.perf_counter() - t0
            tps = done_here * s.tokens_per_step / max(elapsed, 1e-9)
            meta["history"].append(
                [step, round(loss_val, 5), None if held is None else round(held, 5)]
            )
            if on_step:
                on_step(
                    Progress(
                        step,
                        s.steps,
                        loss_val,
                        lr,
                        step * s.tokens_per_step,
                        tps,
                        (s.steps - step) * s.tokens_per_step / max(tps, 1e-9),
                        held,
                        start,
                    )
                )
            if time.perf_counter() - t_save >= save_every_s and step < s.steps:
                meta["wall_s"] = wall0 + time.perf_counter() - t0
                save_state(out, model, opt, s, step, meta)
                t_save = time.perf_counter()
    finally:  # on an interrupt too: the next run resumes from here
        restore()
        if step > start:
            meta["wall_s"] = wall0 + time.perf_counter() - t0
            save_state(out, model, opt, s, step, meta)
    if step < s.steps:
        return TrainResult(
            str(out),
            asdict(s),
            step,
            step * s.tokens_per_step,
            meta["wall_s"],
            loss_val,
            float("nan"),
            0,
            data.skipped,
            meta["history"],
        )
    return finish(out, model, s, data, meta)


def finish(out: Path, model, s: TrainSettings, data: Corpus, meta: dict) -> TrainResult:
    """Write the checkpoint (in `save_dtype`), score it as loaded, and write the card."""
    dtype = torch.bfloat16 if s.save_dtype == "bfloat16" else torch.float32
    save_model = build_model(model.config, "cpu", dtype, 0)
    save_model.load_state_dict({k: v.to("cpu", dtype) for k, v in model.state_dict().items()})
    save_checkpoint(
        save_model,
        out,
        extra_config={
            "looptune_train": {
                "context": s.context,
                "steps": s.steps,
                "tokens": s.steps * s.tokens_per_step,
                "manifest_sha256": s.manifest_sha256,
                "seed": s.seed,
            }
        },
    )
    bpb, nbytes = score_checkpoint(out, data.heldout, s.loops, s.context)
    history = meta.get("history", [])
    result = TrainResult(
        str(out),
        asdict(s),
        s.steps,
        s.steps * s.tokens_per_step,
        meta["wall_s"],
        history[-1][1] if history else float("nan"),
        bpb,
        nbytes,
        meta.get("skipped_files", 0),
        history,
    )
    atomic_write_text(out / "README.md", model_card(result, meta))
    atomic_write_text(
        out / "train_result.json",
        json.dumps(
            asdict(result) | {"machine": meta.get("machine"), "command": meta.get("command")},
            indent=1,
        )
        + "\n",
    )
    return result

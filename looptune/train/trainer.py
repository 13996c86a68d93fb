"""`looptune train`: train a PLT model on code, resumably, and write a checkpoint with its card.

- Data: the train files are joined into one byte stream (a <bos> before each file); a step's
  batch is `batch_size` windows of `context + 1` tokens whose starts come from a generator seeded
  by (seed, step). No data-loader state exists, so a resumed run sees exactly the batches an
  uninterrupted one would.
- Model: the `plt` forward at the run's R, loss on the last loop's logits only.
- Optimiser: AdamW (no weight decay on norms, gates and biases), linear warm-up then cosine decay
  to `min_lr_ratio * lr`, gradient clipping.
- State: `OUT/train_state/` holds the weights, the optimiser moments and the torch RNG states as
  safetensors plus `state.json` (step, tokens, wall time, the run's settings). Files carry the
  step in their names and `state.json` is replaced last, so a crash mid-save leaves the previous
  state readable. Never pickles. A resumed run matches an uninterrupted one bit for bit on the
  same machine, device and torch thread count (float reductions may differ across those).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from looptune.errors import LooptuneError
from looptune.model.checkpoint import build_model, load_model, resolve_device, save_checkpoint
from looptune.model.config import PRESETS, preset_config
from looptune.model.tokenizer import ByteTokenizer
from looptune.store import atomic_write_text
from looptune.train.corpus import Corpus, load_corpus

STATE_DIR = "train_state"
PER_FILE = 400  # bytes per held-out file in the evaluation sample (see `eval_sample`)
BOS = ByteTokenizer.bos_id


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights; a resumed run must match it exactly."""

    preset: str
    loops: int
    steps: int
    batch_size: int = 4
    context: int = 128  # tokens per training window (> the G-SWA window, so the local branch matters)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0  # 0: 5% of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    corpus: str = "stdlib"  # "stdlib" or the --corpus folder
    manifest_sha256: str = ""
    save_dtype: str = "float32"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    @property
    def warmup(self) -> int:
        return self.warmup_steps or max(1, round(0.05 * self.steps))


@dataclass
class Progress:
    """What the progress callback sees after each step."""

    step: int
    steps: int
    loss: float
    lr: float
    tokens: int
    tokens_per_s: float
    eta_s: float
    heldout_bpb: float | None = None  # set on the steps that evaluated
    resumed_from: int = 0


@dataclass
class TrainResult:
    out: str
    settings: dict
    steps: int
    tokens: int
    wall_s: float
    final_loss: float
    heldout_bpb: float
    eval_bytes: int
    skipped_files: int
    history: list = field(default_factory=list)


# ----- data -----

def token_stream(texts: list[tuple[str, str]]) -> np.ndarray:
    """<bos> + bytes of each file, concatenated; uint16 token ids."""
    parts = []
    for _, text in texts:
        parts.append(np.array([BOS], dtype=np.uint16))
        parts.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def batch_at(stream: np.ndarray, seed: int, step: int, batch_size: int, context: int) -> torch.Tensor:
    """The batch of `step`: a pure function of (seed, step), so resume is exact."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - context - 1, size=batch_size)
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))  # [B, T+1]


def eval_batches(stream: np.ndarray, context: int, n_windows: int = 16) -> torch.Tensor:
    """Fixed, evenly spaced held-out windows for the loss shown during training."""
    n = min(n_windows, max(1, (len(stream) - 1) // (context + 1)))
    starts = np.linspace(0, len(stream) - context - 1, n).astype(np.int64)
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))


def eval_sample(heldout: list[tuple[str, str]], per_file: int = PER_FILE) -> list[tuple[str, str]]:
    """The card's evaluation sample: from each held-out file, whole lines from its middle adding
    up to about `per_file` bytes (the full held-out set is too slow to score at R = 4 on a CPU)."""
    out = []
    for path, text in heldout:
        lines = text.splitlines(keepends=True)
        mid = len(lines) // 2
        lo = hi = mid
        size = 0
        while size < per_file and (lo > 0 or hi < len(lines)):
            if hi < len(lines):
                size += len(lines[hi].encode())
                hi += 1
            if size < per_file and lo > 0:
                lo -= 1
                size += len(lines[lo].encode())
        chunk = "".join(lines[lo:hi])
        if chunk.strip():
            out.append((path, chunk))
    return out


def lr_at(s: TrainSettings, step: int) -> float:
    """Linear warm-up, then cosine from lr to min_lr_ratio * lr at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----- model and optimiser -----

def make_optimizer(model, s: TrainSettings) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "gate" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
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
        b = batches[i:i + chunk]
        total += loss_on(model, b, loops).item() * len(b)
    model.train(was_training)
    return total / len(batches) / math.log(2)


# ----- resumable state -----

def _state_paths(out: Path, step: int) -> tuple[Path, Path]:
    d = out / STATE_DIR
    return d / f"model-{step:08d}.safetensors", d / f"optim-{step:08d}.safetensors"


def save_state(out: Path, model, opt, s: TrainSettings, step: int, meta: dict):
    d = out / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    mpath, opath = _state_paths(out, step)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(mpath) + ".tmp")
    os.replace(str(mpath) + ".tmp", mpath)
    osd = opt.state_dict()
    otensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        otensors["rng.cuda"] = torch.cuda.get_rng_state()
    for idx, st in osd["state"].items():
        for k, v in st.items():
            otensors[f"{idx}.{k}"] = torch.as_tensor(v).detach().contiguous().cpu()
    save_file(otensors, str(opath) + ".tmp")
    os.replace(str(opath) + ".tmp", opath)
    doc = dict(meta, step=step, settings=asdict(s), model=mpath.name, optimizer=opath.name)
    atomic_write_text(d / "state.json", json.dumps(doc, indent=1) + "\n")
    for f in d.glob("*.safetensors"):  # older states, now superseded
        if f not in (mpath, opath):
            f.unlink(missing_ok=True)


def read_state(out: Path) -> dict | None:
    path = out / STATE_DIR / "state.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LooptuneError(f"{path}: unreadable training state ({e}); move {out} aside") from None


def load_state(out: Path, doc: dict, model, opt, device):
    d = out / STATE_DIR
    try:
        weights = load_file(str(d / doc["model"]), device=str(device))
        otensors = load_file(str(d / doc["optimizer"]))
    except Exception as e:  # safetensors raises several types for a bad file
        raise LooptuneError(f"{d}: cannot read training state ({e}); move {out} aside") from None
    model.load_state_dict(weights)
    osd = opt.state_dict()
    state: dict = {}
    for key, t in otensors.items():
        if key.startswith("rng."):
            continue
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t.to(device) if name != "step" else t
    osd["state"] = state
    opt.load_state_dict(osd)
    torch.set_rng_state(otensors["rng.torch"])
    if "rng.cuda" in otensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(otensors["rng.cuda"])


def check_out(out: Path, s: TrainSettings) -> dict | None:
    """The saved state to resume from, None to start fresh; errors for an OUT that is not ours."""
    if out.exists() and not out.is_dir():
        raise LooptuneError(f"{out} is a file; OUT must be a directory")
    doc = read_state(out) if out.exists() else None
    if doc is None:
        if out.exists() and (out / "config.json").exists():
            raise LooptuneError(f"{out} already holds a checkpoint that this command did not "
                                "start (no train_state/); choose another OUT")
        return None
    saved = doc.get("settings", {})
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in asdict(s).items()
             if saved.get(k) != v]
    if diffs:
        raise LooptuneError(f"{out} holds a different training run ({'; '.join(diffs[:4])}); "
                            "rerun with the same settings to resume, or choose another OUT")
    return doc


# ----- the loop -----

def _stop_on_sigterm() -> Callable[[], None]:
    """SIGTERM (a `kill`, a job scheduler) stops training like Ctrl-C, so the state is saved;
    background jobs often ignore SIGINT. Returns the function that restores the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def settings_for(preset: str, loops: int, steps: int | None, tokens: int | None,
                 corpus_path: Path | None, seed: int, batch_size: int = 4, context: int = 128,
                 lr: float = 3e-3, save_dtype: str = "float32", manifest_sha256: str = "") -> TrainSettings:
    if preset not in PRESETS:
        raise LooptuneError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if (steps is None) == (tokens is None):
        raise LooptuneError("give exactly one of --steps and --tokens")
    if loops < 1:
        raise LooptuneError(f"--loops must be >= 1, got {loops}")
    if context < 2:
        raise LooptuneError(f"context must be at least 2 tokens, got {context}")
    if save_dtype not in ("float32", "bfloat16"):
        raise LooptuneError(f"--save-dtype must be float32 or bfloat16, got {save_dtype!r}")
    if steps is None:
        steps = math.ceil(tokens / (batch_size * context))
    if steps < 1:
        raise LooptuneError(f"--steps/--tokens must give at least one step, got {steps}")
    return TrainSettings(preset=preset, loops=loops, steps=steps, batch_size=batch_size,
                         context=context, lr=lr, seed=seed,
                         corpus=str(Path(corpus_path).resolve()) if corpus_path else "stdlib",
                         manifest_sha256=manifest_sha256, save_dtype=save_dtype)


def train(out, loops: int, preset: str = "family", steps: int | None = None,
          tokens: int | None = None, corpus: Path | None = None, seed: int = 0,
          device: str = "auto", batch_size: int = 4, context: int = 128, lr: float = 3e-3,
          save_dtype: str = "float32", eval_every: int | None = None, save_every_s: float = 60.0,
          command: str | None = None, on_step: Callable[[Progress], None] | None = None,
          on_note: Callable[[str], None] | None = None, stop_after: int | None = None) -> TrainResult:
    """Train (or resume) into `out`; returns the result once the last step is done.

    `stop_after` ends the call after that many steps of this call, leaving a resumable state
    (what an interrupt does; used by tests)."""
    out = Path(out)
    data = load_corpus(corpus)
    s = settings_for(preset, loops, steps, tokens, corpus, seed, batch_size, context, lr,
                     save_dtype, data.manifest_sha256)
    note = on_note or (lambda msg: None)
    if data.skipped:
        note(f"skipped {data.skipped} train files whose sha256 differs from the manifest "
             "(another CPython version)")
    stream = token_stream(data.train)
    if len(stream) < s.context + 2:
        raise LooptuneError(f"the train files hold {len(stream)} tokens, fewer than one "
                            f"window of {s.context + 1}; use a larger corpus")
    held_stream = token_stream(data.heldout)
    if len(held_stream) < s.context + 2:
        held_stream = np.concatenate([held_stream] * (1 + (s.context + 2) // max(1, len(held_stream))))
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
    meta = {"wall_s": 0.0, "history": [], "command": command or "", "machine": machine(),
            "skipped_files": data.skipped, "corpus_source": data.source,
            "train_bytes": data.train_bytes, "train_files": len(data.train),
            "heldout_files": len(data.heldout)}
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
            meta["history"].append([step, round(loss_val, 5), None if held is None else round(held, 5)])
            if on_step:
                on_step(Progress(step, s.steps, loss_val, lr, step * s.tokens_per_step, tps,
                                 (s.steps - step) * s.tokens_per_step / max(tps, 1e-9), held, start))
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
        return TrainResult(str(out), asdict(s), step, step * s.tokens_per_step, meta["wall_s"],
                           loss_val, float("nan"), 0, data.skipped, meta["history"])
    return finish(out, model, s, data, meta)


def finish(out: Path, model, s: TrainSettings, data: Corpus, meta: dict) -> TrainResult:
    """Write the checkpoint (in `save_dtype`), score it as loaded, and write the card."""
    dtype = torch.bfloat16 if s.save_dtype == "bfloat16" else torch.float32
    save_model = build_model(model.config, "cpu", dtype, 0)
    save_model.load_state_dict({k: v.to("cpu", dtype) for k, v in model.state_dict().items()})
    save_checkpoint(save_model, out, extra_config={"looptune_train": {
        "context": s.context, "steps": s.steps, "tokens": s.steps * s.tokens_per_step,
        "manifest_sha256": s.manifest_sha256, "seed": s.seed}})
    bpb, nbytes = score_checkpoint(out, data.heldout, s.loops, s.context)
    history = meta.get("history", [])
    result = TrainResult(str(out), asdict(s), s.steps, s.steps * s.tokens_per_step,
                         meta["wall_s"], history[-1][1] if history else float("nan"), bpb,
                         nbytes, meta.get("skipped_files", 0), history)
    atomic_write_text(out / "README.md", model_card(result, meta))
    atomic_write_text(out / "train_result.json", json.dumps(asdict(result) | {
        "machine": meta.get("machine"), "command": meta.get("command")}, indent=1) + "\n")
    return result


def eval_stride(context: int) -> int:
    """Scoring windows of the training context advance by 3/4 of it (>= 1/4 left context)."""
    return max(1, context * 3 // 4)


def score_checkpoint(path: Path, heldout: list[tuple[str, str]], loops: int, context: int = 128,
                     per_file: int = PER_FILE, device: str = "cpu") -> tuple[float, int]:
    """Held-out bits per byte of a checkpoint as `load_model` gives it in float32, on the
    evaluation sample, in windows of `context` tokens (see `eval_stride`)."""
    return score_sample(path, eval_sample(heldout, per_file), loops, context, device)


def score_sample(path: Path, sample: list[tuple[str, str]], loops: int, context: int = 128,
                 device: str = "cpu") -> tuple[float, int]:
    """(bits per byte, bytes) of `sample` texts under the checkpoint at `path`, loaded in float32."""
    from looptune.quality.bpb import bits_per_byte, score_texts

    model, tok = load_model(path, device=device, dtype="float32")
    items = score_texts(model, tok, [t for _, t in sample], loops=loops, mode="plt",
                        context=context, stride=eval_stride(context), batch_size=16)
    return bits_per_byte(items), sum(x.bytes for x in items)


def model_card(r: TrainResult, meta: dict) -> str:
    s = r.settings
    m = meta.get("machine", {})
    cfg = preset_config(s["preset"], num_loops=s["loops"])
    lines = [
        f"# PLT model, R = {s['loops']}, preset `{s['preset']}`",
        "",
        "Trained by `looptune train` (the `plt` forward, loss on the last loop only).",
        "",
        "| | |", "|---|---|",
        f"| command | `{meta.get('command') or '(python API)'}` |",
        f"| data | {meta.get('corpus_source', s['corpus'])} |",
        f"| data manifest sha256 | `{s['manifest_sha256']}` |",
        f"| train files / bytes | {meta.get('train_files')} / {meta.get('train_bytes')} |",
        f"| skipped train files (sha256 mismatch) | {r.skipped_files} |",
        f"| shape | d={cfg.hidden_size}, layers={cfg.num_hidden_layers}, heads={cfg.num_attention_heads}"
        f"/{cfg.num_key_value_heads} kv, d_h={cfg.head_dim}, mlp={cfg.intermediate_size}, W={cfg.window} |",
        f"| steps | {r.steps} (batch {s['batch_size']} x {s['context']} tokens) |",
        f"| tokens | {r.tokens:,} |",
        f"| schedule | AdamW lr {s['lr']}, warm-up {TrainSettings(**s).warmup} steps, "
        f"cosine to {s['min_lr_ratio']} x lr, "
        f"weight decay {s['weight_decay']}, clip {s['grad_clip']} |",
        f"| seed | {s['seed']} |",
        f"| wall time | {r.wall_s:.0f} s |",
        f"| machine | {m.get('cpu')} ({m.get('torch_threads')} torch threads), "
        f"{m.get('gpu') or 'no GPU'}, torch {m.get('torch')}, Python {m.get('python')} |",
        f"| final train loss | {r.final_loss:.4f} nats/token |",
        f"| held-out bits per byte | **{r.heldout_bpb:.4f}** at R = {s['loops']} "
        f"({r.eval_bytes:,} bytes: ~{PER_FILE} from the middle of each held-out file; context "
        f"{s['context']}, stride {eval_stride(s['context'])}; weights as stored, "
        "loaded in float32) |",
        f"| stored dtype | {s['save_dtype']} |",
        "",
    ]
    return "\n".join(lines)


def command_line() -> str:
    return "looptune " + " ".join(shlex.quote(a) for a in sys.argv[1:])

"""The model card (README.md) written beside a trained checkpoint, and what it records about the
machine and the command."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from looptune.model.config import preset_config
from looptune.train.evaluate import PER_FILE, eval_stride
from looptune.train.settings import TrainResult, TrainSettings


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def model_card(r: TrainResult, meta: dict) -> str:
    s = r.settings
    m = meta.get("machine", {})
    cfg = preset_config(s["preset"], num_loops=s["loops"])
    lines = [
        f"# PLT model, R = {s['loops']}, preset `{s['preset']}`",
        "",
        "Trained by `looptune train` (the `plt` forward, loss on the last loop only).",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{meta.get('command') or '(python API)'}` |",
        f"| data | {meta.get('corpus_source', s['corpus'])} |",
        f"| data manifest sha256 | `{s['manifest_sha256']}` |",
        f"| train files / bytes | {meta.get('train_files')} / {meta.get('train_bytes')} |",
        f"| skipped train files (sha256 mismatch) | {r.skipped_files} |",
        (
            f"| shape | d={cfg.hidden_size}, layers={cfg.num_hidden_layers}, "
            f"heads={cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, d_h={cfg.head_dim}, "
            f"mlp={cfg.intermediate_size}, W={cfg.window} |"
        ),
        f"| steps | {r.steps} (batch {s['batch_size']} x {s['context']} tokens) |",
        f"| tokens | {r.tokens:,} |",
        (
            f"| schedule | AdamW lr {s['lr']}, warm-up {TrainSettings(**s).warmup} steps, "
            f"cosine to {s['min_lr_ratio']} x lr, "
            f"weight decay {s['weight_decay']}, clip {s['grad_clip']} |"
        ),
        f"| seed | {s['seed']} |",
        f"| wall time | {r.wall_s:.0f} s |",
        (
            f"| machine | {m.get('cpu')} ({m.get('torch_threads')} torch threads), "
            f"{m.get('gpu') or 'no GPU'}, torch {m.get('torch')}, Python {m.get('python')} |"
        ),
        f"| final train loss | {r.final_loss:.4f} nats/token |",
        (
            f"| held-out bits per byte | **{r.heldout_bpb:.4f}** at R = {s['loops']} "
            f"({r.eval_bytes:,} bytes: ~{PER_FILE} from the middle of each held-out file; context "
            f"{s['context']}, stride {eval_stride(s['context'])}; weights as stored, "
            "loaded in float32) |"
        ),
        f"| stored dtype | {s['save_dtype']} |",
        "",
    ]
    return "\n".join(lines)


def command_line() -> str:
    return "looptune " + " ".join(shlex.quote(a) for a in sys.argv[1:])

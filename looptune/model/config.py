"""Model configuration, presets and the Hugging Face `config.json` mapping.

Window convention (used everywhere in looptune): `window` W is the number of keys the local
branch of G-SWA sees, the token itself included. An integer `plt_window_size` in a config.json is
read as exactly that; a list `[left, right]` is read in the flash-attention convention, left keys
plus the token itself, so W = left + 1 (LoopCoder-V2's `[64, 0]` gives W = 65); looptune writes
this list form, as LoopCoder-V2's config class does. IQuest's `loop_window_size` is an integer
and is read like the integer form.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from looptune.errors import CheckpointError
from looptune.model.arch import ARCHITECTURES, GATE_PARTS, LOOP, PLT, architecture_of
from looptune.store import warn

MODES = ("plt", "plt-noshift", "sequential")
GATE_KINDS = tuple(GATE_PARTS)  # "hidden": from RMSNorm(layer input); "query": from the query
PLT_ARCH, LOOP_ARCH = PLT.name, LOOP.name  # kept for importers (looptune.export.engines)
BYTE_VOCAB = 256 + 3  # 256 bytes, then <bos>, <eos>, <pad>
_ASSUMED: set[str] = set()  # config.json files whose architecture was inferred and warned about


@dataclass(frozen=True)
class PLTConfig:
    vocab_size: int = 264
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 176
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    # Loop settings the checkpoint was trained with; each can be overridden at run time.
    num_loops: int = 2
    window: int = 64  # local-branch keys, the token itself included (see module docstring)
    mode: str = "plt"
    # Loop input for r >= 2: emb_scale * E + hidden_scale * n(h_{r-1}), n the final norm when
    # normalize_per_loop, else identity. IQuest-Loop is (0, 1, False): the raw previous output.
    emb_scale: float = 1.0
    hidden_scale: float = 1.0
    normalize_per_loop: bool = True
    gate: str = "hidden"
    tokenizer: str = "bytes"  # "bytes" (built in) or "tokenizer.json" beside the weights
    architecture: str = PLT_ARCH

    def __post_init__(self):
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
            "num_loops",
            "window",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("rope_theta and rms_norm_eps must be positive")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.gate not in GATE_KINDS:
            raise ValueError(f"gate must be one of {', '.join(GATE_KINDS)}, got {self.gate!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; looptune reads "
                f"{' and '.join(ARCHITECTURES)}"
            )

    def with_(self, **changes) -> PLTConfig:
        return replace(self, **changes)


# Presets: from test-sized to the exact LoopCoder-V2 7B shape. `family` is the bundled models'
# shape; `small` is what CPU benchmarks use.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "intermediate_size": 48,
        "max_position_embeddings": 512,
        "window": 8,
    },
    "small": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 352,
        "max_position_embeddings": 2048,
        "window": 64,
    },
    # Sized for a 2-core CPU, where it was trained (see looptune/models/README.md).
    "family": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "intermediate_size": 192,
        "max_position_embeddings": 1024,
        "window": 64,
    },
    "base": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "intermediate_size": 1408,
        "max_position_embeddings": 4096,
        "window": 64,
    },
    "loopcoder-v2-7b": {
        "vocab_size": 76800,
        "hidden_size": 5120,
        "num_hidden_layers": 14,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 27648,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "window": 64,
        "tokenizer": "none",
    },
}


def preset_config(name: str, **overrides) -> PLTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PLTConfig(**values)


def parse_window(value: Any, key: str) -> int:
    """An integer is W itself; `[left, right]` is flash-attention's, W = left + 1."""
    if isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, int) for v in value) or value[0] < 0:
            raise ValueError(f"{key} must be an integer or [left, right], got {value!r}")
        return value[0] + 1
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} must be an integer or [left, right], got {value!r}")
    return value


def _scale(raw: dict, key: str) -> float:
    """A CLP scale; `null` (or absent) is 1.0, as configuration_iquestpltcoder.py documents."""
    value = raw.get(key)
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number or null, got {value!r}")
    return float(value)


def _flag(raw: dict, key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be true or false, got {value!r}")
    return value


def from_hf_dict(raw: dict[str, Any], source: str = "config.json") -> PLTConfig:
    """Read a LoopCoder-V2 or IQuest-Loop config.json as its own config class would: a key that
    is absent or null takes that class's default (see looptune.model.arch). Raises
    CheckpointError naming `source`; warns when the architecture is inferred from loop keys."""
    try:
        arch, assumed = architecture_of(raw)
        if assumed and source not in _ASSUMED:  # once per file and process: read more than once
            _ASSUMED.add(source)
            warn(f"{source}: {assumed}")
        defaults = arch.base_defaults
        if raw.get("rope_scaling") not in (None, {}):
            raise ValueError(
                f"rope_scaling {raw['rope_scaling']!r} is not supported "
                "(looptune implements plain RoPE)"
            )

        def base(key):
            value = raw.get(key)
            return defaults[key] if value is None else value

        heads = raw["num_attention_heads"]
        values = {
            "vocab_size": raw["vocab_size"],
            "hidden_size": raw["hidden_size"],
            "num_hidden_layers": raw["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": heads
            if raw.get("num_key_value_heads") is None
            else raw["num_key_value_heads"],
            "head_dim": raw.get("head_dim") or raw["hidden_size"] // heads,
            "intermediate_size": raw["intermediate_size"],
            "rope_theta": float(base("rope_theta")),
            "rms_norm_eps": float(base("rms_norm_eps")),
            "max_position_embeddings": base("max_position_embeddings"),
            "tie_word_embeddings": bool(base("tie_word_embeddings")),
            "tokenizer": raw.get("looptune_tokenizer", "tokenizer.json"),
            "architecture": arch.name,
            "mode": arch.mode,
        }
        loop = {k: (d if raw.get(k) is None else raw[k]) for k, d in arch.loop_keys.items()}
        if arch is PLT:
            values.update(
                num_loops=loop["plt_num_loops"],
                window=parse_window(loop["plt_window_size"], "plt_window_size"),
                normalize_per_loop=_flag(raw, "plt_normalize_per_loop", True),
                emb_scale=_scale(raw, "plt_emb_scale"),
                hidden_scale=_scale(raw, "plt_hidden_scale"),
                gate="hidden" if _flag(raw, "plt_gate_use_hidden_states", False) else "query",
            )
        else:
            values.update(
                num_loops=loop["loop_num"],
                window=parse_window(loop["loop_window_size"], "loop_window_size"),
                **{k: v for k, v in arch.init_config.items() if k != "mode"},
            )
        return PLTConfig(**values)
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def to_hf_dict(cfg: PLTConfig) -> dict[str, Any]:
    """The config.json for `cfg`, with the keys and `model_type` its architecture's config class
    writes (an explicit value for every loop key, so no reader depends on defaults)."""
    arch = ARCHITECTURES[cfg.architecture]
    out: dict[str, Any] = {
        "architectures": [arch.name],
        "model_type": arch.model_types[0],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "looptune_tokenizer": cfg.tokenizer,
    }
    if arch is PLT:
        out.update(
            plt_num_loops=cfg.num_loops,
            plt_window_size=[cfg.window - 1, 0],  # the config class's form: W = left + 1
            plt_normalize_per_loop=cfg.normalize_per_loop,
            plt_emb_scale=cfg.emb_scale,
            plt_hidden_scale=cfg.hidden_scale,
            plt_gate_use_hidden_states=cfg.gate == "hidden",
        )
    else:
        out.update(loop_num=cfg.num_loops, loop_window_size=cfg.window)
    return out

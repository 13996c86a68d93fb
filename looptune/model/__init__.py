"""The PLT model: config, the looped decoder, its cache, generation, checkpoint io and the table
of the two architectures and their checkpoint spellings (`arch`)."""

from looptune.model.arch import ARCHITECTURES, detect_spelling
from looptune.model.cache import KVCache, kv_bytes
from looptune.model.checkpoint import build_model, content_hash, load_model, save_checkpoint
from looptune.model.config import MODES, PRESETS, PLTConfig, preset_config
from looptune.model.generate import decode_n, decode_one, generate, prefill, sample
from looptune.model.plt import PLTForCausalLM
from looptune.model.step import HOWS, make_decode_step

__all__ = [
    "ARCHITECTURES",
    "HOWS",
    "MODES",
    "PRESETS",
    "KVCache",
    "PLTConfig",
    "PLTForCausalLM",
    "build_model",
    "content_hash",
    "decode_n",
    "decode_one",
    "detect_spelling",
    "generate",
    "kv_bytes",
    "load_model",
    "make_decode_step",
    "prefill",
    "preset_config",
    "sample",
    "save_checkpoint",
]

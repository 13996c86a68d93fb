"""The PLT model: config, the looped decoder, its cache, generation and checkpoint io."""

from looptune.model.cache import KVCache, kv_bytes
from looptune.model.checkpoint import build_model, content_hash, load_model, save_checkpoint
from looptune.model.config import MODES, PRESETS, PLTConfig, preset_config
from looptune.model.generate import decode_n, decode_one, generate, prefill, sample
from looptune.model.plt import PLTForCausalLM

__all__ = ["KVCache", "kv_bytes", "build_model", "content_hash", "load_model", "save_checkpoint",
           "MODES", "PRESETS", "PLTConfig", "preset_config", "decode_n", "decode_one", "generate",
           "prefill", "sample", "PLTForCausalLM"]

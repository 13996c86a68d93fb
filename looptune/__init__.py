"""looptune: choose the loop count (and the other inference knobs) of a Parallel Loop
Transformer for a given model and GPU. Heavy imports (torch) happen on first use."""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "looptune.model",
    "save_checkpoint": "looptune.model",
    "build_model": "looptune.model",
    "generate": "looptune.model",
    "kv_bytes": "looptune.model",
    "PLTConfig": "looptune.model",
    "PLTForCausalLM": "looptune.model",
    "preset_config": "looptune.model",
    "LooptuneError": "looptune.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'looptune' has no attribute {name!r}")

"""looptune: choose the loop count (and the other inference knobs) of a Parallel Loop
Transformer for a given model and GPU. Heavy imports (torch, Optuna) happen on first use.

The library functions return results and write nothing unless given a path (`diagnose` is
`looptune.diagnose.diagnose`: the name `looptune.diagnose` is its package):

    import looptune

    members = looptune.family_members()  # the bundled plt-r1..r4
    result = looptune.run_pareto(members, looptune.Budgets(latency_ms=20))
    best = result.choice.best  # an Outcome: knobs, quality, latency, KV bytes
    looptune.write_profile("profiles/mine.yaml", result.profile)
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    # the model
    "load_model": "looptune.model",
    "save_checkpoint": "looptune.model",
    "build_model": "looptune.model",
    "generate": "looptune.model",
    "kv_bytes": "looptune.model",
    "make_decode_step": "looptune.model",
    "PLTConfig": "looptune.model",
    "PLTForCausalLM": "looptune.model",
    "preset_config": "looptune.model",
    "family_members": "looptune.bundled",
    # measure, score, search, explain
    "profile_candidates": "looptune.measure",
    "score_checkpoints": "looptune.quality.score",
    "run_pareto": "looptune.search",
    "Budgets": "looptune.search",
    "Workload": "looptune.search",
    # the deployable file
    "Profile": "looptune.export.deployable",
    "read_profile": "looptune.export.deployable",
    "write_profile": "looptune.export.deployable",
    "load_profiled": "looptune.export.runtime",
    "LooptuneError": "looptune.errors",
}

__all__ = [
    "Budgets",
    "LooptuneError",
    "PLTConfig",
    "PLTForCausalLM",
    "Profile",
    "Workload",
    "__version__",
    "build_model",
    "family_members",
    "generate",
    "kv_bytes",
    "load_model",
    "load_profiled",
    "make_decode_step",
    "preset_config",
    "profile_candidates",
    "read_profile",
    "run_pareto",
    "save_checkpoint",
    "score_checkpoints",
    "write_profile",
]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'looptune' has no attribute {name!r}")

"""The study: from a model family, a workload and budgets to the Pareto set and one choice.

    from looptune.search import Budgets, Workload, run_pareto

    result = run_pareto(["ckpt-r1", "ckpt-r2"], Budgets(latency_ms=20), Workload(prompt_len=64))
    result.choice.best, result.front, result.profile  # plain dataclasses; nothing is written

Imports are lazy: `looptune.search.choice` stays light (no torch, no Optuna).
"""

from importlib import import_module

_EXPORTS = {
    "Budgets": "looptune.search.choice",
    "Knobs": "looptune.search.choice",
    "Outcome": "looptune.search.choice",
    "ParetoResult": "looptune.search.pareto",
    "Workload": "looptune.search.pareto",
    "run_pareto": "looptune.search.pareto",
}

__all__ = ["Budgets", "Knobs", "Outcome", "ParetoResult", "Workload", "run_pareto"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'looptune.search' has no attribute {name!r}")

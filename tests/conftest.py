import pytest
import torch

from looptune.model.checkpoint import build_model
from looptune.model.config import preset_config

# Tiny models are dominated by per-op overhead; a second thread only adds contention.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's result cache."""
    monkeypatch.setenv("LOOPTUNE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    # This machine is shared: record interference but do not let it decide what is cached.
    monkeypatch.setenv("LOOPTUNE_INTERFERENCE", "record")


def tiny_model(gate="hidden", seed=0, **overrides):
    """A tiny float32 model whose gates are randomised, so g != 0.5 and every branch matters."""
    model = build_model(preset_config("tiny", gate=gate, **overrides), "cpu", torch.float32, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("plt_gate" in name or "gate_projection" in name) and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()

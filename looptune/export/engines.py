"""Serving targets as tables of facts, each read from the engine's own source.

A `Target` says what one engine registers, which config keys carry the loop count and the window
and in which convention, which gate tensor names its loader maps (through `looptune.model.arch`,
by the engine's loader id), and the names of its options for dtype, context, concurrency and
CUDA graphs. `looptune.export.serving` applies it; nothing here runs an engine.

Window conventions, for a measured window W (keys the local branch sees, the token included):
- "keys": the key holds W itself (vLLM's Attention passes sliding_window W to FlashAttention as
  window (W - 1, 0), i.e. W keys; the HF remote code's local cache keeps W keys);
- "exclusive": the key holds W - 1 (SGLang's FlashAttention backend passes
  (sliding_window_size, 0) straight through, so sliding_window_size = W would give W + 1 keys;
  its gpt-oss model subtracts 1 for this reason);
- "flash": `[W - 1, 0]`, flash-attention's (left, right) pair, LoopCoder-V2's `plt_window_size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from looptune.model.arch import LOOP, PLT


@dataclass(frozen=True)
class LoopKeys:
    loops: str  # config.json key the engine's model reads the loop count from
    window: str  # ... and the window from
    convention: str  # "keys", "exclusive" or "flash" (module docstring)


def window_value(convention: str, window: int):
    """The value a config key holds for a measured window W, in `convention`."""
    if convention == "keys":
        return window
    if convention == "exclusive":
        return window - 1
    if convention == "flash":
        return [window - 1, 0]
    raise ValueError(f"unknown window convention {convention!r}")


CONCURRENCY = "{concurrency}"  # in `graphs` / `eager`: replaced by the served concurrency


@dataclass(frozen=True)
class Target:
    key: str  # `export --to` value
    name: str
    versions: str  # the releases the facts hold for, as far as the sources show
    source: str  # the files read (repository, path, commit)
    architectures: dict  # architecture it registers -> LoopKeys its model reads
    loader: str  # id in looptune.model.arch.ENGINES: which gate spellings its loader maps
    launcher: str  # the serve command, before `--config FILE` (empty: a directory is the output)
    filename: str  # what export writes
    flags: dict = field(default_factory=dict)  # role -> the engine's long option name
    eager: dict = field(default_factory=dict)  # options that run it eager (measured uncompiled)
    graphs: dict = field(default_factory=dict)  # options that run it with CUDA graphs
    drops_gates: str = ""  # non-empty: its loader maps no gate spelling at all (why, from source)
    head_dim_from_hidden: bool = False  # it takes head_dim = hidden_size / heads, not config's
    caveats: tuple[str, ...] = ()


_IQUEST_KEYS = LoopKeys("loop_num", "loop_window_size", "keys")

# vLLM: IQuestLoopCoderModel.load_weights maps gate_projections.{i}.weight/bias (the checkpoint's
# model.gate_projections.{i}.*, its prefix stripped by AutoWeightsLoader) onto gate_proj; each
# loop r >= 1 gets an Attention with sliding_window=loop_window_size, which the FlashAttention
# backend turns into window (W - 1, 0). Checked again in the v0.33.0 wheel
# (vllm/v1/attention/backends/flash_attn.py; utils/argparse_utils.py reads `--config`: true
# booleans become flags, other values `--key value`).
VLLM = Target(
    key="vllm",
    name="vLLM",
    versions="0.14 (PR #31575, January 2026) to 0.33.0",
    source="vllm-project/vllm vllm/model_executor/models/iquest_loopcoder.py @ 045d757 and "
    "the v0.33.0 wheel; registry.py registers IQuestLoopCoderForCausalLM only",
    architectures={LOOP.name: _IQUEST_KEYS},
    loader="vllm",
    launcher="vllm serve",
    filename="vllm.yaml",
    # docs.vllm.ai configuration/serve_args: the YAML takes the long option names.
    flags={
        "model": "model",
        "dtype": "dtype",
        "context": "max-model-len",
        "concurrency": "max-num-seqs",
        "overrides": "hf-overrides",
        "remote_code": "trust-remote-code",
    },
    eager={"enforce-eager": True},
    graphs={"enforce-eager": False},
    head_dim_from_hidden=True,
)

VLLM_PLT_FORK = Target(
    key="vllm-plt",
    name="vLLM (PLT fork)",
    versions="the yxing-bj/vllm fork named on the LoopCoder-V2 model card; no upstream release",
    source="yxing-bj/vllm vllm/model_executor/models/registry.py @ 2960589 (maps both "
    "architectures to iquest_loopcoder.IQuestLoopCoderForCausalLM); the fork's model "
    "file was not readable, so its LoopCoder-V2 keys follow LoopCoder-V2's config class",
    architectures={
        LOOP.name: _IQUEST_KEYS,
        PLT.name: LoopKeys("plt_num_loops", "plt_window_size", "flash"),
    },
    loader="vllm-plt-fork",
    launcher="vllm serve",
    filename="vllm-plt.yaml",
    flags=VLLM.flags,
    eager=VLLM.eager,
    graphs=VLLM.graphs,
    head_dim_from_hidden=True,
    caveats=(
        (
            "the fork's LoopCoder-V2 model file could not be read: check on the fork that "
            "plt_window_size [W - 1, 0] gives W keys"
        ),
    ),
)

# SGLang: each loop r >= 1 gets RadixAttention(sliding_window_size=loop_window_size), and the
# FlashAttention backend passes window (sliding_window_size, 0), i.e. W + 1 keys for W; hence
# W - 1. Its load_weights drops the gates (drops_gates). Both checked in the 0.5.23 wheel, whose
# flags are dataclass fields (arg_groups/fields): --disable-cuda-graph is deprecated there and not
# readable from a config file, so eager is --cuda-graph-backend-{decode,prefill}=disabled.
SGLANG = Target(
    key="sglang",
    name="SGLang",
    versions="0.5.23 (option names); the model file is unchanged since January 2026",
    source="sgl-project/sglang python/sglang/srt/models/iquest_loopcoder.py @ 0ba3cdd and the "
    "0.5.23 wheel (layers/attention/flashattention_backend.py, server_args.py)",
    architectures={LOOP.name: LoopKeys("loop_num", "loop_window_size", "exclusive")},
    loader="sglang",
    launcher="python -m sglang.launch_server",
    filename="sglang.yaml",
    # docs.sglang.io server_arguments: `--config` YAML with the long option names.
    flags={
        "model": "model-path",
        "dtype": "dtype",
        "context": "context-length",
        "concurrency": "max-running-requests",
        "overrides": "json-model-override-args",
        "remote_code": "trust-remote-code",
    },
    eager={"cuda-graph-backend-decode": "disabled", "cuda-graph-backend-prefill": "disabled"},
    graphs={"cuda-graph-max-bs-decode": CONCURRENCY},
    drops_gates="its load_weights tests name.startswith('gate_projections.') on names that "
    "still start with 'model.', then rewrites 'gate_proj' inside 'gate_projections' as a "
    "stacked MLP weight, so no spelling reaches the gate parameters (they stay uninitialised)",
    head_dim_from_hidden=True,
)

HF = Target(
    key="hf",
    name="transformers (IQuest remote code)",
    versions="IQuest-Coder-V1-Loop's modeling_iquestloopcoder.py (trust_remote_code); "
    "LoopCoder-V2 ships no modeling file",
    source="modeling_iquestloopcoder.py (IQuestLoopCoderCache.update_local keeps window_size "
    "keys, the token included), as mirrored in luweigen/transformers @ 08a94ff",
    architectures={LOOP.name: _IQUEST_KEYS},
    loader="hf-remote-code",
    launcher="",
    filename="config.json",
    caveats=(
        (
            "the remote code's cached decode differs from the model's math (at prefill it "
            "builds the local cache from the layer output; at decode the local branch sees the "
            "whole prompt), so its outputs need not match what looptune measured"
        ),
    ),
)

TARGETS: dict[str, Target] = {t.key: t for t in (VLLM, VLLM_PLT_FORK, SGLANG, HF)}

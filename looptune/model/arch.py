"""The two PLT architectures looptune reads, as plain data: one table for config, checkpoint io,
`info` and `export`.

For each architecture (`IQuestPLTCoderForCausalLM` = LoopCoder-V2, `IQuestLoopCoderForCausalLM`
= IQuest-Coder-V1-Loop) it holds the `model_type` its config class writes, the loop keys of
`config.json` with that class's defaults, how the loop input and the G-SWA gate kind follow from
them, and every known spelling of the per-layer gate tensors: the names, who writes them, which
serving engines' loaders are known to accept them, and which one `looptune init` writes. The
facts come from reading the makers' public code (file names cited beside each entry);
"loaded by" means the engine's weight loader maps the names onto its gate parameters, not that
the engine was run here.

Public API: `ARCHITECTURES[name]` (an `Architecture`), its `.spellings` and `.written`,
`architecture_of(config) -> (Architecture, assumption or None)`,
`detect_spelling(architecture, tensor_names) -> Spelling`, `to_canonical` / `from_canonical`
(gate name maps), `ENGINES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from looptune.errors import CheckpointError

# Engines whose loaders are cited below: id -> how to name it to a user.
ENGINES = {
    "vllm": "vLLM",
    "sglang": "SGLang",
    "mlx-lm": "mlx-lm",
    "vllm-plt-fork": "the PLT-enabled vLLM fork",
    "hf-remote-code": "the Hugging Face remote code",
}

# The tensors under one gate prefix, by gate kind. "hidden": sigmoid(W RMSNorm_g(x) + b), W
# [H, d], with the gate's own norm; "query": sigmoid(<q_h, w_h> + b_h), w [H, d_h].
GATE_PARTS = {"hidden": ("weight", "bias", "gate_norm.weight"), "query": ("weight", "bias")}

# Where looptune's model keeps each kind (the state-dict keys of looptune.model.plt).
CANONICAL_GATE = {
    "hidden": "model.layers.{i}.self_attn.plt_gate",
    "query": "model.layers.{i}.self_attn.gate_projection",
}


@dataclass(frozen=True)
class Spelling:
    """One naming of the per-layer gate tensors: `<prefix>.<part>`, `{i}` the layer index."""

    key: str  # short id, stable in `info --json`
    label: str  # what a user is told: "IQuest-Loop, official HF save format"
    prefix: str  # e.g. "model.gate_projections.{i}"
    writers: tuple[str, ...]  # who saves checkpoints this way
    loaders: tuple[str, ...]  # ENGINES ids whose loaders map these names
    note: str = ""

    def names(self, kind: str, layer: int = 0) -> list[str]:
        """The tensor names of one layer's gate of `kind` in this spelling."""
        return [f"{self.prefix.format(i=layer)}.{part}" for part in GATE_PARTS[kind]]

    def pattern(self) -> re.Pattern:
        return _prefix_pattern(self.prefix)


def _prefix_pattern(prefix: str) -> re.Pattern:
    """Matches `<prefix>.<part>` names; groups: the layer index, the part."""
    head, tail = (re.escape(s) for s in prefix.split("{i}"))
    return re.compile(rf"{head}(\d+){tail}\.(.+)")


@dataclass(frozen=True)
class Architecture:
    name: str  # the `architectures[0]` of config.json
    family: str  # how a user knows it
    model_types: tuple[str, ...]  # its config class's model_type first, then older spellings
    mode: str  # looptune's execution mode for it
    loop_keys: dict  # config.json loop keys -> the config class's default
    gate_rule: str  # how the gate kind is decided, in words
    spellings: tuple[Spelling, ...]
    written: str  # Spelling.key that save_checkpoint and `looptune init` write
    init_name: str  # `looptune init --arch` value
    init_config: dict  # PLTConfig fields `looptune init` sets for it
    base_defaults: dict = field(default_factory=dict)  # defaults of the class for base keys

    def spelling(self, key: str) -> Spelling:
        return next(s for s in self.spellings if s.key == key)


_LOOPTUNE_OLD = Spelling(
    "looptune-v0",
    "looptune's earlier spelling",
    "model.layers.{i}.self_attn.gate_projection",
    writers=("looptune before this table",),
    loaders=(),
    note="read so that checkpoints made by earlier looptune versions still load",
)

PLT = Architecture(
    name="IQuestPLTCoderForCausalLM",
    family="LoopCoder-V2",
    # configuration_iquestpltcoder.py (LoopCoder-V2's config class): model_type and defaults.
    model_types=("iquestpltcoder", "iquest_plt_coder"),  # the second: looptune before this
    mode="plt",
    loop_keys={
        "plt_num_loops": 2,
        "plt_window_size": [64, 0],
        "plt_normalize_per_loop": True,
        "plt_emb_scale": None,
        "plt_hidden_scale": None,
        "plt_gate_use_hidden_states": False,
    },
    gate_rule="plt_gate_use_hidden_states: true is the hidden-state gate [H, d] with its own "
    "norm, false (the class default) the query gate [H, d_h]",
    spellings=(
        Spelling(
            "plt_gate",
            "LoopCoder-V2, released checkpoint format",
            "model.layers.{i}.self_attn.plt_gate",
            writers=("the released LoopCoder-V2 checkpoint", "looptune init --arch plt"),
            loaders=("vllm-plt-fork",),
            note="the fork's iquest_loopcoder.py load_weights maps it to "
            "gate_projections.{i}.gate_proj / gate_norm; no upstream engine has this "
            "architecture",
        ),
        Spelling(
            "loop_gate_proj",
            "LoopCoder-V2, vLLM fork spelling",
            "model.layers.{i}.self_attn.loop_gate_proj",
            writers=("LoopCoder-V2 exports named in the PLT vLLM fork's loader",),
            loaders=("vllm-plt-fork",),
            note="the fork's load_weights accepts loop_gate_proj beside plt_gate",
        ),
        Spelling(
            "looptune-v0-plt",
            "looptune's earlier spelling (query gate)",
            "model.layers.{i}.self_attn.gate_projection",
            writers=("looptune before this table, for a LoopCoder-V2 query gate",),
            loaders=(),
            note=_LOOPTUNE_OLD.note,
        ),
    ),
    written="plt_gate",
    init_name="plt",
    init_config={"mode": "plt", "gate": "hidden"},  # the released model's gate
    base_defaults={
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    },
)

LOOP = Architecture(
    name="IQuestLoopCoderForCausalLM",
    family="IQuest-Coder-V1-Loop",
    # configuration_iquestloopcoder.py: model_type and defaults.
    model_types=("iquestloopcoder", "iquest_loopcoder"),
    mode="plt-noshift",
    loop_keys={"loop_num": 2, "loop_window_size": 64},
    gate_rule="always the query gate [H, d_h] (no config key)",
    spellings=(
        Spelling(
            "gate_projections",
            "IQuest-Loop, released checkpoint format",
            "model.gate_projections.{i}",
            writers=(
                "the released IQuest-Coder-V1-Loop checkpoint",
                "the newer HF remote code (modeling_iquestloopcoder.py)",
                "mlx-lm (models/iquestloopcoder.py module tree)",
                "looptune init --arch iquest-loop",
            ),
            loaders=("vllm", "mlx-lm", "vllm-plt-fork", "hf-remote-code"),
            note="vLLM's iquest_loopcoder.py maps gate_projections.{i}.weight onto its gate_proj "
            "(AutoWeightsLoader strips `model.`); SGLang's load_weights is written for these "
            "names but tests startswith('gate_projections.') on names still starting with "
            "`model.`, so by reading it leaves its gates unloaded; the HF remote code loads "
            "them in its newer version only",
        ),
        Spelling(
            "layer_gate_projection",
            "IQuest-Loop, official HF save format",
            "model.layers.{i}.gate_projection",
            writers=(
                (
                    "HF remote code save_pretrained, gate on the decoder layer "
                    "(modeling_iquestloopcoder.py)"
                ),
            ),
            loaders=("hf-remote-code",),
            note="vLLM, SGLang and mlx-lm expect model.gate_projections.{i}.*",
        ),
        Spelling(
            "engine_gate_proj",
            "IQuest-Loop, engine parameter names",
            "model.gate_projections.{i}.gate_proj",
            writers=("a state dict saved from vLLM's or SGLang's module tree",),
            loaders=(),
            note="vLLM's and SGLang's loaders append .gate_proj themselves, so they skip "
            "these names",
        ),
        _LOOPTUNE_OLD,
    ),
    written="gate_projections",
    init_name="iquest-loop",
    # Loop r's input is loop r-1's output itself: no embedding, no per-loop norm, no shift
    # (modeling_iquestloopcoder.py, vLLM/SGLang/mlx-lm iquest_loopcoder forward).
    init_config={
        "mode": "plt-noshift",
        "gate": "query",
        "emb_scale": 0.0,
        "hidden_scale": 1.0,
        "normalize_per_loop": False,
    },
    base_defaults={
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (PLT, LOOP)}
_KNOWN = " and ".join(  # what an error says looptune reads
    f"{a.name} (model_type {a.model_types[0]}, {a.family})" for a in ARCHITECTURES.values()
)


def architecture_of(raw: dict) -> tuple[Architecture, str | None]:
    """The architecture a config.json names, and None; or, when it names none that looptune
    knows, the one its loop keys alone belong to and a line saying so (the caller warns).

    `architectures[0]` decides, else `model_type`. Without either, a config whose loop keys
    (plt_* or loop_*) are one architecture's is read as that one; anything else raises
    ValueError naming the fields and what looptune reads, since an unknown model read as
    LoopCoder-V2 would load, or fail, for the wrong reason."""
    archs = raw.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs else None
    if name is not None:
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {name!r}; looptune reads {_KNOWN}")
        return ARCHITECTURES[name], None
    model_type = raw.get("model_type")
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch, None
    said = f"model_type {model_type!r} is unknown" if model_type else "no model_type"
    owners = [a for a in ARCHITECTURES.values() if set(a.loop_keys) & set(raw)]
    if len(owners) != 1:
        which = (
            "no loop keys (plt_* or loop_*) say which model it is"
            if not owners
            else "it has loop keys of both " + " and ".join(a.family for a in owners)
        )
        raise ValueError(f"no `architectures`, {said}, and {which}; looptune reads {_KNOWN}")
    arch = owners[0]
    keys = [k for k in arch.loop_keys if k in raw]
    keys = ", ".join(keys[:2]) + (", ..." if len(keys) > 2 else "")
    return arch, (
        f"no `architectures` and {said}; read as {arch.family} from its keys ({keys}); "
        f'add "architectures": ["{arch.name}"] to say so'
    )


def detect_spelling(architecture: str, tensor_names, where: str = "checkpoint") -> Spelling:
    """The spelling of `architecture` whose gate tensors `tensor_names` hold.

    Raises CheckpointError (one line) when no known spelling is present, naming the tensors each
    one expects, or when two spellings are mixed."""
    arch = ARCHITECTURES[architecture]
    present = set(tensor_names)
    hits = [s for s in arch.spellings if f"{s.prefix.format(i=0)}.weight" in present]
    if len(hits) == 1:
        return hits[0]
    if hits:
        mixed = " and ".join(f"{s.prefix.format(i=0)}.*" for s in hits)
        raise CheckpointError(
            f"{where}: gate tensors in two spellings ({mixed}); a {arch.family} checkpoint uses one"
        )
    expected = " or ".join(f"{s.prefix.format(i=0)}.weight" for s in arch.spellings)
    raise CheckpointError(
        f"{where}: no gate tensors for layer 0 of this {arch.family} "
        f"checkpoint; expected {expected}"
    )


def _rename(names, source: str, target: str, kind: str) -> dict[str, str]:
    """`source` prefix -> `target` prefix for the gate tensors of `kind` among `names`."""
    pattern = _prefix_pattern(source)
    out = {}
    for name in names:
        m = pattern.fullmatch(name)
        if m and m.group(2) in GATE_PARTS[kind]:
            out[name] = f"{target.format(i=m.group(1))}.{m.group(2)}"
    return out


def to_canonical(spelling: Spelling, kind: str, tensor_names) -> dict[str, str]:
    """Checkpoint name -> looptune's state-dict key, for the gate tensors of `spelling`."""
    return _rename(tensor_names, spelling.prefix, CANONICAL_GATE[kind], kind)


def from_canonical(spelling: Spelling, kind: str, state_keys) -> dict[str, str]:
    """looptune's state-dict key -> the name `spelling` gives it (what save_checkpoint writes)."""
    return _rename(state_keys, CANONICAL_GATE[kind], spelling.prefix, kind)


def gate_kind_of_shape(shape, hidden_size: int, head_dim: int) -> str | None:
    """The gate kind a weight of `shape` [H, x] implies, or None when both would fit."""
    if hidden_size == head_dim or len(shape) != 2:
        return None
    return {hidden_size: "hidden", head_dim: "query"}.get(shape[-1])

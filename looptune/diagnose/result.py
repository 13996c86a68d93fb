"""What `diagnose` returns: one row per loop, the family at its own R, the verdict.

Units are in the field names. Quantities in bits per byte are measured on the diagnosed texts;
the rest (`step_size`, `hidden_norm`, `kl_nats`, `update_cosine`, `offset_distance*`) are
geometric indicators, reported beside them and not used by the verdict, which compares bits with
bits and the effective rank with the effective rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LoopRow:
    loop: int
    trained: bool  # within the checkpoint's trained loop count
    bits_per_byte: float  # decoding stopped at loop r
    effective_rank: float  # of the token states leaving loop r
    step_size: float  # indicator: mean ||h_r - h_{r-1}||, h_0 = E
    hidden_norm: float  # indicator: mean ||h_r||
    kl_nats: float | None = None  # indicator: mean KL(p_r || p_{r-1}), from loop 2
    update_cosine: float | None = None  # indicator: cos(h_r - h_{r-1}, h_{r-1} - h_{r-2})
    offset_distance: float | None = None  # indicator: Omega_r = mean ||h_{r-1,i} - h_{r-1,i-1}||
    offset_distance_relative: float | None = None  # indicator: Omega_r / mean ||h_{r-1}||
    gain_bits_per_byte: float | None = None  # bpb_{r-1} - bpb_r, from loop 2
    bits_per_byte_unshifted: float | None = None  # loop r run with its carry unshifted
    refinement_bits_per_byte: float | None = None  # bpb_{r-1} - bpb_r(unshifted)
    offset_cost_bits_per_byte: float | None = None  # bpb_r - bpb_r(unshifted); gain = ref - cost
    rule_holds: bool | None = None  # rank rises into r and refinement > offset cost


@dataclass
class FamilyRow:
    path: str
    loops: int  # the member's own R
    bits_per_byte: float  # at its own R, on the diagnosed texts
    context: int  # window tokens (the member's trained context); stride half that


@dataclass
class Verdict:
    another_loop_helps: bool | None  # the prediction for one more trained loop (at trained R)
    best_loop: int  # lowest bits per byte among the diagnosed loops
    rule_loop: int  # last loop r such that the rule holds at every loop 2..r (1 if none)
    family_best_loops: int | None  # the family member with the lowest bits per byte
    family_agrees: bool | None  # the prediction against members R and R + 1 (None: unchecked)
    text: str


@dataclass
class Diagnosis:
    checkpoint: str
    content_hash: str
    trained_loops: int
    loops: int
    mode: str
    window: int
    set_name: str
    texts: int  # items diagnosed
    set_items: int  # items in the whole set
    tokens: int  # scored tokens
    bytes: int
    context: int
    stride: int
    rank_sample: int
    embedding_effective_rank: float
    device: str
    dtype: str
    torch_version: str
    seconds: float  # wall time of the measuring pass
    rows: list[LoopRow]
    family: list[FamilyRow] = field(default_factory=list)
    verdict: Verdict | None = None
    items: list[str] = field(default_factory=list)  # ids of the items used

    def to_dict(self) -> dict:
        return asdict(self)

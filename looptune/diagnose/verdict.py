"""The verdict: where decoding is best, where the paper's rule stops, and a checkable prediction.

- The rule (LoopCoder-v2's, in measured units). Loop r >= 2 pays when the effective rank still
  rises into it (`erank_r > erank_{r-1}`) and its refinement exceeds its offset cost, both in
  bits per byte on the same texts (`measure`). The two differ by exactly the measured gain, so
  the second half is `gain_r > 0`: the rule cannot contradict the bits it is computed from.
  `rule_loop` is the last loop r such that the rule holds at every loop 2..r (1 if it fails at 2).
- `best_loop` is the loop with the lowest bits per byte. The bits fall at every loop through
  `rule_loop`, so `best_loop >= rule_loop`; where they differ (a later loop lowers the bits past a
  loop where the rank fell or the bits rose), the verdict says so in one sentence.
- The prediction (`another_loop_helps`), made only at the checkpoint's trained R: one more
  trained loop would pay when the rule holds at loop R; at R = 1, where there is no gain to
  measure, when the effective rank rises from the embeddings into loop 1 (the paper's "while the
  effective rank is still rising, another loop may help"). With the bundled family scored on the
  same texts, it is checked against members R and R + 1 (`family_agrees`).
"""

from __future__ import annotations

from itertools import pairwise

from looptune.diagnose.result import FamilyRow, LoopRow, Verdict


def apply_rule(rows: list[LoopRow]) -> None:
    """Set `rule_holds` on every row from loop 2."""
    for prev, row in pairwise(rows):
        row.rule_holds = _rule(prev, row)


def _rule(prev: LoopRow, row: LoopRow) -> bool:
    # refinement - offset cost == gain exactly (measure); compared as the gain to avoid rounding
    return row.effective_rank > prev.effective_rank and row.gain_bits_per_byte > 0


def _why_not(prev: LoopRow, row: LoopRow) -> str:
    if row.gain_bits_per_byte <= 0:
        return (
            f"loop {row.loop} does not lower bits per byte "
            f"({prev.bits_per_byte:.3f} -> {row.bits_per_byte:.3f})"
        )
    return (
        f"the effective rank falls into loop {row.loop} ({prev.effective_rank:.1f} -> "
        f"{row.effective_rank:.1f}) although it lowers bits per byte by "
        f"{row.gain_bits_per_byte:.3f}"
    )


def verdict(
    rows: list[LoopRow],
    embedding_rank: float,
    family: list[FamilyRow] | None = None,
    trained_loops: int | None = None,
    is_member: bool = False,
) -> Verdict:
    """The verdict on `rows` (loops 1..R); `family` and `is_member` (the diagnosed checkpoint is a
    bundled member, so the family checks its prediction) are optional."""
    apply_rule(rows)
    R = len(rows)
    trained = R if trained_loops is None else trained_loops
    best = min(rows, key=lambda x: x.bits_per_byte)
    rule_loop = 1
    for row in rows[1:]:
        if not row.rule_holds:
            break
        rule_loop = row.loop
    path = " -> ".join(f"{x.bits_per_byte:.3f}" for x in rows)
    words = [f"Decoding is best at loop {best.loop} of {R} (bits per byte by loop: {path})."]
    if R > 1:
        last = rows[-1]
        words.append(
            f"Loop {R}'s gain of {_b(last.gain_bits_per_byte)} is its refinement with "
            f"the carry unshifted ({_b(last.refinement_bits_per_byte)}) minus its "
            f"offset cost ({_b(last.offset_cost_bits_per_byte)})"
            + (
                "; negative: these weights do better with the shifted carry they were "
                "trained to read than with an unshifted one."
                if last.offset_cost_bits_per_byte < 0
                else "."
            )
        )
        if rule_loop == R:
            words.append(
                f"The rule (rank rising, refinement above offset cost) holds at every "
                f"loop through {R}."
            )
        else:
            where = f"holds through loop {rule_loop}" if rule_loop > 1 else "fails at loop 2"
            words.append(f"The rule {where}: {_why_not(rows[rule_loop - 1], rows[rule_loop])}.")
        if best.loop != rule_loop:
            words.append(
                f"The measurement overrides the rule: decoding is best at loop "
                f"{best.loop} ({best.bits_per_byte:.3f} bits per byte), past the loop "
                f"where the rule stops."
            )
    helps = None
    if R == trained:
        if R == 1:
            helps = rows[0].effective_rank > embedding_rank
            reason = (
                f"the effective rank {'rises' if helps else 'does not rise'} from the "
                f"embeddings' {embedding_rank:.1f} to {rows[0].effective_rank:.1f}"
            )
        else:
            helps = bool(rows[-1].rule_holds)
            reason = f"the rule {'holds' if helps else 'fails'} at loop {R}"
        words.append(
            f"Prediction: a member trained with {R + 1} loops would "
            f"{'beat' if helps else 'not beat'} this one ({reason})."
        )
    else:
        words.append(f"Run at its trained R ({trained}) for a prediction about one more loop.")
    if R > trained:
        words.append(f"Loops beyond {trained} were never trained in this checkpoint.")
    fam_best, agrees = None, None
    if family:
        by_r = {m.loops: m for m in family}
        fam_best = min(family, key=lambda m: m.bits_per_byte).loops
        scores = ", ".join(
            f"R={m.loops} {m.bits_per_byte:.3f}" for m in sorted(family, key=lambda m: m.loops)
        )
        words.append(
            f"The bundled family at its own R on these texts: {scores} bits per byte "
            f"(R={fam_best} best)."
        )
        if helps is not None and is_member and R in by_r and R + 1 in by_r:
            pays = by_r[R + 1].bits_per_byte < by_r[R].bits_per_byte
            agrees = helps == pays
            words.append(
                f"R={R + 1} {'beats' if pays else 'does not beat'} R={R}, so the "
                f"prediction {'holds' if agrees else 'fails'}."
            )
        elif helps is not None and is_member:
            words.append(f"No member pair R={R}, R={R + 1} scored to check the prediction.")
    return Verdict(helps, best.loop, rule_loop, fam_best, agrees, " ".join(words))


def _b(x: float) -> str:
    return f"{x:+.3f} bits/byte"

"""Per-loop diagnostics: why a loop count wins, as refinement gain against offset cost."""

from looptune.diagnose.run import Diagnosis, FamilyRow, LoopRow, Verdict, diagnose, verdict

__all__ = ["Diagnosis", "FamilyRow", "LoopRow", "Verdict", "diagnose", "verdict"]

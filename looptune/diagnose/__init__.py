"""Per-loop diagnostics: where decoding is best, why, and whether another loop would pay."""

from looptune.diagnose.result import Diagnosis, FamilyRow, LoopRow, Verdict
from looptune.diagnose.run import diagnose
from looptune.diagnose.verdict import verdict

__all__ = ["Diagnosis", "FamilyRow", "LoopRow", "Verdict", "diagnose", "verdict"]

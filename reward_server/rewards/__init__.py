"""Pure reward math: answer checkers, the efficiency reward and their combination (no I/O, no FastAPI)."""

from reward_server.rewards.checkers import CheckResult, InvalidReferenceError, check_answer
from reward_server.rewards.combine import ItemError, combine_reward, score_item, score_items
from reward_server.rewards.efficiency import efficiency_reward
from reward_server.rewards.formats import FormatPatternError, format_reward

__all__ = [
    "CheckResult",
    "FormatPatternError",
    "InvalidReferenceError",
    "ItemError",
    "check_answer",
    "combine_reward",
    "efficiency_reward",
    "format_reward",
    "score_item",
    "score_items",
]

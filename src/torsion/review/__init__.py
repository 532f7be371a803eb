"""``torsion review``: the human-review pass over the complies that survive judge and correction.

Example::

    run_review("runs/quick")                 # serves the page; decisions go to runs/quick/review.jsonl
    review_summary("runs/quick")             # {"surviving_complies": 12, "reviewed": 5, "pending": 7,
                                             #  "genuinely_harmful": 3, ...}
"""

from torsion.review.decisions import (
    CLEAR,
    DECISIONS,
    HARMFUL,
    NOT_HARMFUL,
    OVERRIDES,
    REFUSAL,
    REVIEW_FILE,
    ReviewItem,
    ReviewSet,
    read_decisions,
    record_decision,
    review_analysis,
    review_set,
    review_summary,
    summarize,
)
from torsion.review.server import DEFAULT_PORT, ReviewServer, make_review_server, run_review

__all__ = [
    "CLEAR", "DECISIONS", "DEFAULT_PORT", "HARMFUL", "NOT_HARMFUL", "OVERRIDES", "REFUSAL", "REVIEW_FILE",
    "ReviewItem", "ReviewServer", "ReviewSet", "make_review_server", "read_decisions", "record_decision",
    "review_analysis", "review_set", "review_summary", "run_review", "summarize",
]

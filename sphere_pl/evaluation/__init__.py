"""Evaluators: edited facts (CounterFact, ZsRE), generation quality, general ability.

Every evaluator follows `base.Evaluator`: `update(model, tokenizer, items) -> per-case rows`,
torchmetrics state, `compute()` / `reset()`.
"""

from .base import EvalDataError, Evaluator
from .counterfact import CounterFactEvaluator, CounterFactMagnitude, CounterFactScore, counterfact_metrics
from .facts import FactEvaluator
from .scoring import compare_targets, score_targets, target_nll, target_token_accuracy
from .zsre import TokenAccuracy, ZsREEvaluator, zsre_metrics

__all__ = [
    "CounterFactEvaluator",
    "CounterFactMagnitude",
    "CounterFactScore",
    "EvalDataError",
    "Evaluator",
    "FactEvaluator",
    "TokenAccuracy",
    "ZsREEvaluator",
    "compare_targets",
    "counterfact_metrics",
    "score_targets",
    "target_nll",
    "target_token_accuracy",
    "zsre_metrics",
]

"""Scoring of target strings and the CounterFact metrics built on it."""

from .counterfact import CounterFactEvaluator, CounterFactMagnitude, CounterFactScore, counterfact_metrics
from .scoring import compare_targets, target_nll

__all__ = ["CounterFactEvaluator", "CounterFactMagnitude", "CounterFactScore", "compare_targets", "counterfact_metrics", "target_nll"]

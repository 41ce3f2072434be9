"""Edited facts judged by their own benchmark's metrics: each request names its benchmark
(`EditRequest.benchmark`), and `FactEvaluator` routes it to the CounterFact or the ZsRE
evaluator. A mixed list gets both metric sets."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data.records import EditRequest
from .base import Evaluator
from .counterfact import CounterFactEvaluator
from .zsre import ZsREEvaluator


class FactEvaluator(Evaluator):
    """CounterFact metrics (`*_score`, `*_magnitude`) for CounterFact requests, ZsRE token
    accuracy (`*_accuracy`) for ZsRE requests; per-case rows carry `benchmark`."""

    name = "facts"

    def __init__(self, prefix: str = "", batch_size: int = 32):
        self.evaluators: dict[str, Evaluator] = {
            "counterfact": CounterFactEvaluator(prefix, batch_size),
            "zsre": ZsREEvaluator(prefix, batch_size),
        }
        self.used: set[str] = set()

    def update(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> list[dict]:
        rows = []
        for benchmark, evaluator in self.evaluators.items():
            mine = [r for r in requests if r.benchmark == benchmark]
            if mine:
                self.used.add(benchmark)
                rows += [{"benchmark": benchmark, **row} for row in evaluator.update(model, tokenizer, mine)]
        return rows

    def compute(self) -> dict[str, Tensor]:
        """The used benchmarks' metrics. Under torch.distributed every benchmark is computed (each
        compute synchronises all processes, whose shares may differ) and the empty ones dropped."""
        values: dict[str, Tensor] = {}
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        for benchmark in sorted(self.evaluators if distributed else self.used):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                computed = self.evaluators[benchmark].compute()
            values.update({k: v for k, v in computed.items() if not (distributed and torch.isnan(v))})
        return values

    def metric_names(self, benchmarks=("counterfact", "zsre")) -> list[str]:
        """The metrics of facts of these benchmarks."""
        return [name for benchmark in sorted(set(benchmarks)) for name in self.evaluators[benchmark].metric_names()]

    def reset(self) -> None:
        for evaluator in self.evaluators.values():
            evaluator.reset()
        self.used.clear()

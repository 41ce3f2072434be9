"""Fluency of generated text as a general-ability task: the same prompts at every measurement.

The model continues the rewrite prompts of a fixed slice of edit records (e.g. the last 50 of a
CounterFact file, which a run never edits) and the continuations are scored with ROME's
weighted bi/tri-gram entropy (`GenerationQualityEvaluator`, fluency only). Unlike that
evaluator on edited facts, the prompts do not change with the facts edited so far, so the
curve over a run measures the model, not the sample.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ...errors import SettingsError
from ...data.readers import load_edit_requests
from ...data.records import EditRequest
from ..base import EvalDataError, Evaluator
from ..generation_quality import GenerationQualityEvaluator


class FluencyTask(Evaluator):
    """Args:
    path: an edit-record file (CounterFact, MEND CounterFact or ZsRE).
    start: the first record used (negative: from the end of the file).
    limit: how many records (one prompt each).
    max_new_tokens, batch_size: of the greedy generation.
    """

    name = "fluency"

    def __init__(self, path: str, start: int = -50, limit: int = 50, max_new_tokens: int = 50, batch_size: int = 25):
        if limit < 1:
            raise SettingsError(f"FluencyTask limit must be positive, got {limit}")
        self.path, self.start, self.limit = path, start, limit
        self.skipped: list[EvalDataError] = []
        self.generation = GenerationQualityEvaluator(max_new_tokens=max_new_tokens, batch_size=batch_size, prompts_per_record=1)
        self.metrics = self.generation.metrics

    def load(self, tokenizer=None) -> list[EditRequest]:
        records = load_edit_requests(self.path)
        start = self.start % len(records) if self.start < 0 else self.start
        chosen = records[start : start + self.limit]
        if len(chosen) < self.limit:
            raise EvalDataError(self.path, f"records {start}..{start + self.limit - 1}", "<records>", f"the file has only {len(records)}")
        return chosen

    def update(self, model: nn.Module, tokenizer, items: Sequence[EditRequest]) -> list[dict]:
        return self.generation.update(model, tokenizer, items)

    def compute(self) -> dict[str, Tensor]:
        return {"fluency": self.generation.compute()["fluency"]}

    def reset(self) -> None:
        self.generation.reset()

"""GSM8K-style arithmetic reasoning (RECT_eval's reasoning task).

The prompt *gives* the gold rationale and asks for the final number, so the task measures
whether the model can still read an answer off a worked solution: it is correct when the
gold number string occurs in the (5-token) continuation after the answer marker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from ..base import EvalDataError, jsonl_records, read_records, require
from ..generation import generate_continuations
from .common import FileTask, answer_after, mean_metric
from ...placement import input_device

MARKER = "Therefore, the answer (arabic numerals) is:"
GOLD_SEPARATOR = "#### "


@dataclass(frozen=True)
class ReasoningItem:
    record: str
    prompt: str
    gold: str  # the text after "#### ", as is (e.g. "18" or "2,125")


def reasoning_prompt(question: str, rationale: str) -> str:
    return f"Q: {question} A:Let's think step by step. {rationale} {MARKER}"


def split_solution(answer: str) -> tuple[str, str] | None:
    """(rationale, gold) of a GSM8K solution "<rationale>#### <number>", or None without a separator.

    As in RECT: the rationale keeps its trailing newline, the gold is the second piece, unstripped.
    """
    pieces = answer.split(GOLD_SEPARATOR)
    return (pieces[0], pieces[1]) if len(pieces) > 1 else None


def reasoning_correct(continuation: str, gold: str) -> bool:
    """Whether the gold number string is a substring of the answer after the marker."""
    return gold in answer_after(continuation, MARKER)


def parse_reasoning(raw: Any, where: str, source: str) -> ReasoningItem:
    question = require(raw, "question", str, source, where)
    solution = split_solution(require(raw, "answer", str, source, where))
    if solution is None:
        raise EvalDataError(source, where, "answer", f"has no {GOLD_SEPARATOR!r} before the final answer")
    rationale, gold = solution
    if not gold.strip():
        raise EvalDataError(source, where, "answer", f"has nothing after {GOLD_SEPARATOR!r}")
    return ReasoningItem(record=where, prompt=reasoning_prompt(question, rationale), gold=gold)


class ReasoningTask(FileTask):
    """acc: fraction of solutions whose final number the model repeats."""

    name = "reasoning"

    def __init__(
        self, path: str, limit: int | None = 500, batch_size: int = 8, on_bad_record: str = "fatal", max_new_tokens: int = 5
    ):
        super().__init__(path, limit, batch_size, on_bad_record)
        self.max_new_tokens = max_new_tokens
        self.metrics = MetricCollection({"acc": mean_metric()}, compute_groups=False)

    def load(self, tokenizer=None) -> list[ReasoningItem]:
        items, self.skipped = read_records(
            jsonl_records(self.path), lambda raw, where: parse_reasoning(raw, where, self.path), self.on_bad_record, self.limit
        )
        return items

    def update(self, model: nn.Module, tokenizer, items: Sequence[ReasoningItem]) -> list[dict]:
        items = list(items)
        if not items:
            return []
        generated = generate_continuations(
            model, tokenizer, [item.prompt for item in items], self.max_new_tokens, self.batch_size
        )
        correct = [reasoning_correct(text, item.gold) for text, item in zip(generated, items)]
        device = input_device(model)
        self.metrics.to(device)
        self.metrics["acc"].update(torch.tensor(correct, dtype=torch.float32, device=device))
        return [
            {"record": item.record, "generated": text, "prediction": answer_after(text, MARKER), "gold": item.gold, "correct": ok}
            for item, text, ok in zip(items, generated, correct)
        ]

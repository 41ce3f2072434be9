"""NQ-style open-domain QA with a given passage (RECT_eval's OpenDomainQA task).

The model answers in up to 20 tokens. The answer counts as correct when some contiguous run
of its SQuAD-normalised words equals a normalised gold answer ("soft" exact match), which
forgives the extra words a base model tends to add.
"""

from __future__ import annotations

import re
import string
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

MARKER = "Answer:"
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class OpenQAItem:
    record: str
    prompt: str
    answers: tuple[str, ...]


def open_qa_prompt(passage: str, question: str) -> str:
    return f"Refer to the passage below and answer the following question.\nPassage: {passage}\nQuestion: {question}\n{MARKER}"


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def soft_exact_match(answer: str, golds: Sequence[str]) -> bool:
    """Whether some contiguous run of the normalised answer's words equals a normalised gold answer."""
    words = normalize_answer(answer).split()
    for gold in golds:
        target = normalize_answer(gold).split()
        if target and any(words[i : i + len(target)] == target for i in range(len(words) - len(target) + 1)):
            return True
    return False


def parse_open_qa(raw: Any, where: str, source: str) -> OpenQAItem:
    question = require(raw, "question", str, source, where)
    answers = require(raw, "answer", list, source, where)
    if not all(isinstance(a, str) for a in answers):
        raise EvalDataError(source, where, "answer", "expected a list of strings")
    passages = require(raw, "output", list, source, where)
    if not isinstance(passages[0], str):
        raise EvalDataError(
            source, where, "output", f"expected a list whose first element is a string, got {type(passages[0]).__name__}"
        )
    return OpenQAItem(record=where, prompt=open_qa_prompt(passages[0], question), answers=tuple(answers))


class OpenQATask(FileTask):
    """acc (soft exact match) and answer_length (mean normalised words in the answer)."""

    name = "open_qa"

    def __init__(
        self, path: str, limit: int | None = 500, batch_size: int = 8, on_bad_record: str = "fatal", max_new_tokens: int = 20
    ):
        super().__init__(path, limit, batch_size, on_bad_record)
        self.max_new_tokens = max_new_tokens
        self.metrics = MetricCollection({"acc": mean_metric(), "answer_length": mean_metric()}, compute_groups=False)

    def load(self, tokenizer=None) -> list[OpenQAItem]:
        items, self.skipped = read_records(
            jsonl_records(self.path), lambda raw, where: parse_open_qa(raw, where, self.path), self.on_bad_record, self.limit
        )
        return items

    def update(self, model: nn.Module, tokenizer, items: Sequence[OpenQAItem]) -> list[dict]:
        items = list(items)
        if not items:
            return []
        generated = generate_continuations(
            model, tokenizer, [item.prompt for item in items], self.max_new_tokens, self.batch_size
        )
        answers = [answer_after(text, MARKER) for text in generated]
        correct = [soft_exact_match(answer, item.answers) for answer, item in zip(answers, items)]
        lengths = [len(normalize_answer(answer).split()) for answer in answers]
        device = input_device(model)
        self.metrics.to(device)
        self.metrics["acc"].update(torch.tensor(correct, dtype=torch.float32, device=device))
        self.metrics["answer_length"].update(torch.tensor(lengths, dtype=torch.float32, device=device))
        return [
            {
                "record": item.record,
                "generated": text,
                "prediction": normalize_answer(answer),
                "gold": list(item.answers),
                "correct": ok,
                "answer_length": n,
            }
            for item, text, answer, ok, n in zip(items, generated, answers, correct, lengths)
        ]

"""BoolQ-style closed-domain QA (RECT_eval's ClosedDomainQA task).

The model answers a yes/no question about a passage in one generated token; "yes" is
the positive answer, "no" the negative, anything else is invalid.
"""

from __future__ import annotations

from typing import Any

from ..base import jsonl_records, read_records, require
from .common import BinaryAnswerTask, BinaryItem


def closed_qa_prompt(passage: str, question: str) -> str:
    return (
        "Please answer the given question based on the passage. The answer should be exact 'yes' or 'no'. "
        f"passage: {passage} question: {question}. answer: "
    )


def parse_closed_qa(raw: Any, where: str, source: str) -> BinaryItem:
    question = require(raw, "question", str, source, where)
    passage = require(raw, "passage", str, source, where)
    answer = require(raw, "answer", bool, source, where)
    return BinaryItem(record=where, prompt=closed_qa_prompt(passage, question), label=int(answer))


class ClosedQATask(BinaryAnswerTask):
    """acc / f1 / mcc / f1_likelihood / invalid_rate of " yes" vs " no" answers about a passage."""

    name = "closed_qa"
    marker = "answer: "
    positive = "yes"
    negative = "no"

    def __init__(
        self, path: str, limit: int | None = 500, batch_size: int = 8, on_bad_record: str = "fatal", max_new_tokens: int = 1
    ):
        super().__init__(path, limit, batch_size, on_bad_record, max_new_tokens)

    def load(self, tokenizer=None) -> list[BinaryItem]:
        items, self.skipped = read_records(
            jsonl_records(self.path), lambda raw, where: parse_closed_qa(raw, where, self.path), self.on_bad_record, self.limit
        )
        return items

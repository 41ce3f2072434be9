"""RTE-style natural language inference (RECT_eval's NLI task).

Prompt ``{sentence1} entails {sentence2}. True or False? answer:``, one generated token;
"true" is a prediction of entailment, "false" of not_entailment, anything else is invalid.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any

from ..base import EvalDataError, read_records
from .common import BinaryAnswerTask, BinaryItem

HEADER = ["index", "sentence1", "sentence2", "label"]
LABELS = {"entailment": 1, "not_entailment": 0}


def nli_prompt(sentence1: str, sentence2: str) -> str:
    return f"{sentence1} entails {sentence2}. True or False? answer:"


def tsv_rows(path: str) -> Iterable[tuple[str, Any]]:
    """`("line N", {column: value})` per data row; a row with the wrong number of columns is an `EvalDataError`.

    Read without quote handling (`QUOTE_NONE`): a sentence that starts with a quotation mark
    keeps it (RECT's default csv dialect drops such quotes in 69 of the 2,489 rows).
    """
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != HEADER:
            raise EvalDataError(path, "line 1", "<header>", f"expected the columns {HEADER}, got {header}")
        for row in reader:
            where = f"line {reader.line_num}"
            if not row:
                continue
            if len(row) != len(HEADER):
                yield (
                    where,
                    EvalDataError(path, where, "<record>", f"expected {len(HEADER)} tab-separated columns, got {len(row)}"),
                )
            else:
                yield where, dict(zip(HEADER, row))


def parse_nli(raw: Any, where: str, source: str) -> BinaryItem:
    if isinstance(raw, EvalDataError):
        raise raw
    for field in ("sentence1", "sentence2"):
        if not raw[field].strip():
            raise EvalDataError(source, where, field, "is empty")
    if raw["label"] not in LABELS:
        raise EvalDataError(source, where, "label", f"expected one of {sorted(LABELS)}, got {raw['label']!r}")
    return BinaryItem(
        record=f"{where} (index {raw['index']})",
        prompt=nli_prompt(raw["sentence1"], raw["sentence2"]),
        label=LABELS[raw["label"]],
    )


class NLITask(BinaryAnswerTask):
    """acc / f1 / mcc / f1_likelihood / invalid_rate of " true" (entailment) vs " false"."""

    name = "nli"
    marker = "answer:"
    positive = "true"
    negative = "false"

    def __init__(
        self, path: str, limit: int | None = 500, batch_size: int = 8, on_bad_record: str = "fatal", max_new_tokens: int = 1
    ):
        super().__init__(path, limit, batch_size, on_bad_record, max_new_tokens)

    def load(self, tokenizer=None) -> list[BinaryItem]:
        items, self.skipped = read_records(
            tsv_rows(self.path), lambda raw, where: parse_nli(raw, where, self.path), self.on_bad_record, self.limit
        )
        return items

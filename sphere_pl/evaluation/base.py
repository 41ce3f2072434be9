"""What every evaluator shares: torchmetrics state, per-case rows, and bad-record handling.

An evaluator is one benchmark: a reader for its file (when it has its own data), a
plain-function core, and torchmetrics metrics. It must implement

* ``update(model, tokenizer, items) -> list[dict]``: score `items`, update `self.metrics`
  and return one JSON-serialisable row per case (a run writes them to its per-case files);

and may override ``compute`` / ``reset`` (default: those of `self.metrics`). Evaluators with
their own data (the general-ability tasks, `sphere_pl.evaluation.general`) also implement
``load(tokenizer) -> list``: the first `limit` good records of their file, a bad record
being fatal or skipped (``on_bad_record``), never scored.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from ..errors import SettingsError, SpherePLError

ON_BAD_RECORD = ("fatal", "skip")


class EvalDataError(SpherePLError, ValueError):
    """A malformed evaluation record. The message names the file, the record (line or index) and the field."""

    hint = "fix that record, or set on_bad_record: skip on the task to leave bad records out (never scored)"

    def __init__(self, source: str, where: str, field: str, problem: str):
        super().__init__(f"{source}: {where}: field {field!r}: {problem}")
        self.source, self.where, self.field, self.problem = source, where, field, problem


def check_on_bad_record(value: str) -> str:
    if value not in ON_BAD_RECORD:
        raise SettingsError(f"on_bad_record must be one of {list(ON_BAD_RECORD)}, got {value!r}")
    return value


def read_records(
    records: Iterable[tuple[str, Any]], parse: Callable[[Any, str], Any], on_bad_record: str = "fatal", limit: int | None = None
) -> tuple[list, list[EvalDataError]]:
    """Parse `(where, raw)` pairs with `parse(raw, where)` until `limit` good records.

    A record that `parse` rejects with `EvalDataError` stops the read (`on_bad_record="fatal"`)
    or is left out and returned in the second list (`"skip"`): it is never scored.
    """
    check_on_bad_record(on_bad_record)
    good, skipped = [], []
    for where, raw in records:
        if limit is not None and len(good) >= limit:
            break
        try:
            good.append(parse(raw, where))
        except EvalDataError as e:
            if on_bad_record == "fatal":
                raise
            skipped.append(e)
    return good, skipped


def jsonl_records(path: str | os.PathLike) -> Iterable[tuple[str, Any]]:
    """`("line N", parsed JSON)` for each non-empty line; a line that is not JSON is an `EvalDataError`
    (raised when reached, so `read_records` can skip it)."""
    source = os.fspath(path)
    with open(source, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {number}", _Unparsable(source, f"line {number}", f"is not valid JSON ({e.msg} at column {e.colno})")


class _Unparsable:
    """Placeholder for a line that could not be parsed; `require` rejects it with its message."""

    def __init__(self, source: str, where: str, problem: str):
        self.error = EvalDataError(source, where, "<record>", problem)


def require(raw: Any, key: str, kind: type | tuple[type, ...], source: str, where: str, non_empty: bool = True) -> Any:
    """`raw[key]`, checked to be of `kind` (and non-empty for strings and lists)."""
    if isinstance(raw, _Unparsable):
        raise raw.error
    if not isinstance(raw, dict):
        raise EvalDataError(source, where, "<record>", f"expected a JSON object, got {type(raw).__name__}")
    if key not in raw or raw[key] is None:
        raise EvalDataError(source, where, key, "is missing")
    value = raw[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise EvalDataError(source, where, key, f"expected {_kind_name(kind)}, got bool {value!r}")
    if not isinstance(value, kind):
        raise EvalDataError(source, where, key, f"expected {_kind_name(kind)}, got {type(value).__name__} {str(value)[:60]!r}")
    if non_empty and isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        raise EvalDataError(source, where, key, "is empty")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


class Evaluator:
    """Base class; see the module docstring for what a subclass implements."""

    name: str = "evaluator"
    metrics: MetricCollection

    def update(self, model: nn.Module, tokenizer, items: Sequence) -> list[dict]:
        raise NotImplementedError

    def compute(self) -> dict[str, Tensor]:
        return dict(self.metrics.compute())

    def metric_names(self) -> list[str]:
        """The names `compute` returns (without a prefix given at scoring time)."""
        return list(self.metrics.keys())

    def reset(self) -> None:
        self.metrics.reset()

    def evaluate(self, model: nn.Module, tokenizer, items: Sequence) -> dict[str, Tensor]:
        """Metrics of `items` alone (accumulated state is cleared afterwards)."""
        return self.evaluate_cases(model, tokenizer, items)[0]

    def evaluate_cases(self, model: nn.Module, tokenizer, items: Sequence) -> tuple[dict[str, Tensor], list[dict]]:
        """Metrics of `items` alone and their per-case rows (accumulated state is cleared afterwards)."""
        self.reset()
        rows = self.update(model, tokenizer, items)
        values = self.compute()
        self.reset()
        return values, rows


class RunningMean(Metric):
    """Mean of the values given to `update` (one per record or prompt), kept as a sum and a count
    so that it accumulates over batches and reduces across processes by summing."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: Tensor | Sequence[float] | float) -> None:
        values = torch.as_tensor(values, dtype=torch.float64, device=self.total.device).detach().flatten()
        if torch.isnan(values).any():
            raise ValueError(f"{type(self).__name__} got NaN; leave unscored records out instead")
        self.total += values.sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        """The mean of every value seen; NaN when none were."""
        return (self.total / self.count).float()


def compute_or_nan(metrics: MetricCollection) -> dict[str, Tensor]:
    """Each metric's value, NaN for one never updated (e.g. consistency with no references),
    without torchmetrics' warning about computing before updating."""
    return {name: m.compute() if m.update_count else torch.tensor(math.nan) for name, m in metrics.items()}

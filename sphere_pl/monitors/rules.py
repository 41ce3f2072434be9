"""The one language for "this edit stream has collapsed", judged on the rows a run records.

A rule is a list of conditions; a row holds the rule when any condition holds there. The collapse
guard judges each batch with it, `CollapseStop` ends a run with it, and the study report names the
collapse point with it. Conditions:

* `{metric: edited_so_far/efficacy_score, below: 0.5}`
* `{metric: guard/he_score/*, above: 50}`: any metric under `guard/he_score/` (one per layer);
* `{metric: never_edited/specificity_score, drop_from_start: 0.2}`: more than 0.2 under its value
  before editing;
* `{metric: canary/perplexity, ratio_to_start_above: 2.0}`: more than doubled.

A metric's value before editing is its row at 0 edits, or its `pre_edit/` counterpart
(`edited_so_far/` -> `pre_edit/to_edit/`, `general/` -> `pre_edit/general/`). A run refuses, before
any edit, a condition on a metric it does not record (`check_metrics`).
"""

from __future__ import annotations

import difflib

from ..errors import SettingsError
from . import protocol

KINDS = ("below", "above", "drop_from_start", "ratio_to_start_above")


class CollapseRule:
    def __init__(self, conditions: list[dict], points_in_a_row: int = 1, where: str = "collapse"):
        if not conditions:
            raise SettingsError(f"{where}: field 'conditions' lists no condition")
        for i, c in enumerate(conditions):
            if not isinstance(c, dict) or not isinstance(c.get("metric"), str):
                raise SettingsError(f"{where}: conditions[{i}]: field 'metric' is missing")
            kinds = [k for k in c if k != "metric"]
            if len(kinds) != 1 or kinds[0] not in KINDS or not isinstance(c[kinds[0]], (int, float)) or isinstance(c[kinds[0]], bool):
                raise SettingsError(f"{where}: conditions[{i}] ({c.get('metric')}): give exactly one of {list(KINDS)} with a number, got {kinds}")
            if kinds[0] == "ratio_to_start_above" and c[kinds[0]] <= 1:
                raise SettingsError(f"{where}: conditions[{i}] ({c['metric']}): ratio_to_start_above must be above 1, got {c[kinds[0]]}")
        if not isinstance(points_in_a_row, int) or isinstance(points_in_a_row, bool) or points_in_a_row < 1:
            raise SettingsError(f"{where}: field 'points_in_a_row' must be an integer >= 1, got {points_in_a_row!r}")
        self.conditions = [dict(c) for c in conditions]
        self.points_in_a_row = points_in_a_row
        self.where = where

    def as_config(self) -> dict:
        return {"conditions": [dict(c) for c in self.conditions], "points_in_a_row": self.points_in_a_row}

    def describe(self) -> str:
        words = {"below": "below {}", "above": "above {}", "drop_from_start": "more than {} under its pre-edit value",
                 "ratio_to_start_above": "more than {}x its pre-edit value"}
        parts = [f"{c['metric']} {words[_kind(c)].format(c[_kind(c)])}" for c in self.conditions]
        return " or ".join(parts) + f", at {self.points_in_a_row} evaluation point(s) in a row"

    # --------------------------------------------------------------- metrics
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(c["metric"] for c in self.conditions))

    def reads(self, metric: str) -> bool:
        """Whether some condition reads `metric`."""
        return any(_matches(c["metric"], metric) for c in self.conditions)

    def check_metrics(self, recorded: set[str]) -> None:
        """Refuse a condition on a metric the run never records (it could never hold)."""
        for i, c in enumerate(self.conditions):
            if not any(_matches(c["metric"], name) for name in recorded):
                close = difflib.get_close_matches(c["metric"], sorted(recorded), n=3, cutoff=0.6)
                raise SettingsError(
                    f"{self.where}: conditions[{i}]: metric {c['metric']!r} is never recorded by this run, so the condition "
                    f"could never hold" + (f"; did you mean {', '.join(map(repr, close))}?" if close else
                                           f"; it records e.g. {', '.join(sorted(recorded)[:6])}")
                )

    # ---------------------------------------------------------------- on rows
    def reasons(self, row: dict, rows: list[dict]) -> list[str]:
        """Every condition that holds at `row` (with `rows`, the run's rows, for pre-edit values)."""
        out = []
        for c in self.conditions:
            kind, limit = _kind(c), c[_kind(c)]
            for metric in [m for m in row if _matches(c["metric"], m)]:
                value = row[metric]
                if kind == "below" and value < limit:
                    out.append(f"{metric} {value:.3f} < {limit}")
                elif kind == "above" and value > limit:
                    out.append(f"{metric} {value:.3f} > {limit}")
                elif kind in ("drop_from_start", "ratio_to_start_above"):
                    start = start_value(rows, metric)
                    if start is None:
                        continue
                    if kind == "drop_from_start" and value < start - limit:
                        out.append(f"{metric} {value:.3f}, {start - value:.3f} under its pre-edit {start:.3f}")
                    if kind == "ratio_to_start_above" and start > 0 and value > limit * start:
                        out.append(f"{metric} {value:.3f}, {value / start:.2f}x its pre-edit {start:.3f}")
        return out

    def why(self, row: dict, rows: list[dict]) -> str | None:
        """The first condition that holds at `row` (its reason), or None."""
        reasons = self.reasons(row, rows)
        return reasons[0] if reasons else None

    def points(self, rows: list[dict]) -> list[tuple[float, str | None]]:
        """(edits, reason or None) at every point after the first edit where a rule metric was recorded."""
        return [(r["edits"], self.why(r, rows)) for r in sorted(rows, key=lambda r: r["edits"]) if r["edits"] > 0 and any(self.reads(k) for k in r)]

    def first_collapse(self, rows: list[dict]) -> dict | None:
        """{"edits", "why"} of the first point that begins `points_in_a_row` collapsed points, or None."""
        run: list[tuple[float, str]] = []
        for edits, why in self.points(rows):
            run = run + [(edits, why)] if why else []
            if len(run) >= self.points_in_a_row:
                return {"edits": int(run[0][0]), "why": run[0][1]}
        return None

    def streak(self, rows: list[dict]) -> int:
        """Collapsed points in a row at the end of `rows`."""
        count = 0
        for _, why in reversed(self.points(rows)):
            if not why:
                break
            count += 1
        return count


def _kind(condition: dict) -> str:
    return next(k for k in condition if k != "metric")


def _matches(pattern: str, metric: str) -> bool:
    return metric.startswith(pattern[:-1]) if pattern.endswith("/*") else metric == pattern


def start_value(rows: list[dict], metric: str) -> float | None:
    """A metric's value before editing: its row at 0 edits, or its `pre_edit/` counterpart."""
    at_zero = [r[metric] for r in rows if r.get("edits") == 0 and metric in r]
    if at_zero:
        return at_zero[0]
    for now, before in ((protocol.EDITED_SO_FAR, protocol.PRE_EDIT), (protocol.GENERAL, protocol.PRE_EDIT_GENERAL)):
        if metric.startswith(now):
            key = before + metric[len(now) :]
            found = [r[key] for r in rows if key in r]
            if found:
                return found[0]
    return None


def recorded_metrics(trainer, pl_module) -> set[str]:
    """The metric names this run records during `fit`: each monitor's (its `metric_names`)."""
    names: set[str] = set()
    for callback in trainer.callbacks:
        if hasattr(callback, "metric_names"):
            names |= set(callback.metric_names(trainer, pl_module))
    return names


def find_callback(trainer, kind):
    """The trainer's callback of type `kind`, or None."""
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)

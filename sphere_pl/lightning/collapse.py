"""When an edit stream has collapsed, stated before the run, and a callback that ends a run there.

A rule is a list of conditions on the evaluation rows a run records; a point (a row with the
metric) is collapsed when any condition holds there, and the run has collapsed at the first
point that begins `points_in_a_row` collapsed points in a row. Conditions:

* `{metric: edited_so_far/efficacy_score, below: 0.5}`
* `{metric: never_edited/specificity_score, drop_from_start: 0.2}`: more than 0.2 under its value
  before editing;
* `{metric: general/perplexity/perplexity, ratio_to_start_above: 2.0}`: more than doubled.

A metric's value before editing is its row at 0 edits, or its `pre_edit/` counterpart
(`edited_so_far/` → `pre_edit/to_edit/`, `general/` → `pre_edit/general/`).
"""

from __future__ import annotations

import lightning as L

from ..evaluation import protocol

KINDS = ("below", "above", "drop_from_start", "ratio_to_start_above")


class CollapseRule:
    def __init__(self, conditions: list[dict], points_in_a_row: int = 2, stop: bool = False, where: str = "collapse"):
        if not conditions:
            raise ValueError(f"{where}: field 'conditions' lists no condition")
        for i, c in enumerate(conditions):
            if not isinstance(c, dict) or not isinstance(c.get("metric"), str):
                raise ValueError(f"{where}: conditions[{i}]: field 'metric' is missing")
            kinds = [k for k in c if k != "metric"]
            if len(kinds) != 1 or kinds[0] not in KINDS or not isinstance(c[kinds[0]], (int, float)):
                raise ValueError(f"{where}: conditions[{i}] ({c.get('metric')}): give exactly one of {list(KINDS)} with a number, got {kinds}")
        if not isinstance(points_in_a_row, int) or points_in_a_row < 1:
            raise ValueError(f"{where}: field 'points_in_a_row' must be an integer >= 1, got {points_in_a_row!r}")
        self.conditions = [dict(c) for c in conditions]
        self.points_in_a_row = points_in_a_row
        self.stop = stop

    @classmethod
    def from_config(cls, raw: dict, where: str) -> "CollapseRule":
        unknown = set(raw) - {"conditions", "points_in_a_row", "stop"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        return cls(raw.get("conditions") or [], raw.get("points_in_a_row", 2), bool(raw.get("stop", False)), where)

    def as_config(self) -> dict:
        return {"conditions": self.conditions, "points_in_a_row": self.points_in_a_row, "stop": self.stop}

    def describe(self) -> str:
        words = {"below": "below {}", "above": "above {}", "drop_from_start": "more than {} under its pre-edit value",
                 "ratio_to_start_above": "more than {}x its pre-edit value"}
        parts = []
        for c in self.conditions:
            kind = next(k for k in c if k != "metric")
            parts.append(f"{c['metric']} {words[kind].format(c[kind])}")
        return " or ".join(parts) + f", at {self.points_in_a_row} evaluation point(s) in a row"

    # ---------------------------------------------------------------- on rows
    def why(self, row: dict, rows: list[dict]) -> str | None:
        """The first condition that holds at `row` (its reason), or None."""
        for c in self.conditions:
            metric = c["metric"]
            if metric not in row:
                continue
            value = row[metric]
            kind = next(k for k in c if k != "metric")
            limit = c[kind]
            if kind == "below" and value < limit:
                return f"{metric} {value:.3f} < {limit}"
            if kind == "above" and value > limit:
                return f"{metric} {value:.3f} > {limit}"
            start = start_value(rows, metric)
            if start is None:
                continue
            if kind == "drop_from_start" and value < start - limit:
                return f"{metric} {value:.3f}, {start - value:.3f} under its pre-edit {start:.3f}"
            if kind == "ratio_to_start_above" and start > 0 and value > limit * start:
                return f"{metric} {value:.3f}, {value / start:.2f}x its pre-edit {start:.3f}"
        return None

    def points(self, rows: list[dict]) -> list[tuple[float, str | None]]:
        """(edits, reason or None) at every evaluation point after the first edit."""
        metrics = {c["metric"] for c in self.conditions}
        return [(r["edits"], self.why(r, rows)) for r in sorted(rows, key=lambda r: r["edits"]) if r["edits"] > 0 and metrics & set(r)]

    def first_collapse(self, rows: list[dict]) -> dict | None:
        """{"edits", "why"} of the first point that begins `points_in_a_row` collapsed points, or None."""
        run: list[tuple[float, str]] = []
        for edits, why in self.points(rows):
            run = run + [(edits, why)] if why else []
            if len(run) >= self.points_in_a_row:
                return {"edits": int(run[0][0]), "why": run[0][1]}
        return None


def start_value(rows: list[dict], metric: str) -> float | None:
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


class CollapseStop(L.Callback):
    """Args:
    conditions: the collapse conditions (see `sphere_pl.lightning.collapse`); none: never checks.
    points_in_a_row: collapsed evaluation points in a row that make a collapse.
    stop: end the run there (a clean end: the batch's checkpoint, the final evaluation, the summary).

    Checked after the measurements of each batch; records `collapse/points_in_a_row`."""

    def __init__(self, conditions: list[dict] | None = None, points_in_a_row: int = 2, stop: bool = False):
        self.rule = CollapseRule(conditions, points_in_a_row, stop) if conditions else None
        self.checked_edits = -1.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rule is None:
            return
        rows = pl_module.recorder.history
        points = self.rule.points(rows)
        if not points or points[-1][0] <= self.checked_edits:
            return  # no new evaluation point
        self.checked_edits = points[-1][0]
        streak = 0
        for _, why in reversed(points):
            if not why:
                break
            streak += 1
        pl_module.recorder.record({"collapse/points_in_a_row": float(streak)})
        if streak >= self.rule.points_in_a_row and self.rule.stop:
            first = self.rule.first_collapse(rows)
            print(f"sphere_pl: collapsed at {first['edits']} edits ({first['why']}), {streak} evaluation points in a row: "
                  f"the run ends here, after {pl_module.editor.edits_applied} edits", flush=True)
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"checked_edits": self.checked_edits}

    def load_state_dict(self, state_dict: dict) -> None:
        self.checked_edits = float(state_dict["checked_edits"])

"""`CollapseStop`: the collapse rule (`rules.py`), stated before the run, checked on its rows after
every batch; records `collapse/points_in_a_row` and, with `stop`, ends the run where it holds."""

from __future__ import annotations

import lightning as L

from .rules import CollapseRule, recorded_metrics


class CollapseStop(L.Callback):
    """Args:
    conditions: the collapse conditions (see `sphere_pl.monitors.rules`); none: never checks.
    points_in_a_row: collapsed evaluation points in a row that make a collapse.
    stop: end the run there (a clean end: the batch's checkpoint, the final evaluation, the summary).

    A condition on a metric the run does not record is refused before the first edit."""

    def __init__(self, conditions: list[dict] | None = None, points_in_a_row: int = 2, stop: bool = False):
        self.rule = CollapseRule(conditions, points_in_a_row, "collapse") if conditions else None
        self.stop = stop
        self.checked_edits = -1.0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.rule is not None and stage == "fit":
            self.rule.check_metrics(recorded_metrics(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rule is None:
            return
        rows = pl_module.record.history
        points = self.rule.points(rows)
        if not points or points[-1][0] <= self.checked_edits:
            return  # no new evaluation point
        self.checked_edits = points[-1][0]
        streak = self.rule.streak(rows)
        pl_module.record.record({"collapse/points_in_a_row": float(streak)})
        if streak >= self.rule.points_in_a_row and self.stop:
            first = self.rule.first_collapse(rows)
            print(f"sphere_pl: collapsed at {first['edits']} edits ({first['why']}), {streak} evaluation points in a row: "
                  f"the run ends here, after {pl_module.editor.edits_applied} edits", flush=True)
            trainer.should_stop = True

    def metric_names(self, trainer, pl_module) -> set[str]:
        return {"collapse/points_in_a_row"} if self.rule is not None else set()

    def state_dict(self) -> dict:
        return {"checked_edits": self.checked_edits}

    def load_state_dict(self, state_dict: dict) -> None:
        self.checked_edits = float(state_dict["checked_edits"])

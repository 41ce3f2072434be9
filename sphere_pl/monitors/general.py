"""General ability during an editing run: the general-ability tasks and perplexity
(`sphere_pl.evaluation.general`) measured before the first edit, at the evaluation points
(`schedule.py`), and by `validate` / `test` on an edited model."""

from __future__ import annotations

import lightning as L
import torch

from ..errors import SettingsError
from ..evaluation.base import Evaluator
from . import protocol
from .schedule import Schedule


class GeneralAbilityMonitor(L.Callback):
    """Args:
    tasks: task evaluators, e.g. `sphere_pl.evaluation.general.NLITask` with its `path` and
        `limit` (first n examples, default 500), `PerplexityTask` on WikiText-2.
    every_n_batches: measure after every this many edit batches (0: only before editing and
        in validate / test).
    at_edits: instead, measure after the first batch that brings the edits applied to each of these.
    before_editing: measure once before the first edit (`pre_edit/general/...`).

    Recorded as `<moment>general/<task>/<metric>` through the module's record; per-case rows go to
    its per-case files as `general-<task>`.
    """

    def __init__(self, tasks: list[Evaluator] | None = None, every_n_batches: int = 5, before_editing: bool = True, at_edits: list[int] | None = None):
        tasks = tasks or []
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise SettingsError(f"general tasks must have distinct names, got {names}")
        self.tasks = list(tasks)
        self.schedule = Schedule(every_n_batches, at_edits, "general")
        self.before_editing = before_editing
        self.items: dict[str, list] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Reads every task's file once, so a bad file stops the run before the first edit."""
        for task in self.tasks:
            if task.name not in self.items:
                self.items[task.name] = task.load(pl_module.editor.tokenizer)

    def metric_names(self, trainer, pl_module) -> set[str]:
        prefixes = [protocol.GENERAL] + ([protocol.PRE_EDIT_GENERAL] if self.before_editing else [])
        return {f"{prefix}{task.name}/{name}" for prefix in prefixes for task in self.tasks for name in task.metric_names()}

    def measure(self, trainer, pl_module, prefix: str, moment: str) -> dict[str, float]:
        """Every task on this process's share of its items (all of them without DDP); the
        metrics' states are summed across processes when computed."""
        values = {}
        editor = pl_module.editor
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        with editor.timer("general"), editor.evaluation_weights():
            for task in self.tasks:
                items = self.items[task.name][rank::world]
                metrics, rows = task.evaluate_cases(editor.model, editor.tokenizer, items)
                values.update({f"{prefix}{task.name}/{k}": float(v) for k, v in metrics.items() if not torch.isnan(v)})
                pl_module.record.write_cases(protocol.GENERAL, task.name, rows, moment, sharded=True)
        return values

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.tasks and self.before_editing and pl_module.editor.batches_done == 0:
            pl_module.record.record(self.measure(trainer, pl_module, protocol.PRE_EDIT_GENERAL, "pre_edit"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.tasks and self.schedule.due_after(pl_module.editor):
            pl_module.record.record(self.measure(trainer, pl_module, protocol.GENERAL, "after_batch"))

    def on_validation_end(self, trainer, pl_module) -> None:
        self._final(trainer, pl_module, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._final(trainer, pl_module, "test")

    def _final(self, trainer, pl_module, stage: str) -> None:
        """In `validate` / `test` (not the validation at the end of `fit`, which the periodic
        measurement covers): general ability of the model as evaluated."""
        if not self.tasks or trainer.state.fn != stage:
            return
        pl_module.record.record_final_outside_a_loop(self.measure(trainer, pl_module, protocol.FINAL_GENERAL, "final"))

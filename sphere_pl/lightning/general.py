"""General ability during an editing run: the general-ability tasks and perplexity
(`sphere_pl.evaluation.general`) measured before the first edit, every `every_n_batches` edit
batches, and by `validate` / `test` on an edited model."""

from __future__ import annotations

import lightning as L
import torch

from ..evaluation import protocol
from ..evaluation.base import Evaluator


class GeneralAbilityMonitor(L.Callback):
    """Args:
    tasks: task evaluators, e.g. `sphere_pl.evaluation.general.NLITask` with its `path` and
        `limit` (first n examples, default 500), `PerplexityTask` on WikiText-2.
    every_n_batches: measure after every this many edit batches (0: only before editing and
        in validate / test).
    at_edits: instead, measure after the first batch that brings the edits applied to each of these.
    before_editing: measure once before the first edit (`pre_edit/general/...`).

    Recorded as `<moment>general/<task>/<metric>` with `edits` through the module's recorder;
    per-case rows go to its `cases_dir` as `general-<task>.jsonl`.
    """

    def __init__(self, tasks: list[Evaluator] | None = None, every_n_batches: int = 5, before_editing: bool = True, at_edits: list[int] | None = None):
        tasks = tasks or []
        if every_n_batches < 0:
            raise ValueError(f"every_n_batches must be >= 0, got {every_n_batches}")
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"general tasks must have distinct names, got {names}")
        self.tasks = list(tasks)
        self.every_n_batches = every_n_batches
        self.at_edits = sorted(set(at_edits)) if at_edits is not None else None
        self.before_editing = before_editing
        self.items: dict[str, list] = {}

    def _load(self, pl_module) -> None:
        """Reads every task's file once, so a bad file stops the run before the first edit."""
        for task in self.tasks:
            if task.name not in self.items:
                self.items[task.name] = task.load(pl_module.editor.tokenizer)

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
                pl_module.recorder.write_cases(protocol.GENERAL, task.name, rows, moment, sharded=True)
        return values

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._load(pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.tasks and self.before_editing and pl_module.editor.batches_done == 0:
            pl_module.recorder.record(self.measure(trainer, pl_module, protocol.PRE_EDIT_GENERAL, "pre_edit"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        editor = pl_module.editor
        if self.at_edits is not None:
            due = any(editor.edits_applied - len(batch.requests) < n <= editor.edits_applied for n in self.at_edits)
        else:
            due = bool(self.every_n_batches) and editor.batches_done % self.every_n_batches == 0
        if self.tasks and due:
            pl_module.recorder.record(self.measure(trainer, pl_module, protocol.GENERAL, "after_batch"))

    def on_validation_end(self, trainer, pl_module) -> None:
        self._final(trainer, pl_module, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._final(trainer, pl_module, "test")

    def _final(self, trainer, pl_module, stage: str) -> None:
        """In `validate` / `test` (not the validation at the end of `fit`, which the periodic
        measurement covers): general ability of the model as evaluated."""
        if not self.tasks or trainer.state.fn != stage:
            return
        pl_module.recorder.record_outside_a_loop(self.measure(trainer, pl_module, protocol.FINAL_GENERAL, "final"))

"""Progress over edits: one plain line after each applied batch, on a terminal and in a log file alike;
and over the end's scoring of the edited (or held-out) facts, which takes minutes to most of an hour on
a long stream and was silent (a line every half minute and at the end: its batches are small).

    editing: 40% 12/30 edits, 1.43 s/edit, 00:26 left
    scoring the edited facts: 3/10 batches, 00:41 left

Lightning's bars count batches of an epoch, show `v_num`, and fill a log file (a scheduler's, or a
study's fit.log) with carriage returns, nested scoring bars and escape codes; an editing run has one
pass, edits of its own and batches that take seconds to minutes, so a line per batch says enough.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar

SCORING_EVERY_S = 30.0


class EditProgress(ProgressBar):
    def __init__(self):
        super().__init__()
        self._enabled = True
        self.total: int | None = None
        self.at_start = 0
        self.started = 0.0
        self.scoring_started = 0.0
        self.scoring_shown = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        requests = getattr(trainer.datamodule, "edit_requests", None) if trainer.datamodule is not None else None
        self.total = len(requests) if requests is not None else None
        self.at_start = pl_module.editor.edits_applied  # a resumed run counts on from where it was
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._enabled and trainer.is_global_zero:
            print(progress_line(pl_module.editor.edits_applied, self.total, self.at_start, time.perf_counter() - self.started),
                  file=sys.stderr, flush=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.scoring_started = self.scoring_shown = time.perf_counter()

    on_test_start = on_validation_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._scoring(trainer, "edited", batch_idx + 1, trainer.num_val_batches[dataloader_idx])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._scoring(trainer, "held-out", batch_idx + 1, trainer.num_test_batches[dataloader_idx])

    def _scoring(self, trainer, which: str, done: int, total) -> None:
        now = time.perf_counter()
        total = int(total) if total != float("inf") else None
        due = now - self.scoring_shown >= SCORING_EVERY_S or done == total
        if self._enabled and due and trainer.is_global_zero and not trainer.sanity_checking:
            self.scoring_shown = now
            print(scoring_line(which, done, total, now - self.scoring_started), file=sys.stderr, flush=True)


def scoring_line(which: str, done: int, total: int | None, seconds: float) -> str:
    """`scoring the edited facts: 3/10 batches, 00:41 left`."""
    line = f"scoring the {which} facts: {done}/{total} batches" if total else f"scoring the {which} facts: {done} batches"
    if total and done:
        line += _left(int(seconds / done * (total - done)))
    return line


def progress_line(done: int, total: int | None, at_start: int, seconds: float) -> str:
    """`editing: 40% 12/30 edits, 1.43 s/edit, 00:26 left` (the pace of the edits made since `at_start`)."""
    line = f"editing: {100 * done // total}% {done}/{total} edits" if total else f"editing: {done} edits"
    if done > at_start:
        pace = seconds / (done - at_start)
        line += f", {pace:.2f} s/edit"
        if total:
            line += _left(int(pace * (total - done)))
    return line


def _left(seconds: int) -> str:
    return f", {seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d} left" if seconds >= 3600 else f", {seconds // 60:02d}:{seconds % 60:02d} left"

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
        self.scoring_total: int | None = None
        self.scoring_done = 0
        self.scoring_started = 0.0
        self.scoring_shown = 0.0
        self._edited: set = set()

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
        # the end's scoring passes over the whole edit set; only batches holding facts in the weights take time
        # (a run stopped early skips the rest in moments), so those are the ones counted
        self._edited = set(pl_module.edited_case_ids())
        loader = trainer.val_dataloaders
        self.begin_scoring(None if loader is None else sum(1 for batch in loader if self._holds_edited(batch)))

    def on_test_start(self, trainer, pl_module) -> None:
        loader = trainer.test_dataloaders
        self.begin_scoring(None if loader is None else len(loader))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._holds_edited(batch):
            self.batch_scored(trainer, "edited")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.batch_scored(trainer, "held-out")

    def _holds_edited(self, batch) -> bool:
        return any(request.case_id in self._edited for request in batch)

    def begin_scoring(self, batches: int | None) -> None:
        """A scoring pass of `batches` batches (None: unknown) starts: also called by the end-of-fit scoring
        that runs outside Lightning's loops."""
        self.scoring_total, self.scoring_done = batches, 0
        self.scoring_started = self.scoring_shown = time.perf_counter()

    def batch_scored(self, trainer, which: str) -> None:
        """A line every `SCORING_EVERY_S` seconds and after the last batch."""
        self.scoring_done += 1
        now = time.perf_counter()
        due = now - self.scoring_shown >= SCORING_EVERY_S or self.scoring_done == self.scoring_total
        if self._enabled and due and trainer.is_global_zero and not trainer.sanity_checking:
            self.scoring_shown = now
            print(scoring_line(which, self.scoring_done, self.scoring_total, now - self.scoring_started), file=sys.stderr, flush=True)


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

"""Progress over edits: one plain line after each applied batch, on a terminal and in a log file alike.

    editing: 40% 12/30 edits, 1.43 s/edit, 00:26 left

Lightning's bars count batches of an epoch, show `v_num`, and fill a log file (a scheduler's, or a
study's fit.log) with carriage returns, nested scoring bars and escape codes; an editing run has one
pass, edits of its own and batches that take seconds to minutes, so a line per batch says enough.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar


class EditProgress(ProgressBar):
    def __init__(self):
        super().__init__()
        self._enabled = True
        self.total: int | None = None
        self.at_start = 0
        self.started = 0.0

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


def progress_line(done: int, total: int | None, at_start: int, seconds: float) -> str:
    """`editing: 40% 12/30 edits, 1.43 s/edit, 00:26 left` (the pace of the edits made since `at_start`)."""
    line = f"editing: {100 * done // total}% {done}/{total} edits" if total else f"editing: {done} edits"
    if done > at_start:
        pace = seconds / (done - at_start)
        line += f", {pace:.2f} s/edit"
        if total:
            left = int(pace * (total - done))
            line += f", {left // 3600:02d}:{left % 3600 // 60:02d}:{left % 60:02d} left" if left >= 3600 else f", {left // 60:02d}:{left % 60:02d} left"
    return line

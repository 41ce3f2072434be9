"""When a monitor measures: every n applied batches, or at chosen edit counts.

`at_edits: [100, 250]` measures after the first batch that brings the edits applied to (or past)
each count; otherwise every `every_n_batches` applied batches (0: never during `fit`). The fact
monitor, the general-ability monitor, the HE monitor and the canaries share this one rule.
"""

from __future__ import annotations

from ..errors import SettingsError


class Schedule:
    def __init__(self, every_n_batches: int = 1, at_edits: list[int] | None = None, where: str = "monitor"):
        if not isinstance(every_n_batches, int) or isinstance(every_n_batches, bool) or every_n_batches < 0:
            raise SettingsError(f"{where}.every_n_batches must be an integer >= 0, got {every_n_batches!r}")
        if at_edits is not None and (not at_edits or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in at_edits)):
            raise SettingsError(f"{where}.at_edits must list positive edit counts, got {at_edits}")
        self.every_n_batches = every_n_batches
        self.at_edits = sorted(set(at_edits)) if at_edits is not None else None

    def due(self, edits_before: int, edits_after: int, batches_done: int) -> bool:
        """Whether to measure after the batch that took the edits from `edits_before` to `edits_after`."""
        if self.at_edits is not None:
            return any(edits_before < n <= edits_after for n in self.at_edits)
        return bool(self.every_n_batches) and batches_done % self.every_n_batches == 0

    def due_after(self, editor) -> bool:
        """Whether to measure now, after the latest batch of `editor`. After a batch the collapse guard
        reverted, the state before it is measured where an every-n point falls (a guard's stop ends the
        run there)."""
        applied = len(editor.outcome.applied) if editor.outcome is not None else 0
        return self.due(editor.edits_applied - applied, editor.edits_applied, editor.batches_done)

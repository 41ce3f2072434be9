"""A measurement kept while the edited weights stay as they are.

The collapse guard reads HE and the canaries after every batch, and the monitors that record them
may measure the same weights again in the same batch; every change to an edited weight goes
through the editor's `WeightWriter`, whose `generation` then moves, so equal generations mean
equal weights and the second reading is the first one's value.
"""

from __future__ import annotations

from collections.abc import Callable


class PerWeights:
    def __init__(self):
        self.generation: int | None = None
        self.value = None

    def get(self, editor, measure: Callable[[], object]):
        """`measure()` of `editor`'s weights as they are now, measured once per state of the weights."""
        generation = editor.writer.generation  # read before `measure` (PRUNE swaps weights in to evaluate them)
        if generation != self.generation:
            self.value, self.generation = measure(), generation
        return self.value

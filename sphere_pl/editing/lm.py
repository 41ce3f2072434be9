"""The model being edited, as editing methods see it, and a per-phase wall-clock timer."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..heap import trim_heap
from ..models import ModuleTemplates
from ..placement import input_device


class PhaseTimer:
    """Accumulates wall time per named phase (CUDA-synchronised), for the speed benchmark.

    At the end of each phase the CPU heap's free pages go back to the system (`trim_heap`), so
    that the next phase's peak does not stack on what this one freed. `observers` (callables
    `(phase, "start" | "end")`) are told, outside the timed span, when a phase starts and ends:
    a benchmark measures what else it wants per phase (memory peaks) without wrapping the timer.
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.observers: list = []

    @contextmanager
    def __call__(self, phase: str):
        for observer in self.observers:
            observer(phase, "start")
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - start
            trim_heap()  # outside the timed span
            for observer in self.observers:
                observer(phase, "end")

    @staticmethod
    def _sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, module templates and id: everything a method reads.

    Methods receive this (named `lm`) instead of the editor, so they cannot reach the
    editor's bookkeeping and write weights only through the `WeightWriter` they are given.
    """

    model: nn.Module
    tokenizer: object
    templates: ModuleTemplates
    model_id: str
    timer: PhaseTimer = field(default_factory=PhaseTimer)

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    @property
    def max_length(self) -> int | None:
        """Longest sequence the model takes (its position table), None when it does not say."""
        return getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)

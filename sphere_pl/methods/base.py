"""What every editing method is given and must provide.

A method is an `nn.Module` holding its cross-batch state as buffers (so it moves to the
right device and lands in checkpoints) with two jobs: `setup` (statistics, projectors)
and `edit` (turn a batch of requests into weight deltas). It never adds a delta to a
weight itself: it hands each delta to the `WeightWriter`, which runs the delta filters
(the SPHERE projection) and refuses non-finite updates. That is what makes the projection
method-agnostic.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..models import ModuleTemplates, add_to_linear_weight, linear_weight
from ..requests import EditRequest


class NonFiniteUpdateError(FloatingPointError):
    """A weight delta contained NaN or Inf; it was not written."""


class PhaseTimer:
    """Accumulates wall time per named phase (CUDA-synchronised), for the speed benchmark."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - start

    @staticmethod
    def _sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


@dataclass
class EditContext:
    """The model being edited and what methods need to know about it."""

    model: nn.Module
    tokenizer: object
    templates: ModuleTemplates
    model_id: str
    timer: PhaseTimer = field(default_factory=PhaseTimer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class DeltaFilter(Protocol):
    def __call__(self, module_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor: ...


class WeightWriter:
    """The only path by which a delta reaches a weight: filters, then a finiteness check, then `W += delta`."""

    def __init__(self, ctx: EditContext, filters: list[DeltaFilter] = ()):
        self.ctx = ctx
        self.filters = list(filters)

    def write(self, module_name: str, delta: torch.Tensor) -> torch.Tensor:
        """Add `delta` (nn.Linear layout) to the weight of `module_name`; returns the delta written."""
        module = self.ctx.model.get_submodule(module_name)
        weight = linear_weight(module)
        if delta.shape != weight.shape:
            raise ValueError(f"delta for {module_name} has shape {tuple(delta.shape)}, weight has {tuple(weight.shape)}")
        if not torch.isfinite(delta).all():
            raise NonFiniteUpdateError(f"non-finite update for {module_name}")
        with self.ctx.timer("projection"):
            for f in self.filters:
                delta = f(module_name, weight, delta)
        if not torch.isfinite(delta).all():
            raise NonFiniteUpdateError(f"non-finite update for {module_name} after filtering")
        add_to_linear_weight(module, delta)
        return delta


class EditMethod(nn.Module):
    """Base class of editing methods. Subclasses implement `edit` and, if they need it, `setup`."""

    def __init__(self, layers: list[int]):
        super().__init__()
        if not layers:
            raise ValueError("an editing method needs at least one layer to edit")
        self.layers = list(layers)

    def edited_modules(self, templates: ModuleTemplates) -> list[str]:
        return [templates.down_proj_at(layer) for layer in self.layers]

    def setup(self, ctx: EditContext) -> None:
        """Prepare state from the unedited model (called once per run, before any edit or restore)."""

    def edit(self, ctx: EditContext, requests: list[EditRequest], writer: WeightWriter) -> dict[str, float]:
        """Write this batch's deltas through `writer`; return scalars worth logging."""
        raise NotImplementedError


"""The one path by which a delta reaches a weight: delta filters, then `W += delta`, checked.

Methods never add to a weight themselves; they hand each proposed delta to the writer.
The writer runs the delta filters in order (the method's own post-processing first, then
the configured filters such as the SPHERE projection), casts to the weight's dtype and
refuses the write when the *resulting weight* would not be finite: a delta finite in
float32 can still overflow a float16 weight, so it is the written value that is checked.

Weights that a method needs in place only for a while also go through the writer, which
puts the exact previous weights back afterwards: `provisionally` (MEMIT's layer-by-layer deltas,
seen by the next layers' keys), `training` (FT's optimiser steps on one weight) and
`temporarily` (PRUNE's restrained weights while the model is evaluated). Within a batch
(`begin_batch`) the writer remembers each weight's version after its last change and refuses
to go on from a weight that something else changed since.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..filters import DeltaFilter
from ..models import linear_weight, set_linear_weight
from .lm import LoadedModel


class NonFiniteUpdateError(FloatingPointError):
    """A weight delta, or the weight it would produce, contained NaN or Inf; nothing was written."""


class WrittenOutsideError(RuntimeError):
    """A weight changed during a batch by something other than the writer."""


class WeightWriter:
    """Filters, checks and writes deltas."""

    def __init__(self, lm: LoadedModel, filters: list[DeltaFilter] = ()):
        self.lm = lm
        self.filters = list(filters)
        self.versions: dict[str, int] = {}  # module -> its weight's version after the writer's last change
        self.generation = 0  # counts every change the writer makes: equal generations, equal weights

    def begin_batch(self) -> None:
        """Start remembering this batch's changes (weights may have been reverted or loaded in between)."""
        self.versions = {}

    def _module(self, module_name: str) -> nn.Module:
        module = self.lm.model.get_submodule(module_name)
        known = self.versions.get(module_name)
        if known is not None and module.weight._version != known:
            raise WrittenOutsideError(f"the weight of {module_name} was changed outside the WeightWriter since its last write")
        return module

    def _set(self, module_name: str, module: nn.Module, value: torch.Tensor) -> None:
        set_linear_weight(module, value)
        self.versions[module_name] = module.weight._version
        self.generation += 1

    def put(self, weights) -> None:
        """Set weights (nn.Linear layout) exactly as given: a restore (a failed batch, a resume, a reverted
        patch). `weights`: a dict, or (module, weight) pairs."""
        for name, weight in weights.items() if isinstance(weights, dict) else weights:
            self._set(name, self.lm.model.get_submodule(name), weight)

    @contextmanager
    def temporarily(self, weights: dict[str, torch.Tensor]):
        """`weights` in place for the duration, then the exact previous weights back."""
        before = {name: linear_weight(self._module(name)).detach().clone() for name in weights}
        try:
            self.put(weights)
            yield
        finally:
            self.put(before)

    @contextmanager
    def provisionally(self):
        """Yields `add(module_name, delta)`, which adds a raw delta (no filters) for the duration;
        afterwards every weight it touched is exactly as before."""
        before: dict[str, torch.Tensor] = {}

        def add(module_name: str, delta: torch.Tensor) -> None:
            module = self._module(module_name)
            weight = linear_weight(module).detach().clone()
            before.setdefault(module_name, weight)
            self._set(module_name, module, weight + delta.to(weight.dtype))

        try:
            yield add
        finally:
            self.put(before)

    @contextmanager
    def training(self, module_name: str):
        """Yields the weight parameter of `module_name` for a method's own optimiser steps; afterwards
        the weight is exactly as before (the method then writes W_trained − W as a delta)."""
        module = self._module(module_name)
        before = linear_weight(module).detach().clone()
        param = module.weight
        param.requires_grad_(True)
        try:
            yield param
        finally:
            param.requires_grad_(False)
            param.grad = None
            self._set(module_name, module, before)

    def filter(self, module_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Run the filter chain on `delta` as if it were added to `weight`."""
        with self.lm.timer("projection"):
            for f in self.filters:
                delta = f(module_name, weight, delta)
        return delta

    def write(self, module_name: str, delta: torch.Tensor, apply_filters: bool = True) -> torch.Tensor:
        """Add `delta` (nn.Linear layout) to the weight of `module_name`; returns the delta after filtering.

        `apply_filters=False` is for a method whose algorithm runs the filters elsewhere
        (PRUNE filters its restrained cumulative delta); the finiteness check always runs.
        """
        module = self._module(module_name)
        weight = linear_weight(module)
        if delta.shape != weight.shape:
            raise ValueError(f"delta for {module_name} has shape {tuple(delta.shape)}, weight has {tuple(weight.shape)}")
        if not torch.isfinite(delta).all():
            raise NonFiniteUpdateError(f"non-finite update for {module_name}")
        if apply_filters:
            delta = self.filter(module_name, weight, delta)
        with torch.no_grad():
            new_weight = weight + delta.to(dtype=weight.dtype, device=weight.device)
        if not torch.isfinite(new_weight).all():
            bad = int((~torch.isfinite(new_weight)).sum())
            raise NonFiniteUpdateError(
                f"update for {module_name} makes {bad} weight entries non-finite in {weight.dtype} "
                f"(the delta's largest magnitude after filtering is {float(delta.abs().max()):.3g})"
            )
        self._set(module_name, module, new_weight)
        return delta

"""The one path by which a delta reaches a weight: delta filters, then `W += delta`, checked.

Methods never add to a weight themselves; they hand each proposed delta to the writer.
The writer runs the delta filters in order (the method's own post-processing first, then
the configured filters such as the SPHERE projection), casts to the weight's dtype and
refuses the write when the *resulting weight* would not be finite: a delta finite in
float32 can still overflow a float16 weight, so it is the written value that is checked.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import linear_weight, set_linear_weight
from .lm import LoadedModel


class NonFiniteUpdateError(FloatingPointError):
    """A weight delta, or the weight it would produce, contained NaN or Inf; nothing was written."""


class DeltaFilter(nn.Module):
    """Base class of delta filters: `filter(module_name, weight, delta) -> delta`, both in
    nn.Linear layout (d_out x d_in). A subclass implements `forward` and may override
    `prepare` (called once, on the unedited model) and `settings` (recorded in patches).
    """

    def forward(self, module_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, model: nn.Module, module_names: list[str]) -> None:
        """Read what the filter needs from the unedited weights."""

    def settings(self) -> dict:
        return {"name": type(self).__name__}


class WeightWriter:
    """Filters, checks and writes deltas."""

    def __init__(self, lm: LoadedModel, filters: list[DeltaFilter] = ()):
        self.lm = lm
        self.filters = list(filters)

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
        module = self.lm.model.get_submodule(module_name)
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
        set_linear_weight(module, new_weight)
        return delta

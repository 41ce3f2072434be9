"""The delta-filter contract: what every plug-in on the weight writer's path implements.

A filter sees each proposed weight delta before it is added (`filter(module_name, weight, delta)
-> delta`, both in nn.Linear layout, d_out x d_in). The writer runs the method's own filters
first, then the configured ones (the SPHERE projection, `sphere_pl.sphere.SphereProjection`).
This sits below both the editing core and the filters it runs, so neither imports the other.
"""

from __future__ import annotations

import torch
from torch import nn


class DeltaFilter(nn.Module):
    """Base class of delta filters. A subclass implements `forward` and may override `prepare`
    (called once, on the unedited model) and `settings` (recorded in patches and checkpoints).
    A filter is an `nn.Module` so that its buffers follow the model to its device."""

    def forward(self, module_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, model: nn.Module, module_names: list[str]) -> None:
        """Read what the filter needs from the unedited weights."""

    def settings(self) -> dict:
        return {"name": type(self).__name__}

"""The SPHERE projection as a delta filter, usable with any editing method (SPEC section 3).

Every delta is pushed away from the principal hyperspherical directions U of the weight
it is added to: ΔW' = ΔW − α (ΔW U) Uᵀ. U comes from the current weight (the authors'
code) or from the pretrained weight (the paper's wording), computed once and cached.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SettingsError
from .hyperspherical import principal_directions, sphere_project
from ..filters import DeltaFilter
from ..models import linear_weight

BASES = ("current", "pretrained")


class SphereProjection(DeltaFilter):
    """Args:
    cumulative_ratio: η, share of the spectrum the principal directions cover; 0 disables.
    strength: α, how much of the update's component along U is removed.
    basis: "current" (recompute U from the weight before each update) or "pretrained".
    """

    def __init__(self, cumulative_ratio: float = 0.5, strength: float = 0.5, basis: str = "current"):
        super().__init__()
        if basis not in BASES:
            raise SettingsError(f"basis must be one of {BASES}, got {basis!r}")
        if not 0.0 <= cumulative_ratio < 1.0:
            raise SettingsError(f"SphereProjection cumulative_ratio (η) must lie in [0, 1) (the paper: 0.5; 0 disables), got {cumulative_ratio}")
        if not 0.0 <= strength <= 1.0:
            raise SettingsError(f"SphereProjection strength (α) must lie in [0, 1] (the paper: 0.5 on AlphaEdit, 0.8 on the others), got {strength}")
        self.cumulative_ratio = cumulative_ratio
        self.strength = strength
        self.basis = basis
        self._buffer_of: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return self.cumulative_ratio > 0 and self.strength > 0

    def prepare(self, model: nn.Module, module_names: list[str]) -> None:
        """Cache the pretrained principal directions: buffers, so they follow the module to its device;
        recomputed from the pretrained weights at every set-up, so not checkpointed."""
        if not self.enabled or self.basis != "pretrained":
            return
        for i, name in enumerate(module_names):
            buffer = f"pretrained_directions_{i}"
            self.register_buffer(buffer, principal_directions(linear_weight(model.get_submodule(name)), self.cumulative_ratio))
            self._buffer_of[name] = buffer

    def directions(self, module_name: str, weight: torch.Tensor) -> torch.Tensor:
        if self.basis == "pretrained":
            if module_name not in self._buffer_of:
                raise RuntimeError(f"no pretrained directions for {module_name}: call prepare() first")
            return getattr(self, self._buffer_of[module_name])
        return principal_directions(weight, self.cumulative_ratio)

    def forward(self, module_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return delta
        return sphere_project(delta, self.directions(module_name, weight), self.strength)

    def settings(self) -> dict:
        return {"name": "sphere", "cumulative_ratio": self.cumulative_ratio, "strength": self.strength, "basis": self.basis}

    def extra_repr(self) -> str:
        return f"cumulative_ratio={self.cumulative_ratio}, strength={self.strength}, basis={self.basis!r}"

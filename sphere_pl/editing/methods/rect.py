"""RECT (SPEC section 4): MEMIT's delta, sparsified to the entries that change their weight most.

Each delta keeps its `keep_ratio` (40 %) largest entries by relative change |ΔW / (W + 1e-8)|,
measured against the weight it is about to be added to, and zeroes the rest. The sparsifier
is RECT's own post-processing: the writer runs it before the configured filters, so with
SPHERE on, the order is the official code's (`memit/memit_rect_main.py`): sparsify, then
project, then W += ΔW. (The official mask keeps entries >= the 60th-percentile value, which
is one entry more than 40 %; here exactly floor(0.4 · entries) are kept.)
"""

from __future__ import annotations

import torch

from ...errors import SettingsError
from ...filters import DeltaFilter
from .base import register_method
from .memit import MEMIT


class RelativeChangeSparsifier(DeltaFilter):
    """Keeps the `keep_ratio` share of delta entries with the largest |ΔW / (W + eps)|."""

    def __init__(self, keep_ratio: float = 0.4, eps: float = 1e-8):
        super().__init__()
        if not 0.0 < keep_ratio <= 1.0:
            raise SettingsError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
        self.keep_ratio = keep_ratio
        self.eps = eps

    def forward(self, module_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        relative = (delta / (weight.to(delta.dtype) + self.eps)).abs().flatten()
        keep = int(self.keep_ratio * relative.numel())
        sparse = torch.zeros_like(delta).flatten()
        kept = torch.topk(relative, keep, sorted=False).indices
        sparse[kept] = delta.flatten()[kept]
        return sparse.view_as(delta)

    def settings(self) -> dict:
        return {"name": "rect_sparsify", "keep_ratio": self.keep_ratio, "eps": self.eps}


@register_method("rect")
class RECT(MEMIT):
    """Args: those of MEMIT, and
    keep_ratio: share of each delta's entries kept, by relative change (0.4).
    """

    def __init__(self, keep_ratio: float = 0.4, **memit_args):
        super().__init__(**memit_args)
        self.sparsifier = RelativeChangeSparsifier(keep_ratio)

    def delta_filters(self) -> list[DeltaFilter]:
        return [self.sparsifier]

    def settings(self) -> dict:
        return {**super().settings(), "keep_ratio": self.sparsifier.keep_ratio}

"""MEMIT (SPEC section 4): a closed-form least-squares update per layer, preserving C0.

    ΔW_l = R Kᵀ (λ C0 + K Kᵀ)⁻¹      (solved in float64)

K (d_in x n): the batch's keys at layer l; R (d_out x n): the residual (z − h) divided over
the layers still to come; λ = `mom2_update_weight` (15000 in the paper).

As in the official code (`memit/memit_main.py`), each layer's delta is computed with the
earlier layers' *raw* deltas temporarily applied; the weights are then restored and all
deltas are written at the end of the batch, each through the writer (so the SPHERE
projection sees the pre-batch weight). MEMIT keeps no state across batches: earlier
batches' keys are not accumulated (that would be MEMIT-seq).
"""

from __future__ import annotations

import torch

from ...errors import SettingsError
from ..keys import GENERATION_PREFIXES
from ..lm import LoadedModel
from ..stats import KeyStatistics

from ..values import ValueOptimization
from ..norm_anchor import NormAnchor
from .base import LocateThenEdit, register_method


@register_method("memit")
class MEMIT(LocateThenEdit):
    """Args:
    layers: layers whose down-projection is edited (the paper: 4–8 on LLaMA3-8B).
    values: target-value optimisation hyper-parameters.
    stats: where the key second moments C0 come from.
    mom2_update_weight: λ, the weight of C0 against the new keys (15000).
    context_templates, context_prefixes, context_length, context_seed: as for AlphaEdit.
    norm_anchor: norm anchoring of the target values (NAS, `sphere_pl.editing.norm_anchor`); None: off.
    """

    writes_each_layer = False

    def __init__(
        self,
        layers: list[int] = [4, 5, 6, 7, 8],
        values: ValueOptimization = ValueOptimization(),
        stats: KeyStatistics = KeyStatistics(),
        mom2_update_weight: float = 15000.0,
        context_templates: list[str] | None = None,
        context_prefixes: list[str] = list(GENERATION_PREFIXES),
        context_length: int = 10,
        context_seed: int = 0,
        norm_anchor: NormAnchor | None = None,
    ):
        super().__init__(layers, values, stats, context_templates, context_prefixes, context_length, context_seed, norm_anchor)
        if not mom2_update_weight > 0:
            raise SettingsError(f"mom2_update_weight = {mom2_update_weight} must be > 0 (the paper: 15000)")
        self.mom2_update_weight = mom2_update_weight

    def settings(self) -> dict:
        return {**super().settings(), "mom2_update_weight": self.mom2_update_weight}

    def setup(self, lm: LoadedModel) -> None:
        super().setup(lm)
        moments = self.key_second_moments(lm)
        # λ C0 per layer, float64; recomputed from the statistics cache at every set-up, so not checkpointed.
        # Filled in place, each float32 C0 dropped once copied: no second stack of the matrices at the peak.
        d_in = moments[self.layers[0]].shape[0]
        weighted = torch.empty(len(self.layers), d_in, d_in, dtype=torch.float64, device=lm.device)
        for i, layer in enumerate(self.layers):
            weighted[i].copy_(moments.pop(layer)).mul_(self.mom2_update_weight)
        self.register_buffer("weighted_moments", weighted, persistent=False)

    def solve(self, index: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        k, r = keys.double(), residuals.double()
        adjusted_keys = torch.linalg.solve(self.weighted_moments[index] + k @ k.T, k)  # (λC0 + KKᵀ)⁻¹ K
        return r @ adjusted_keys.T

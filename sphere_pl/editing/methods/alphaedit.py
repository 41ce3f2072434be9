"""AlphaEdit (SPEC section 4): MEMIT's closed-form update, constrained to the null space of
the preserved knowledge and to the keys of all earlier batches.

Per layer l (in order, residual spread over the layers still to come):

    (P (K Kᵀ + C_p) + L2·I) X = P K Rᵀ,   ΔW = Xᵀ

P projects on the near-null space of C0 (singular values below `nullspace_threshold`), so
ΔW k = 0 for keys k the model already uses; C_p accumulates K Kᵀ of all earlier batches.

State: C_p per layer, and the keys of every committed batch (on the CPU). Reverting drops
the last batches' keys and rebuilds C_p by adding K Kᵀ batch after batch in the original
order, the very operations an uninterrupted run performs, so the result is bit-identical.
The keys cost d_in x (edits so far) floats per layer: 30 KB per edit on SmolLM2 (5 layers),
287 KB per edit on LLaMA3-8B; C_p itself is d_in² per layer.
"""

from __future__ import annotations

import torch

from ..keys import GENERATION_PREFIXES
from ..lm import LoadedModel
from ..stats import KeyStatistics
from ..values import ValueOptimization
from .base import LocateThenEdit, register_method


def nullspace_projector(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ over the singular vectors of C0 whose singular value is below `threshold`.

    C0 is symmetric positive semi-definite, so its singular vectors are its eigenvectors and
    its singular values the eigenvalues' magnitudes: `eigh` gives them several times faster than `svd`.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment.double())
    small = eigenvectors[:, eigenvalues.abs() < threshold]
    return (small @ small.T).to(second_moment.dtype)


@register_method("alphaedit")
class AlphaEdit(LocateThenEdit):
    """Args:
    layers: layers whose down-projection is edited (the paper: 4–8 on LLaMA3-8B).
    values: target-value optimisation hyper-parameters.
    stats: where the key second moments C0 come from.
    nullspace_threshold: singular values of C0 below this span the null space (2e-2).
    L2: ridge term of the solve (10).
    context_templates: fixed context templates (each with "{}"); None samples them from the model.
    context_prefixes: words the sampled context templates start with (one template each).
    context_length: tokens sampled per context template.
    context_seed: seed for sampling context templates.
    """

    sphere_strength = 0.5  # the paper's α for AlphaEdit

    def __init__(
        self,
        layers: list[int] = [4, 5, 6, 7, 8],
        values: ValueOptimization = ValueOptimization(),
        stats: KeyStatistics = KeyStatistics(),
        nullspace_threshold: float = 2e-2,
        L2: float = 10.0,
        context_templates: list[str] | None = None,
        context_prefixes: list[str] = list(GENERATION_PREFIXES),
        context_length: int = 10,
        context_seed: int = 0,
    ):
        super().__init__(layers, values, stats, context_templates, context_prefixes, context_length, context_seed)
        if not nullspace_threshold > 0:
            raise ValueError(
                f"nullspace_threshold = {nullspace_threshold} leaves an empty null space: every update would be zero; "
                "it must be > 0 (the paper: 2e-2)"
            )
        if not L2 >= 0:
            raise ValueError(f"L2 = {L2} must be >= 0")
        self.nullspace_threshold = nullspace_threshold
        self.L2 = L2
        self.batch_keys: list[list[torch.Tensor]] = []  # per committed batch: per layer (d_in, n), CPU

    def settings(self) -> dict:
        return {**super().settings(), "nullspace_threshold": self.nullspace_threshold, "L2": self.L2}

    def get_extra_state(self):
        return {**super().get_extra_state(), "batch_keys": self.batch_keys}

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.batch_keys = [list(keys) for keys in state.get("batch_keys", [])]

    def setup(self, lm: LoadedModel) -> None:
        super().setup(lm)
        moments = self.key_second_moments(lm)
        projectors = torch.stack([nullspace_projector(moments[layer], self.nullspace_threshold) for layer in self.layers])
        empty = [layer for layer, p in zip(self.layers, projectors) if not bool(p.any())]
        if empty:
            raise ValueError(
                f"no singular value of C0 lies below nullspace_threshold = {self.nullspace_threshold} at layer(s) {empty}: "
                "the null space is empty and every update would be zero; raise nullspace_threshold"
            )
        self.register_buffer("projectors", projectors.to(lm.device))
        self.register_buffer("previous_key_moments", torch.zeros_like(self.projectors))

    def solve(self, index: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """ΔW (d_out x d_in) for layer index i from keys (d_in x n) and residuals (d_out x n)."""
        P = self.projectors[index]
        keys = keys.to(P.dtype)
        lhs = P @ (keys @ keys.T + self.previous_key_moments[index]) + self.L2 * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
        rhs = P @ keys @ residuals.to(P.dtype).T
        return torch.linalg.solve(lhs, rhs).T

    def batch_state(self, final_keys: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [final_keys[layer].T.to(self.previous_key_moments.dtype) for layer in self.layers]

    def commit(self, keys: list[torch.Tensor]) -> None:
        _accumulate(self.previous_key_moments, keys)
        self.batch_keys.append([k.cpu() for k in keys])

    @classmethod
    def revert_state(cls, state: dict, num_batches: int) -> dict:
        extra = state["_extra_state"]
        batch_keys = extra["batch_keys"]
        if num_batches > len(batch_keys):
            raise ValueError(f"cannot revert {num_batches} batches: AlphaEdit has committed {len(batch_keys)}")
        kept = batch_keys[: len(batch_keys) - num_batches]
        moments = torch.zeros_like(state["previous_key_moments"])
        for keys in kept:
            _accumulate(moments, [k.to(moments.device) for k in keys])
        return {**state, "previous_key_moments": moments, "_extra_state": {**extra, "batch_keys": kept}}


def _accumulate(moments: torch.Tensor, keys: list[torch.Tensor]) -> None:
    """C_p[i] += K Kᵀ per layer: the one place this sum is formed, so a rebuild repeats it exactly."""
    for i, k in enumerate(keys):
        moments[i] += k @ k.T

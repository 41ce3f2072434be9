"""AlphaEdit (SPEC section 4): MEMIT's closed-form update, constrained to the null space of
the preserved knowledge and to the keys of all earlier batches.

Per layer l (in order, residual spread over the layers still to come):

    (P (K Kᵀ + C_p) + L2·I) X = P K Rᵀ,   ΔW = Xᵀ

P projects on the near-null space of C0 (singular values below `nullspace_threshold`), so
ΔW k = 0 for keys k the model already uses; C_p accumulates K Kᵀ of all earlier batches.
"""

from __future__ import annotations

import torch

from ..requests import EditRequest
from ..stats import KeyStatistics, second_moments
from .base import EditContext, EditMethod, WeightWriter
from .keys import GENERATION_PREFIXES, KeyReader, generate_context_templates
from .values import ValueOptimization, optimize_values


def nullspace_projector(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ over the singular vectors of C0 whose singular value is below `threshold`.

    C0 is symmetric positive semi-definite, so its singular vectors are its eigenvectors and
    its singular values the eigenvalues' magnitudes: `eigh` gives them several times faster than `svd`.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment.double())
    small = eigenvectors[:, eigenvalues.abs() < threshold]
    return (small @ small.T).to(second_moment.dtype)


class AlphaEdit(EditMethod):
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
        super().__init__(layers)
        self.values = values
        self.stats = stats
        self.nullspace_threshold = nullspace_threshold
        self.L2 = L2
        self.context_prefixes = list(context_prefixes)
        self.context_length = context_length
        self.context_seed = context_seed
        self.context_groups = [["{}"], list(context_templates)] if context_templates else None

    # Context templates are plain strings: they travel in the checkpoint as extra state.
    def get_extra_state(self):
        return {"context_groups": self.context_groups}

    def set_extra_state(self, state):
        self.context_groups = state["context_groups"]

    def setup(self, ctx: EditContext) -> None:
        with ctx.timer("statistics"):
            moments = second_moments(ctx.model, ctx.tokenizer, ctx.templates, self.layers, self.stats, ctx.model_id)
        projectors = torch.stack([nullspace_projector(moments[layer], self.nullspace_threshold) for layer in self.layers])
        self.register_buffer("projectors", projectors.to(ctx.device))
        self.register_buffer("previous_key_moments", torch.zeros_like(self.projectors))
        if self.context_groups is None:
            self.context_groups = generate_context_templates(
                ctx.model, ctx.tokenizer, self.context_length, self.context_prefixes, self.context_seed
            )

    def edit(self, ctx: EditContext, requests: list[EditRequest], writer: WeightWriter) -> dict[str, float]:
        model, tok, templates = ctx.model, ctx.tokenizer, ctx.templates
        z_layer = self.layers[-1]
        with ctx.timer("value_optimisation"):
            targets, info = optimize_values(model, tok, templates, requests, self.context_groups, z_layer, self.values)

        with ctx.timer("keys"):
            reader = KeyReader(model, tok, templates, requests, self.context_groups, from_layer=min(self.layers))
        for i, layer in enumerate(self.layers):
            with ctx.timer("keys"):
                keys, current = reader.read([layer], output_layer=z_layer)
            with ctx.timer("solve"):
                delta = self._solve(i, keys[layer].T, (targets - current).T / (len(self.layers) - i))
            writer.write(templates.down_proj_at(layer), delta)

        with ctx.timer("keys"):
            final_keys, _ = reader.read(self.layers)
        for i, layer in enumerate(self.layers):
            k = final_keys[layer].T.to(self.previous_key_moments.dtype)
            self.previous_key_moments[i] += k @ k.T
        return {"value_loss": float(info["loss"].mean()), "value_steps": float(info["steps"].float().mean())}

    def _solve(self, i: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """ΔW (d_out x d_in) for layer index i from keys (d_in x n) and residuals (d_out x n)."""
        P = self.projectors[i]
        keys = keys.to(P.dtype)
        lhs = P @ (keys @ keys.T + self.previous_key_moments[i]) + self.L2 * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
        rhs = P @ keys @ residuals.to(P.dtype).T
        return torch.linalg.solve(lhs, rhs).T

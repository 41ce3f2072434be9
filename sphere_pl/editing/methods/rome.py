"""ROME (SPEC section 4): a rank-one update of one layer, one request at a time.

For each request, in order (a batch is applied request by request, each seeing the
previous ones' edits):

    u  = mean over context templates of the key k (down_proj input at the subject's last
         token), optionally C0⁻¹ u (`mom2_adjustment`), normalised to unit length;
    v* − W k = δ, the vector that added to the layer's MLP output at the subject's last
         token makes the model say the new target (optimised as for MEMIT, with the clamp
         and weight decay relative to the MLP output, as ROME's compute_v);
    ΔW = δ uᵀ / (uᵀ k),   k the key of the bare prompt, so that (W + ΔW) k = v*.

Adding δ to the MLP output equals adding it to the block output, so the value search is
the shared one. Context templates are one flat group: the bare prompt, then
`context_per_length` samples per prefix for each length in `context_lengths` (the paper:
10 of 5 tokens and 10 of 10). Each delta goes through the writer, and with it through the
SPHERE projection on the weight as it is before that request (the official rome_main.py).
ROME keeps no state across batches.
"""

from __future__ import annotations

import torch

from ...data.records import EditRequest
from ...tracing import capture, token_positions, tokenize
from ..keys import GENERATION_PREFIXES, KeyReader, generate_context_templates
from ..lm import LoadedModel
from ..stats import KeyStatistics

from ..values import ValueOptimization
from ..writer import WeightWriter
from ..norm_anchor import NormAnchor
from .base import BatchEdit, LocateThenEdit, register_method, single_layer


@register_method("rome")
class ROME(LocateThenEdit):
    """Args:
    layer: the layer whose down-projection is edited (the paper: 5 on LLaMA3-8B).
    layers: accepted as a one-element list instead of `layer`; several are refused.
    values: value search (defaults: ROME's LLaMA3-8B lr 0.5, clamp 4, weight decay 1e-3).
    stats: where C0 comes from (used only with `mom2_adjustment`).
    mom2_adjustment: u ← C0⁻¹ u (off for LLaMA3-8B).
    context_templates: fixed templates (each with "{}"), used after the bare prompt; None samples them.
    context_lengths, context_per_length: tokens per sampled template, and samples per prefix and length.
    context_prefixes, context_seed: as for AlphaEdit.
    norm_anchor: norm anchoring of the target values (NAS, `sphere_pl.editing.norm_anchor`); None: off.
    """

    def __init__(
        self,
        layer: int = 5,
        values: ValueOptimization = ValueOptimization(lr=0.5, clamp_norm_factor=4.0, weight_decay=1e-3),
        stats: KeyStatistics = KeyStatistics(),
        mom2_adjustment: bool = False,
        context_templates: list[str] | None = None,
        context_lengths: list[int] = [5, 10],
        context_per_length: int = 2,
        context_prefixes: list[str] = list(GENERATION_PREFIXES),
        context_seed: int = 0,
        layers: list[int] | None = None,
        norm_anchor: NormAnchor | None = None,
    ):
        layer = single_layer(self, layer, layers)
        super().__init__([layer], values, stats, context_templates, context_prefixes, max(context_lengths), context_seed, norm_anchor)
        if context_templates:
            self.context_groups = [["{}", *context_templates]]  # one flat group, as ROME averages
        self.mom2_adjustment = mom2_adjustment
        self.context_lengths = list(context_lengths)
        self.context_per_length = context_per_length

    @property
    def layer(self) -> int:
        return self.layers[0]

    def settings(self) -> dict:
        return {
            **super().settings(),
            "mom2_adjustment": self.mom2_adjustment,
            "context_lengths": self.context_lengths,
            "context_per_length": self.context_per_length,
        }

    def setup(self, lm: LoadedModel) -> None:
        if self.context_groups is None:
            sampled = []
            for length in self.context_lengths:
                for i in range(self.context_per_length):
                    seed = self.context_seed + 1000 * length + i
                    sampled += generate_context_templates(lm.model, lm.tokenizer, length, self.context_prefixes, seed)[1]
            self.context_groups = [["{}", *sampled]]
        super().setup(lm)
        if self.mom2_adjustment:
            moment = self.key_second_moments(lm)[self.layer]
            self.register_buffer("key_moment", moment.to(lm.device), persistent=False)

    def edit(self, lm: LoadedModel, requests: list[EditRequest], writer: WeightWriter) -> BatchEdit:
        losses, steps, anchored = [], [], []
        for request in requests:
            loss, step, plan, anchoring = self._edit_one(lm, request, writer)
            losses.append(loss)
            steps.append(step)
            anchored.append(anchoring)
        means = {k: sum(a[k] for a in anchored) / len(anchored) for k in anchored[0]}
        return BatchEdit(info={"value_loss": sum(losses) / len(losses), "value_steps": sum(steps) / len(steps), **plan, **means})

    def _edit_one(self, lm: LoadedModel, request: EditRequest, writer: WeightWriter) -> tuple[float, float, dict, dict]:
        model, tok, templates = lm.model, lm.tokenizer, lm.templates
        name = templates.down_proj_at(self.layer)
        with lm.timer("keys"):
            u = KeyReader(model, tok, templates, [request], self.context_groups, self.layer).read([self.layer])[0][self.layer][0]
            bare = tokenize(tok, [request.rewrite_prompt], lm.device)
            found = capture(model, bare, inputs_of=[name], outputs_of=[name], stop_after=name)
            position = token_positions(tok, [(request.prompt, request.subject)])[0]
            k, mlp_out = found[("in", name)][0, position].float(), found[("out", name)][0, position]
        if self.mom2_adjustment:
            u = torch.linalg.solve(self.key_moment.double(), u.double()).to(u.dtype)
        u = u / u.norm()
        _, info = self.value_search(lm, [request], self.layer, reference=mlp_out[None])
        self._check_values_moved([request], info)
        anchoring = {}
        if self.norm_anchor is not None:  # v* = mlp_out + δ anchored (the official ROME code uses threshold 5)
            pushes, anchoring = self.anchored_pushes(lm, [request], self.layer, info["delta"], v0=mlp_out[None])
            info["delta"] = pushes
        with lm.timer("solve"):
            delta = info["delta"][0].to(k.dtype)  # v* − W k: what the MLP output must gain
            update = torch.outer(delta, u) / torch.dot(u, k)  # rank one, and update @ k = delta
        writer.write(name, update)
        return float(info["loss"].mean()), float(info["steps"].float().mean()), self.plan_info(info), anchoring

"""PRUNE (SPEC section 4): MEMIT edits, with the cumulative change's large singular values restrained.

For each edited layer, Δ = W_t − W₀ (all batches so far) and σ_max = the largest singular
value of the pretrained W₀. Singular values of Δ above σ_max are log-compressed,

    σ → log σ − log σ_max + σ_max,

and the configured filters (the SPHERE projection) run on the restrained Δ' against W₀, so
that the projection uses the *pretrained* weight as its basis. W₀ + Δ' is the restrained weight.

`restrain` says where it is used, following `experiments/evaluate.py` (branch MEMIT_prune):

* ``evaluation`` (default, the official code and the paper's numbers): the live model keeps
  the raw MEMIT deltas, unfiltered; W₀ + Δ' is put in place only while the model is
  evaluated (`Editor.evaluate`, validation and test).
* ``live``: after every batch the live weights become W₀ + Δ', so later batches edit the
  restrained model.

Either way every change of a weight goes through the writer (with `apply_filters=False`:
the filters have already run on Δ').
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from ...errors import SettingsError
from ...data.records import EditRequest
from ...models import linear_weight
from ..lm import LoadedModel
from ..writer import WeightWriter
from .base import BatchEdit, register_method
from .memit import MEMIT

RESTRAIN = ("evaluation", "live")


def restrain_singular_values(delta: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Δ with every singular value σ > σ_max replaced by log σ − log σ_max + σ_max (float64 SVD)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    big = s > sigma_max
    s = torch.where(big, torch.log(s.clamp(min=sigma_max)) - math.log(sigma_max) + sigma_max, s)
    return ((u * s) @ vh).to(delta.dtype)


class _RawWriter:
    """Hands MEMIT's per-layer writes to the real writer without the filters (PRUNE filters Δ')."""

    def __init__(self, writer: WeightWriter):
        self.writer = writer

    def write(self, module_name: str, delta: torch.Tensor) -> torch.Tensor:
        return self.writer.write(module_name, delta, apply_filters=False)

    def __getattr__(self, name: str):  # everything else (provisional writes, ...) is the writer's own
        return getattr(self.writer, name)


@register_method("prune")
class PRUNE(MEMIT):
    """Args: those of MEMIT, and
    restrain: "evaluation" (restrained weights only while evaluating; the official code) or
        "live" (the live model carries the restrained weights).
    """

    def __init__(self, restrain: str = "evaluation", **memit_args):
        super().__init__(**memit_args)
        if restrain not in RESTRAIN:
            raise SettingsError(f"restrain must be one of {RESTRAIN}, got {restrain!r}")
        self.restrain = restrain

    def settings(self) -> dict:
        return {**super().settings(), "restrain": self.restrain}

    def setup(self, lm: LoadedModel) -> None:
        super().setup(lm)
        pretrained = [linear_weight(lm.model.get_submodule(n)).detach().clone() for n in self.edited_modules(lm.templates)]
        # W₀ and its σ_max: read from the pretrained model at every set-up, so not checkpointed
        self.register_buffer("pretrained_weights", torch.stack(pretrained), persistent=False)
        self.sigma_max = [float(torch.linalg.matrix_norm(w.double(), ord=2)) for w in pretrained]

    def restrained_deltas(self, lm: LoadedModel, writer: WeightWriter) -> dict[str, torch.Tensor]:
        """Δ' per edited module: the cumulative change, restrained, then through the filters against W₀."""
        result = {}
        for i, name in enumerate(self.edited_modules(lm.templates)):
            w0 = self.pretrained_weights[i]
            cumulative = linear_weight(lm.model.get_submodule(name)).detach() - w0
            result[name] = writer.filter(name, w0, restrain_singular_values(cumulative, self.sigma_max[i]))
        return result

    def edit(self, lm: LoadedModel, requests: list[EditRequest], writer: WeightWriter) -> BatchEdit:
        result = super().edit(lm, requests, _RawWriter(writer))
        if self.restrain == "live":
            for i, (name, restrained) in enumerate(self.restrained_deltas(lm, writer).items()):
                current = linear_weight(lm.model.get_submodule(name)).detach()
                writer.write(name, (self.pretrained_weights[i] + restrained) - current, apply_filters=False)
        return result

    @contextmanager
    def evaluation_weights(self, lm: LoadedModel, writer: WeightWriter):
        if self.restrain != "evaluation" or not hasattr(self, "pretrained_weights"):
            yield
            return
        dtype = self.pretrained_weights.dtype
        restrained = {name: self.pretrained_weights[i] + delta.to(dtype) for i, (name, delta) in enumerate(self.restrained_deltas(lm, writer).items())}
        with writer.temporarily(restrained):  # the live weights come back exactly afterwards
            yield

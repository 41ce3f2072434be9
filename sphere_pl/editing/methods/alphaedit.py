"""AlphaEdit (SPEC section 4): MEMIT's closed-form update, constrained to the null space of
the preserved knowledge and to the keys of all earlier batches.

Per layer l (in order, residual spread over the layers still to come):

    (P (K Kᵀ + C_p) + L2·I) X = P K Rᵀ,   ΔW = Xᵀ

P projects on the near-null space of C0 (singular values below `nullspace_threshold`), so
ΔW k = 0 for keys k the model already uses; C_p accumulates K Kᵀ of all earlier batches.

State: C_p per layer, kept as the keys of the committed batches (on the CPU) while they are
fewer than d_in per layer. The checkpoint holds only those keys: P is recomputed from the
cached C0 at set-up, and C_p is rebuilt from the keys by adding K Kᵀ batch after batch in
the original order, the very operations an uninterrupted run performs, so a resume is
bit-identical. Once a layer has d_in keys, the oldest batches are folded into one stored
d_in x d_in sum (`folded_key_moments`) and from then on only the newest batches stay keys
(at most d_in / 4 of them, at least the last 2 batches): the method state stays below
1.25 d_in² floats per layer, where the former checkpoints held 2 d_in² plus every key.
Folded batches can no longer be reverted one by one. The keys cost 30 KB
per edit on SmolLM2 (5 layers) and 287 KB per edit on LLaMA3-8B.
"""

from __future__ import annotations

import os

import torch

from ...errors import SettingsError
from ..keys import GENERATION_PREFIXES
from ..lm import LoadedModel
from ...models import linear_weight
from ..stats import KeyStatistics

from ..values import ValueOptimization
from ..norm_anchor import NormAnchor
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
    projectors_file: a null-space projector file as the official AlphaEdit code writes it
        (`null_space_project.pt`: one (d_in, d_in) projector per edited layer, in `layers`
        order), read with `weights_only=True`; C0 is then not needed. None computes P from C0.
    context_templates: fixed context templates (each with "{}"); None samples them from the model.
    context_prefixes: words the sampled context templates start with (one template each).
    context_length: tokens sampled per context template.
    context_seed: seed for sampling context templates.
    norm_anchor: norm anchoring of the target values (NAS, `sphere_pl.editing.norm_anchor`); None: off.
    """

    sphere_strength = 0.5  # the paper's α for AlphaEdit

    def __init__(
        self,
        layers: list[int] = [4, 5, 6, 7, 8],
        values: ValueOptimization = ValueOptimization(),
        stats: KeyStatistics = KeyStatistics(),
        nullspace_threshold: float = 2e-2,
        L2: float = 10.0,
        projectors_file: str | None = None,
        context_templates: list[str] | None = None,
        context_prefixes: list[str] = list(GENERATION_PREFIXES),
        context_length: int = 10,
        context_seed: int = 0,
        norm_anchor: NormAnchor | None = None,
    ):
        super().__init__(layers, values, stats, context_templates, context_prefixes, context_length, context_seed, norm_anchor)
        if not nullspace_threshold > 0:
            raise SettingsError(
                f"nullspace_threshold = {nullspace_threshold} leaves an empty null space: every update would be zero; "
                "it must be > 0 (the paper: 2e-2)"
            )
        if not L2 >= 0:
            raise SettingsError(f"L2 = {L2} must be >= 0")
        self.nullspace_threshold = nullspace_threshold
        self.L2 = L2
        self.projectors_file = projectors_file
        self.batch_keys: list[list[torch.Tensor]] = []  # per committed, unfolded batch: per layer (d_in, n), CPU
        self.folded_key_moments: torch.Tensor | None = None  # (layers, d_in, d_in) sum over folded batches, CPU
        self.folded_batches = 0

    def settings(self) -> dict:
        return {**super().settings(), "nullspace_threshold": self.nullspace_threshold, "L2": self.L2, "projectors_file": self.projectors_file}

    def get_extra_state(self):
        return {
            **super().get_extra_state(),
            "batch_keys": self.batch_keys,
            "folded_key_moments": self.folded_key_moments,
            "folded_batches": self.folded_batches,
        }

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.batch_keys = [list(keys) for keys in state.get("batch_keys", [])]
        self.folded_key_moments = state.get("folded_key_moments")
        self.folded_batches = int(state.get("folded_batches", 0))
        if hasattr(self, "previous_key_moments"):  # set up: rebuild C_p exactly from what was saved
            self.previous_key_moments.copy_(_rebuild(self.previous_key_moments, self.folded_key_moments, self.batch_keys))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints of earlier versions stored P and C_p; both are recomputed now
        for stale in ("projectors", "previous_key_moments"):
            state_dict.pop(prefix + stale, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def setup(self, lm: LoadedModel) -> None:
        super().setup(lm)
        if self.projectors_file:
            d_in = linear_weight(lm.model.get_submodule(lm.templates.down_proj_at(self.layers[0]))).shape[1]
            projectors = read_projectors_file(self.projectors_file, len(self.layers), d_in)
        else:
            moments = self.key_second_moments(lm)
            shape, dtype = moments[self.layers[0]].shape, moments[self.layers[0]].dtype
            projectors = torch.empty(len(self.layers), *shape, dtype=dtype, device=lm.device)
            for i, layer in enumerate(self.layers):  # each C0 dropped once its projector is written
                # on the model's device: a float64 eigh of LLaMA3-8B's 14336 x 14336 C0 takes minutes on a CPU
                projectors[i] = nullspace_projector(moments.pop(layer).to(lm.device), self.nullspace_threshold)
        empty = [layer for layer, p in zip(self.layers, projectors) if not bool(p.any())]
        if empty:
            raise SettingsError(
                f"no singular value of C0 lies below nullspace_threshold = {self.nullspace_threshold} at layer(s) {empty}: "
                "the null space is empty and every update would be zero; raise nullspace_threshold"
            )
        # both recomputed at every set-up (P from the cached C0, C_p from the saved keys): not checkpointed
        self.register_buffer("projectors", projectors.to(lm.device), persistent=False)
        self.register_buffer("previous_key_moments", torch.zeros_like(self.projectors), persistent=False)

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
        d_in = self.previous_key_moments.shape[-1]
        # keys are cheaper than the d_in x d_in sum until there are d_in of them; once a folded
        # sum exists, a few kept keys (for revert) are all the checkpoint adds to it
        threshold = d_in if self.folded_key_moments is None else d_in // 4
        if sum(k[0].shape[1] for k in self.batch_keys) >= threshold:
            self._fold(keep=d_in // 8)

    def _fold(self, keep: int) -> None:
        """Sum the oldest batches' K Kᵀ into `folded_key_moments` until at most `keep` keys per
        layer (and never fewer than the newest 2 batches) are left as keys: the same additions,
        in the same order, on the same device as the running sum, so the rebuild stays exact."""
        device = self.previous_key_moments.device
        folded = torch.zeros_like(self.previous_key_moments) if self.folded_key_moments is None else self.folded_key_moments.to(device)
        while len(self.batch_keys) > 2 and sum(k[0].shape[1] for k in self.batch_keys) > keep:
            _accumulate(folded, [k.to(device) for k in self.batch_keys.pop(0)])
            self.folded_batches += 1
        self.folded_key_moments = folded.cpu()

    @classmethod
    def revert_state(cls, state: dict, num_batches: int) -> dict:
        extra = state["_extra_state"]
        batch_keys = extra["batch_keys"]
        if num_batches > len(batch_keys):
            folded = extra.get("folded_batches", 0)
            raise ValueError(
                f"cannot revert {num_batches} batches: AlphaEdit keeps the keys of the last {len(batch_keys)} batch(es) "
                + (f"(the {folded} before them were folded into one K Kᵀ sum to keep checkpoints small)" if folded else "")
            )
        kept = batch_keys[: len(batch_keys) - num_batches]
        return {**state, "_extra_state": {**extra, "batch_keys": kept}}


def read_projectors_file(path: str, num_layers: int, d_in: int) -> torch.Tensor:
    """The official code's `null_space_project.pt` (a plain tensor), checked against the edited layers."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise SettingsError(f"projectors_file {path} does not exist")
    try:
        projectors = torch.load(path, map_location="cpu", weights_only=True)  # a tensor: no pickled code runs
    except Exception as e:
        raise SettingsError(f"projectors_file {path} is not a readable tensor file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(projectors, torch.Tensor) or not projectors.is_floating_point():
        raise SettingsError(f"projectors_file {path} holds a {type(projectors).__name__}, not a floating-point tensor of projectors")
    if tuple(projectors.shape) != (num_layers, d_in, d_in):
        raise SettingsError(
            f"projectors_file {path} has shape {tuple(projectors.shape)}, but {num_layers} edited layer(s) with {d_in} inputs "
            f"need ({num_layers}, {d_in}, {d_in}): it was made for other layers or another model"
        )
    if not bool(torch.isfinite(projectors).all()):
        raise SettingsError(f"projectors_file {path} holds non-finite values")
    return projectors.float()


def _accumulate(moments: torch.Tensor, keys: list[torch.Tensor]) -> None:
    """C_p[i] += K Kᵀ per layer: the one place this sum is formed, so a rebuild repeats it exactly."""
    for i, k in enumerate(keys):
        moments[i] += k @ k.T


def _rebuild(like: torch.Tensor, folded: torch.Tensor | None, batch_keys: list[list[torch.Tensor]]) -> torch.Tensor:
    """C_p from the folded sum and the unfolded batches' keys, in the order they were committed."""
    moments = torch.zeros_like(like) if folded is None else folded.to(like.device, like.dtype).clone()
    for keys in batch_keys:
        _accumulate(moments, [k.to(like.device) for k in keys])
    return moments

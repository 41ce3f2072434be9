"""`HypersphericalEnergyMonitor`: HE of every edited weight, live, as the edits go on (SPEC section 2).

Collapse under sequential editing coincides with large ΔHE, which is why it is watched after every
batch: `he/layerN`, `he_delta/layerN` (against the pretrained weight) and `he_relative/layerN`.
HE is that of the weights that are evaluated, so that HE and the metrics describe the same
weights: where a method evaluates others than the live ones (PRUNE's `restrain: evaluation`), the
live weights' HE is recorded beside it as `he_live/layerN`. The collapse guard reads HE through
`energies`, with the same definition.
"""

from __future__ import annotations

import lightning as L
import torch

from ..sphere.hyperspherical import hyperspherical_energy
from .cache import PerWeights
from .schedule import Schedule


class HypersphericalEnergyMonitor(L.Callback):
    """Args:
    s: the power of the energy (0: logarithmic energy).
    reduction: mean or sum over neuron pairs.
    every_n_batches: record after every this many applied batches.
    chunk_size: rows per block of the pairwise computation.
    normalize_rows: False: distances between raw rows, not directions.

    The pre-edit HE is part of the callback's checkpoint state, so a resumed run keeps its baseline.
    """

    def __init__(
        self, s: float = 1.0, reduction: str = "mean", every_n_batches: int = 1, chunk_size: int = 1024, normalize_rows: bool = True
    ):
        self.s = s
        self.reduction = reduction
        self.normalize_rows = normalize_rows
        self.schedule = Schedule(every_n_batches, None, "he")
        self.chunk_size = chunk_size
        self.initial: dict[str, float] = {}
        self._cache = PerWeights()

    def _energies_of(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        return {label: float(hyperspherical_energy(w, self.s, self.reduction, self.chunk_size, self.normalize_rows)) for label, w in weights.items()}

    def energies(self, editor) -> tuple[dict[str, float], dict[str, float] | None]:
        """HE per edited layer of the evaluated weights, and of the live ones where they differ (else None)."""
        def measure():
            live = {label: w.detach().clone() for label, w in editor.edited_weights().items()}
            with editor.evaluation_weights():
                evaluated = editor.edited_weights()
                differs = any(not torch.equal(w, live[label]) for label, w in evaluated.items())
                return self._energies_of(evaluated), (self._energies_of(live) if differs else None)

        with editor.timer("he"):
            return self._cache.get(editor, measure)

    def metric_names(self, trainer, pl_module) -> set[str]:
        return {f"{kind}/{label}" for label in pl_module.editor.weight_labels for kind in ("he", "he_delta", "he_relative")}

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.initial:  # restored from a checkpoint when resuming
            with pl_module.editor.timer("he"):
                self.initial = self._energies_of(pl_module.editor.edited_weights())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.schedule.due_after(pl_module.editor):
            return
        energies, live = self.energies(pl_module.editor)
        values = {}
        for layer, he in energies.items():
            he0 = self.initial[layer]
            values[f"he/{layer}"] = he
            values[f"he_delta/{layer}"] = he - he0
            values[f"he_relative/{layer}"] = (he - he0) / abs(he0)
            if live is not None:
                values[f"he_live/{layer}"] = live[layer]
        pl_module.record.record(values)

    def state_dict(self) -> dict:
        return {"initial": self.initial}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial = dict(state_dict["initial"])

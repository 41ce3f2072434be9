"""Callbacks: hyperspherical energy of the edited layers, and checkpoints after edit batches."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from .hyperspherical import hyperspherical_energy
from .models import linear_weight


class HypersphericalEnergyMonitor(L.Callback):
    """Logs, per edited layer and after every `every_n_batches` edit batches, the HE of its
    weight, ΔHE against the pre-edit weight and the relative change (SPEC section 2).

    Collapse under sequential editing coincides with large ΔHE, which is why it is watched live.
    The pre-edit HE is part of the callback's checkpoint state, so a resumed run keeps its baseline.
    """

    def __init__(self, s: float = 1.0, reduction: str = "mean", every_n_batches: int = 1, chunk_size: int = 1024):
        self.s = s
        self.reduction = reduction
        self.every_n_batches = every_n_batches
        self.chunk_size = chunk_size
        self.initial: dict[str, float] = {}

    def _energies(self, pl_module) -> dict[str, float]:
        energies = {}
        for layer, name in zip(pl_module.method.layers, pl_module.edited_modules):
            weight = linear_weight(pl_module.model.get_submodule(name))
            energies[f"layer{layer}"] = float(hyperspherical_energy(weight, self.s, self.reduction, self.chunk_size))
        return energies

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.initial:  # restored from a checkpoint when resuming
            with pl_module.ctx.timer("he"):
                self.initial = self._energies(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.batches_done % self.every_n_batches:
            return
        with pl_module.ctx.timer("he"):
            energies = self._energies(pl_module)
        values = {}
        for layer, he in energies.items():
            he0 = self.initial[layer]
            values[f"he/{layer}"] = he
            values[f"he_delta/{layer}"] = he - he0
            values[f"he_relative/{layer}"] = (he - he0) / abs(he0)
        pl_module.log_progress(values)

    def state_dict(self) -> dict:
        return {"initial": self.initial}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial = dict(state_dict["initial"])


class EditCheckpoint(L.Callback):
    """Writes `edits-<n>.ckpt` every `every_n_batches` edit batches (and after the last) plus
    `last.ckpt`, keeping the newest `keep_last` numbered ones.

    Files are written under a temporary name and renamed, so an interrupted write never
    replaces a good checkpoint. (Lightning's ModelCheckpoint counts optimizer steps; an
    editing run has none.)
    """

    def __init__(self, dirpath: str | None = None, every_n_batches: int = 1, keep_last: int | None = 2):
        self.dirpath = dirpath
        self.every_n_batches = every_n_batches
        self.keep_last = keep_last
        self.saved: list[str] = []

    def _dir(self, trainer) -> Path:
        return Path(self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last_batch = pl_module.batches_done == trainer.num_training_batches
        if pl_module.batches_done % self.every_n_batches and not last_batch:
            return
        directory = self._dir(trainer)
        path = directory / f"edits-{pl_module.edits_applied:06d}.ckpt"
        self.saved.append(str(path))  # before saving, so the checkpoint's own list includes itself
        self._atomic_save(trainer, path)
        self._atomic_save(trainer, directory / "last.ckpt")
        while self.keep_last is not None and len(self.saved) > self.keep_last:
            old = self.saved.pop(0)
            if trainer.is_global_zero and os.path.exists(old):
                os.remove(old)

    @staticmethod
    def _atomic_save(trainer, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # loops, callbacks and data position too
        if trainer.is_global_zero:
            os.replace(tmp, path)

    def state_dict(self) -> dict:
        return {"saved": list(self.saved)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved = list(state_dict["saved"])

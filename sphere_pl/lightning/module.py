"""Sequential editing as a LightningModule: every training step applies one edit batch.

The module wraps the `Editor` core: a step applies a batch, a checkpoint saves and restores the
editor's state (`state.py`). What is measured around the edits lives in the monitors
(`sphere_pl.monitors`), which write through the module's `RunRecord`. Nothing is trained by
gradient descent (there is no optimizer). A checkpoint holds the editor's state and the record's
rows, not the whole model and not the constructor's arguments: the config given on the command
line always decides which model is loaded, and a checkpoint made for another model, other
weights or other edit data is refused.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch

from ..data.records import EditBatch, EditRequest
from ..editing.editor import CheckpointMismatchError, EditFailedError, Editor
from ..editing.methods.base import EditMethod, create_method
from ..editing.patch import Patch, PatchError
from ..filters import DeltaFilter
from ..models import PretrainedModel
from ..placement import is_dispatched
from ..sphere.projection import SphereProjection
from . import state
from .record import RunRecord

# Lightning's advice for gradient training does not apply to an editing run: the model is
# deliberately in eval mode, there is no optimizer and training_step returns nothing.
for _message in (".*module\\(s\\) in eval mode.*", ".*configure_optimizers.*returned `None`.*", ".*training_step.*returned `None`.*"):
    warnings.filterwarnings("ignore", message=_message)

__all__ = ["EditFailedError", "SequentialEditor"]


class SequentialEditor(L.LightningModule):
    """Args:
    model: the model to edit, built (`PretrainedModel`: the CLI builds it from `model.model:`;
        `PretrainedModel.wrap` takes one built elsewhere). None: the embedded SmolLM2-135M-Instruct.
    method: a registered method name ("alphaedit") or an EditMethod (class_path + init_args).
    filters: delta filters applied to every delta after the method's own post-processing, in
        order. None (the default): the SPHERE projection as the paper sets it for the method
        (η = 0.5; α 0.5 on AlphaEdit, 0.8 on the others); [] for none.
    history_size: batch patches kept in checkpoints, so `sphere-pl rollback` can undo that many.
    scoring_batch_size: prompts per scoring forward pass.
    write_cases: write every evaluation's per-case rows (NLLs, probabilities, decisions per
        prompt) under `<run directory>/cases/`.

    Which facts are scored when is `FactMonitor`'s (the CLI's `facts:` section).
    """

    def __init__(
        self,
        model: PretrainedModel | None = None,
        method: EditMethod | str = "alphaedit",  # the class first: jsonargparse then keeps its refusal as the cause
        filters: list[DeltaFilter] | None = None,
        history_size: int = 2,
        scoring_batch_size: int = 32,
        write_cases: bool = False,
    ):
        super().__init__()
        pretrained = model if model is not None else PretrainedModel()
        self.load_settings = pretrained.settings()  # checkpoints and patches record how to load it again
        self.save_hyperparameters({**self.load_settings, "history_size": history_size, "scoring_batch_size": scoring_batch_size})
        self.strict_loading = False  # checkpoints keep no module state dict (see on_save_checkpoint)
        method = create_method(method)
        filters = [SphereProjection(0.5, method.sphere_strength)] if filters is None else list(filters)
        self.editor = Editor(pretrained.model, pretrained.tokenizer, method, filters, pretrained.model_id, pretrained.module_templates,
                             history_size, scoring_batch_size)
        # registered as submodules so that Lightning moves them to the run's device
        self.model = pretrained.model
        self.method = self.editor.method
        self.filters = torch.nn.ModuleList(self.editor.filters)
        self.record = RunRecord(self, write_cases)
        self.patch: Patch | None = None  # an exported patch evaluated by validate/test (--patch)

    # ------------------------------------------------------------ what is edited
    @property
    def batches_done(self) -> int:
        return self.editor.batches_done

    @property
    def edits_in_weights(self) -> int:
        return self.editor.edits_applied + (self.patch.num_edits if self.patch is not None else 0)

    def edited_case_ids(self) -> list:
        """The facts whose edits are in the weights: the applied batches' (never a reverted or withheld
        request's), or the evaluated patch's."""
        applied = [case_id for ids in self.editor.case_ids for case_id in ids]
        return applied + (list(self.patch.metadata.get("case_ids", [])) if self.patch is not None else [])

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        """Check every record against the model, then prepare the editor on the unedited weights
        (before Lightning restores a checkpoint)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        requests = list(getattr(datamodule, "edit_requests", [])) if stage == "fit" else []
        if requests:
            self.editor.check_requests(requests + list(datamodule.holdout_requests))
        if self._trainer is not None:  # Lightning moves the module only after setup(): C0 and the projectors belong on the GPU
            self.record.attach(self.trainer)
            if not is_dispatched(self.model):  # a dispatched model stays where accelerate placed its blocks
                self.to(self.trainer.strategy.root_device)
        self.editor.prepare()  # validate/test too: a method may evaluate weights derived from the pretrained ones
        if requests:
            self.editor.check_fits(requests)  # e.g. the value search's memory, now that it is measured
        if self.patch is not None:
            self.patch.check_fits(self.editor.model, "apply")
            self.editor.writer.put(self.patch.applied_weights(self.editor.model))

    def configure_optimizers(self):
        return None

    # ---------------------------------------------------------------- editing
    def training_step(self, batch: EditBatch, batch_idx: int):
        if batch.index != self.editor.batches_done:
            raise EditFailedError(
                f"edit batch {batch.index} arrived after {self.editor.batches_done} applied batches: "
                "the edit data or its order differs from the run being resumed"
            )
        try:
            self.editor.apply(batch.requests)
        except EditFailedError as e:
            raise EditFailedError(f"{e} Checkpoints already written are intact.") from e.__cause__
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if hasattr(loader, "mark_completed"):
            loader.mark_completed(batch)
        self.record.record(self.edit_info())
        return None

    def edit_info(self) -> dict[str, float]:
        """How the latest batch's edit went (`edit/value_loss`, ...): its row in the record."""
        return {f"edit/{k}": float(v) for k, v in self.editor.last_info.items()}

    def on_train_start(self) -> None:
        """A resumed run must be given the batches its checkpoint says were applied."""
        batches = getattr(self.trainer.datamodule, "edit_batches", [])[: self.editor.batches_done]
        self.editor.check_stream([[r.case_id for r in batch.requests] for batch in batches])

    # ------------------------------------------------------------- evaluation
    # Lightning runs its validation and test loops only when these exist; `FactMonitor` scores the batches.
    def validation_step(self, batch: list[EditRequest], batch_idx: int):
        return None

    def test_step(self, batch: list[EditRequest], batch_idx: int):
        return None

    def on_validation_start(self) -> None:
        self._check_edits_belong_to_the_data()

    def on_test_start(self) -> None:
        self._check_edits_belong_to_the_data()

    def _check_edits_belong_to_the_data(self) -> None:
        """A checkpoint or patch scored against edit data it was not made from is refused: its edited
        facts must be among the data's edit records, and none of them among the held-out ones."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        edited = self.edited_case_ids()
        if not edited and self._trainer is not None and self.trainer.state.fn == "validate" and self.trainer.is_global_zero:
            print("sphere_pl: validate: no edits are in the weights (give --ckpt_path or --patch): there are no edited facts to score",
                  flush=True)
        if datamodule is None or not edited or not hasattr(datamodule, "edit_requests"):
            return
        unknown = [c for c in edited if c not in {r.case_id for r in datamodule.edit_requests}]
        held_out = [c for c in edited if c in {r.case_id for r in datamodule.holdout_requests}]
        if unknown or held_out:
            which = f"{len(unknown)} of its {len(edited)} edited facts are not among this data's edit records (case_ids {unknown[:5]}" \
                    f"{' ...' if len(unknown) > 5 else ''})" if unknown else f"it edited held-out facts (case_ids {held_out[:5]})"
            raise CheckpointMismatchError(f"the checkpoint or patch was made from other edit data: {which}; give the data config "
                                          "of the run that made it (data.source, dataset_size_limit, num_holdout, seed)")

    # ------------------------------------------------------------ patches
    def apply_patch(self, path: str) -> None:
        """Evaluate a saved edit patch (`sphere-pl export`) without its checkpoint: it is read now
        (a bad file fails before any work) and written into the model in `setup`, after the
        editor is prepared on the unedited weights. It must fit these base weights (checked)."""
        patch = Patch.load(path)
        try:
            patch.check_fits(self.editor.model)
        except PatchError as e:
            raise PatchError(f"{path}: {e}") from None
        self.patch = patch

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {}  # the editor's state below holds the edited weights
        checkpoint.pop("hyper_parameters", None)  # LightningCLI would let these override the config
        state.seal(checkpoint, self.editor.state_dict(), self.load_settings, self.record.history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        section = state.verify(checkpoint, str(self.trainer.ckpt_path) if self._trainer is not None else "the checkpoint")
        self.editor.load_state_dict(section)
        self.record.load_state_dict({"history": section.get("progress_history", [])})
        torch.set_rng_state(section["torch_rng"])
        if section["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(section["cuda_rng"])

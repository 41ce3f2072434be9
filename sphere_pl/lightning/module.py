"""Sequential editing as a LightningModule: every training step applies one edit batch.

The module wraps the `Editor` core: a step applies a batch, a checkpoint saves and restores
the editor's state. What is measured around the edits lives in callbacks (`FactMonitor`,
`GeneralAbilityMonitor`, `HypersphericalEnergyMonitor`, ...), which record through the
module's `RunRecorder`. Nothing is trained by gradient descent (there is no optimizer). A
checkpoint holds the editor's `state_dict()` (edited weights, method state, recent patches) and
the recorder's history, not the whole model and not the constructor's arguments: the config
given on the command line always decides which model is loaded, and a checkpoint made for
another model or other weights is refused.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch

from ..data.records import EditBatch, EditRequest
from ..editing.editor import EditFailedError, Editor
from ..editing.methods.base import EditMethod
from ..editing.patch import Patch
from ..editing.writer import DeltaFilter
from ..models import PretrainedModel
from .recorder import RunRecorder

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
        order (None: the SPHERE projection with the paper's η = 0.5 and the method's α: 0.5 on
        AlphaEdit, 0.8 on the others; [] for none).
    history_size: batch patches kept in checkpoints, so `sphere-pl rollback` can undo that many.
    scoring_batch_size: prompts per scoring forward pass.
    cases_dir: write every evaluation's per-case rows (NLLs, probabilities, decisions per
        prompt) to `<cases_dir>/<population>[-<evaluator>].jsonl` (None: not written).

    Which facts are scored when is `FactMonitor`'s (the CLI's `facts:` section).
    """

    def __init__(
        self,
        model: PretrainedModel | None = None,
        method: str | EditMethod = "alphaedit",
        filters: list[DeltaFilter] | None = None,
        history_size: int = 2,
        scoring_batch_size: int = 32,
        cases_dir: str | None = None,
    ):
        super().__init__()
        pretrained = model if model is not None else PretrainedModel()
        self.load_settings = pretrained.settings()  # checkpoints and patches record how to load it again
        self.save_hyperparameters({**self.load_settings, "history_size": history_size, "scoring_batch_size": scoring_batch_size, "cases_dir": cases_dir})
        self.strict_loading = False  # checkpoints keep no module state dict (see on_save_checkpoint)
        self.editor = Editor(pretrained.model, pretrained.tokenizer, method, filters, pretrained.model_id, pretrained.module_templates,
                             history_size, scoring_batch_size)
        # registered as submodules so that Lightning moves them to the run's device
        self.model = pretrained.model
        self.method = self.editor.method
        self.filters = torch.nn.ModuleList(self.editor.filters)
        self.recorder = RunRecorder(self.editor, cases_dir)
        self.pending_patch: Patch | None = None

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        """Check every record against the model, then prepare the editor on the unedited weights
        (before Lightning restores a checkpoint)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        requests = list(getattr(datamodule, "edit_requests", [])) if stage == "fit" else []
        if requests:
            self.editor.check_requests(requests + list(datamodule.holdout_requests))
        if self._trainer is not None:  # Lightning moves the module only after setup(): C0 and the projectors belong on the GPU
            self.recorder.attach(self.trainer)
            self.to(self.trainer.strategy.root_device)
        self.editor.prepare()  # validate/test too: a method may evaluate weights derived from the pretrained ones
        if requests:
            self.editor.check_fits(requests)  # e.g. the value search's memory, now that it is measured
        if self.pending_patch is not None:
            self.pending_patch.apply_to(self.editor.model)
            self.pending_patch = None

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
        self.log("edits", float(self.editor.edits_applied), on_step=True, prog_bar=True)
        self.log_dict({f"edit/{k}": float(v) for k, v in self.editor.last_info.items()}, on_step=True)
        return None

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

    # ------------------------------------------------------------ patches
    def apply_patch(self, path: str) -> None:
        """Evaluate a saved edit patch (`sphere-pl export`) without its checkpoint: it is read now
        (a bad file fails before any work) and written into the model in `setup`, after the
        editor is prepared on the unedited weights. It must fit these base weights (checked)."""
        self.pending_patch = Patch.load(path)
        self.pending_patch.check_fits(self.editor.model)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {}  # the editor's state below holds the edited weights
        checkpoint.pop("hyper_parameters", None)  # LightningCLI would let these override the config
        checkpoint["sphere_pl"] = {
            **self.editor.state_dict(),
            "load": dict(self.load_settings),
            "progress_history": self.recorder.state_dict()["history"],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("sphere_pl")
        if state is None:
            raise ValueError("not a sphere_pl checkpoint: it has no 'sphere_pl' section")
        self.editor.load_state_dict(state)
        self.recorder.load_state_dict({"history": state.get("progress_history", [])})
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

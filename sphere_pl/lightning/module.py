"""Sequential editing as a LightningModule: every training step applies one edit batch.

The module wraps the `Editor` core and adds what Lightning is for: the loop over edit
batches, periodic evaluation, logging and checkpoints. Nothing is trained by gradient
descent (there is no optimizer). A checkpoint holds the editor's `state_dict()` (edited
weights, method state, recent patches), not the whole model and not the constructor's
arguments: the config given on the command line always decides which model is loaded,
and a checkpoint made for another model or other weights is refused.
"""

from __future__ import annotations

import random
import warnings

import lightning as L
import torch

from ..data.records import EditBatch, EditRequest
from ..editing.editor import EditFailedError, Editor
from ..editing.methods.base import EditMethod
from ..editing.writer import DeltaFilter
from ..evaluation.counterfact import CounterFactEvaluator
from ..models import EMBEDDED_MODEL, load_model_and_tokenizer


# Lightning's advice for gradient training does not apply to an editing run: the model is
# deliberately in eval mode, there is no optimizer and training_step returns nothing.
for _message in (".*module\\(s\\) in eval mode.*", ".*configure_optimizers.*returned `None`.*", ".*training_step.*returned `None`.*"):
    warnings.filterwarnings("ignore", message=_message)

__all__ = ["EditFailedError", "SequentialEditor"]


class SequentialEditor(L.LightningModule):
    """Args:
    model_name_or_path: Hugging Face hub name or local path; None: the embedded SmolLM2-135M-Instruct.
    gguf_file: GGUF file inside `model_name_or_path`, if the weights are in that format.
    dtype: float32, bfloat16, float16 or float64.
    trust_remote_code: let transformers run the model repository's own code (off unless set).
    module_templates: override module names ({} = layer index): down_proj, layer, layers, final_norm, lm_head.
    method: a registered method name ("alphaedit") or an EditMethod (class_path + init_args).
    filters: delta filters applied to every delta after the method's own post-processing, in
        order (None: the SPHERE projection with the paper's η = 0.5 and the method's α: 0.5 on
        AlphaEdit, 0.8 on the others; [] for none).
    history_size: batch patches kept in checkpoints, so `sphere-pl rollback` can undo that many.
    eval_every: evaluate edited and held-out facts every this many edit batches (0: never during fit).
    eval_sample_size: evaluate at most this many of the facts edited so far, a fixed random
        sample (None: all of them).
    eval_seed: seed of that sample.
    scoring_batch_size: prompts per scoring forward pass.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        module_templates: dict[str, str] | None = None,
        method: str | EditMethod = "alphaedit",
        filters: list[DeltaFilter] | None = None,
        history_size: int = 2,
        eval_every: int = 1,
        eval_sample_size: int | None = None,
        eval_seed: int = 0,
        scoring_batch_size: int = 32,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["method", "filters"])  # logged; never restored from checkpoints
        self.strict_loading = False  # checkpoints keep no module state dict (see on_save_checkpoint)
        model, tokenizer = load_model_and_tokenizer(model_name_or_path, dtype, gguf_file, trust_remote_code)
        model_id = (model_name_or_path or EMBEDDED_MODEL) + (f"/{gguf_file}" if gguf_file else "")
        self.load_settings = {
            "model_name_or_path": model_name_or_path,
            "gguf_file": gguf_file,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            "module_templates": module_templates,
        }
        self.editor = Editor(model, tokenizer, method, filters, model_id, module_templates, history_size, scoring_batch_size)
        # registered as submodules so that Lightning moves them to the run's device
        self.model = model
        self.method = self.editor.method
        self.filters = torch.nn.ModuleList(self.editor.filters)
        self.eval_every = eval_every
        self.eval_sample_size = eval_sample_size
        self.eval_seed = eval_seed
        self.final_eval = CounterFactEvaluator("", scoring_batch_size)
        self.progress_history: list[dict[str, float]] = []
        self.edited_requests: list[EditRequest] = []

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        """Check every record against the model, then prepare the editor on the unedited weights
        (before Lightning restores a checkpoint)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and stage == "fit":
            self.editor.check_requests(list(datamodule.edit_requests) + list(datamodule.holdout_requests))
        self.editor.prepare()  # validate/test too: a method may evaluate weights derived from the pretrained ones

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
        self.edited_requests.extend(batch.requests)
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if hasattr(loader, "mark_completed"):
            loader.mark_completed(batch)
        self.log("edits", float(self.editor.edits_applied), on_step=True, prog_bar=True)
        self.log_dict({f"edit/{k}": float(v) for k, v in self.editor.last_info.items()}, on_step=True)
        return None

    def on_train_start(self) -> None:
        # After a resume the edited facts are the batches the checkpoint says were applied.
        if self.editor.batches_done and not self.edited_requests:
            batches = self.trainer.train_dataloader.batches[: self.editor.batches_done]
            for batch, saved_ids in zip(batches, self.editor.case_ids):
                ids = [r.case_id for r in batch.requests]
                if ids != saved_ids:
                    raise ValueError(
                        f"the checkpoint is from another run: its edit batch {batch.index} held case_ids {saved_ids}, "
                        f"this run's data puts {ids} there (different data, order, seed or num_edits)"
                    )
                self.edited_requests.extend(batch.requests)

    def on_train_batch_end(self, outputs, batch: EditBatch, batch_idx: int) -> None:
        if self.eval_every and self.editor.batches_done % self.eval_every == 0:
            with self.editor.timer("evaluation"):
                self.log_progress(self.evaluate_progress())

    def log_progress(self, values: dict[str, float]) -> None:
        """Send metrics measured after some edit batches straight to the loggers, with `edits`.

        `self.log` would re-send a value on every later step of the (single) epoch when it is
        not logged again, so metrics taken every n batches would reappear, stale. Each row
        is also kept in `progress_history` (checkpointed) for the end-of-run summary.
        """
        row = {**values, "edits": float(self.editor.edits_applied)}
        step = self.editor.batches_done - 1
        if self.progress_history and self.progress_history[-1].get("step") == step:
            self.progress_history[-1].update(row)
        else:
            self.progress_history.append({"step": step, **row})
        for logger in self.loggers:
            logger.log_metrics(row, step=step)

    def evaluate_progress(self) -> dict[str, float]:
        """Metrics on (a fixed sample of) the facts edited so far and on never-edited facts."""
        values = self.editor.evaluate(self._edited_sample(), prefix="edited/")
        holdout = getattr(self.trainer.datamodule, "holdout_requests", []) if self._trainer is not None else []
        if holdout:
            values.update(self.editor.evaluate(holdout, prefix="holdout/"))
        return values

    def _edited_sample(self) -> list[EditRequest]:
        """A fixed random sample: each fact gets a seeded priority; the k lowest among the edited are kept."""
        if self.eval_sample_size is None or len(self.edited_requests) <= self.eval_sample_size:
            return self.edited_requests

        def priority(request: EditRequest) -> float:
            return random.Random(f"{self.eval_seed}:{request.case_id}").random()

        return sorted(self.edited_requests, key=priority)[: self.eval_sample_size]

    # ------------------------------------------------------------- evaluation
    def validation_step(self, batch: list[EditRequest], batch_idx: int):
        with self.editor.evaluation_weights():
            self.final_eval.update(self.editor.model, self.editor.tokenizer, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_final("final/")

    def test_step(self, batch: list[EditRequest], batch_idx: int):
        with self.editor.evaluation_weights():
            self.final_eval.update(self.editor.model, self.editor.tokenizer, batch)

    def on_test_epoch_end(self) -> None:
        self._log_final("holdout_final/")

    def _log_final(self, prefix: str) -> None:
        values = {prefix + k: float(v) for k, v in self.final_eval.compute().items() if not v.isnan()}
        values["edits"] = float(self.editor.edits_applied)
        self.final_eval.reset()
        self.log_dict(values)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {}  # the editor's state below holds the edited weights
        checkpoint.pop("hyper_parameters", None)  # LightningCLI would let these override the config
        checkpoint["sphere_pl"] = {
            **self.editor.state_dict(),
            "load": dict(self.load_settings),
            "progress_history": [dict(row) for row in self.progress_history],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("sphere_pl")
        if state is None:
            raise ValueError("not a sphere_pl checkpoint: it has no 'sphere_pl' section")
        self.editor.load_state_dict(state)
        self.progress_history = [dict(row) for row in state.get("progress_history", [])]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

"""Sequential editing as a LightningModule: every training step applies one edit batch.

Nothing here is trained by gradient descent from Lightning's point of view (there is no
optimizer): `training_step` hands the batch to the editing method, whose deltas reach the
weights only through the `WeightWriter` (projection hook + finiteness check). A batch is
applied whole or not at all. Checkpoints hold the edited layers' weights and the method
state, not the whole model.
"""

from __future__ import annotations

import logging
import random
import warnings

import lightning as L
import torch

from .methods.alphaedit import AlphaEdit
from .methods.base import EditContext, EditMethod, WeightWriter
from .metrics import CounterFactEvaluator
from .models import EMBEDDED_MODEL, linear_weight, load_model_and_tokenizer, resolve_templates, set_linear_weight
from .projection import SphereProjection
from .requests import EditBatch, EditRequest

log = logging.getLogger(__name__)

# Lightning's advice for gradient training does not apply to an editing run: the model is
# deliberately in eval mode, there is no optimizer and training_step returns nothing.
for _message in (".*module\\(s\\) in eval mode.*", ".*configure_optimizers.*returned `None`.*", ".*training_step.*returned `None`.*"):
    warnings.filterwarnings("ignore", message=_message)


class EditFailedError(RuntimeError):
    """An edit batch could not be applied; the model was rolled back to before it."""


class SequentialEditor(L.LightningModule):
    """Args:
    model_name_or_path: Hugging Face hub name or local path; None: the embedded SmolLM2-135M-Instruct.
    gguf_file: GGUF file inside `model_name_or_path`, if the weights are in that format.
    dtype: float32, bfloat16, float16 or float64.
    module_templates: override module names ({} = layer index): down_proj, layer, layers, final_norm, lm_head.
    method: the editing method (None: AlphaEdit with the paper's hyper-parameters).
    projection: the SPHERE projection applied to every delta (None: the paper's η=0.5, α=0.5;
        cumulative_ratio 0 disables it).
    eval_every: evaluate edited and held-out facts every this many edit batches (0: never during fit).
    eval_sample_size: evaluate at most this many of the facts edited so far, a fixed random
        sample (None: all of them).
    eval_seed: seed of that sample.
    eval_batch_size: prompts per scoring forward pass.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        module_templates: dict[str, str] | None = None,
        method: EditMethod | None = None,
        projection: SphereProjection | None = None,
        eval_every: int = 1,
        eval_sample_size: int | None = None,
        eval_seed: int = 0,
        eval_batch_size: int = 32,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["method", "projection"])
        self.strict_loading = False  # checkpoints hold only the edited weights
        self.model, self.tokenizer = load_model_and_tokenizer(model_name_or_path, dtype, gguf_file)
        self.model.requires_grad_(False)
        self.templates = resolve_templates(self.model, module_templates)
        self.model_id = model_name_or_path or EMBEDDED_MODEL
        if gguf_file:
            self.model_id += f"/{gguf_file}"
        self.method = method if method is not None else AlphaEdit()
        self.projection = projection if projection is not None else SphereProjection()
        self.edited_modules = self.method.edited_modules(self.templates)
        self.eval_every = eval_every
        self.eval_sample_size = eval_sample_size
        self.eval_seed = eval_seed
        self.edited_eval = CounterFactEvaluator("edited/", eval_batch_size)
        self.holdout_eval = CounterFactEvaluator("holdout/", eval_batch_size)
        self.final_eval = CounterFactEvaluator("", eval_batch_size)
        self.ctx = EditContext(self.model, self.tokenizer, self.templates, self.model_id)
        self.writer = WeightWriter(self.ctx, [self.projection])
        self.batches_done = 0
        self.edits_applied = 0
        self.edited_requests: list[EditRequest] = []
        self._prepared = False

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        """Statistics and projectors come from the unedited model, before any checkpoint is restored."""
        if stage != "fit" or self._prepared:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        self.model.to(device)
        with self.ctx.timer("setup"):
            self.method.setup(self.ctx)
            self.projection.prepare(self.model, self.edited_modules)
        self._prepared = True

    def configure_optimizers(self):
        return None

    # ---------------------------------------------------------------- editing
    def training_step(self, batch: EditBatch, batch_idx: int):
        if batch.index != self.batches_done:
            raise EditFailedError(
                f"edit batch {batch.index} arrived after {self.batches_done} applied batches: "
                "the edit data or its order differs from the run being resumed"
            )
        snapshot = {name: linear_weight(self.model.get_submodule(name)).detach().clone() for name in self.edited_modules}
        try:
            info = self.method.edit(self.ctx, batch.requests, self.writer)
        except Exception as e:
            for name, weight in snapshot.items():
                set_linear_weight(self.model.get_submodule(name), weight)
            case_ids = [r.case_id for r in batch.requests]
            raise EditFailedError(
                f"edit batch {batch.index} (case_ids {case_ids}) failed: {e}. The model was rolled back to "
                f"before this batch ({self.edits_applied} edits applied); checkpoints already written are intact."
            ) from e
        self.batches_done += 1
        self.edits_applied += len(batch)
        self.edited_requests.extend(batch.requests)
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if hasattr(loader, "mark_completed"):
            loader.mark_completed(batch)
        self.log("edits", float(self.edits_applied), on_step=True, prog_bar=True)
        self.log_dict({f"edit/{k}": float(v) for k, v in info.items()}, on_step=True)
        return None

    def on_train_start(self) -> None:
        # After a resume the edited facts are the batches the checkpoint says were applied.
        if self.batches_done and not self.edited_requests:
            for batch in self.trainer.train_dataloader.batches[: self.batches_done]:
                self.edited_requests.extend(batch.requests)

    def on_train_batch_end(self, outputs, batch: EditBatch, batch_idx: int) -> None:
        if self.eval_every and self.batches_done % self.eval_every == 0:
            with self.ctx.timer("evaluation"):
                self.log_progress(self.evaluate_progress())

    def log_progress(self, values: dict[str, float]) -> None:
        """Send metrics measured after some edit batches straight to the loggers, with `edits`.

        `self.log` would re-send a value on every later step of the (single) epoch when it is
        not logged again, so metrics taken every n batches would reappear, stale.
        """
        row = {**values, "edits": float(self.edits_applied)}
        for logger in self.loggers:
            logger.log_metrics(row, step=self.batches_done - 1)

    def evaluate_progress(self) -> dict[str, float]:
        """Metrics on (a fixed sample of) the facts edited so far and on never-edited facts."""
        values = dict(self.edited_eval.evaluate(self.model, self.tokenizer, self._edited_sample()))
        holdout = getattr(self.trainer.datamodule, "holdout_requests", []) if self._trainer is not None else []
        if holdout:
            values.update(self.holdout_eval.evaluate(self.model, self.tokenizer, holdout))
        return {k: float(v) for k, v in values.items() if not (isinstance(v, torch.Tensor) and v.isnan())}

    def _edited_sample(self) -> list[EditRequest]:
        """A fixed random sample: each fact gets a seeded priority; the k lowest among the edited are kept."""
        if self.eval_sample_size is None or len(self.edited_requests) <= self.eval_sample_size:
            return self.edited_requests
        def priority(request: EditRequest) -> float:
            return random.Random(f"{self.eval_seed}:{request.case_id}").random()

        return sorted(self.edited_requests, key=priority)[: self.eval_sample_size]

    # ------------------------------------------------------------- evaluation
    def validation_step(self, batch: list[EditRequest], batch_idx: int):
        self.final_eval.update(self.model, self.tokenizer, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_final("final/")

    def test_step(self, batch: list[EditRequest], batch_idx: int):
        self.final_eval.update(self.model, self.tokenizer, batch)

    def on_test_epoch_end(self) -> None:
        self._log_final("holdout_final/")

    def _log_final(self, prefix: str) -> None:
        values = {prefix + k: float(v) for k, v in self.final_eval.compute().items() if not v.isnan()}
        values["edits"] = float(self.edits_applied)
        self.final_eval.reset()
        self.log_dict(values)

    # ------------------------------------------------------------ checkpoints
    def _kept_keys(self) -> list[str]:
        """State dict keys a checkpoint needs: edited weights, method and projection state."""
        edited = {f"model.{name}.weight" for name in self.edited_modules}
        return [k for k in self.state_dict() if k in edited or k.startswith(("method.", "projection."))]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kept = set(self._kept_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in kept}
        checkpoint["sphere_pl"] = {
            "batches_done": self.batches_done,
            "edits_applied": self.edits_applied,
            "edited_modules": self.edited_modules,
            "model_id": self.model_id,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("sphere_pl")
        if state is None:
            raise ValueError("not a sphere_pl checkpoint: it has no 'sphere_pl' section")
        if state["edited_modules"] != self.edited_modules:
            raise ValueError(f"checkpoint edits {state['edited_modules']}, this run edits {self.edited_modules}")
        if state["model_id"] != self.model_id:
            raise ValueError(f"checkpoint was made for model {state['model_id']!r}, this run loads {self.model_id!r}")
        missing = [k for k in self._kept_keys() if k not in checkpoint["state_dict"]]
        if missing:
            raise ValueError(f"checkpoint lacks {missing}")
        self.batches_done = state["batches_done"]
        self.edits_applied = state["edits_applied"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

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
from ..editing.editor import CheckpointMismatchError, EditFailedError, Editor
from ..editing.patch import Patch
from ..editing.methods.base import EditMethod
from ..editing.writer import DeltaFilter
from ..evaluation import protocol
from ..evaluation.base import CaseWriter, Evaluator
from ..evaluation.facts import FactEvaluator
from ..models import EMBEDDED_MODEL, load_model_and_tokenizer, prepare_tokenizer


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
    eval_every: evaluate the facts edited so far and held-out facts every this many edit
        batches (0: never during fit). Metric names say population and moment
        (`sphere_pl.evaluation.protocol`).
    eval_sample_size: evaluate at most this many of the facts edited so far, a fixed random
        sample (None: all of them).
    eval_seed: seed of that sample.
    eval_last_batch: also evaluate the batch just edited, right after its edit (`last_batch/`).
    eval_before_editing: evaluate the facts to be edited before the first edit (`pre_edit/to_edit/`).
    scoring_batch_size: prompts per scoring forward pass.
    cases_dir: write every evaluation's per-case rows (NLLs, probabilities, decisions per
        prompt) to `<cases_dir>/<population>[-<evaluator>].jsonl` (None: not written).
    evaluators: more evaluators of edit facts (e.g. `GenerativeEfficacyEvaluator`,
        `GenerationQualityEvaluator`), run wherever facts are evaluated except `last_batch/`:
        before editing, every `eval_every` batches on the sample, and at the end.
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
        eval_last_batch: bool = True,
        eval_before_editing: bool = True,
        scoring_batch_size: int = 32,
        cases_dir: str | None = None,
        evaluators: list[Evaluator] | None = None,
        *,
        _model_and_tokenizer: tuple | None = None,  # see `from_model`; the leading underscore keeps it out of the CLI
    ):
        super().__init__()
        # logged; never restored from checkpoints
        self.save_hyperparameters(ignore=["method", "filters", "evaluators", "_model_and_tokenizer"])
        self.strict_loading = False  # checkpoints keep no module state dict (see on_save_checkpoint)
        if _model_and_tokenizer is None:
            model, tokenizer = load_model_and_tokenizer(model_name_or_path, dtype, gguf_file, trust_remote_code)
        else:
            model, tokenizer = _model_and_tokenizer[0], prepare_tokenizer(_model_and_tokenizer[1])
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
        self.eval_last_batch = eval_last_batch
        self.eval_before_editing = eval_before_editing
        self.cases = CaseWriter(cases_dir) if cases_dir else None
        self.evaluators = list(evaluators or [])
        self.final_evals: list[Evaluator] = [FactEvaluator("", scoring_batch_size), *self.evaluators]
        self.final_rows: dict[str, list[dict]] = {}
        self.pending_patch: Patch | None = None
        self.final_evaluated = False
        self.progress_history: list[dict[str, float]] = []
        self.edited_requests: list[EditRequest] = []

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, **kwargs) -> "SequentialEditor":
        """An editor over a model and tokenizer that are already built (on a GPU from a config, shared
        by several runs, ...) instead of loaded from `model_name_or_path`. Pass the settings that say
        what the model is all the same (`model_name_or_path`, `dtype`): checkpoints and patches record them."""
        return cls(**kwargs, _model_and_tokenizer=(model, tokenizer))

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        """Check every record against the model, then prepare the editor on the unedited weights
        (before Lightning restores a checkpoint)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and stage == "fit":
            self.editor.check_requests(list(datamodule.edit_requests) + list(datamodule.holdout_requests))
        if self._trainer is not None:  # Lightning moves the module only after setup(): C0 and the projectors belong on the GPU
            self.to(self.trainer.strategy.root_device)
        self.editor.prepare()  # validate/test too: a method may evaluate weights derived from the pretrained ones
        if datamodule is not None and stage == "fit":
            self.editor.check_fits(datamodule.edit_requests)  # e.g. the value search's memory, now that it is measured
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
                    raise CheckpointMismatchError(
                        f"the checkpoint is from another run: its edit batch {batch.index} held case_ids {saved_ids}, "
                        f"this run's data puts {ids} there (different data, order, seed or num_edits)"
                    )
                self.edited_requests.extend(batch.requests)

    def on_fit_start(self) -> None:
        if self.eval_before_editing and self.editor.batches_done == 0 and self._trainer is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
            to_edit = list(getattr(datamodule, "edit_requests", []))
            if to_edit:
                with self.editor.timer("evaluation"):
                    values = self._evaluate(self._sample(to_edit), protocol.PRE_EDIT, "pre_edit", extras=True)
                self.log_pre_edit(values)

    def log_pre_edit(self, values: dict[str, float]) -> None:
        """Like `log_progress`, for values measured before the first edit (history step -1, 0 edits)."""
        row = {**values, "edits": 0.0}
        if self.progress_history and self.progress_history[0].get("step") == -1:
            self.progress_history[0].update(row)
        else:
            self.progress_history.insert(0, {"step": -1, **row})
        for logger in self.loggers:
            logger.log_metrics(row, step=0)

    def on_train_batch_end(self, outputs, batch: EditBatch, batch_idx: int) -> None:
        values = {}
        with self.editor.timer("evaluation"):
            if self.eval_last_batch:
                values.update(self._evaluate(batch.requests, protocol.LAST_BATCH, "after_batch"))
            if self.eval_every and self.editor.batches_done % self.eval_every == 0:
                values.update(self.evaluate_progress())
        if values:
            self.log_progress(values)

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
        values = self._evaluate(self._sample(self.edited_requests), protocol.EDITED_SO_FAR, "after_batch", extras=True)
        holdout = getattr(self.trainer.datamodule, "holdout_requests", []) if self._trainer is not None else []
        if holdout:
            values.update(self._evaluate(holdout, protocol.NEVER_EDITED, "after_batch"))
        return values

    def _evaluate(self, requests: list[EditRequest], prefix: str, moment: str, extras: bool = False) -> dict[str, float]:
        """Metrics of `requests` under `prefix` (with `extras`: also the extra evaluators'); per-case
        rows go to `cases_dir` when set."""
        values, rows = self.editor.evaluate_cases(requests, prefix=prefix)
        self._write_cases(prefix, "", rows, moment)
        for evaluator in self.evaluators if extras else []:
            with self.editor.evaluation_weights():
                extra, rows = evaluator.evaluate_cases(self.editor.model, self.editor.tokenizer, requests)
            values.update({prefix + k: float(v) for k, v in extra.items() if not torch.isnan(v)})
            self._write_cases(prefix, evaluator.name, rows, moment)
        return values

    def _write_cases(self, prefix: str, evaluator: str, rows: list[dict], moment: str, sharded: bool = False) -> None:
        """Per-case rows to `cases_dir`. Rows of records sharded across DDP processes go to one
        file per process (`...rank<r>.jsonl`); rows every process computes, to rank 0's file only."""
        if self.cases is None:
            return
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if world > 1 and not sharded and rank != 0:
            return
        name = prefix.strip("/").replace("/", "-") + (f"-{evaluator}" if evaluator else "")
        name += f".rank{rank}" if world > 1 and sharded else ""
        self.cases.write(name, rows, moment=moment, edits=self.editor.edits_applied, batches=self.editor.batches_done)

    def _sample(self, requests: list[EditRequest]) -> list[EditRequest]:
        """A fixed random sample: each fact gets a seeded priority and the k lowest are kept, so
        the sample of the facts edited so far only grows, and the pre-edit sample is its final state."""
        if self.eval_sample_size is None or len(requests) <= self.eval_sample_size:
            return requests

        def priority(request: EditRequest) -> float:
            return random.Random(f"{self.eval_seed}:{request.case_id}").random()

        return sorted(requests, key=priority)[: self.eval_sample_size]

    # ------------------------------------------------------------- evaluation
    def validation_step(self, batch: list[EditRequest], batch_idx: int):
        self._final_update(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_final(protocol.FINAL_EDITED)

    def test_step(self, batch: list[EditRequest], batch_idx: int):
        self._final_update(batch)

    def on_test_epoch_end(self) -> None:
        self._log_final(protocol.FINAL_NEVER_EDITED)

    def _final_update(self, batch: list[EditRequest]) -> None:
        with self.editor.evaluation_weights():
            for evaluator in self.final_evals:
                rows = evaluator.update(self.editor.model, self.editor.tokenizer, batch)
                self.final_rows.setdefault(evaluator.name, []).extend(rows)

    def _log_final(self, prefix: str) -> None:
        self.log_dict(self._final_values(prefix))
        self.final_evaluated = True

    def _final_values(self, prefix: str) -> dict[str, float]:
        values = {"edits": float(self.editor.edits_applied)}
        for evaluator in self.final_evals:
            values.update({prefix + k: float(v) for k, v in evaluator.compute().items() if not v.isnan()})
            evaluator.reset()
            name = "" if isinstance(evaluator, FactEvaluator) else evaluator.name
            self._write_cases(prefix, name, self.final_rows.get(evaluator.name, []), "final", sharded=True)
        self.final_rows = {}
        return values

    def evaluate_final(self) -> dict[str, float]:
        """The end-of-fit evaluation of every edited fact, run directly. A run resumed from the
        checkpoint of its last batch has no edits left, and Lightning then skips the loop and the
        validation at its end; `RunSummary` calls this so that such a run still ends evaluated."""
        for batch in self.trainer.datamodule.val_dataloader():
            self._final_update(batch)
        self.final_evaluated = True
        return self._final_values(protocol.FINAL_EDITED)

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

"""`FactMonitor`: the edit facts scored during and after a run, population by population.

Which facts and when (`protocol.py` names the prefixes):

* `pre_edit/to_edit/`: the facts that will be edited (the same sample as below), before the first
  edit, with `never_edited/` at 0 edits;
* `last_batch/`: the batch just edited, right after its edit (its applied requests);
* `edited_so_far/`: the facts edited so far, or a fixed sample of `sample_size`, and
  `never_edited/`: the datamodule's held-out facts, at the evaluation points (`schedule.py`);
* `final/edited/` (end of `fit`, `validate`): every fact whose edit is in the weights (applied, not
  reverted or quarantined; with `--patch`, the patch's), and `final/never_edited/` (`test`): the
  held-out facts, in Lightning's validation and test loops (timed as evaluation).

Which facts are edited is the editor's to say (the outcome of each batch, the case_ids it holds),
and every value goes through the module's `RunRecord`.
"""

from __future__ import annotations

import random

import lightning as L
import torch

from ..data.records import EditRequest
from ..evaluation.base import Evaluator
from ..errors import SettingsError
from ..evaluation.facts import FactEvaluator
from ..lightning.progress import EditProgress
from . import protocol
from .schedule import Schedule


class FactMonitor(L.Callback):
    """Args:
    every_n_batches: score the facts edited so far and the held-out facts every this many edit
        batches (0: never during fit).
    at_edits: instead, score them at these edit counts: after the first batch that brings the
        edits applied to each (e.g. [100, 250, 500, 1000]).
    sample_size: score at most this many of the facts edited so far, a fixed random sample
        (None: all of them). The sample only grows as edits are added.
    seed: seed of that sample.
    last_batch: also score the batch just edited, right after its edit (`last_batch/`).
    before_editing: score the facts to be edited before the first edit (`pre_edit/to_edit/`).
    evaluators: more evaluators of edit facts (e.g. `GenerativeEfficacyEvaluator`,
        `GenerationQualityEvaluator`), run wherever facts are scored except `last_batch/`.
    unedited_baseline: at every evaluation point, also score that point's edited-so-far sample on the
        unedited weights (`pre_edit/edited_so_far/`): the same facts before and after their edits.
    """

    def __init__(
        self,
        every_n_batches: int = 1,
        at_edits: list[int] | None = None,
        sample_size: int | None = None,
        seed: int = 0,
        last_batch: bool = True,
        before_editing: bool = True,
        evaluators: list[Evaluator] | None = None,
        unedited_baseline: bool = False,
    ):
        self.schedule = Schedule(every_n_batches, at_edits, "facts")
        self.unedited_baseline = unedited_baseline
        self.unedited: dict[str, torch.Tensor] = {}  # the edited modules' pretrained weights (unedited_baseline), read at set-up
        if sample_size is not None and sample_size < 1:
            raise SettingsError(f"facts.sample_size must be >= 1 (or null: every fact), got {sample_size}")
        self.sample_size = sample_size
        self.seed = seed
        self.last_batch = last_batch
        self.before_editing = before_editing
        self.evaluators = list(evaluators or [])
        self.final_evaluators: list[Evaluator] = []
        self.final_rows: dict[str, list[dict]] = {}

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.final_evaluators = [FactEvaluator("", pl_module.editor.scoring_batch_size), *self.evaluators]
        editor = pl_module.editor
        if self.unedited_baseline and stage == "fit" and not self.unedited:  # before a checkpoint is restored: the pretrained weights
            self.unedited = {name: w.detach().clone() for name, w in zip(editor.edited_modules, editor.edited_weights().values())}

    def metric_names(self, trainer, pl_module) -> set[str]:
        datamodule = trainer.datamodule
        records = list(getattr(datamodule, "edit_requests", [])) + list(getattr(datamodule, "holdout_requests", []))
        facts = FactEvaluator("").metric_names({r.benchmark for r in records})
        extras = [name for evaluator in self.evaluators for name in evaluator.metric_names()]
        prefixes = {protocol.PRE_EDIT: self.before_editing, protocol.LAST_BATCH: self.last_batch,
                    protocol.EDITED_SO_FAR: True, protocol.NEVER_EDITED: bool(getattr(datamodule, "holdout_requests", None))}
        prefixes[protocol.EDITED_SO_FAR_UNEDITED] = self.unedited_baseline
        names = {prefix + name for prefix, on in prefixes.items() if on for name in facts}
        sampled = (protocol.PRE_EDIT, protocol.EDITED_SO_FAR) + ((protocol.EDITED_SO_FAR_UNEDITED,) if self.unedited_baseline else ())
        names |= {prefix + name for prefix in sampled for name in extras}
        return names

    def on_fit_start(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        to_edit = list(getattr(datamodule, "edit_requests", []))
        if self.before_editing and pl_module.editor.batches_done == 0 and to_edit:
            with pl_module.editor.timer("evaluation"):
                values = self.score(pl_module, self.sample(to_edit), protocol.PRE_EDIT, "pre_edit", extras=True)
                holdout = getattr(datamodule, "holdout_requests", [])
                if holdout:  # the never-edited facts' starting point, for their curve and a collapse rule
                    values.update(self.score(pl_module, holdout, protocol.NEVER_EDITED, "pre_edit"))
            pl_module.record.record(values)

    # ----------------------------------------------------------- during fit
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        editor = pl_module.editor
        values = {}
        with editor.timer("evaluation"):
            applied = set(editor.outcome.applied)  # none of a reverted batch, not a quarantined request
            requests = [r for r in batch.requests if r.case_id in applied]
            if self.last_batch and requests:
                values.update(self.score(pl_module, requests, protocol.LAST_BATCH, "after_batch"))
            if self.schedule.due_after(editor):
                values.update(self.evaluate_progress(trainer, pl_module))
        pl_module.record.record(values)

    def evaluate_progress(self, trainer, pl_module) -> dict[str, float]:
        """Metrics on (a fixed sample of) the facts edited so far and on the never-edited facts."""
        applied = set(pl_module.edited_case_ids())
        edited = [r for r in trainer.datamodule.edited_requests(pl_module.editor.batches_done) if r.case_id in applied]
        sample = self.sample(edited)
        values = self.score(pl_module, sample, protocol.EDITED_SO_FAR, "after_batch", extras=True)
        if self.unedited_baseline:
            values.update(self.score_unedited(pl_module, sample))
        holdout = getattr(trainer.datamodule, "holdout_requests", [])
        if holdout:
            values.update(self.score(pl_module, holdout, protocol.NEVER_EDITED, "after_batch"))
        return values

    def score(self, pl_module, requests: list[EditRequest], prefix: str, moment: str, extras: bool = False) -> dict[str, float]:
        """Metrics of `requests` under `prefix` (with `extras`: also the extra evaluators'); per-case
        rows go to the record."""
        editor, record = pl_module.editor, pl_module.record
        values, rows = editor.evaluate_cases(requests, prefix=prefix)
        record.write_cases(prefix, "", rows, moment)
        for evaluator in self.evaluators if extras else []:
            with editor.evaluation_weights():
                extra, rows = evaluator.evaluate_cases(editor.model, editor.tokenizer, requests)
            values.update({prefix + k: float(v) for k, v in extra.items() if not torch.isnan(v)})
            record.write_cases(prefix, evaluator.name, rows, moment)
        return values

    def score_unedited(self, pl_module, requests: list[EditRequest]) -> dict[str, float]:
        """`requests` scored by every fact evaluator on the pretrained weights, put in place for the duration
        (exactly the weights back afterwards): the paired baseline of the edited-so-far sample."""
        editor, prefix = pl_module.editor, protocol.EDITED_SO_FAR_UNEDITED
        values = {}
        with editor.writer.temporarily(self.unedited):
            for evaluator in [FactEvaluator("", editor.scoring_batch_size), *self.evaluators]:
                scores, rows = evaluator.evaluate_cases(editor.model, editor.tokenizer, requests)
                values.update({prefix + k: float(v) for k, v in scores.items() if not torch.isnan(v)})
                pl_module.record.write_cases(prefix, "" if isinstance(evaluator, FactEvaluator) else evaluator.name, rows, "after_batch")
        return values

    def sample(self, requests: list[EditRequest]) -> list[EditRequest]:
        """A fixed random sample: each fact gets a seeded priority and the k lowest are kept, so
        the sample of the facts edited so far only grows, and the pre-edit sample is its final state."""
        if self.sample_size is None or len(requests) <= self.sample_size:
            return requests

        def priority(request: EditRequest) -> float:
            return random.Random(f"{self.seed}:{request.case_id}").random()

        return sorted(requests, key=priority)[: self.sample_size]

    # ----------------------------------------------------- after the edits
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._score_final_batch(pl_module, self._in_the_weights(pl_module, batch))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._score_final_batch(pl_module, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.record.record_final(pl_module, self._final_values(pl_module, protocol.FINAL_EDITED))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        pl_module.record.record_final(pl_module, self._final_values(pl_module, protocol.FINAL_NEVER_EDITED))

    def on_fit_end(self, trainer, pl_module) -> None:
        """The end-of-fit scoring of every edited fact, run directly where Lightning skipped its loop: a run
        resumed from the checkpoint of its last batch has no edits left, and Lightning then runs no validation."""
        scored = any(k.startswith(protocol.FINAL_EDITED) for k in pl_module.record.final)
        if scored or trainer.limit_val_batches == 0 or not pl_module.editor.batches_done:
            return
        batches = [b for b in (self._in_the_weights(pl_module, b) for b in trainer.datamodule.val_dataloader()) if b]
        progress = trainer.progress_bar_callback  # says where this scoring is, as it does inside a loop
        if isinstance(progress, EditProgress):
            progress.begin_scoring(len(batches))
        with pl_module.editor.timer("evaluation"):
            for batch in batches:
                self._score_final_batch(pl_module, batch)
                if isinstance(progress, EditProgress):
                    progress.batch_scored(trainer, "edited")
            values = self._final_values(pl_module, protocol.FINAL_EDITED)
        pl_module.record.record_final_outside_a_loop(values)

    @staticmethod
    def _in_the_weights(pl_module, batch: list[EditRequest]) -> list[EditRequest]:
        """The facts of a batch of the edit set whose edits are in the weights: `final/edited/` scores these
        only (a run stopped early, a reverted batch or a quarantined request leaves the others unedited)."""
        edited = set(pl_module.edited_case_ids())
        return [r for r in batch if r.case_id in edited]

    def _score_final_batch(self, pl_module, batch: list[EditRequest]) -> None:
        if not batch:
            return
        editor = pl_module.editor
        with editor.timer("evaluation"), editor.evaluation_weights():
            for evaluator in self.final_evaluators:
                rows = evaluator.update(editor.model, editor.tokenizer, batch)
                self.final_rows.setdefault(evaluator.name, []).extend(rows)

    def _final_values(self, pl_module, prefix: str) -> dict[str, float]:
        values = {}
        for evaluator in self.final_evaluators:
            values.update({prefix + k: float(v) for k, v in evaluator.compute().items() if not v.isnan()})
            evaluator.reset()
            name = "" if isinstance(evaluator, FactEvaluator) else evaluator.name
            pl_module.record.write_cases(prefix, name, self.final_rows.get(evaluator.name, []), "final", sharded=True)
        self.final_rows = {}
        return values

"""Canaries: cheap signals measured before editing and after every batch, so a collapse is located
to the batch where it starts (the fuller evaluations run only at their evaluation points).

* `PerplexityCanary` (`canary/perplexity`): perplexity of a few fixed windows of a text file.
* `SpecificityCanary` (`canary/specificity`): the first `records` never-edited (held-out) facts,
  their neighborhood prompts only (CounterFact; ZsRE facts: their specificity token accuracy).

Each is recorded as its own series; the collapse guard reads the same measurements (taken once
per state of the weights) to judge a batch, and `CollapseStop` or a study's rule can read them.
"""

from __future__ import annotations

import lightning as L
import torch

from ..errors import SettingsError
from ..evaluation.counterfact import CounterFactScore
from ..evaluation.general.perplexity import PerplexityTask, window_nll
from ..evaluation.scoring import compare_targets
from . import protocol
from .cache import PerWeights
from .schedule import Schedule
from ..placement import input_device

PERPLEXITY, SPECIFICITY = protocol.CANARY + "perplexity", protocol.CANARY + "specificity"


class _Canary(L.Callback):
    """What both canaries share: on when configured, measured before editing and every `every_n_batches`."""

    metric = ""

    def __init__(self, every_n_batches: int, where: str):
        self.schedule = Schedule(every_n_batches, None, where)
        self._cache = PerWeights()

    @property
    def enabled(self) -> bool:
        raise NotImplementedError

    def _measure(self, trainer, pl_module) -> float:
        raise NotImplementedError

    def measure(self, trainer, pl_module) -> float:
        """The signal for the model as it is now (its evaluated weights)."""
        editor = pl_module.editor
        with editor.timer("canary"):
            return self._cache.get(editor, lambda: self._measure(trainer, pl_module))

    def metric_names(self, trainer, pl_module) -> set[str]:
        return {self.metric} if self.enabled else set()

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.enabled and pl_module.editor.batches_done == 0:
            pl_module.record.record({self.metric: self.measure(trainer, pl_module)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.enabled and self.schedule.due_after(pl_module.editor):
            pl_module.record.record({self.metric: self.measure(trainer, pl_module)})


class PerplexityCanary(_Canary):
    """Args:
    path: a plain-text file (e.g. WikiText-2's test split); None: off.
    windows: how many windows of `seq_len` tokens, the first ones of the file.
    seq_len: tokens per window.
    every_n_batches: record after every this many applied batches.
    """

    metric = PERPLEXITY

    def __init__(self, path: str | None = None, windows: int = 2, seq_len: int = 256, every_n_batches: int = 1):
        super().__init__(every_n_batches, "canary_perplexity")
        for name, value, least in (("windows", windows, 1), ("seq_len", seq_len, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise SettingsError(f"canary_perplexity.{name} must be an integer >= {least}, got {value!r}")
        self.path, self.windows, self.seq_len = path, windows, seq_len
        self._tokens: list[list[int]] | None = None

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.enabled and self._tokens is None:  # read now: a bad file stops the run before the first edit
            self._tokens = PerplexityTask(self.path, self.windows, self.seq_len).load(pl_module.editor.tokenizer)

    def _measure(self, trainer, pl_module) -> float:
        editor = pl_module.editor
        with editor.evaluation_weights():
            device = input_device(editor.model)
            sums = window_nll(editor.model, torch.tensor(self._tokens, device=device))
        return float(torch.exp(sums.double().sum() / (len(self._tokens) * (self.seq_len - 1))))


class SpecificityCanary(_Canary):
    """Args:
    records: how many never-edited (held-out) facts, the first ones of `data.num_holdout`; 0: off.
    every_n_batches: record after every this many applied batches.
    """

    metric = SPECIFICITY

    def __init__(self, records: int = 0, every_n_batches: int = 1):
        super().__init__(every_n_batches, "canary_specificity")
        if not isinstance(records, int) or isinstance(records, bool) or records < 0:
            raise SettingsError(f"canary_specificity.records must be an integer >= 0, got {records!r}")
        self.records = records

    @property
    def enabled(self) -> bool:
        return self.records > 0

    def requests(self, trainer) -> list:
        return list(getattr(trainer.datamodule, "holdout_requests", []))[: self.records]

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.enabled and stage == "fit" and len(self.requests(trainer)) < self.records:
            raise SettingsError(f"canary_specificity.records = {self.records}, but the data holds {len(self.requests(trainer))} "
                                "never-edited records (data.num_holdout)")

    def _measure(self, trainer, pl_module) -> float:
        editor, requests = pl_module.editor, self.requests(trainer)
        if not all(r.benchmark == "counterfact" for r in requests):  # ZsRE facts: token accuracy, through the full evaluation
            return editor.evaluate(requests)["specificity_accuracy"]
        # only the neighborhood prompts (the specificity group): a fifth of a full evaluation's prompts
        prompts = [p for r in requests for p in r.neighborhood_prompts]
        new = [r.target_new for r in requests for _ in r.neighborhood_prompts]
        true = [r.neighborhood_true for r in requests for _ in r.neighborhood_prompts]
        with editor.evaluation_weights():
            nll_new, nll_true = compare_targets(editor.model, editor.tokenizer, prompts, new, true, batch_size=editor.scoring_batch_size)
        score = CounterFactScore("true")
        score.update(nll_new.cpu(), nll_true.cpu())
        return float(score.compute())

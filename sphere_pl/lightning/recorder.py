"""`RunRecorder`: the one place where what a run measured is written down.

Every callback that measures something (facts, general ability, HE, the HE analysis) and the
module itself record through the module's recorder, which

* sends each row to every logger, with `edits` (the number of edits applied) and the step;
* keeps the rows measured during `fit` as the run's history (checkpointed with the module, so
  a resumed run's summary covers the whole run);
* writes per-case rows to `<cases_dir>/<population>[-<evaluator>].jsonl`, one file per process
  for records sharded across DDP processes;
* holds the final metrics of the run (`final/...`), which `validate`/`test` return.

The batch position has one home, the editor (`batches_done`); a row's step is derived from it
(the batch just applied, or -1 before the first edit).
"""

from __future__ import annotations

import torch

from ..evaluation.base import CaseWriter


class RunRecorder:
    def __init__(self, editor, cases_dir: str | None = None):
        self.editor = editor
        self.cases = CaseWriter(cases_dir) if cases_dir else None
        self.history: list[dict[str, float]] = []
        self.final: dict[str, float] = {}
        self.trainer = None

    def attach(self, trainer) -> None:
        """The run whose loggers receive the rows (set by the module at set-up)."""
        self.trainer = trainer

    @property
    def loggers(self) -> list:
        return list(self.trainer.loggers) if self.trainer is not None else []

    @property
    def step(self) -> int:
        """The batch just applied (-1 before the first edit): the step every row is logged at."""
        return self.editor.batches_done - 1

    def record(self, values: dict[str, float]) -> None:
        """Values measured now, during `fit`: to the loggers and into the history row of this step.

        Rows go straight to the loggers rather than through `LightningModule.log`, which would re-send
        a value at every later step of the (single) epoch when it is not logged again."""
        if not values:
            return
        row = {**values, "edits": float(self.editor.edits_applied)}
        step = self.step
        if self.history and self.history[-1].get("step") == step:
            self.history[-1].update(row)
        elif step == -1:  # before editing: the first row, whatever was recorded after it on a resume
            self.history.insert(0, {"step": -1, **row})
        else:
            self.history.append({"step": step, **row})
        for logger in self.loggers:
            logger.log_metrics(row, step=max(step, 0))

    def record_final(self, pl_module, values: dict[str, float]) -> None:
        """The metrics of the run's end (`final/...`, with `edits`): through `LightningModule.log_dict`,
        so that `trainer.validate`/`test` return them and callbacks read them."""
        self.final.update({k: v for k, v in values.items() if k != "edits"})
        pl_module.log_dict(values)

    def record_outside_a_loop(self, values: dict[str, float]) -> None:
        """Final metrics measured where Lightning allows no `log` (at the end of `fit`, or after a
        validate/test loop): straight to the loggers, and into `callback_metrics`."""
        self.final.update({k: v for k, v in values.items() if k != "edits"})
        row = {**values, "edits": float(self.editor.edits_applied)}
        for logger in self.loggers:
            logger.log_metrics(row, step=max(self.step, 0))
        if self.trainer is not None:
            self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in row.items()})

    def write_cases(self, population: str, evaluator: str, rows: list[dict], moment: str, sharded: bool = False) -> None:
        """Per-case rows to `cases_dir`. Rows of records sharded across DDP processes go to one
        file per process (`...rank<r>.jsonl`); rows every process computes, to rank 0's file only."""
        if self.cases is None:
            return
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if world > 1 and not sharded and rank != 0:
            return
        name = population.strip("/").replace("/", "-") + (f"-{evaluator}" if evaluator else "")
        name += f".rank{rank}" if world > 1 and sharded else ""
        self.cases.write(name, rows, moment=moment, edits=self.editor.edits_applied, batches=self.editor.batches_done)

    def state_dict(self) -> dict:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(row) for row in state.get("history", [])]

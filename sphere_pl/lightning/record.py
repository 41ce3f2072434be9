"""`RunRecord`: the run directory, every file in it, and every metric row the run measures.

The module owns one record; monitors and the module itself write through it and nowhere else:

* `record(values)`: values measured now, during `fit`, sent to every logger with `edits` (the
  number of edits in the weights) at the step of the batch just applied, and kept as the run's
  history (checkpointed, so a resumed run's summary and files cover the whole run);
* `record_final(...)`: the metrics of the run's end (`final/...`), which `validate`/`test` return;
* `log(values)`: values for the loggers only, as given (the HE analysis' correlations);
* files in the run directory (`trainer.default_root_dir`), each written whole or not at all
  (`sphere_pl.files.atomic_write`): `summary.json`, `metrics.csv`, `he_analysis.json`, plots,
  `quarantine.jsonl`, and with `write_cases` one per-case file per evaluation under `cases/`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from ..files import atomic_write, atomic_write_json, atomic_write_text

SUMMARY, METRICS, HE_ANALYSIS, QUARANTINE, CASES = "summary.json", "metrics.csv", "he_analysis.json", "quarantine.jsonl", "cases"


class RunRecord:
    """Args:
    progress: what the rows are stamped with: an object with `batches_done` and `edits_in_weights`
        (the module).
    write_cases: write every evaluation's per-case rows (NLLs, probabilities, decisions per prompt)
        to `cases/<population>[-<evaluator>]/<moment>-<edits>.jsonl`.
    """

    def __init__(self, progress, write_cases: bool = False):
        self.progress = progress
        self.write_cases_enabled = write_cases
        self.history: list[dict[str, float]] = []
        self.final: dict[str, float] = {}
        self.trainer = None

    # ------------------------------------------------------------------ where
    def attach(self, trainer) -> None:
        """The run whose loggers receive the rows and whose `default_root_dir` holds the files."""
        self.trainer = trainer

    @property
    def directory(self) -> Path:
        return Path(self.trainer.default_root_dir if self.trainer is not None else ".")

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def loggers(self) -> list:
        return list(self.trainer.loggers) if self.trainer is not None else []

    @property
    def step(self) -> int:
        """The batch just applied (-1 before the first edit): the step every row is logged at."""
        return self.progress.batches_done - 1

    @property
    def edits(self) -> float:
        return float(self.progress.edits_in_weights)

    # ------------------------------------------------------------------- rows
    def record(self, values: dict[str, float]) -> None:
        """Values measured now, during `fit`: to the loggers and into the history row of this step.

        Rows go straight to the loggers rather than through `LightningModule.log`, which would re-send
        a value at every later step of the (single) epoch when it is not logged again."""
        if not values:
            return
        row = {**values, "edits": self.edits}
        step = self.step
        if self.history and self.history[-1].get("step") == step:
            self.history[-1].update(row)
        elif step == -1:  # before editing: the first row, whatever was recorded after it on a resume
            self.history.insert(0, {"step": -1, **row})
        else:
            self.history.append({"step": step, **row})
        self.log(row)

    def log(self, values: dict[str, float]) -> None:
        """Values for the loggers only, at this step (not part of the run's history)."""
        if values:
            for logger in self.loggers:
                logger.log_metrics(values, step=max(self.step, 0))

    def record_final(self, pl_module, values: dict[str, float]) -> None:
        """The metrics of the run's end (`final/...`), inside a validation or test loop: through
        `LightningModule.log_dict`, so that `trainer.validate`/`test` return them."""
        self.final.update(values)
        pl_module.log_dict({**values, "edits": self.edits})

    def record_final_outside_a_loop(self, values: dict[str, float]) -> None:
        """Final metrics measured where Lightning allows no `log` (at the end of `fit`, or after a
        validate/test loop): straight to the loggers, and into `callback_metrics`."""
        self.final.update(values)
        row = {**values, "edits": self.edits}
        self.log(row)
        if self.trainer is not None:
            self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in row.items()})

    # ------------------------------------------------------------------ files
    def write_json(self, name: str, value) -> Path:
        return atomic_write_json(self.path(name), value)

    def write_rows_csv(self, name: str, rows: list[dict]) -> Path:
        return write_rows_csv(self.path(name), rows)

    def write_jsonl(self, name: str, rows: list[dict]) -> Path:
        return atomic_write_text(self.path(name), "".join(json.dumps(row, default=_plain) + "\n" for row in rows))

    def write_figure(self, name: str, figure) -> Path:
        """A matplotlib figure as PNG."""
        return atomic_write(self.path(name), lambda tmp: figure.savefig(tmp, format="png", dpi=figure.dpi))

    def write_cases(self, population: str, evaluator: str, rows: list[dict], moment: str, sharded: bool = False) -> Path | None:
        """One evaluation's per-case rows, each with its context (population, moment, edits, batches), as
        `cases/<population>[-<evaluator>]/<moment>-<edits>[.rank<r>].jsonl`: rows of records sharded across
        DDP processes to one file per process, rows every process computes to the first one's only.
        An evaluation repeated after a resume rewrites its file (never duplicates rows)."""
        if not self.write_cases_enabled:
            return None
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if world > 1 and not sharded and rank != 0:
            return None
        folder = population.strip("/").replace("/", "-") + (f"-{evaluator}" if evaluator else "")
        name = f"{moment}-{int(self.edits):06d}" + (f".rank{rank}" if world > 1 and sharded else "")
        context = {"population": population, "moment": moment, "edits": int(self.edits), "batches": self.progress.batches_done}
        return self.write_jsonl(f"{CASES}/{folder}/{name}.jsonl", [{**context, **row} for row in rows])

    # ------------------------------------------------------------- resuming
    def state_dict(self) -> dict:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(row) for row in state.get("history", [])]


def write_rows_csv(path: str | Path, rows: list[dict]) -> Path:
    """Rows as CSV: `step` and `edits` first, then every metric by name."""
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("step", "edits"), k))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def read_rows_csv(path: str | Path) -> list[dict[str, float]]:
    """The rows of a `metrics.csv`, empty cells left out."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)

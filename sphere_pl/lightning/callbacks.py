"""Callbacks: hyperspherical energy of the edited layers, checkpoints after edit batches,
and the end-of-run summary. They read the editor through its public interface
(`pl_module.editor`: `edited_weights()`, `batches_done`, `edits_applied`, `timer`) and
record through the module's `RunRecorder` (`pl_module.recorder`).
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..evaluation import protocol
from ..sphere.hyperspherical import hyperspherical_energy
from .checkpoint_io import SafetensorsCheckpointIO
from .facts import FactMonitor


class HypersphericalEnergyMonitor(L.Callback):
    """Logs, per edited layer and after every `every_n_batches` edit batches, the HE of its
    weight, ΔHE against the pre-edit weight and the relative change (SPEC section 2).

    Collapse under sequential editing coincides with large ΔHE, which is why it is watched live.
    The pre-edit HE is part of the callback's checkpoint state, so a resumed run keeps its baseline.
    HE is that of the weights that are evaluated, so that HE and the metrics describe the same
    weights: where a method evaluates others than the live ones (PRUNE's `restrain: evaluation`),
    the live weights' HE is logged beside it as `he_live/layerN`.
    The definition is configurable: the power `s` (0: logarithmic energy), `reduction` (mean or
    sum over neuron pairs) and `normalize_rows` (False: distances between raw rows, not directions).
    """

    def __init__(
        self, s: float = 1.0, reduction: str = "mean", every_n_batches: int = 1, chunk_size: int = 1024, normalize_rows: bool = True
    ):
        self.s = s
        self.reduction = reduction
        self.normalize_rows = normalize_rows
        self.every_n_batches = every_n_batches
        self.chunk_size = chunk_size
        self.initial: dict[str, float] = {}

    def _energies(self, pl_module) -> dict[str, float]:
        return {
            f"layer{layer}": float(hyperspherical_energy(weight, self.s, self.reduction, self.chunk_size, self.normalize_rows))
            for layer, weight in pl_module.editor.edited_weights().items()
        }

    def _evaluated_and_live(self, pl_module) -> tuple[dict[str, float], dict[str, float] | None]:
        """HE of the evaluated weights, and of the live ones where they differ (else None)."""
        editor = pl_module.editor
        live_weights = {layer: w.detach().clone() for layer, w in editor.edited_weights().items()}
        with editor.evaluation_weights():
            differs = any(not torch.equal(w, live_weights[layer]) for layer, w in editor.edited_weights().items())
            evaluated = self._energies(pl_module)
        return evaluated, (self._energies(pl_module) if differs else None)

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.initial:  # restored from a checkpoint when resuming
            with pl_module.editor.timer("he"):
                self.initial = self._energies(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.editor.batches_done % self.every_n_batches:
            return
        with pl_module.editor.timer("he"):
            energies, live = self._evaluated_and_live(pl_module)
        values = {}
        for layer, he in energies.items():
            he0 = self.initial[layer]
            values[f"he/{layer}"] = he
            values[f"he_delta/{layer}"] = he - he0
            values[f"he_relative/{layer}"] = (he - he0) / abs(he0)
            if live is not None:
                values[f"he_live/{layer}"] = live[layer]
        pl_module.recorder.record(values)

    def state_dict(self) -> dict:
        return {"initial": self.initial}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial = dict(state_dict["initial"])


class EditCheckpoint(L.Callback):
    """Writes `edits-<n>.ckpt` every `every_n_batches` edit batches (and after the last) plus
    `last.ckpt`, keeping the newest `keep_last` numbered ones.

    Files are safetensors (`checkpoint_io.py`), written under a temporary name, fsynced and
    renamed, so an interrupted write never replaces a good checkpoint. (Lightning's
    ModelCheckpoint counts optimizer steps; an editing run has none.)
    """

    def __init__(self, dirpath: str | None = None, every_n_batches: int = 1, keep_last: int | None = 2):
        self.dirpath = dirpath
        self.every_n_batches = every_n_batches
        self.keep_last = keep_last
        self.saved: list[str] = []
        self._lock = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Checkpoints are safetensors files (no pickle on reading): install the CheckpointIO
        unless the trainer was given a custom one. Runs before Lightning restores --ckpt_path.
        A `fit` takes the checkpoint directory for itself (`RunLock`)."""
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafetensorsCheckpointIO()
        if stage == "fit" and trainer.is_global_zero:
            self._lock = RunLock.take(self._dir(trainer))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A stop by SIGTERM (what schedulers send before they kill a job) says how far the run got
        and where it can resume; the CLI then exits non-zero so that the job is requeued. Any
        failure gives the directory back (Lightning calls no teardown after one)."""
        self.teardown(trainer, pl_module, "fit")
        if isinstance(exception, SIGTERMException) and trainer.is_global_zero:
            last = self._dir(trainer) / "last.ckpt"
            total = getattr(trainer.datamodule, "edit_requests", None) if trainer.datamodule is not None else None
            of = f" of {len(total)}" if total is not None else ""
            where = f"its last checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            print(f"sphere_pl: stopped by SIGTERM after {pl_module.editor.edits_applied}{of} edits "
                  f"({pl_module.editor.batches_done} batches); {where}", file=sys.stderr, flush=True)

    def _dir(self, trainer) -> Path:
        return Path(self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = pl_module.editor.batches_done
        if done != batch.index + 1:
            return  # the batch was reverted (CollapseGuard's stop): the last checkpoint holds the state before it
        if done % self.every_n_batches and done != trainer.num_training_batches:
            return
        directory = self._dir(trainer)
        path = directory / f"edits-{pl_module.editor.edits_applied:06d}.ckpt"
        self.saved.append(str(path))  # before saving, so the checkpoint's own list includes itself
        self._atomic_save(trainer, path)
        self._atomic_save(trainer, directory / "last.ckpt")
        while self.keep_last is not None and len(self.saved) > self.keep_last:
            old = self.saved.pop(0)
            if trainer.is_global_zero and os.path.exists(old):
                os.remove(old)

    def _atomic_save(self, trainer, path: Path) -> None:
        """Temp file, fsync, rename, fsync of the directory: a crash leaves either the old file
        or the new one under `path`, never a torn one. A write that fails (a full disk) is one
        error naming the checkpoint to resume from."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # loops, callbacks and data position too
        except OSError as e:
            if trainer.is_global_zero and tmp.exists():
                tmp.unlink()
            good = [p for p in self.saved if p != str(path) and os.path.exists(p)]
            resume = f"resume from {good[-1]} once there is room" if good else "no earlier checkpoint of this run exists: start again once there is room"
            raise CheckpointWriteError(f"could not write checkpoint {path}: {e.strerror or e}; the checkpoints already written are whole: {resume}") from None
        if trainer.is_global_zero:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def state_dict(self) -> dict:
        return {"saved": list(self.saved)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved = list(state_dict["saved"])


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the ones already written are whole."""


class RunDirectoryInUseError(RuntimeError):
    """Another running `fit` writes into the same checkpoint directory."""


class RunLock:
    """An exclusive lock on a checkpoint directory for the life of a `fit`: two runs writing each
    other's checkpoints are refused. An advisory `flock`, which the kernel drops when the process
    ends, so a killed run never leaves it stuck; the file says who holds it."""

    NAME = ".sphere_pl.lock"

    def __init__(self, handle):
        self.handle = handle

    @classmethod
    def take(cls, directory: Path) -> "RunLock":
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / cls.NAME, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirectoryInUseError(
                f"checkpoint directory {directory} is in use by a running fit ({holder}): give this run its own "
                "checkpoint.dirpath and trainer.default_root_dir, or wait for that run to end"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        return cls(handle)

    def release(self) -> None:
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()

    @classmethod
    def held(cls, directory: Path) -> bool:
        """Whether a running `fit` holds `directory` now (probed without taking it for longer than the probe)."""
        path = Path(directory) / cls.NAME
        if not path.exists():
            return False
        with open(path) as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return False


class RunSummary(L.Callback):
    """At the end of `fit`: a console table of the final metrics and the HE change per layer,
    and `summary.json` plus `metrics.csv` (every evaluation row) in the run directory, so
    results can be read without W&B. `dirpath` defaults to the trainer's `default_root_dir`.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        """What is about to be edited, how, and with what memory (in place of Lightning's model table)."""
        print(format_header(pl_module, trainer.datamodule), flush=True)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        directory = Path(self.dirpath or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(protocol.FINAL_EDITED)}
        facts = next((c for c in trainer.callbacks if isinstance(c, FactMonitor)), None)
        if not final and not pl_module.recorder.final and facts is not None and trainer.limit_val_batches != 0 and pl_module.editor.batches_done:
            final = facts.evaluate_final(trainer, pl_module)  # resumed after the last batch: Lightning skipped the validation
            final.pop("edits", None)
        rows = [dict(row) for row in pl_module.recorder.history]
        last = rows[-1] if rows else {}
        he = {
            key.split("/", 1)[1]: {"he": last.get(f"he/{key.split('/', 1)[1]}"), "he_delta": last[key], "he_relative": last.get(f"he_relative/{key.split('/', 1)[1]}")}
            for key in sorted(last)
            if key.startswith("he_delta/")
        }
        editor = pl_module.editor
        summary = {
            "model_id": editor.lm.model_id,
            "edits": editor.edits_applied,
            "batches": editor.batches_done,
            "settings": editor.settings(),
            "final": final,
            "last_evaluation": {k: v for k, v in last.items() if k.startswith(protocol.FACT_PREFIXES)},
            "hyperspherical_energy": he,
            "seconds": {k: round(v, 3) for k, v in editor.timer.seconds.items()},
        }
        (directory / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        write_rows_csv(directory / "metrics.csv", rows)
        print(format_summary(summary, directory))


def write_rows_csv(path: Path, rows: list[dict]) -> None:
    """A run's recorded rows as CSV: `step` and `edits` first, then every metric by name."""
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("step", "edits"), k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def format_header(pl_module, datamodule) -> str:
    """The lines printed when `fit` starts: model, method, filters, edits, C0, memory settings."""
    editor = pl_module.editor
    method = editor.method
    settings = method.settings()
    dtype = str(next(editor.model.parameters()).dtype).removeprefix("torch.")
    lines = [f"sphere_pl fit: {editor.lm.model_id} in {dtype} on {editor.lm.device}"]
    values = settings.get("values")
    how = f"; value search {values['num_grad_steps']} steps, lr {values['lr']}, clamp {values['clamp_norm_factor']}, weight decay {values['weight_decay']}" if values else ""
    lines.append(f"  method   {method.name} on layers {list(method.layers)}{how}")
    filters = ", ".join(f"{f['name']}({', '.join(f'{k} {v}' for k, v in f.items() if k != 'name')})" for f in editor.settings()["filters"]) or "none"
    lines.append(f"  filters  {filters}")
    if datamodule is not None and getattr(datamodule, "edit_requests", None):
        total, size = len(datamodule.edit_requests), datamodule.num_edits
        resumed = f"; resuming after {editor.edits_applied}" if editor.edits_applied else ""
        lines.append(f"  edits    {total} in batches of {size} ({-(-total // size)} batches), {len(datamodule.holdout_requests)} held out{resumed}")
    stats = settings.get("stats")
    if stats:
        source = stats["from_file"] or f"{stats['corpus']}, {stats['num_samples']} x {stats['seq_len']} tokens (cached in {stats['cache_dir']})"
        lines.append(f"  C0       {source}")
    if values:
        budget = getattr(method, "value_budget", None)
        memory = f"within {budget.bytes / 1024**3:.2f} GB ({budget.source})" if budget is not None else "explicit"
        lines.append(f"  memory   value search: requests_per_pass {values['requests_per_pass']}, recompute_activations "
                     f"{values['recompute_activations']}, {memory}; compute {values['compute_dtype']}")
    return "\n".join(lines)


def format_summary(summary: dict, directory: Path) -> str:
    """The console table: final metrics, then HE per edited layer."""
    lines = [f"sphere_pl run summary: {summary['edits']} edits in {summary['batches']} batches on {summary['model_id']}"]
    metrics = summary["final"] or summary["last_evaluation"]
    if metrics:
        width = max(len(k) for k in metrics)
        lines += ["", f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
        lines += [f"{k:<{width}}  {v:6.3f}" for k, v in sorted(metrics.items())]
    if summary["hyperspherical_energy"]:
        lines += ["", f"{'layer':<8}  {'HE':>12}  {'ΔHE':>12}  {'ΔHE/HE':>10}", f"{'-' * 8}  {'-' * 12}  {'-' * 12}  {'-' * 10}"]
        for layer, v in summary["hyperspherical_energy"].items():
            lines.append(f"{layer:<8}  {v['he']:12.6f}  {v['he_delta']:12.4e}  {v['he_relative']:10.3e}")
    lines += ["", f"written: {directory / 'summary.json'}, {directory / 'metrics.csv'}"]
    return "\n".join(lines)


class EditProgressBar(TQDMProgressBar):
    """A progress bar over edits: done/total, seconds per edit, the time left. (Lightning's counts
    batches of an epoch and shows `v_num`; an editing run has one pass and edits of its own.)"""

    @property
    def train_description(self) -> str:
        return "editing"

    @property
    def validation_description(self) -> str:
        return "scoring edited facts"

    @property
    def test_description(self) -> str:
        return "scoring"

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.unit, bar.unit_scale = "edit", False
        return bar

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._count_from_here(trainer, pl_module)  # Lightning skips on_train_epoch_start when it resumes mid-epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self._count_from_here(trainer, pl_module)

    def _count_from_here(self, trainer, pl_module) -> None:
        requests = getattr(trainer.datamodule, "edit_requests", None) if trainer.datamodule is not None else None
        bar, done = self.train_progress_bar, pl_module.editor.edits_applied
        bar.reset(total=len(requests) if requests is not None else None)
        bar.initial = bar.n = done  # a resumed run starts where it was
        bar.set_description(self.train_description)
        self._start, self._done_at_start = time.perf_counter(), done

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        bar.n = pl_module.editor.edits_applied
        done = bar.n - self._done_at_start
        if done:
            bar.set_postfix_str(f"{(time.perf_counter() - self._start) / done:.2f} s/edit", refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train_progress_bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        return {}  # no v_num, no loss: the postfix says seconds per edit

"""`EditCheckpoint`: a checkpoint after edit batches, in a directory that belongs to one run.

Lightning's ModelCheckpoint counts optimizer steps; an editing run has none. This writes
`edits-<n>.ckpt` every `every_n_batches` applied batches (and after the last) plus `last.ckpt`,
keeps the newest `keep_last` numbered ones, and never checkpoints a batch the collapse guard
reverted. A `fit` holds its directory (`RunLock`); a directory that already holds a run is
resumed from one of its checkpoints (`--ckpt_path`) or refused, never mixed with a new run.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..editing.editor import REVERTED
from ..errors import SpherePLError
from .checkpoint_io import SafetensorsCheckpointIO


class CheckpointWriteError(SpherePLError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); the ones already written are whole."""

    hint = "free disk space (or point checkpoint.dirpath elsewhere), then resume with --ckpt_path <that checkpoint>"


class RunDirectoryInUseError(SpherePLError, RuntimeError):
    """Another running `fit` writes into the same checkpoint directory, or the directory holds another run."""

    hint = "two runs must not share checkpoints: give each its own checkpoint.dirpath and trainer.default_root_dir"


class EditCheckpoint(L.Callback):
    """Args:
    dirpath: where checkpoints go (default: `<trainer.default_root_dir>/checkpoints`).
    every_n_batches: write one every this many applied batches (and after the last).
    keep_last: numbered checkpoints kept (None: all).
    """

    def __init__(self, dirpath: str | None = None, every_n_batches: int = 1, keep_last: int | None = 2):
        self.dirpath = dirpath
        self.every_n_batches = every_n_batches
        self.keep_last = keep_last
        self.saved: list[str] = []
        self._lock = None

    def directory(self, trainer) -> Path:
        return Path(self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Checkpoints are safetensors files (no pickle on reading): install the CheckpointIO unless the
        trainer was given a custom one. Runs before Lightning restores --ckpt_path. A `fit` takes the
        checkpoint directory for itself."""
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafetensorsCheckpointIO()
        if stage == "fit" and trainer.is_global_zero:
            self._lock = RunLock.take(self.directory(trainer))

    def on_fit_start(self, trainer, pl_module) -> None:
        check_not_another_run(self.directory(trainer), trainer.ckpt_path)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A stop by SIGTERM (what schedulers send before they kill a job) or Ctrl-C says how far the run
        got and where it resumes; the CLI exits non-zero so that a job is requeued. Any failure gives the
        directory back (Lightning calls no teardown after one)."""
        self.teardown(trainer, pl_module, "fit")
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.is_global_zero:
            last = self.directory(trainer) / "last.ckpt"
            datamodule = trainer.datamodule
            total = f" of {len(datamodule.edit_requests)}" if getattr(datamodule, "edit_requests", None) else ""
            where = (f"its last checkpoint is {last}; resume with --ckpt_path {last}" if last.exists()
                     else "no checkpoint was written yet: start it again")
            why = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
            print(f"sphere_pl: stopped by {why} after {pl_module.editor.edits_applied}{total} edits "
                  f"({pl_module.editor.batches_done} batches); {where}", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        editor = pl_module.editor
        if editor.outcome is not None and editor.outcome.status == REVERTED:
            return  # the collapse guard reverted it: the last checkpoint holds the state before it
        done = editor.batches_done
        if done % self.every_n_batches and done != trainer.num_training_batches:
            return
        directory = self.directory(trainer)
        path = directory / f"edits-{editor.edits_applied:06d}.ckpt"
        self.saved.append(str(path))  # before saving, so the checkpoint's own list includes itself
        self._save(trainer, path)
        self._save(trainer, directory / "last.ckpt")
        while self.keep_last is not None and len(self.saved) > self.keep_last:
            old = self.saved.pop(0)
            if trainer.is_global_zero and os.path.exists(old):
                os.remove(old)

    def _save(self, trainer, path: Path) -> None:
        """Through the trainer's CheckpointIO, which writes whole files (`atomic_write`). A write that
        fails (a full disk) is one error naming the checkpoint to resume from."""
        try:
            trainer.save_checkpoint(path, weights_only=False)  # loops, callbacks and data position too
        except OSError as e:
            good = [p for p in self.saved if p != str(path) and os.path.exists(p)]
            resume = f"resume from {good[-1]} once there is room" if good else "no earlier checkpoint of this run exists: start again once there is room"
            raise CheckpointWriteError(f"could not write checkpoint {path}: {e.strerror or e}; the checkpoints already written are whole: {resume}") from None

    def state_dict(self) -> dict:
        return {"saved": list(self.saved)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved = list(state_dict["saved"])


def check_not_another_run(directory: Path, ckpt_path) -> None:
    """A directory that holds checkpoints is written only by a fit resumed from one of them (or from a
    rolled-back copy beside them); a new run, or another run's resumption, is refused."""
    directory = Path(directory)
    numbered = sorted(directory.glob("edits-*.ckpt"))
    if not numbered and not (directory / "last.ckpt").exists():
        return
    if ckpt_path and Path(ckpt_path).resolve().parent == directory.resolve():
        return
    raise RunDirectoryInUseError(
        f"checkpoint directory {directory} already holds a run ({numbered[-1].name if numbered else 'last.ckpt'})"
        + (f", and --ckpt_path {ckpt_path} is another run's checkpoint" if ckpt_path else "")
        + f": resume that run with --ckpt_path {directory / 'last.ckpt'}, or give this one its own checkpoint.dirpath "
        "and trainer.default_root_dir (or remove that folder)"
    )


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
            handle.close()
            raise cls.in_use(directory) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        return cls(handle)

    @classmethod
    def in_use(cls, directory: Path) -> RunDirectoryInUseError:
        """The refusal of a directory a running fit holds, naming the holder."""
        path = Path(directory) / cls.NAME
        holder = (path.read_text().strip() if path.exists() else "") or "another process"
        return RunDirectoryInUseError(f"checkpoint directory {directory} is in use by a running fit ({holder}): give this run its own "
                                      "checkpoint.dirpath and trainer.default_root_dir, or wait for that run to end")

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

"""The `sphere_pl` section of a checkpoint: its one writer and its one reader.

A checkpoint is Lightning's dict (loops, callback states) plus this section, which holds the
editor's state (edited weights, method state, kept batch patches, case_ids, phase seconds), how
the model was loaded, the run record's rows and the RNG state. `seal` writes the section with
its format version and a SHA-256 checksum of every part of the checkpoint; `verify` (every
reader: resume, validate/test, export, rollback, the study) refuses a file altered after it was
written, naming the part. Version 1 (before checksums) is still read. `rewind_loops` is the one
place that moves Lightning's loop state, for a checkpoint taken back to an earlier batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from ..editing.editor import CheckpointMismatchError
from ..files.checkpoint import CheckpointFormatError, load_checkpoint_file

SECTION = "sphere_pl"
VERSION = 2
_CHECKSUMS = "checksums"


def seal(checkpoint: dict, editor_state: dict, load: dict, history: list[dict]) -> dict:
    """Write the section into `checkpoint` (the rest of it complete), then its checksums."""
    checkpoint[SECTION] = {
        **editor_state,
        "version": VERSION,
        "load": dict(load),
        "progress_history": [dict(row) for row in history],
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    reseal(checkpoint)
    return checkpoint


def reseal(checkpoint: dict) -> None:
    """Checksums again, after a command changed the checkpoint on purpose (rollback)."""
    section = checkpoint[SECTION]
    section.pop(_CHECKSUMS, None)
    section[_CHECKSUMS] = _checksums(checkpoint)


def verify(checkpoint: dict, source: str) -> dict:
    """The section of a loaded checkpoint, checked: a sphere_pl checkpoint, a version this code
    reads, every part as it was written. Returns the section."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(SECTION), dict):
        raise CheckpointFormatError(f"{source} is not a sphere_pl checkpoint: it has no {SECTION!r} section")
    section = checkpoint[SECTION]
    version = section.get("version", 1)
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointFormatError(f"{source} was written by a newer sphere_pl (checkpoint version {version}; this one reads up to {VERSION})")
    if version >= 2:
        written = section.get(_CHECKSUMS)
        if not isinstance(written, dict):
            raise CheckpointFormatError(f"{source} is damaged: its {SECTION} section has lost its checksums")
        actual = _checksums(checkpoint)
        altered = sorted(set(written) ^ set(actual) | {k for k in written.keys() & actual.keys() if written[k] != actual[k]})
        if altered:
            raise CheckpointMismatchError(
                f"{source} was altered after it was written: {', '.join(altered)} no longer match(es) the checksum written "
                "with it; resume from an earlier numbered checkpoint (edits-*.ckpt), or start the run again"
            )
    return section


@dataclass
class RunState:
    """A checkpoint file read and verified: the whole dict and its section."""

    path: str
    checkpoint: dict

    @property
    def section(self) -> dict:
        return self.checkpoint[SECTION]

    @property
    def history(self) -> list[dict]:
        return [dict(row) for row in self.section.get("progress_history", [])]


def read(path: str | os.PathLike) -> RunState:
    """A checkpoint file, loaded without running pickled code and verified."""
    path = str(path)
    checkpoint = load_checkpoint_file(path)
    verify(checkpoint, path)
    return RunState(path, checkpoint)


def rewind_loops(checkpoint: dict, batches_done: int) -> None:
    """Point Lightning's progress counters and the edit loader at the first batch not applied."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epoch_loop = loop.get("epoch_loop.state_dict", {})
    progress = loop.get("epoch_loop.batch_progress", {})
    for group in ("total", "current"):
        for key in progress.get(group, {}):
            progress[group][key] = min(progress[group][key], batches_done)
    if "_batches_that_stepped" in epoch_loop:
        epoch_loop["_batches_that_stepped"] = batches_done
    combined = loop.get("state_dict", {}).get("combined_loader")
    if combined:
        for loader_state in combined:
            if isinstance(loader_state, dict) and "completed" in loader_state:
                loader_state["completed"] = batches_done


# ------------------------------------------------------------------------------ checksums


def _checksums(checkpoint: dict) -> dict[str, str]:
    """SHA-256 of each part: every top-level entry of the checkpoint, and each entry of the section."""
    parts = {key: value for key, value in checkpoint.items() if key != SECTION}
    parts.update({f"{SECTION}/{key}": value for key, value in checkpoint.get(SECTION, {}).items() if key != _CHECKSUMS})
    out = {}
    for name, value in sorted(parts.items()):
        digest = hashlib.sha256()
        _feed(digest, value)
        out[name] = digest.hexdigest()
    return out


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key in sorted(value, key=str):
            digest.update(json.dumps(str(key)).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())

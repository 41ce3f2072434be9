"""What an offline W&B run logged, read from its files without a server or wandb's service.

``read_offline_history`` decodes the ``run-*.wandb`` transaction log of an offline run (as
``AutoWandbLogger`` writes it without credentials) into the list of logged rows;
``find_offline_runs`` lists a save directory's offline runs. wandb itself ships no Python reader
of this file since its core moved to Go, hence this one (only the format is read: no code runs).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Union

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------


def find_offline_runs(save_dir: Union[str, os.PathLike]) -> list[Path]:
    """Offline run directories under ``save_dir`` (``<save_dir>/wandb/offline-run-*``),
    oldest first.  ``save_dir`` may also be the ``wandb`` folder itself."""
    root = Path(save_dir)
    if root.name != "wandb" and (root / "wandb").is_dir():
        root = root / "wandb"
    return sorted(p for p in root.glob("offline-run-*") if p.is_dir() and not p.is_symlink())


# The .wandb file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1,
# version 0), then 32 KiB blocks of chunks, each chunk = crc32 (IEEE, of type byte
# + data, little-endian) | length (uint16 LE) | type (1 full, 2 first, 3 middle,
# 4 last) | data.  A logical record is one protobuf wandb_internal_pb2.Record.
_HEADER = b":W&B" + struct.pack("<H", 0xBEE1)
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _iter_log_records(path: Path):
    data = path.read_bytes()
    if len(data) < 7:  # just created, header not flushed yet
        return
    if data[:6] != _HEADER:
        raise ValueError(f"{path} is not a W&B transaction log (bad header)")
    pos = 7
    parts: list[bytes] = []
    while pos + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        start, end = pos + _CHUNK_HEADER, pos + _CHUNK_HEADER + length
        if kind == 0 and length == 0:  # zero-filled tail (preallocated / torn write)
            pos += left_in_block
            continue
        if end > len(data):
            break  # truncated last record (run still being written)
        chunk = data[start:end]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos = end
        if kind == _FULL:
            parts = []
            yield chunk
        elif kind == _FIRST:
            parts = [chunk]
        elif kind == _MIDDLE:
            parts.append(chunk)
        elif kind == _LAST:
            parts.append(chunk)
            yield b"".join(parts)
            parts = []
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")


def _item_value(item: Any) -> Any:
    # wandb 0.31 writes value_json; the typed oneof is read too in case newer
    # writers use it.
    which = item.WhichOneof("value")
    if which is None:
        return json.loads(item.value_json) if item.value_json else None
    if which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    return getattr(item, which)


def _read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for raw in _iter_log_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def _history_row(history: Any) -> dict:
    row: dict = {}
    for item in history.item:
        *parents, leaf = list(item.nested_key) or [item.key]
        target = row
        for name in parents:  # logged nested dicts come back nested
            target = target.setdefault(name, {})
        target[leaf] = _item_value(item)
    return row


def read_offline_history(run_dir: Union[str, os.PathLike], *, timeout: float = 10.0) -> list[dict]:
    """History rows (one dict per ``run.log`` commit, in order) of an offline W&B run.

    ``run_dir`` is an ``offline-run-*`` directory (or its ``run-*.wandb`` file).
    Rows contain wandb's own ``_step``, ``_runtime`` and ``_timestamp`` next to the
    logged keys (and ``edits`` carried over by the step_sync of
    :class:`AutoWandbLogger` where a row lacked it); logged nested dicts come
    back nested.

    wandb writes the file asynchronously: ``run.finish()`` can return before
    the data is on disk.  So this waits up to ``timeout`` seconds for the run's
    exit record, then returns what is there (with a warning if the run has not
    ended, e.g. it is still running or crashed; ``timeout=0`` reads a live run
    without waiting).  A torn last record is ignored.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        files = [run_dir]
    else:
        files = sorted(run_dir.glob("run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    deadline = time.monotonic() + timeout
    while True:
        per_file = [_read_records(path) for path in files]
        ended = all(any(r.WhichOneof("record_type") == "exit" for r in recs) for recs in per_file)
        if ended or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not ended and timeout > 0:
        log.warning(
            "%s: no exit record after %.1fs; the run may still be running or have crashed",
            run_dir,
            timeout,
        )
    return [
        _history_row(r.history)
        for recs in per_file
        for r in recs
        if r.WhichOneof("record_type") == "history"
    ]

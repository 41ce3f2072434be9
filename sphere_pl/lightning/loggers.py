"""W&B logging for sphere_pl: a WandbLogger that picks online/offline by itself,
and helpers to read back what an offline run logged (no server needed).

``AutoWandbLogger`` runs online when W&B credentials are configured and offline
otherwise, and makes the ``edits`` metric (number of edits applied) the x-axis of
every chart.  ``read_offline_history`` decodes the ``run-*.wandb`` transaction log
of an offline run into the list of logged rows.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

EDITS_METRIC = "edits"
_DEFAULT_BASE_URL = "https://api.wandb.ai"


# ---------------------------------------------------------------------------
# online / offline decision
# ---------------------------------------------------------------------------


def _netrc_path() -> Path:
    # Same lookup order as wandb: $NETRC, then ~/.netrc, then ~/_netrc.
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        p = Path(name).expanduser()
        if p.exists():
            return p
    return Path("~/.netrc").expanduser()


def wandb_credentials_source() -> Optional[str]:
    """Where W&B credentials come from (``"WANDB_API_KEY"``, ``"netrc:<path>"``, ...),
    or None when none are configured.  Reads env and netrc only: no network, no
    prompt, no change to wandb's session state (unlike ``wandb.login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or _DEFAULT_BASE_URL).netloc
    path = _netrc_path()
    try:
        creds = netrc.netrc(str(path)).authenticators(host) if host else None
    except FileNotFoundError:
        return None
    except (netrc.NetrcParseError, OSError) as e:
        log.warning("could not read netrc file %s: %s", path, e)
        return None
    if creds and creds[2]:
        return f"netrc:{path}"
    return None


def decide_wandb_mode() -> str:
    """The W&B mode an :class:`AutoWandbLogger` uses when not told: what
    ``WANDB_MODE`` says if set (``online``, ``offline``/``dryrun``, ``disabled``),
    else ``"online"`` when credentials are configured and ``"offline"`` otherwise."""
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if wandb_credentials_source() else "offline"


# ---------------------------------------------------------------------------
# logger
# ---------------------------------------------------------------------------


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that goes online only when W&B credentials are configured.

    Same arguments as :class:`~lightning.pytorch.loggers.WandbLogger` (defaults:
    ``project="sphere_pl"``, ``save_dir="runs"``), except ``offline``:
    ``None`` (default) decides automatically (see :func:`decide_wandb_mode`),
    ``True``/``False`` force offline/online.  An explicit ``mode=`` kwarg wins over
    everything.  The decision is in ``self.mode`` (``"online"``, ``"offline"`` or
    ``"disabled"``). ``group`` puts the run in a W&B group (`sphere-pl study` groups its variants).

    Once the run exists, every metric is plotted against ``edits``
    (``define_metric("*", step_metric="edits", step_sync=True)``); rows logged
    without ``edits`` get its last value.  ``trainer/global_step`` and ``epoch``
    are still logged as usual.
    """

    def __init__(
        self,
        *args: Any,
        project: Optional[str] = "sphere_pl",
        save_dir: Union[str, os.PathLike] = "runs",
        offline: Optional[bool] = None,
        group: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        if group is not None:  # W&B's run group: the runs of one study, side by side
            kwargs["group"] = group
        mode = kwargs.pop("mode", None)
        if mode is None:
            if offline is None:
                mode = decide_wandb_mode()
            else:
                mode = "offline" if offline else "online"
        if mode != "online" and kwargs.get("log_model"):
            log.warning("W&B runs %s: log_model=%r ignored", mode, kwargs["log_model"])
            kwargs["log_model"] = False
        self.mode: str = mode
        # The mode goes to wandb.init() as an argument.  We do not pass
        # offline=True to WandbLogger, which would set os.environ["WANDB_MODE"]
        # for the whole process.
        super().__init__(*args, project=project, save_dir=save_dir, offline=False, mode=mode, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # wandb 0.31 warns about any anonymous=..., even None.
            self._wandb_init.pop("anonymous", None)
        self._edits_axis_defined = False
        self._log_decision()

    @rank_zero_only
    def _log_decision(self) -> None:
        source = wandb_credentials_source()
        log.info(
            "W&B logging %s (credentials: %s, WANDB_MODE=%s, save_dir=%s)",
            self.mode,
            source or "none",
            os.environ.get("WANDB_MODE", "unset"),
            self._save_dir,
        )

    @property
    def offline(self) -> bool:
        return self.mode != "online"

    @property
    def experiment(self) -> Any:
        exp = super().experiment  # rank-zero guarded by the parent property
        if not self._edits_axis_defined and callable(getattr(exp, "define_metric", None)):
            self._edits_axis_defined = True
            # Lightning already defined trainer/global_step and "*" against it;
            # these later definitions make edits the x-axis (edits itself stays
            # a plain metric, so it is not its own step metric).
            exp.define_metric(EDITS_METRIC)
            exp.define_metric("*", step_metric=EDITS_METRIC, step_sync=True)
        return exp


# ---------------------------------------------------------------------------
# reading offline runs
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

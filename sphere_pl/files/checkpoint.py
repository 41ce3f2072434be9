"""Checkpoint files as safetensors: tensors in the body, everything else as JSON in the header.

A checkpoint of an editing run is a nested dict of plain values and tensors (the edited weights,
the method's keys, kept batch patches, RNG state). Writing it with `torch.save` would make every
reader unpickle it; here no reader ever runs code from a file: the tensors go into a safetensors
file and the structure around them into its metadata, each tensor replaced by
`{"__tensor__": name}`. Checkpoints written by earlier versions with `torch.save` are still read,
with `weights_only=True`. The statistics cache's partial sums use the same format.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import SpherePLError
from .atomic import atomic_write

FORMAT = "sphere_pl.checkpoint/1"
_TENSOR, _TUPLE = "__tensor__", "__tuple__"


class CheckpointFormatError(SpherePLError, ValueError):
    """A file that is not a readable sphere_pl checkpoint (named, with what it is instead)."""

    hint = "resume from a *.ckpt written by fit (the previous numbered checkpoint if the last one is damaged)"


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str, storages: set) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensor = value.detach()
        storage = tensor.untyped_storage()
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and storage.nbytes() == tensor.numel() * tensor.element_size()
        if tensor.device.type != "cpu" or not whole or storage.data_ptr() in storages:
            tensor = tensor.to("cpu", copy=True).contiguous()  # safetensors refuses views and shared storage
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
        return {_TENSOR: name}
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"checkpoint field {where or '/'} has non-string keys {bad[:3]}: cannot be stored")
        return {k: _encode(v, tensors, f"{where}/{k}", storages) for k, v in value.items()}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]", storages) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]", storages) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint field {where or '/'} holds a {type(value).__name__}: only tensors and plain values are stored")


def _decode(value: Any, tensors) -> Any:
    if isinstance(value, dict):
        if _TENSOR in value and len(value) == 1:
            return tensors(value[_TENSOR])
        if _TUPLE in value and len(value) == 1:
            return tuple(_decode(v, tensors) for v in value[_TUPLE])
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def save_checkpoint_file(checkpoint: dict, path: str | os.PathLike) -> None:
    """Write `checkpoint` to `path` as safetensors, whole or not at all (`atomic_write`)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(checkpoint, tensors, "", set())
    metadata = {"format": FORMAT, "structure": json.dumps(structure)}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except SafetensorError as e:  # safetensors reports the system's I/O errors (a full disk) as its own
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        errno = int(code.group(1))
        raise OSError(errno, os.strerror(errno), str(path)) from e


def is_safetensors_checkpoint(path: str | os.PathLike) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = None) -> dict:
    """Read a checkpoint written by `save_checkpoint_file` (or, from older versions, by
    `torch.save`, loaded with `weights_only=True`). Never unpickles arbitrary objects; anything
    unreadable is a `CheckpointFormatError` naming the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"checkpoint not found: {path}")
    if zipfile.is_zipfile(path):  # torch.save format
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:  # a pickle that would run code, or a damaged archive
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise CheckpointFormatError(f"{path} is not a readable sphere_pl checkpoint (torch.save data refused by weights_only "
                                        f"loading: {first})") from None
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointFormatError(
                    f"{path} is a safetensors file but not a sphere_pl checkpoint (an exported edit patch is evaluated "
                    "with --patch, not --ckpt_path)"
                )
            structure = json.loads(metadata["structure"])
            loaded = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointFormatError(f"{path} is not a readable sphere_pl checkpoint ({type(e).__name__}: {e}); "
                                    "it may be truncated or damaged") from None
    try:
        if map_location is None or callable(map_location):  # Lightning's default is an identity function: keep on CPU
            return _decode(structure, loaded.__getitem__)
        return _decode(structure, lambda name: loaded[name].to(map_location))
    except KeyError as e:
        raise CheckpointFormatError(f"{path} is damaged: its header names tensor {e} that the file does not hold") from None

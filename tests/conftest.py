"""Shared fixtures: a tiny random LLaMA saved like a real checkpoint, real text, real edit data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPUS = SHARED_DATA / "wikitext-2" / "valid.txt"
CONTEXT_TEMPLATES = ["Hello there. {}", "A b c. {}"]
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the real SmolLM2 model (tens of seconds)")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random LLaMA + byte tokenizer written with save_pretrained, loaded by local path."""
    from helpers import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def _smollm2_once():
    """The embedded SmolLM2-135M-Instruct (GGUF, ~15-25 s to load) loaded once, and a copy of its weights."""
    from sphere_pl import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None)
    pristine = {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()}
    return model, tokenizer, pristine


@pytest.fixture
def smollm2(_smollm2_once):
    """(model, tokenizer) of the embedded SmolLM2, as `load_model_and_tokenizer(None)` returns them,
    shared by the session: after each test every weight is copied back from the freshly loaded
    ones, and train/eval modes, requires_grad flags, hooks and the tokenizer's padding put back."""
    model, tokenizer, pristine = _smollm2_once
    modes = {name: module.training for name, module in model.named_modules()}
    grads = {name: param.requires_grad for name, param in model.named_parameters()}
    hooks = {
        name: {kind: dict(getattr(module, kind)) for kind in HOOK_DICTS}
        for name, module in model.named_modules()
    }
    settings = {key: getattr(tokenizer, key) for key in ("padding_side", "truncation_side", "pad_token")}
    try:
        yield model, tokenizer
    finally:
        with torch.no_grad():
            for name, tensor in model.state_dict(keep_vars=True).items():
                tensor.copy_(pristine[name])
        for name, module in model.named_modules():
            module.training = modes[name]
            for kind, kept in hooks[name].items():
                getattr(module, kind).clear()
                getattr(module, kind).update(kept)
        for name, param in model.named_parameters():
            param.requires_grad_(grads[name])
        for key, value in settings.items():
            setattr(tokenizer, key, value)


@pytest.fixture(scope="session")
def fork_context(tmp_path_factory):
    """multiprocessing's forkserver context, the server having imported sphere_pl (tests/forked_cli.py)."""
    from forked_cli import context
    from helpers import cli_env

    return context(cli_env(tmp_path_factory.mktemp("fork-server")))


@pytest.fixture(scope="session")
def forked_cli(fork_context):
    """`run(args, cwd, env, ok=True)`: `python -m sphere_pl ARGS` forked from the server, as `helpers.run_cli`."""
    from functools import partial

    from forked_cli import run_cli_forked

    return partial(run_cli_forked, fork_context)


@pytest.fixture(scope="session")
def stats_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("stats-cache"))


@pytest.fixture
def tiny_method(stats_cache):
    """Factory of a small AlphaEdit for the tiny model (layers 1, 2; few steps; fixed contexts)."""
    from sphere_pl.editing.methods import AlphaEdit
    from sphere_pl.editing.values import ValueOptimization
    from sphere_pl.editing.stats import KeyStatistics

    def make(**overrides):
        kwargs = dict(
            layers=[1, 2],
            values=ValueOptimization(num_grad_steps=5, lr=0.5),
            stats=KeyStatistics(corpus=str(CORPUS), num_samples=20, seq_len=64, cache_dir=stats_cache),
            context_templates=CONTEXT_TEMPLATES,
        )
        kwargs.update(overrides)
        return AlphaEdit(**kwargs)

    return make


def tiny_method_kwargs(stats_cache: str) -> dict[str, dict]:
    """Per registered method: settings that make it small and fast on the tiny model.

    Every registered method must have an entry: the shared method suite runs over all of them
    and fails for a method that has none.
    """
    from sphere_pl.editing.stats import KeyStatistics
    from sphere_pl.editing.values import ValueOptimization

    common = dict(
        values=ValueOptimization(num_grad_steps=5, lr=0.5),
        stats=KeyStatistics(corpus=str(CORPUS), num_samples=20, seq_len=64, cache_dir=stats_cache),
        context_templates=CONTEXT_TEMPLATES,
    )
    return {
        "alphaedit": dict(layers=[1, 2], **common),
        "memit": dict(layers=[1, 2], **common),
        "rect": dict(layers=[1, 2], **common),
        "prune": dict(layers=[1, 2], **common),
        "rome": dict(layer=1, **common),
        "ft": dict(layer=2, num_steps=5, lr=1e-2),
        "ultraedit": dict(targets={"mlp.gate_proj": [1], "mlp.up_proj": [2]}, lr=1e-2, mini_batch=3),
    }


@pytest.fixture
def method_factory(stats_cache):
    """`make(name, **overrides)`: a small instance of the registered method `name`."""
    from sphere_pl.editing.methods import create_method

    def make(name: str, **overrides):
        kwargs = tiny_method_kwargs(stats_cache)[name]
        return create_method(name, **{**kwargs, **overrides})

    return make


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def tok():
    from helpers import tiny_tokenizer

    return tiny_tokenizer()

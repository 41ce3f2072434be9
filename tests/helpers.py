"""Test-only helpers: tiny randomly initialised models and a byte tokenizer (no downloads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from sphere_pl.models import prepare_tokenizer


def tiny_llama(seed: int = 0, vocab_size: int = 257, hidden_size: int = 32, intermediate_size: int = 64, layers: int = 4):
    """A randomly initialised LLaMA for unit tests (milliseconds to build)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer():
    """A byte-level tokenizer (one token per byte, no merges) for unit tests; needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    return prepare_tokenizer(tokenizer)


REPO = Path(__file__).resolve().parents[1]


class SimulatedCrash(Exception):
    pass


class CrashBeforeBatch(L.Callback):
    """The process dies as it is about to apply edit batch `index` (the checkpoint of the batch before is on disk)."""

    def __init__(self, index: int):
        self.index = index

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch.index == self.index:
            raise SimulatedCrash(f"simulated crash before batch {self.index}")


def save_tiny_model(path: Path, seed: int = 0) -> str:
    """A tiny random LLaMA and the byte tokenizer written with save_pretrained, to load by local path."""
    tiny_llama(seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def cli_env(tmp_path: Path) -> dict[str, str]:
    """No W&B credentials, every W&B/home directory in tmp_path, offline hub, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        NETRC=str(home / ".netrc"),
        WANDB_SILENT="true",
        WANDB_CONSOLE="off",
        WANDB_DISABLE_GIT="true",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        directory = tmp_path / var.lower()
        directory.mkdir(exist_ok=True)
        env[var] = str(directory)
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    """`python -m sphere_pl ARGS` as a user runs it; asserts the exit status is 0 (ok) or not."""
    result = subprocess.run(
        [sys.executable, "-m", "sphere_pl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if ok:
        assert result.returncode == 0, f"sphere_pl {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    else:
        assert result.returncode != 0, f"sphere_pl {args} should have failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def brute_force_accuracy(model, tok, prompt: str, target: str) -> float:
    """Top-1 token accuracy of " " + target after prompt: one full forward, argmax position by position."""
    import torch

    prompt_ids = tok(prompt).input_ids
    target_ids = tok(" " + target, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + target_ids])).logits[0]
    n = len(prompt_ids)
    return sum(int(logits[n + j - 1].argmax()) == t for j, t in enumerate(target_ids)) / len(target_ids)

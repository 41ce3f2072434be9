"""Test-only helpers: tiny randomly initialised models and a byte tokenizer (no downloads)."""

from __future__ import annotations

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

"""Batched text generation from prompts, shared by every generation-based evaluator.

Prompts are left-padded so that every row's new tokens start at the same position, and
length-sorted so that a batch pads little. Decoding is greedy, or top-k sampling with a
seed (so that a run's generations are reproducible). The decoding itself is `transformers`'
`generate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import SettingsError
from ..placement import input_device


@torch.no_grad()
def generate_continuations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    top_k: int | None = None,
    seed: int = 0,
) -> list[str]:
    """The text each prompt continues with (the prompt itself excluded), in the order of `prompts`.

    top_k: None decodes greedily; k > 0 samples from the k most likely tokens, seeded by `seed`.
    Generation stops at `max_new_tokens` or the tokenizer's EOS token. The model runs in
    eval mode and is put back in its previous mode afterwards.
    """
    if max_new_tokens < 1:
        raise SettingsError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise SettingsError(f"batch_size must be positive, got {batch_size}")
    if top_k is not None and top_k < 1:
        raise SettingsError(f"top_k must be a positive int or None (greedy), got {top_k}")
    prompts = list(prompts)
    if not prompts:
        return []
    device = input_device(model)
    encoded = [tokenizer(p).input_ids for p in prompts]
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
                attention = torch.zeros((len(rows), width), dtype=torch.long, device=device)
                for r, i in enumerate(rows):  # left padding: (batch, width)
                    input_ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i], device=device)
                    attention[r, width - len(encoded[i]) :] = 1
                sampling = {"do_sample": True, "top_k": top_k} if top_k is not None else {"do_sample": False}
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                    top_p=None,
                    temperature=None,
                    **sampling,
                )  # (batch, width + new tokens)
                for r, i in enumerate(rows):
                    texts[i] = continuation_text(tokenizer, output[r, width:].tolist())
    finally:
        model.train(was_training)
    return texts


#: generation-config fields that can make greedy decoding pick another token than the top-1 logit,
#: each with the values that leave it out (a repetition penalty of 1.0 changes nothing)
_GREEDY_CHANGERS: dict[str, tuple] = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "num_beams": (None, 1),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "watermarking_config": (None,),
}


def greedy_is_argmax(model: nn.Module) -> bool:
    """Whether `generate_continuations`' greedy next token is the top-1 logit for this model: true
    unless its generation config asks for a penalty, suppression or forced token that `generate`
    would apply (Qwen2.5's repetition_penalty 1.05, for one)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    return all(any(getattr(config, field, None) == value for value in neutral) for field, neutral in _GREEDY_CHANGERS.items())


def continuation_text(tokenizer, new_ids: list[int]) -> str:
    """The text of generated token ids, as `generate_continuations` returns it: up to the first EOS,
    special tokens left out."""
    eos_id = tokenizer.eos_token_id
    if eos_id is not None and eos_id in new_ids:
        new_ids = new_ids[: new_ids.index(eos_id)]
    return tokenizer.decode(new_ids, skip_special_tokens=True)

"""Teacher-forced scoring of target strings after prompts.

`target_nll` is the quantity every CounterFact metric is built on: the negative
log-likelihood of `" " + target` continuing `prompt`, averaged over the target's tokens.
`target_token_accuracy` is ZsRE's: the fraction of the target's tokens that are the model's
top-1 prediction given the prompt and the target's earlier tokens. Both come out of the same
batched pass (`score_targets`).
Prompt and target are tokenised separately and their ids concatenated, so the target's
token boundaries never depend on the prompt. Only the positions that predict target tokens
go through the LM head; full-vocabulary log-probabilities are never built for the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..tracing import pad_id_lists
from ..placement import input_device


def _encode(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) per example; the target gets its leading space here."""
    encoded = []
    for prompt, target in zip(prompts, targets, strict=True):
        # special tokens (e.g. BOS) belong at the start of the prompt, never inside the sequence
        prompt_ids = tokenizer(prompt).input_ids
        target_ids = tokenizer(" " + target, add_special_tokens=False).input_ids
        if not prompt_ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens: nothing predicts the first target token")
        if not target.strip() or not target_ids:
            raise ValueError(f"target {target!r} for prompt {prompt!r} is empty")
        encoded.append((prompt_ids, target_ids))
    return encoded


def _lm_head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for selected rows of the final hidden states (the base model applies the final norm)."""
    logits = model.get_output_embeddings()(hidden)
    softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2/3 cap their logits
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class TargetScores(NamedTuple):
    """Per example, in the order of the prompts: mean NLL per target token, the fraction of
    target tokens that are the top-1 prediction (teacher-forced), and the top-1 token after the
    prompt alone (what one step of greedy decoding would add; a one-token answer needs no `generate`)."""

    nll: torch.Tensor  # (n,)
    token_accuracy: torch.Tensor  # (n,)
    next_token: torch.Tensor  # (n,) token ids, long


def target_nll(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Mean NLL per target token of `" " + targets[i]` after `prompts[i]`, shape (len(prompts),)."""
    return score_targets(model, tokenizer, prompts, targets, batch_size).nll


def target_token_accuracy(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Fraction of the tokens of `" " + targets[i]` predicted top-1 after `prompts[i]` (teacher-forced), shape (n,)."""
    return score_targets(model, tokenizer, prompts, targets, batch_size).token_accuracy


@torch.no_grad()
def score_targets(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> TargetScores:
    """NLL and top-1 token accuracy of `" " + targets[i]` after `prompts[i]`, and the top-1 token
    after the prompt, in one batched pass.

    Teacher-forced, without gradients, on the model's device, in batches of `batch_size`
    right-padded sequences (examples are length-sorted so batches pad little). Log-softmax is
    taken in at least float32. The result is float32 (float64 for a float64 model) on the
    model's device, in the order of `prompts`. The model runs in eval mode (no dropout) and
    is put back in its previous mode afterwards.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = input_device(model)
    out_dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    nll = torch.empty(len(prompts), dtype=out_dtype, device=device)
    accuracy = torch.empty(len(prompts), dtype=out_dtype, device=device)
    next_token = torch.empty(len(prompts), dtype=torch.long, device=device)
    if not prompts:
        return TargetScores(nll, accuracy, next_token)
    encoded = _encode(tokenizer, prompts, targets)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        _score_batches(model, encoded, pad_id, batch_size, nll, accuracy, next_token)
    finally:
        model.train(was_training)
    return TargetScores(nll, accuracy, next_token)


def _score_batches(model, encoded, pad_id, batch_size, nll, accuracy, next_token) -> None:
    """Scores every example; examples that feed the model the same tokens share one row.

    The model reads prompt + target[:-1]; for single-token targets that is the prompt alone,
    so the new and the true target of a prompt come out of one forward pass. Distinct inputs
    are length-sorted so batches pad little.
    """
    device, out_dtype = nll.device, nll.dtype
    base = model.base_model
    examples_of: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt_ids, target_ids) in enumerate(encoded):
        examples_of.setdefault(tuple(prompt_ids + target_ids[:-1]), []).append(i)
    distinct = sorted(examples_of, key=len)
    totals = torch.zeros(len(encoded), dtype=out_dtype, device=device)
    hits = torch.zeros(len(encoded), dtype=out_dtype, device=device)
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start : start + batch_size]
        batch = pad_id_lists([list(seq) for seq in chunk], pad_id, device)
        rows, positions, target_ids, example_ids, first_slots = [], [], [], [], []
        for row, seq in enumerate(chunk):
            for i in examples_of[seq]:
                n_prompt, n_target = len(encoded[i][0]), len(encoded[i][1])
                first_slots.append(len(positions))
                # the logits at position p predict token p + 1
                positions.extend(range(n_prompt - 1, n_prompt + n_target - 1))
                rows.extend([row] * n_target)
                target_ids.extend(encoded[i][1])
                example_ids.extend([i] * n_target)

        hidden = base(**batch, use_cache=False).last_hidden_state
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]  # (n target tokens, d)
        logprobs = torch.log_softmax(_lm_head_logits(model, picked).to(out_dtype), dim=-1)
        wanted = torch.tensor(target_ids, device=device)
        token_nll = -logprobs.gather(1, wanted[:, None])[:, 0]
        index = torch.tensor(example_ids, device=device)
        top1 = logprobs.argmax(-1)  # (n target tokens,)
        totals.index_add_(0, index, token_nll)
        hits.index_add_(0, index, (top1 == wanted).to(out_dtype))
        first = torch.tensor(first_slots, device=device)  # each example's slot that predicts its first target token
        next_token[index[first]] = top1[first]
    counts = torch.tensor([len(target) for _, target in encoded], dtype=out_dtype, device=device)
    nll.copy_(totals / counts)
    accuracy.copy_(hits / counts)


def compare_targets(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    new_targets: Sequence[str] | str,
    true_targets: Sequence[str] | str,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll_new, nll_true) for every prompt, scored together in one batched pass.

    A single string for `new_targets` or `true_targets` applies to every prompt.
    """
    prompts = list(prompts)
    new = [new_targets] * len(prompts) if isinstance(new_targets, str) else list(new_targets)
    true = [true_targets] * len(prompts) if isinstance(true_targets, str) else list(true_targets)
    if not len(prompts) == len(new) == len(true):
        raise ValueError(f"{len(prompts)} prompts, {len(new)} new targets, {len(true)} true targets")
    nll = target_nll(model, tokenizer, prompts + prompts, new + true, batch_size=batch_size)
    return nll[: len(prompts)], nll[len(prompts) :]

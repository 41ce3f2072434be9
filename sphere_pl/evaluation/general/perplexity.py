"""Perplexity on WikiText-2: a check that editing leaves the model's language modelling intact.

The file is tokenised once, as one string, and cut into consecutive, non-overlapping windows
of `seq_len` tokens (the incomplete tail is dropped), as in the GPTQ-style WikiText-2
protocol. In every window each token after the first is predicted from the ones before it;
perplexity = exp(mean NLL over all predicted tokens of the scored windows).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from ...errors import SettingsError
from ..base import EvalDataError, Evaluator
from ..scoring import _lm_head_logits
from ...placement import input_device


class TokenNLL(Metric):
    """Mean NLL per predicted token, or its exp (perplexity) with `exp=True`; sums are float64."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, exp: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.exp = exp
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, tokens: Tensor) -> None:
        """nll_sum: (n,) summed NLL per window; tokens: (n,) predicted tokens per window."""
        self.nll_sum += nll_sum.detach().double().sum()
        self.tokens += tokens.sum()

    def compute(self) -> Tensor:
        mean = self.nll_sum / self.tokens  # NaN when nothing was scored
        return (mean.exp() if self.exp else mean).float()


def windows(ids: Sequence[int], seq_len: int, max_windows: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping `seq_len`-token windows of `ids` (the first `max_windows`; a short tail is dropped)."""
    count = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
    return [list(ids[i * seq_len : (i + 1) * seq_len]) for i in range(count)]


@torch.no_grad()
def window_nll(model: nn.Module, batch: Tensor) -> Tensor:
    """Summed NLL of tokens 1.. of each row given the earlier ones; batch: (n, seq_len) -> (n,) at least float32.

    The LM head runs one row at a time, so only (seq_len, vocab) logits exist at once.
    """
    out_dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    hidden = model.base_model(input_ids=batch, use_cache=False).last_hidden_state  # (n, seq_len, d)
    sums = []
    for row in range(batch.shape[0]):
        logits = _lm_head_logits(model, hidden[row, :-1]).to(out_dtype)  # (seq_len - 1, vocab)
        sums.append(F.cross_entropy(logits, batch[row, 1:], reduction="sum"))
    return torch.stack(sums)


class PerplexityTask(Evaluator):
    """perplexity and nll (per token) of the first `max_windows` windows of a plain-text file."""

    name = "perplexity"

    def __init__(self, path: str, max_windows: int | None = 50, seq_len: int = 512, batch_size: int = 4):
        if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
            raise SettingsError(f"max_windows must be a positive int or None (every window), got {max_windows!r}")
        if seq_len < 2:
            raise SettingsError(f"seq_len must be at least 2 (one token predicts the next), got {seq_len}")
        if batch_size < 1:
            raise SettingsError(f"batch_size must be positive, got {batch_size}")
        self.path = os.fspath(path)
        self.max_windows, self.seq_len, self.batch_size = max_windows, seq_len, batch_size
        self.skipped: list[EvalDataError] = []  # nothing is ever skipped; kept for a uniform interface
        self.metrics = MetricCollection({"perplexity": TokenNLL(exp=True), "nll": TokenNLL()}, compute_groups=False)

    def load(self, tokenizer=None) -> list[list[int]]:
        """The windows (token id lists) of the file's text, tokenised as is (with the tokenizer's special tokens, e.g. a BOS)."""
        if tokenizer is None:
            raise ValueError("PerplexityTask.load needs the tokenizer: its items are token windows")
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        ids = tokenizer(text, verbose=False).input_ids
        found = windows(ids, self.seq_len, self.max_windows)
        if not found:
            raise EvalDataError(
                self.path, "whole file", "<text>", f"has {len(ids)} tokens, fewer than one window of {self.seq_len}"
            )
        return found

    def update(self, model: nn.Module, tokenizer, items: Sequence[Sequence[int]]) -> list[dict]:
        items = [list(window) for window in items]
        if not items:
            return []
        if any(len(window) != len(items[0]) or len(window) < 2 for window in items):
            raise ValueError("windows must all have the same length, at least 2")
        device = input_device(model)
        self.metrics.to(device)
        was_training = model.training
        model.eval()
        try:
            sums = torch.cat(
                [
                    window_nll(model, torch.tensor(items[i : i + self.batch_size], device=device))
                    for i in range(0, len(items), self.batch_size)
                ]
            )
        finally:
            model.train(was_training)
        tokens = torch.full_like(sums, len(items[0]) - 1, dtype=torch.long)
        self.metrics.update(sums, tokens)
        predicted = len(items[0]) - 1
        return [
            {"window": i, "tokens": predicted, "nll": s / predicted, "perplexity": float(torch.tensor(s / predicted).exp())}
            for i, s in enumerate(sums.tolist())
        ]

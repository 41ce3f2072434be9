"""Generation-based efficacy: does the edited model *say* the new target when asked?

CounterFact's efficacy compares the likelihoods of two given answers; a model can prefer the
new one and still never produce it. Here the model decodes greedily from the rewrite prompt
and from each paraphrase prompt, for as many tokens as the new target has plus a margin,
and a prompt counts as a success when the text begins with the new target
(`starts_with_target`).

Metric keys: ``generated_efficacy`` (fraction of rewrite prompts) and
``generated_generalization`` (fraction of paraphrase prompts, over all paraphrases seen).
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Sequence

from torch import Tensor, nn
from torchmetrics import MetricCollection

from ..errors import SettingsError
from ..data.records import EditRequest
from .base import Evaluator
from .base import RunningMean, compute_or_nan
from .generation import generate_continuations


def _strip_trailing_punctuation(text: str) -> str:
    end = len(text)
    while end and (unicodedata.category(text[end - 1]).startswith("P") or text[end - 1].isspace()):
        end -= 1
    return text[:end]


def starts_with_target(generated: str, target: str) -> bool:
    """Whether `generated` begins with `target`.

    Rule: runs of whitespace count as one space in both and leading whitespace is ignored;
    trailing punctuation of the target is ignored ("D.C." matches "D.C"); the comparison is
    case-sensitive; and the target must end at a word boundary, so "Paris" matches "Paris,
    the capital" and "Paris" but not "Parisian".
    """
    wanted = _strip_trailing_punctuation(" ".join(target.split()))
    if not wanted:
        raise ValueError(f"target {target!r} has no words")
    text = " ".join(generated.split())
    if not text.startswith(wanted):
        return False
    after = text[len(wanted) : len(wanted) + 1]
    return not (after and _is_word_char(after) and _is_word_char(wanted[-1]))


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


class GeneratedTargetRate(RunningMean):
    """Fraction (0..1) of prompts whose greedy continuation starts with the new target."""

    plot_lower_bound = 0.0
    plot_upper_bound = 1.0


class GenerativeEfficacyEvaluator(Evaluator):
    """Greedy decoding from rewrite and paraphrase prompts, judged by `starts_with_target`.

    max_new_tokens: a fixed budget for every prompt; by default each record gets the number of
    tokens of ``" " + target_new`` plus `extra_tokens` (room to see where the target ends).
    """

    name = "generative_efficacy"

    def __init__(self, max_new_tokens: int | None = None, extra_tokens: int = 2, batch_size: int = 16):
        if max_new_tokens is not None and max_new_tokens < 1:
            raise SettingsError(f"max_new_tokens must be positive or None, got {max_new_tokens}")
        if extra_tokens < 0:
            raise SettingsError(f"extra_tokens must be non-negative, got {extra_tokens}")
        self.max_new_tokens, self.extra_tokens, self.batch_size = max_new_tokens, extra_tokens, batch_size
        self.metrics = MetricCollection(
            {"generated_efficacy": GeneratedTargetRate(), "generated_generalization": GeneratedTargetRate()},
            compute_groups=False,
        )

    def budget(self, tokenizer, request: EditRequest) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return len(tokenizer(" " + request.target_new, add_special_tokens=False).input_ids) + self.extra_tokens

    def compute(self) -> dict[str, Tensor]:
        return compute_or_nan(self.metrics)

    def update(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> list[dict]:
        # every prompt as (record index, prompt); one generate call per distinct budget
        jobs = [(i, p) for i, r in enumerate(requests) for p in (r.rewrite_prompt, *r.paraphrase_prompts)]
        budgets = [self.budget(tokenizer, r) for r in requests]
        by_budget: dict[int, list[int]] = defaultdict(list)
        for j, (i, _) in enumerate(jobs):
            by_budget[budgets[i]].append(j)
        generated = [""] * len(jobs)
        for budget, indices in by_budget.items():
            texts = generate_continuations(model, tokenizer, [jobs[j][1] for j in indices], budget, batch_size=self.batch_size)
            for j, text in zip(indices, texts):
                generated[j] = text

        rows, start = [], 0
        for i, request in enumerate(requests):
            n = 1 + len(request.paraphrase_prompts)
            decisions = [
                {"prompt": jobs[j][1], "generated": generated[j], "match": starts_with_target(generated[j], request.target_new)}
                for j in range(start, start + n)
            ]
            start += n
            rewrite, paraphrases = decisions[0], decisions[1:]
            self.metrics["generated_efficacy"].update(float(rewrite["match"]))
            if paraphrases:
                self.metrics["generated_generalization"].update([float(d["match"]) for d in paraphrases])
            rows.append(
                {
                    "case_id": request.case_id,
                    "target_new": request.target_new,
                    "max_new_tokens": budgets[i],
                    "rewrite": rewrite,
                    "paraphrases": paraphrases,
                    "generated_efficacy": float(rewrite["match"]),
                    "generated_generalization": (
                        sum(d["match"] for d in paraphrases) / len(paraphrases) if paraphrases else None
                    ),
                }
            )
        return rows

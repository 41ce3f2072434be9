"""What the general-ability tasks share: answer parsing, the binary-answer metrics and task skeletons.

The binary tasks (NLI, closed-domain QA) follow RECT_eval: greedy generation of one token,
a yes/no-style parse of the text after the prompt's answer marker, and a second,
likelihood-based prediction (which of the two answer words has the lower mean NLL). An
answer that names neither word is *invalid*: RECT leaves it out of the accuracy's
denominator but keeps it in F1 / MCC as a third label (-1), so the metrics here do too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef

from ...errors import SettingsError
from ..base import EvalDataError, Evaluator, check_on_bad_record
from ..generation import continuation_text, generate_continuations, greedy_is_argmax
from ..scoring import score_targets
from ...placement import input_device

INVALID = -1
#: the class index of an invalid answer in the 3-class torchmetrics metrics (weighted F1 and MCC do not depend on the order)
_INVALID_CLASS = 2


# --- plain-function parsers ---------------------------------------------------------------


def answer_after(text: str, marker: str) -> str:
    """The stripped text after the last `marker` in `text` (all of it when `marker` is absent).

    RECT applies this to the decoded prompt + continuation; every prompt here ends with its
    marker and no marker overlaps itself, so applying it to the continuation alone is the same.
    """
    return text.split(marker)[-1].strip()


def classify_answer(answer: str, positive: str, negative: str) -> int:
    """1 if `positive` occurs in `answer` (case-insensitive, as a substring), else 0 if `negative` does, else INVALID.

    Substring, positive first, as in RECT: "yes, no" is 1 and "not" counts as "no".
    """
    lower = answer.lower()
    if positive in lower:
        return 1
    if negative in lower:
        return 0
    return INVALID


# --- metrics -------------------------------------------------------------------------------


class _AnswerCounts(Metric):
    """Counts of correct, incorrect and invalid answers, summed across processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for state in ("correct", "incorrect", "invalid"):
            self.add_state(state, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds: (n,) in {INVALID, 0, 1}; target: (n,) in {0, 1}."""
        valid = preds != INVALID
        self.invalid += (~valid).sum()
        self.correct += (valid & (preds == target)).sum()
        self.incorrect += (valid & (preds != target)).sum()


class ValidAccuracy(_AnswerCounts):
    """correct / (correct + incorrect): invalid answers are left out, as in RECT (0 when every answer is invalid)."""

    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def compute(self) -> Tensor:
        valid = self.correct + self.incorrect
        if valid + self.invalid == 0:
            return torch.tensor(float("nan"))
        return self.correct.double().div(valid).float() if valid > 0 else torch.tensor(0.0)


class InvalidRate(_AnswerCounts):
    """Fraction of answers that name neither answer word."""

    higher_is_better = False

    def compute(self) -> Tensor:
        return (self.invalid.double() / (self.correct + self.incorrect + self.invalid)).float()


def binary_answer_metrics() -> MetricCollection:
    """acc, f1 (weighted, invalid as its own label), mcc, invalid_rate of the generated answers; f1_likelihood
    and acc_likelihood of the likelihood-scored ones (the more likely of the two answer words: never invalid,
    so a small model that does not follow the answer format still shows what it knows)."""
    return MetricCollection(
        {
            "acc": ValidAccuracy(),
            "f1": MulticlassF1Score(num_classes=3, average="weighted"),
            "mcc": MulticlassMatthewsCorrCoef(num_classes=3),
            "f1_likelihood": MulticlassF1Score(num_classes=2, average="weighted"),
            "acc_likelihood": BinaryAccuracy(),
            "invalid_rate": InvalidRate(),
        },
        compute_groups=False,
    )


def update_binary_answer_metrics(metrics: MetricCollection, preds: Tensor, likelihood_preds: Tensor, target: Tensor) -> None:
    """preds: (n,) in {INVALID, 0, 1} from generation; likelihood_preds and target: (n,) in {0, 1}."""
    classes = torch.where(preds == INVALID, torch.full_like(preds, _INVALID_CLASS), preds)
    metrics["acc"].update(preds, target)
    metrics["invalid_rate"].update(preds, target)
    metrics["f1"].update(classes, target)
    metrics["mcc"].update(classes, target)
    metrics["f1_likelihood"].update(likelihood_preds, target)
    metrics["acc_likelihood"].update(likelihood_preds, target)


def mean_metric() -> MeanMetric:
    """A mean whose state (sum and weight) is summed across processes."""
    return MeanMetric(nan_strategy="error")


# --- task skeletons ------------------------------------------------------------------------


class FileTask(Evaluator):
    """A task read from one file: the first `limit` good records, bad ones fatal or skipped."""

    def __init__(self, path: str | os.PathLike, limit: int | None, batch_size: int, on_bad_record: str = "fatal"):
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise SettingsError(f"limit must be a positive int or None (every record), got {limit!r}")
        if batch_size < 1:
            raise SettingsError(f"batch_size must be positive, got {batch_size}")
        self.path = os.fspath(path)
        self.limit = limit
        self.batch_size = batch_size
        self.on_bad_record = check_on_bad_record(on_bad_record)
        self.skipped: list[EvalDataError] = []

    def load(self, tokenizer=None) -> list:
        """The items to score; `tokenizer` is unused here (the perplexity task needs one)."""
        raise NotImplementedError


@dataclass(frozen=True)
class BinaryItem:
    """One binary question: its record (file location), prompt and gold label (1 = positive word)."""

    record: str
    prompt: str
    label: int


class BinaryAnswerTask(FileTask):
    """Generate `max_new_tokens`, parse the answer after `marker`, and compare the likelihoods of the two words.

    With one new token (RECT's setting) there is one forward pass per prompt: the greedy token is
    the top-1 prediction of the pass that scores the two words, not a separate `generate` call
    (unless the model's generation config would make greedy decoding pick another token).
    """

    marker: str
    positive: str
    negative: str

    def __init__(self, path, limit=500, batch_size=8, on_bad_record="fatal", max_new_tokens: int = 1):
        super().__init__(path, limit, batch_size, on_bad_record)
        self.max_new_tokens = max_new_tokens
        self.metrics = binary_answer_metrics()

    def update(self, model: nn.Module, tokenizer, items: Sequence[BinaryItem]) -> list[dict]:
        items = list(items)
        if not items:
            return []
        device = input_device(model)
        self.metrics.to(device)
        prompts = [item.prompt for item in items]
        # RECT scores f"{prompt} {word}": the word with its leading space, after the prompt as is
        scores = score_targets(
            model, tokenizer, prompts + prompts, [self.positive] * len(items) + [self.negative] * len(items), self.batch_size
        )
        if self.max_new_tokens == 1 and greedy_is_argmax(model):  # one greedy token: the top-1 of the pass that scored the words
            generated = [continuation_text(tokenizer, [token]) for token in scores.next_token[: len(items)].tolist()]
        else:
            generated = generate_continuations(model, tokenizer, prompts, self.max_new_tokens, self.batch_size)
        nll_pos, nll_neg = scores.nll[: len(items)], scores.nll[len(items) :]
        preds = [classify_answer(answer_after(text, self.marker), self.positive, self.negative) for text in generated]
        likelihood_preds = (nll_pos < nll_neg).long()  # a tie goes to the negative word, as in RECT
        target = torch.tensor([item.label for item in items], device=device)
        update_binary_answer_metrics(self.metrics, torch.tensor(preds, device=device), likelihood_preds, target)
        return [
            {
                "record": item.record,
                "generated": text,
                "prediction": pred,
                "gold": item.label,
                "correct": pred == item.label,
                f"nll_{self.positive}": float(p),
                f"nll_{self.negative}": float(n),
                "likelihood_prediction": int(lp),
                "likelihood_correct": int(lp) == item.label,
            }
            for item, text, pred, p, n, lp in zip(
                items, generated, preds, nll_pos.tolist(), nll_neg.tolist(), likelihood_preds.tolist()
            )
        ]

"""ZsRE metrics (MEND / ROME definitions) as torchmetrics `Metric`s, and an evaluator.

ZsRE judges an edit by teacher-forced top-1 token accuracy, not by comparing two targets:

=================  ==========================  ==========================  ==================
group              prompt                      target                      EasyEdit name
=================  ==========================  ==========================  ==================
efficacy           the question (``src``)      the new answer (``alt``)    reliability
generalization     its rephrasing              the new answer              generalization
specificity        an unrelated NQ question    its own answer (``loc_ans``) locality
=================  ==========================  ==========================  ==================

Per prompt, the accuracy is the fraction of the target's tokens that are the model's top-1
prediction given the prompt and the target's earlier tokens; a metric is the mean over
prompts. (ROME reports specificity of ZsRE against the *gold* NQ answer too.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from ..data.records import EditRequest
from .base import Evaluator, RunningMean
from .scoring import score_targets

ZSRE_GROUPS = ("efficacy", "generalization", "specificity")


class TokenAccuracy(RunningMean):
    """Mean over prompts of their top-1 token accuracy (0..1); NaN when no prompt was seen."""

    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def update(self, accuracy: Tensor) -> None:
        accuracy = accuracy.detach().flatten()
        if accuracy.numel() and (accuracy.min() < 0 or accuracy.max() > 1):
            raise ValueError("token accuracies must lie in [0, 1]")
        super().update(accuracy)


def zsre_metrics(prefix: str = "") -> MetricCollection:
    """`{prefix}{group}_accuracy` for efficacy, generalization and specificity."""
    members = {f"{group}_accuracy": TokenAccuracy() for group in ZSRE_GROUPS}
    return MetricCollection(members, prefix=prefix or None, compute_groups=False)


def zsre_prompts(requests: Sequence[EditRequest]) -> list[tuple[object, str, str, str]]:
    """(case_id, group, prompt, target) for every prompt, group by group."""
    items = [(r.case_id, "efficacy", r.rewrite_prompt, r.target_new) for r in requests]
    items += [(r.case_id, "generalization", p, r.target_new) for r in requests for p in r.paraphrase_prompts]
    items += [(r.case_id, "specificity", p, r.neighborhood_true) for r in requests for p in r.neighborhood_prompts]
    return items


class ZsREEvaluator(Evaluator):
    """Token accuracy of edit requests, one batched scoring pass for all their prompts."""

    name = "zsre"

    def __init__(self, prefix: str = "", batch_size: int = 32):
        self.metrics = zsre_metrics(prefix)
        self.batch_size = batch_size

    def update(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> list[dict]:
        items = zsre_prompts(requests)
        scores = score_targets(model, tokenizer, [i[2] for i in items], [i[3] for i in items], self.batch_size)
        self.metrics.to(scores.token_accuracy.device)
        groups = [i[1] for i in items]
        for group in ZSRE_GROUPS:
            mask = torch.tensor([g == group for g in groups], dtype=torch.bool, device=scores.token_accuracy.device)
            self.metrics[f"{group}_accuracy"].update(scores.token_accuracy[mask])
        return [
            {"case_id": case_id, "group": group, "prompt": prompt, "target": target, "token_accuracy": acc, "nll": nll}
            for (case_id, group, prompt, target), acc, nll in zip(items, scores.token_accuracy.tolist(), scores.nll.tolist())
        ]

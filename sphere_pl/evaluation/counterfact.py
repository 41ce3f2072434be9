"""CounterFact metrics (ROME's definitions) as torchmetrics `Metric`s, and an evaluator.

Every CounterFact prompt is scored twice, with the new and the true target (length-normalised
NLL, `sphere_pl.evaluation.scoring`). The prompt groups differ in which target should win:

=================  ==========================  ==========  ============
group              prompts                     preferred   ROME names
=================  ==========================  ==========  ============
efficacy           the rewrite prompt          new         ES / EM
generalization     paraphrase prompts          new         PS / PM
specificity        neighborhood prompts        true        NS / NM
=================  ==========================  ==========  ============

*score* = fraction of prompts where the preferred target has the strictly lower NLL;
*magnitude* = mean of P(preferred) - P(other), P = exp(-NLL). Both are micro-averages over
prompts (ROME averages per record first; identical when every record has the same number
of prompts per group, as in CounterFact).
"""

from __future__ import annotations

import math

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from ..data.records import EditRequest
from .base import Evaluator
from .scoring import compare_targets

#: group -> which target should be more likely after a successful, local edit
COUNTERFACT_GROUPS: dict[str, str] = {"efficacy": "new", "generalization": "new", "specificity": "true"}


class _CounterFactMetric(Metric):
    """Shared state: a running sum and the number of prompts seen."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, prefer: str = "new", **kwargs):
        super().__init__(**kwargs)
        if prefer not in ("new", "true"):
            raise ValueError(f"prefer must be 'new' or 'true', got {prefer!r}")
        self.prefer = prefer
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _preferred_other(self, nll_new: Tensor, nll_true: Tensor) -> tuple[Tensor, Tensor]:
        if nll_new.shape != nll_true.shape:
            raise ValueError(f"nll_new {tuple(nll_new.shape)} and nll_true {tuple(nll_true.shape)} differ in shape")
        nll_new, nll_true = nll_new.detach().flatten().double(), nll_true.detach().flatten().double()
        return (nll_new, nll_true) if self.prefer == "new" else (nll_true, nll_new)

    def _per_prompt(self, nll_preferred: Tensor, nll_other: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, nll_new: Tensor, nll_true: Tensor) -> None:
        values = self._per_prompt(*self._preferred_other(nll_new, nll_true))
        self.total += values.sum().to(self.total.device)
        self.count += values.numel()

    def compute(self) -> Tensor:
        """The mean over all prompts seen; NaN when none were (e.g. no paraphrases anywhere)."""
        return (self.total / self.count).float()


class CounterFactScore(_CounterFactMetric):
    """Fraction (0..1) of prompts where the preferred target has the lower NLL (ES / PS / NS)."""

    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def _per_prompt(self, nll_preferred: Tensor, nll_other: Tensor) -> Tensor:
        return (nll_preferred < nll_other).double()


class CounterFactMagnitude(_CounterFactMetric):
    """Mean of P(preferred) - P(other), P = exp(-NLL), in -1..1 (EM / PM / NM)."""

    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    def _per_prompt(self, nll_preferred: Tensor, nll_other: Tensor) -> Tensor:
        return torch.exp(-nll_preferred) - torch.exp(-nll_other)


def counterfact_metrics(prefix: str = "") -> MetricCollection:
    """`{prefix}{group}_score` and `{prefix}{group}_magnitude` for every group in COUNTERFACT_GROUPS.

    The groups receive different inputs, so update the members (`metrics["efficacy_score"]`,
    the prefix may be left out), not the whole collection; `CounterFactEvaluator` does that.
    """
    members: dict[str, Metric] = {}
    for group, prefer in COUNTERFACT_GROUPS.items():
        members[f"{group}_score"] = CounterFactScore(prefer)
        members[f"{group}_magnitude"] = CounterFactMagnitude(prefer)
    # compute groups would merge metrics with equal states; ours see different prompts
    return MetricCollection(members, prefix=prefix or None, compute_groups=False)


def counterfact_prompts(requests: Sequence[EditRequest]) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """group -> (prompts, new targets, true targets), one entry per prompt, groups possibly empty."""
    groups = {group: ([], [], []) for group in COUNTERFACT_GROUPS}

    def add(group: str, prompts: Sequence[str], new: str, true: str) -> None:
        p, n, t = groups[group]
        p.extend(prompts)
        n.extend([new] * len(prompts))
        t.extend([true] * len(prompts))

    for r in requests:
        add("efficacy", [r.rewrite_prompt], r.target_new, r.target_true)
        add("generalization", r.paraphrase_prompts, r.target_new, r.target_true)
        # a neighbor's own true answer against the edit's new target: the edit must not leak
        add("specificity", r.neighborhood_prompts, r.target_new, r.neighborhood_true)
    return groups


class CounterFactEvaluator(Evaluator):
    """Scores edit requests on a model and routes each prompt group to its metrics.

    `update` may be called several times (e.g. once per edit batch) before `compute`, and
    returns one row per scored prompt (the per-case file); `evaluate` does update + compute +
    reset in one go. `metrics` is a plain MetricCollection: assign it to a LightningModule
    attribute if it should follow the module's device; otherwise `update` moves it to the
    model's device.
    """

    name = "counterfact"

    def __init__(self, prefix: str = "", batch_size: int = 32):
        self.metrics = counterfact_metrics(prefix)
        self.batch_size = batch_size

    def update(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> list[dict]:
        groups = counterfact_prompts(requests)
        owners = _prompt_owners(requests)
        prompts = [p for g in groups.values() for p in g[0]]
        new = [n for g in groups.values() for n in g[1]]
        true = [t for g in groups.values() for t in g[2]]
        nll_new, nll_true = compare_targets(model, tokenizer, prompts, new, true, batch_size=self.batch_size)
        self.metrics.to(nll_new.device)
        start = 0
        for group, (group_prompts, _, _) in groups.items():
            end = start + len(group_prompts)
            for kind in ("score", "magnitude"):
                # an empty group updates nothing: it adds no prompts to the count
                self.metrics[f"{group}_{kind}"].update(nll_new[start:end], nll_true[start:end])
            start = end
        rows = []
        for (case_id, group), prompt, new_t, true_t, a, b in zip(owners, prompts, new, true, nll_new.tolist(), nll_true.tolist()):
            preferred = COUNTERFACT_GROUPS[group]
            success = a < b if preferred == "new" else b < a
            rows.append(
                {"case_id": case_id, "group": group, "prompt": prompt, "target_new": new_t, "target_true": true_t,
                 "nll_new": a, "nll_true": b, "prob_new": math.exp(-a), "prob_true": math.exp(-b),
                 "preferred": preferred, "success": success}
            )  # fmt: skip
        return rows


def _prompt_owners(requests: Sequence[EditRequest]) -> list[tuple]:
    """(case_id, group) of every prompt, in the order `counterfact_prompts` lays them out."""
    owners = []
    owners += [(r.case_id, "efficacy") for r in requests]
    owners += [(r.case_id, "generalization") for r in requests for _ in r.paraphrase_prompts]
    owners += [(r.case_id, "specificity") for r in requests for _ in r.neighborhood_prompts]
    return owners

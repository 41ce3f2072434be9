"""How HE moves with the editing metrics over a run (the paper's Figures 2 and 3), as plain
functions over the evaluation rows a run records (`RunRecorder.history`).

* level correlation: Spearman's ρ between a layer's HE series and a metric's series over the
  evaluation points (does lower/higher HE go with worse scores?);
* change correlation: Spearman's ρ between their changes from one point to the next (do the
  steps where HE jumps coincide with the steps where a metric drops?).

A correlation needs at least 3 points and two non-constant series; otherwise it is None.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional import spearman_corrcoef

from .hyperspherical import normalized_gram

MIN_POINTS = 3


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ (ties get average ranks), or None when undefined."""
    if len(x) != len(y):
        raise ValueError(f"series of different lengths: {len(x)} and {len(y)}")
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    if len(a) < MIN_POINTS or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return None
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return None
    return float(spearman_corrcoef(a, b))


def he_metric_correlations(rows: Sequence[dict], he_prefix: str = "he/", metric_prefixes: Sequence[str] = ()) -> dict:
    """{layer: {metric: {"level": ρ, "change": ρ, "points": n}}} over the rows holding both.

    rows: evaluation rows with `edits`, `{he_prefix}<layer>` and metric keys; metrics are the
    keys starting with one of `metric_prefixes`.
    """
    layers = sorted({k[len(he_prefix) :] for row in rows for k in row if k.startswith(he_prefix)})
    metrics = sorted({k for row in rows for k in row if k.startswith(tuple(metric_prefixes))})
    result: dict[str, dict[str, dict]] = {}
    for layer in layers:
        he_key = he_prefix + layer
        result[layer] = {}
        for metric in metrics:
            points = sorted((row["edits"], row[he_key], row[metric]) for row in rows if he_key in row and metric in row)
            he = [p[1] for p in points]
            values = [p[2] for p in points]
            he_steps = [b - a for a, b in zip(he, he[1:])]
            value_steps = [b - a for a, b in zip(values, values[1:])]
            result[layer][metric] = {"level": spearman(he, values), "change": spearman(he_steps, value_steps), "points": len(points)}
    return result


def neuron_cosines(weight: torch.Tensor, max_neurons: int = 256) -> torch.Tensor:
    """Cosine similarity between the first `max_neurons` neurons (rows) of `weight`, (n, n) float32.

    Evenly spaced rows are taken when the weight has more, so the map stays small for 4096-row
    weights; the same rows are taken before and after editing.
    """
    rows = weight.shape[0]
    index = torch.linspace(0, rows - 1, min(rows, max_neurons)).round().long()
    return normalized_gram(weight[index.to(weight.device)]).float().cpu()

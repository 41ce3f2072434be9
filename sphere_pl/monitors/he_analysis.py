"""At the end of `fit`: how HE moved with every editing metric (Spearman, the paper's Figures 2
and 3), plots of HE and the metrics against edits, and neuron cosine-similarity maps of each
edited weight before and after editing. Written to the run directory through the run record, and
logged."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ..lightning.record import HE_ANALYSIS
from ..sphere.analysis import he_metric_correlations, neuron_cosines
from . import protocol

DEFAULT_METRICS = (protocol.EDITED_SO_FAR, protocol.NEVER_EDITED, protocol.LAST_BATCH, protocol.GENERAL)


class HEAnalysis(L.Callback):
    """Writes `he_analysis.json`, `he_curves.png` and `neuron_cosines_<layer>.png` into the run directory.

    Args:
    metric_prefixes: which logged metrics are correlated with HE.
    max_neurons: neurons shown in the cosine maps (evenly spaced rows beyond that).
    plots: write the PNG files (matplotlib).

    The pre-edit cosine maps are part of the callback's checkpoint state (max_neurons² floats
    per layer), so a resumed run still shows "before".
    """

    def __init__(self, metric_prefixes: list[str] | None = None, max_neurons: int = 256, plots: bool = True):
        self.metric_prefixes = tuple(metric_prefixes) if metric_prefixes is not None else DEFAULT_METRICS
        self.max_neurons = max_neurons
        self.plots = plots
        self.before: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.before and pl_module.editor.batches_done == 0:
            self.before = self._cosines(pl_module)

    def _cosines(self, pl_module) -> dict[str, torch.Tensor]:
        return {label: neuron_cosines(w, self.max_neurons) for label, w in pl_module.editor.edited_weights().items()}

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        record = pl_module.record
        rows = [dict(row) for row in record.history]
        correlations = he_metric_correlations(rows, "he/", self.metric_prefixes)
        record.write_json(HE_ANALYSIS, {"spearman": correlations})
        record.log({
            f"he_analysis/{kind}/{layer}/{metric}": value[kind]
            for layer, by_metric in correlations.items()
            for metric, value in by_metric.items()
            for kind in ("level", "change")
            if value[kind] is not None
        })
        if self.plots:
            after = self._cosines(pl_module)
            record.write_figure("he_curves.png", plot_curves(rows, self.metric_prefixes))
            for layer, cos_after in after.items():
                if layer in self.before:
                    record.write_figure(f"neuron_cosines_{layer}.png", plot_cosines(self.before[layer], cos_after, layer))

    def state_dict(self) -> dict:
        return {"before": dict(self.before)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = dict(state_dict["before"])


def plot_curves(rows: list[dict], metric_prefixes):
    """Two panels against edits: relative HE change per layer, and the editing metrics (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key in sorted({k for row in rows for k in row if k.startswith("he_relative/")}):
        points = sorted((r["edits"], r[key]) for r in rows if key in r)
        top.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=key.split("/", 1)[1])
    top.set_ylabel("ΔHE / HE (pre-edit)")
    top.legend(fontsize=7)
    for key in sorted({k for row in rows for k in row if k.startswith(tuple(metric_prefixes)) and k.endswith(("_score", "_accuracy", "acc"))}):
        points = sorted((r["edits"], r[key]) for r in rows if key in r)
        bottom.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=key)
    bottom.set_xlabel("edits")
    bottom.set_ylabel("metric")
    bottom.legend(fontsize=6)
    fig.tight_layout()
    fig.set_dpi(110)
    plt.close(fig)
    return fig


def plot_cosines(before: torch.Tensor, after: torch.Tensor, layer: str):
    """Neuron cosine-similarity maps before and after editing, and their difference (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, matrix, title in zip(axes[:2], (before, after), ("before editing", "after editing")):
        image = ax.imshow(matrix.numpy(), vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_title(f"{layer}: {title}")
    fig.colorbar(image, ax=axes[:2], shrink=0.8)
    diff = (after - before).numpy()
    bound = max(float(abs(diff).max()), 1e-12)
    image = axes[2].imshow(diff, vmin=-bound, vmax=bound, cmap="coolwarm")
    axes[2].set_title("after − before")
    fig.colorbar(image, ax=axes[2], shrink=0.8)
    fig.set_dpi(100)
    plt.close(fig)
    return fig

"""A study's report, rebuilt from what is on disk: `report.md`, `report.csv`, `he.png`, `metrics.png`.

Per variant: status, edits, seconds per edit (the editing phases, and the measuring ones beside them),
the metrics at every evaluation point, HE change per layer, the collapse point under the study's rule,
what the guard said, Spearman correlations of HE with each metric beside the edit count's own, and,
pooled over the variants, the same against the metrics the rule reads. `export` copies the report and
each variant's rows (a running variant's from its last checkpoint) without checkpoints, to commit.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from pathlib import Path

from ...files import atomic_write, atomic_write_json, atomic_write_text
from ...lightning import state
from ...lightning.record import METRICS, read_rows_csv, write_rows_csv
from ...monitors import protocol
from ...monitors.rules import start_value
from ...monitors.summary import read_summary
from ...sphere.analysis import he_metric_correlations, spearman
from .config import FIT_CONFIG, STATUS, Study
from .streams import GENERATED, collapse_batch, generated_rule, plot_spread, summary_lines

def variant_rows(directory: Path) -> list[dict]:
    """The rows a variant recorded: from its last checkpoint (also mid-run; read and verified), else its metrics.csv."""
    last = directory / "checkpoints" / "last.ckpt"
    if last.exists():
        return state.read(last).history
    return read_rows_csv(directory / METRICS) if (directory / METRICS).exists() else []


#: phases that measure the run (fact and general evaluations, HE, the collapse guard), not edit it
MEASURING_PHASES = ("evaluation", "general", "he", "canary", "guard")
#: one-off phases, left out of the per-edit figures
ONE_OFF_PHASES = ("setup", "statistics", "convergence_report")


def seconds_per_edit(directory: Path) -> dict[str, float] | None:
    """A finished variant's seconds per edit from its summary's phase timer, set-up and statistics
    excluded: {"editing": the editing phases (keys, value search, solve, projection, ...),
    "measuring": evaluations, HE and guard checks}. None before the run has a summary."""
    summary = read_summary(directory)
    if not summary or not summary.get("edits"):
        return None
    seconds = {k: v for k, v in summary.get("seconds", {}).items() if k not in ONE_OFF_PHASES}
    # each sum over its own phases (not the total less the other): the editing figure then depends on the
    # editing phases alone, so a resumed run that re-measured reports it bit for bit as the uninterrupted one
    measuring = sum(v for k, v in seconds.items() if k in MEASURING_PHASES)
    editing = sum(v for k, v in seconds.items() if k not in MEASURING_PHASES)
    return {"editing": editing / summary["edits"], "measuring": measuring / summary["edits"]}


POINT_METRICS = (protocol.LAST_BATCH, protocol.EDITED_SO_FAR, protocol.EDITED_SO_FAR_UNEDITED, protocol.NEVER_EDITED, protocol.GENERAL)


def write_report(study: Study, rows_by_variant: dict[str, list[dict]] | None = None) -> Path:
    """`report.md` and `report.csv` (final and per-point metrics, HE change per layer, seconds per edit,
    collapse point) and `he.png`, `metrics.png` in the study directory, from what is on disk
    (`rows_by_variant`: each variant's `variant_rows`, when the caller has read them already)."""
    directory = study.directory
    rows_by_variant = rows_by_variant or {v.name: variant_rows(study.variant_dir(v)) for v in study.variants}
    results = []
    for variant in study.variants:
        vdir = study.variant_dir(variant)
        rows = rows_by_variant[variant.name]
        points = [_with_pre_edit_values(r, rows) for r in rows if any(k.startswith(POINT_METRICS) for k in r)]
        summary = read_summary(vdir) or {}
        he = {k.split("/", 1)[1]: v for k, v in (rows[-1] if rows else {}).items() if k.startswith("he_relative/")}
        collapse = study.collapse.first_collapse(rows) if study.collapse else None
        generated = generated_rule(study.collapse)
        correlations = he_metric_correlations(rows, "he/", POINT_METRICS)
        baseline = _edits_correlations(rows, POINT_METRICS)
        results.append({"variant": variant.name, "status": study.status(variant), "rows": rows, "points": points,
                        "final": summary.get("final", {}), "edits": int(rows[-1]["edits"]) if rows else 0, "he": he,
                        "seconds_per_edit": seconds_per_edit(vdir), "collapse": collapse, "spearman": correlations,
                        "baseline": baseline, "collapse_generated": generated.first_collapse(rows) if generated else None,
                        "collapse_batch": collapse_batch(study.batch_rule, rows)})
    metrics = sorted({k for r in results for row in r["points"] for k in row if k.startswith(POINT_METRICS) and "magnitude" not in k})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["variant", "edits", *metrics, *sorted({k for r in results for row in r["rows"] for k in row if k.startswith("he_relative/")})])
    writer.writeheader()
    for r in results:
        for row in r["points"]:
            writer.writerow({"variant": r["variant"], **{k: row.get(k, "") for k in writer.fieldnames if k != "variant"}})
    atomic_write_text(directory / "report.csv", buffer.getvalue())
    atomic_write_text(directory / "report.md", _markdown(study, results, metrics))
    _plots(results, metrics, directory)
    if study.streams and study.collapse:
        plot_spread(results, list(dict.fromkeys(c["metric"] for c in study.collapse.conditions)), directory / "streams.png", _write_figure)
    return directory / "report.md"


RUN_FILES = ("summary.json", "he_analysis.json", FIT_CONFIG)
REPORT_FILES = ("report.md", "report.csv", "he.png", "metrics.png", "streams.png")


def export(study: Study, target: Path) -> Path:
    """The report and each variant's rows, status and run files (not its checkpoints) into `target`:
    what can be committed, so a study's results outlive the machine it runs on."""
    rows_by_variant = {v.name: variant_rows(study.variant_dir(v)) for v in study.variants}  # one checkpoint read each
    write_report(study, rows_by_variant)
    target.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        if (study.directory / name).exists():
            _copy(study.directory / name, target / name)
    for variant in study.variants:
        vdir, rows = study.variant_dir(variant), rows_by_variant[variant.name]
        if not rows:
            continue
        out = target / variant.name
        out.mkdir(exist_ok=True)
        status = study.status(variant)
        if status["status"] == "done" and (vdir / "metrics.csv").exists():
            _copy(vdir / METRICS, out / METRICS)  # the finished run's own file
        else:
            write_rows_csv(out / "metrics.csv", rows)
        atomic_write_json(out / STATUS, {**status, "edits": int(rows[-1]["edits"])}, indent=1)
        for name in RUN_FILES:
            if (vdir / name).exists():
                _copy(vdir / name, out / name)
    return target


def _edits_correlations(rows: list[dict], metric_prefixes) -> dict:
    """{metric: Spearman ρ of the edit count against the metric} over the points where HE is also
    recorded: the baseline an HE correlation has to beat to say more than "the edits went on"."""
    he_rows = [r for r in rows if any(k.startswith("he/") for k in r)]
    metrics = sorted({k for r in he_rows for k in r if k.startswith(tuple(metric_prefixes))})
    return {m: spearman([r["edits"] for r in he_rows if m in r], [r[m] for r in he_rows if m in r]) for m in metrics}


def _with_pre_edit_values(row: dict, rows: list[dict]) -> dict:
    """The point before editing shows the pre-edit values the collapse rule compares with: general
    abilities of the unedited model and, as edited_so_far, the facts to be edited before their edits."""
    if row["edits"] != 0:
        return row
    filled = dict(row)
    for key in {k for r in rows for k in r if k.startswith((protocol.EDITED_SO_FAR, protocol.GENERAL))} - set(row):
        value = start_value(rows, key)
        if value is not None:
            filled[key] = value
    return filled


def _guard(rows: list[dict]) -> str:
    """What the collapse guard said: not on, no breach, or the edits at which it breached."""
    checked = [r for r in rows if "guard/breach" in r]
    if not checked:
        return "off"
    breached = [int(r["edits"]) for r in checked if r["guard/breach"]]
    return f"breached after {', '.join(map(str, breached))} edits" if breached else "no breach"


def _markdown(study: Study, results: list[dict], metrics: list[str]) -> str:
    rule = study.collapse.describe() if study.collapse else "none stated"
    lines = [f"# Study {study.name}", "", f"Collapse rule: {rule}.", "",
             "Seconds per edit: the editing phases, and the measuring ones (evaluations, HE, guard) beside them; set-up and statistics excluded.", "",
             "| variant | status | edits | s per edit: editing | measuring | " + " | ".join(m for m in metrics)
             + " | mean ΔHE/HE | collapsed at | under generated efficacy | batch (canaries) | guard |",
             "|---|---|---:|---:|---:|" + "---:|" * len(metrics) + "---:|---|---|---|---|"]
    for r in results:
        last = r["points"][-1] if r["points"] else {}
        he = sum(r["he"].values()) / len(r["he"]) if r["he"] else math.nan
        sec = f"{r['seconds_per_edit']['editing']:.2f} | {r['seconds_per_edit']['measuring']:.2f}" if r["seconds_per_edit"] else "– | –"
        collapsed = f"{r['collapse']['edits']} edits ({r['collapse']['why']})" if r["collapse"] else f"none by {r['edits']}"
        measured = study.collapse is not None and any(GENERATED in row for row in r["rows"])
        generated = f"{r['collapse_generated']['edits']} edits" if r["collapse_generated"] else (f"none by {r['edits']}" if measured else "–")
        batch = (f"batch {r['collapse_batch']['batch']} ({r['collapse_batch']['edits']} edits: {r['collapse_batch']['why']})"
                 if r["collapse_batch"] else ("–" if study.batch_rule is None else f"none by {r['edits']}"))
        lines.append(f"| {r['variant']} | {r['status']['status']} | {r['edits']} | {sec} | "
                     + " | ".join(_fmt(last.get(m)) for m in metrics) + f" | {_fmt(he, '.3e')} | {collapsed} | {generated} | {batch} | {_guard(r['rows'])} |")
    if study.batch_rule is not None:
        lines += ["", f"Batch rule (on the series recorded after every batch): {study.batch_rule.describe().replace('evaluation point', 'batch')}."]
    lines += summary_lines(study, results)
    lines += _side_by_side(study, results)
    lines += ["", "## At every evaluation point", "",
              "At 0 edits: the unedited model; edited_so_far there scores the facts to be edited, before their edits.", ""]
    for r in results:
        if not r["points"]:
            continue
        lines += [f"### {r['variant']}", "", "| edits | " + " | ".join(metrics) + " |", "|---:|" + "---:|" * len(metrics)]
        lines += [f"| {int(p['edits'])} | " + " | ".join(_fmt(p.get(m)) for m in metrics) + " |" for p in r["points"]]
        lines.append("")
    lines += ["## Spearman ρ of HE against each metric over the evaluation points (level; change)", ""]
    for r in results:
        found = False
        for layer, by_metric in r["spearman"].items():
            cells = [f"{m} {_fmt(v['level'], '.2f')}; {_fmt(v['change'], '.2f')}" for m, v in by_metric.items()
                     if "magnitude" not in m and (v["level"] is not None or v["change"] is not None)]
            if cells:
                found = True
                lines.append(f"- {r['variant']}, {layer}: " + ", ".join(cells))
        if not found:
            lines.append(f"- {r['variant']}: too few evaluation points (3 needed) or constant series")
        else:
            cells = [f"{m} {_fmt(v, '.2f')}" for m, v in r["baseline"].items() if "magnitude" not in m and v is not None]
            lines.append(f"- {r['variant']}, the edit count itself (what any quantity that only grows with the edits gives): " + ", ".join(cells))
    lines += _pooled_correlations(study, results)
    lines += ["", "Files: report.csv (every point), he.png, metrics.png; each variant's folder holds its run."]
    return "\n".join(lines) + "\n"


def _side_by_side(study: Study, results: list[dict]) -> list[str]:
    """One table per metric the collapse rule reads: a row per evaluation point, a column per variant."""
    if not study.collapse:
        return []
    lines = []
    for metric in dict.fromkeys(c["metric"] for c in study.collapse.conditions):
        by_variant = {r["variant"]: {p["edits"]: p[metric] for p in r["points"] if metric in p} for r in results}
        edits = sorted({e for values in by_variant.values() for e in values})
        if not edits:
            continue
        names = [name for name, values in by_variant.items() if values]
        lines += ["", f"## {metric}, side by side", "", "| edits | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        lines += [f"| {int(e)} | " + " | ".join(_fmt(by_variant[n].get(e)) for n in names) + " |" for e in edits]
    return lines


def _pooled_correlations(study: Study, results: list[dict]) -> list[str]:
    """Spearman ρ over the evaluation points of all variants together, of each layer's HE and of the
    edit count against each metric the collapse rule reads. Within one run any quantity that grows
    with the edits correlates; pooled, HE has to order the variants too (same edits, other damage)."""
    if not study.collapse or len(results) < 2:
        return []
    points = [p for r in results for p in r["points"] if p["edits"] > 0 and any(k.startswith("he/") for k in p)]
    layers = sorted({k for p in points for k in p if k.startswith("he/")})
    lines = ["", "## Pooled over the variants: Spearman ρ against the metrics the collapse rule reads", "",
             "| metric | points | edit count | " + " | ".join(layers) + " |", "|---|---:|---:|" + "---:|" * len(layers)]
    for metric in dict.fromkeys(c["metric"] for c in study.collapse.conditions):
        have = [p for p in points if metric in p and all(layer in p for layer in layers)]
        if not have:
            continue
        values = [p[metric] for p in have]
        cells = [spearman([p["edits"] for p in have], values)] + [spearman([p[layer] for p in have], values) for layer in layers]
        lines.append(f"| {metric} | {len(have)} | " + " | ".join(_fmt(c, ".2f") for c in cells) + " |")
    return lines


def _plots(results: list[dict], metrics: list[str], directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({k.split("/", 1)[1] for r in results for row in r["rows"] for k in row if k.startswith("he_relative/")})
    if layers:
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.2), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            for r in results:
                pts = [(row["edits"], row[f"he_relative/{layer}"]) for row in r["rows"] if f"he_relative/{layer}" in row]
                if pts:
                    ax.plot(*zip(*pts), label=r["variant"])
            ax.set_title(f"ΔHE/HE {layer}")
            ax.set_xlabel("edits")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        _write_figure(directory / "he.png", fig)
        plt.close(fig)
    if metrics:
        cols = min(3, len(metrics))
        fig, axes = plt.subplots(-(-len(metrics) // cols), cols, figsize=(4.2 * cols, 3.2 * -(-len(metrics) // cols)), squeeze=False)
        for ax, metric in zip(axes.flat, metrics):
            for r in results:
                pts = [(row["edits"], row[metric]) for row in r["points"] if metric in row]
                if pts:
                    ax.plot(*zip(*pts), marker="o", markersize=3, label=r["variant"])
            ax.set_title(metric, fontsize=9)
            ax.set_xlabel("edits")
            if "perplexity" in metric and ax.has_data() and min(row[metric] for r in results for row in r["points"] if metric in row) > 0:
                ax.set_yscale("log")  # a collapse takes perplexity up by orders of magnitude
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        _write_figure(directory / "metrics.png", fig)
        plt.close(fig)


def _write_figure(path: Path, figure) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def _copy(source: Path, target: Path) -> None:
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)



"""What a study says across its edit streams: where each variant collapsed (at the evaluation points, under
generated efficacy, and to the batch by the canaries), as the mean and range over the streams; and, per pair
(a variant and its twin on the same stream), the paired difference at every point beside the spread the
streams give the variant alone.

A difference "exceeds the spread" at a point when the twin differs from the variant the same way on every
stream and the mean difference is larger than the range (max - min) of the variant's own value across the
streams: the effect must be bigger than what reordering the same records does.
"""

from __future__ import annotations

import statistics

from ...monitors.rules import CollapseRule

EFFICACY, GENERATED = "edited_so_far/efficacy_score", "edited_so_far/generated_efficacy"


def base_name(variant: str) -> str:
    return variant.split("@", 1)[0]


def generated_rule(rule: CollapseRule | None) -> CollapseRule | None:
    """The collapse rule with teacher-forced efficacy read as generated efficacy (what the model says)."""
    if rule is None or not any(c["metric"] == EFFICACY for c in rule.conditions):
        return None
    conditions = [{**c, "metric": GENERATED} if c["metric"] == EFFICACY else dict(c) for c in rule.conditions]
    return CollapseRule(conditions, rule.points_in_a_row, "collapse under generated efficacy")


def collapse_batch(rule: CollapseRule | None, rows: list[dict]) -> dict | None:
    """{"edits", "batch", "why"} where the batch rule first holds on the per-batch canary rows, or None."""
    if rule is None:
        return None
    found = rule.first_collapse(rows)
    if found is None:
        return None
    batches = sorted({r["edits"] for r in rows if r["edits"] > 0 and any(rule.reads(k) for k in r)})
    return {**found, "batch": batches.index(found["edits"]) + 1 if found["edits"] in batches else None}


def _spread(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.mean(values):.0f} ({min(values):.0f}–{max(values):.0f})"


def _collapse_cell(ran: list[dict], key: str) -> str:
    """Where the runs that collapsed did, and how far the others have gone without collapsing."""
    if not ran:
        return "not run"
    found = [r[key]["edits"] for r in ran if r.get(key)]
    reached = [r["edits"] for r in ran if not r.get(key)]
    parts = [f"{_spread(found)} in {len(found)} of {len(ran)}"] if found else []
    if reached:
        upto = f"{min(reached)}" if min(reached) == max(reached) else f"{min(reached)}–{max(reached)}"
        parts.append(f"none by {upto} in {len(reached)}")
    return ", ".join(parts)


def summary_lines(study, results: list[dict]) -> list[str]:
    """The per-variant collapse table over the streams, and the pairs' differences."""
    if not study.streams:
        return []
    by_base: dict[str, list[dict]] = {}
    for r in results:
        by_base.setdefault(base_name(r["variant"]), []).append(r)
    lines = ["", f"## Over the {len(study.streams)} streams ({', '.join(s.name for s in study.streams)})", "",
             "Collapse in edits: mean (range) over the streams where the run collapsed, in how many of the streams run; "
             "none by N: no collapse by the N edits those runs have reached (a run still going, or stopped early, "
             "counts only to where it is); not run: no stream has started.", "",
             "| variant | streams run | collapsed (rule) | under generated efficacy | batch located by the canaries |",
             "|---|---|---|---|---|"]
    for base, runs in by_base.items():
        ran = [r for r in runs if r["points"]]
        cells = [f"{len(ran)} of {len(study.streams)}"]
        for key in ("collapse", "collapse_generated", "collapse_batch"):
            cells.append(_collapse_cell(ran, key))
        lines.append(f"| {base} | " + " | ".join(cells) + " |")
    for a, b in study.pairs:
        lines += pair_lines(study, a, b, by_base.get(a, []), by_base.get(b, []))
    return lines


def pair_lines(study, a: str, b: str, runs_a: list[dict], runs_b: list[dict]) -> list[str]:
    """Per metric the rule reads: at each point reached by both on every stream where both have run, the per-stream
    differences b − a, their mean, the range of a across those streams, and whether the difference exceeds it
    (not judged on a single stream, where there is no range)."""
    stream_of = {r["variant"].split("@", 1)[1]: r for r in runs_a if r["points"]}
    twins = [(stream_of[r["variant"].split("@", 1)[1]], r) for r in runs_b
             if r["points"] and r["variant"].split("@", 1)[1] in stream_of]  # a stream not run by both says nothing of the pair
    if not twins or study.collapse is None:
        return []
    streams = ", ".join(rb["variant"].split("@", 1)[1] for _, rb in twins)
    lines = ["", f"### {b} − {a}, stream by stream ({streams})", ""]
    for metric in dict.fromkeys(c["metric"] for c in study.collapse.conditions):
        by_point = []
        common = None
        for ra, rb in twins:
            pa = {p["edits"]: p[metric] for p in ra["points"] if metric in p}
            pb = {p["edits"]: p[metric] for p in rb["points"] if metric in p}
            edits = set(pa) & set(pb)
            common = edits if common is None else common & edits
            by_point.append((pa, pb))
        if not common:
            continue
        lines += [f"{metric}:", "", "| edits | differences per stream | mean | range of " + a + " | exceeds it |", "|---:|---|---:|---:|---|"]
        for e in sorted(common):
            diffs = [pb[e] - pa[e] for pa, pb in by_point]
            own = [pa[e] for pa, _ in by_point]
            mean, width = statistics.mean(diffs), max(own) - min(own)
            same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
            beyond = "one stream" if len(twins) < 2 else "yes" if same_sign and abs(mean) > width else "no"
            lines.append(f"| {int(e)} | " + ", ".join(f"{d:+.3f}" for d in diffs) + f" | {mean:+.3f} | {width:.3f} | {beyond} |")
        lines.append("")
    return lines


def plot_spread(results: list[dict], metrics: list[str], path, write) -> None:
    """Per metric: each base variant's mean over its streams, with the band from the lowest to the highest stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_base: dict[str, list[dict]] = {}
    for r in results:
        by_base.setdefault(base_name(r["variant"]), []).append(r)
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for base, runs in by_base.items():
            series = [{p["edits"]: p[metric] for p in r["points"] if metric in p} for r in runs]
            edits = sorted(set().union(*series)) if series else []
            points = [(e, [s[e] for s in series if e in s]) for e in edits]
            points = [(e, v) for e, v in points if v]
            if not points:
                continue
            xs = [e for e, _ in points]
            line = ax.plot(xs, [statistics.mean(v) for _, v in points], marker="o", markersize=3, label=base)[0]
            ax.fill_between(xs, [min(v) for _, v in points], [max(v) for _, v in points], color=line.get_color(), alpha=0.2)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("edits")
        if "perplexity" in metric and ax.has_data():
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    write(path, fig)
    plt.close(fig)


"""Would CollapseGuard have seen the long-horizon study's collapses coming? Read from the recorded rows.

    python benchmarks/guard_on_long_horizon.py [benchmarks/results/long_horizon]

The study ran without the guard. Its rows hold HE of every edited layer after every batch, so the
guard's HE step score (|HE_t - HE_t-1| over the median of the last 5 steps, scored from 2 steps
of history, the pretrained HE as the first point: `benchmarks/guard_thresholds.py`'s `scores`) can
be replayed exactly. Its perplexity canary (2 x 256-token windows after every batch) cannot: the
study measured perplexity (20 x 512 tokens) only at its evaluation points, so the table shows the
first point where that perplexity was over the guard's default ratio (2x), the batch by which the
canary would have breached at the latest, if the two sets of windows agree.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from guard_thresholds import scores

from sphere_pl.monitors.rules import start_value

DEFAULT = Path(__file__).resolve().parent / "results" / "long_horizon"
HE_SCORE, PERPLEXITY_RATIO = 50.0, 2.0  # CollapseGuard's defaults


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def replay(rows: list[dict]) -> dict:
    batches = [r for r in rows if any(k.startswith("he/") for k in r)]
    best = (0.0, None, None)
    for key in sorted(k for k in batches[0] if k.startswith("he/")):
        layer = key.removeprefix("he/")
        pretrained = batches[0][key] - batches[0][f"he_delta/{layer}"]
        for i, score in enumerate(scores([pretrained] + [r[key] for r in batches])):
            if score > best[0]:
                best = (score, layer, int(batches[i + 2]["edits"]))  # score i: the step into series[i + 3] = batches[i + 2]
    start = start_value(rows, "general/perplexity/perplexity")  # the collapse rule's own pre-edit value
    over = [int(r["edits"]) for r in rows if r.get("general/perplexity/perplexity", 0.0) > PERPLEXITY_RATIO * start]
    return {"score": best, "perplexity_over": over[0] if over else None, "edits": int(rows[-1]["edits"])}


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    print(f"| variant | edits | largest HE step score (layer, at edits) | breaches of {HE_SCORE:.0f} | "
          f"first point with perplexity > {PERPLEXITY_RATIO:.0f}x |\n|---|---:|---:|---:|---:|")
    for path in sorted(root.glob("*/metrics.csv")):
        r = replay(rows_of(path))
        score, layer, at = r["score"]
        print(f"| {path.parent.name} | {r['edits']} | {score:.1f} ({layer}, {at}) | {'yes' if score > HE_SCORE else 'none'} | "
              f"{r['perplexity_over'] if r['perplexity_over'] is not None else 'none'} |")


if __name__ == "__main__":
    main()

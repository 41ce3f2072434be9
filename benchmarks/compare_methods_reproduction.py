"""Does the `study` re-run of the method comparison reproduce the recorded 12-variant table?

The recorded rows (`benchmarks/results/compare_methods/<variant>/progress.jsonl`) came from the
retired script with its own editing loop; the re-run is
`python -m sphere_pl study --config benchmarks/studies/compare_methods.yaml`, whose variants
write `metrics.csv` (or their exported copy). For every variant and every evaluation point this
prints the recorded and re-run scores side by side and the largest difference per metric:

    python benchmarks/compare_methods_reproduction.py                      # the study's directory
    python benchmarks/compare_methods_reproduction.py --rerun benchmarks/results/compare_methods_study

Scores are fractions of the facts edited so far (20 … 200) or of 50 held-out prompts, so any
difference is a whole number of prompts; HE is compared as the mean relative change over the edited
layers and, finer, as the largest difference of one layer's HE (about 1e-11 on MEMIT, the rounding
level of HE's own sums; larger gaps mean the weights differ).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks/results/compare_methods"
STUDY_DIR = ROOT.parent / "studies/compare-methods"

# recorded name -> the study's column
SCORES = {
    "edited/efficacy_score": "edited_so_far/efficacy_score",
    "edited/generalization_score": "edited_so_far/generalization_score",
    "edited/specificity_score": "edited_so_far/specificity_score",
    "holdout/specificity_score": "never_edited/specificity_score",
}
SHORT = {"edited/efficacy_score": "eff", "edited/generalization_score": "gen", "edited/specificity_score": "spec", "holdout/specificity_score": "held"}


def recorded_rows(variant: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (RECORDED / variant / "progress.jsonl").read_text().splitlines() if line.strip()]
    return {int(r["edits"]): r for r in rows}


def rerun_rows(directory: Path) -> dict[int, dict]:
    with open(directory / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for row in rows:
        edits = int(float(row["edits"]))
        values = {k: float(v) for k, v in row.items() if v not in ("", None)}
        he = [v for k, v in values.items() if k.startswith("he_relative/")]
        values["he_relative_mean"] = sum(he) / len(he) if he else math.nan
        out[edits] = values
    return out


def compare(variant: str, rerun_dir: Path) -> dict[str, float] | None:
    if not (rerun_dir / "metrics.csv").exists():
        print(f"{variant}: no metrics.csv in {rerun_dir} (not run or not finished)")
        return None
    recorded, rerun = recorded_rows(variant), rerun_rows(rerun_dir)
    points = sorted(e for e in recorded if e > 0)
    print(f"\n{variant}: {len(points)} recorded points, re-run has {len([e for e in rerun if e > 0])}")
    print("edits | " + " | ".join(f"{SHORT[k]} rec / rerun" for k in SCORES) + " | ΔHE/HE rec / rerun | largest |HE rec − rerun| of a layer")
    largest = {k: 0.0 for k in SCORES}
    largest["he_relative_mean"] = 0.0
    for edits in points:
        rec, new = recorded[edits], rerun.get(edits)
        if new is None:
            print(f"{edits:5d} | missing in the re-run")
            continue
        cells = []
        for key, column in SCORES.items():
            a, b = rec[key], new.get(column, math.nan)
            largest[key] = max(largest[key], abs(a - b))
            cells.append(f"{a:.3f} / {b:.3f}" + ("" if round(a, 3) == round(b, 3) else " *"))
        a, b = rec["he_relative_mean"], new["he_relative_mean"]
        largest["he_relative_mean"] = max(largest["he_relative_mean"], abs(a - b))
        layers = [abs(v - new[k]) for k, v in rec.items() if k.startswith("he/") and k in new]
        print(f"{edits:5d} | " + " | ".join(cells) + f" | {a:.3e} / {b:.3e} | {max(layers, default=math.nan):.1e}")
    before = rerun.get(0)
    if before is not None and max(rerun) != 200:  # ROME edits 100: its unedited row scores other facts
        print(f"    0 | the unedited row scores the {max(rerun)} facts this variant edits; the recorded one 200: not compared")
    elif before is not None:  # the unedited model: the facts to be edited, and the held-out ones
        pretrained = json.loads((RECORDED / "pretrained.json").read_text())
        cells = []
        for key, column in SCORES.items():
            column = "never_edited/specificity_score" if key.startswith("holdout") else column.replace("edited_so_far", "pre_edit/to_edit")
            a, b = pretrained[key], before.get(column, math.nan)
            largest[key] = max(largest[key], abs(a - b))
            cells.append(f"{a:.3f} / {b:.3f}" + ("" if round(a, 3) == round(b, 3) else " *"))
        print("    0 | " + " | ".join(cells) + " | (unedited model)")
    print("largest difference: " + ", ".join(f"{SHORT.get(k, 'ΔHE/HE')} {v:.3g}" for k, v in largest.items()))
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rerun", type=Path, default=STUDY_DIR, help="the study's directory (or its --export copy)")
    parser.add_argument("--variants", nargs="+", help="default: every recorded variant")
    args = parser.parse_args()
    variants = args.variants or sorted(p.name for p in RECORDED.iterdir() if (p / "progress.jsonl").exists())
    summary = {v: compare(v, args.rerun / v) for v in variants}
    print("\nvariant | largest |Δ| eff / gen / spec / held (prompts' fraction) | ΔHE/HE")
    for v, largest in summary.items():
        if largest is not None:
            print(f"{v} | " + " / ".join(f"{largest[k]:.3f}" for k in SCORES) + f" | {largest['he_relative_mean']:.2e}")


if __name__ == "__main__":
    main()

"""Where CollapseGuard's default thresholds come from, and what one check costs on SmolLM2.

    python benchmarks/guard_thresholds.py

1. The HE step score (a step over the median of the steps before it, window 5, at least 2 steps)
   of every edited layer after every batch of the recorded 12-variant method comparison
   (benchmarks/results/compare_methods/*/progress.jsonl: 200 counterfact-val edits in batches of
   20; ROME 100), with the pretrained HE of each layer as the starting point. Printed: the largest
   score per variant, and the held-out specificity's largest fall below the unedited model's.
2. The seconds one guard check takes on SmolLM2-135M-Instruct (HE and norms of layers 4-8, 20
   canary records, 2 perplexity windows of 256 tokens), beside an edit batch's time.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from sphere_pl import Editor, load_edit_requests, load_model_and_tokenizer
from sphere_pl.monitors.guard import CollapseGuard
from sphere_pl.sphere import hyperspherical_energy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compare_methods"
SHARED = ROOT.parent / "shared" / "data"


def scores(series: list[float], window: int = 5, least: int = 2) -> list[float]:
    steps = [abs(b - a) for a, b in zip(series, series[1:])]
    return [steps[i] / statistics.median(steps[max(0, i - window) : i]) for i in range(least, len(steps))]


def main() -> None:
    model, tok = load_model_and_tokenizer(None)
    pretrained = {}
    for name, param in model.named_parameters():
        if name.endswith("mlp.down_proj.weight"):
            pretrained[int(name.split(".")[2])] = float(hyperspherical_energy(param.detach()))
    start = json.loads((RESULTS / "pretrained.json").read_text())["holdout/specificity_score"]
    print("| variant | largest HE step score (layer) | at edits | held-out specificity: largest fall |\n|---|---:|---:|---:|")
    for path in sorted(RESULTS.glob("*/progress.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        best = (0.0, None, None)
        for key in [k for k in rows[0] if k.startswith("he/layer")]:
            layer = int(key.removeprefix("he/layer"))
            found = scores([pretrained[layer]] + [r[key] for r in rows])
            for i, score in enumerate(found):
                if score > best[0]:
                    best = (score, layer, rows[i + 2]["edits"])  # score i is of the step into rows[i + 2] (2 steps of history)
        fall = max(start - r["holdout/specificity_score"] for r in rows)
        print(f"| {path.parent.name} | {best[0]:.1f} (layer {best[1]}) | {best[2]} | {fall:.2f} |")

    editor = Editor(model, tok, "alphaedit", filters=[])
    records = load_edit_requests(SHARED / "counterfact" / "counterfact-val.json")
    guard = CollapseGuard(enabled=True, canaries=20, perplexity_path=str(SHARED / "wikitext-2" / "test.txt"), perplexity_windows=2)
    guard.load_windows(tok)
    canaries = records[-20:]
    guard.measure(editor, canaries)  # warm-up
    times, cpu = [], []
    for _ in range(3):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        guard.measure(editor, canaries)
        times.append(time.perf_counter() - begin)
        cpu.append(time.process_time() - begin_cpu)
    print(f"\none guard check on SmolLM2 ({torch.get_num_threads()} threads): {statistics.median(times):.2f} s wall, "
          f"{statistics.median(cpu):.2f} s process CPU (median of 3: HE and norms of layers 4-8, 20 canaries, "
          "2 x 256-token perplexity windows)")


if __name__ == "__main__":
    main()

"""What `values.compute_dtype: bfloat16` changes: per-case decisions against float32.

    python benchmarks/bf16_agreement.py                       # first 100 records, one batch of 100
    python benchmarks/bf16_agreement.py --records 100 --batch 10

The same edits (AlphaEdit + SPHERE, η 0.5, α 0.5, layers 4-8, the paper's value settings: lr 0.1,
clamp 0.75, weight decay 0.5, 25 steps) are made on SmolLM2-135M-Instruct twice, once with the
value search in float32 and once with its upper blocks in bfloat16, from the first `--records`
records of `counterfact-val.json`. Every edited fact is then scored; for each prompt the
decision (does the preferred target win?) is compared between the two runs, as agreement in %
per score, with the mean |ΔNLL| of the new target on the rewrite prompts, the target values'
relative difference and each run's value-search seconds per edit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sphere_pl import Editor, SphereProjection, create_method, load_edit_requests, load_model_and_tokenizer
from sphere_pl.editing.stats import KeyStatistics
from sphere_pl.editing.values import ValueOptimization

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def run(compute_dtype: str, requests, batch: int, pristine: dict) -> tuple[list[dict], dict, torch.Tensor]:
    model, tok = load_model_and_tokenizer(None)
    model.load_state_dict(pristine)
    values = ValueOptimization(num_grad_steps=25, lr=0.1, clamp_norm_factor=0.75, weight_decay=0.5, compute_dtype=compute_dtype)
    stats = KeyStatistics(corpus=str(DATA / "wikitext-2" / "valid.txt"), num_samples=200, seq_len=256)
    method = create_method("alphaedit", layers=[4, 5, 6, 7, 8], values=values, stats=stats)
    editor = Editor(model, tok, method=method, filters=[SphereProjection(0.5, 0.5)], model_id="embedded:smollm2-135m-instruct")
    editor.prepare()
    start = time.perf_counter()
    for i in range(0, len(requests), batch):
        editor.apply(requests[i : i + batch])
        print(f"{compute_dtype}: {editor.edits_applied} edits, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = dict(editor.timer.seconds)
    _, rows = editor.evaluate_cases(requests)
    weights = torch.cat([w.flatten() for w in editor.edited_weights().values()]).clone()
    return rows, {"value s/edit": seconds["value_optimisation"] / len(requests), "total s/edit": (time.perf_counter() - start) / len(requests)}, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    requests = load_edit_requests(str(DATA / "counterfact" / "counterfact-val.json"), limit=args.records)
    model, _ = load_model_and_tokenizer(None)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    base = torch.cat([model.get_submodule(f"model.layers.{i}.mlp.down_proj").weight.detach().flatten() for i in range(4, 9)]).clone()
    del model
    results = {dtype: run(dtype, requests, args.batch, pristine) for dtype in ("float32", "bfloat16")}
    (rows32, t32, w32), (rows16, t16, w16) = results["float32"], results["bfloat16"]
    print(f"\nSmolLM2-135M-Instruct, AlphaEdit + SPHERE, first {len(requests)} records of counterfact-val.json, batches of {args.batch}, "
          f"paper value settings, {torch.get_num_threads()} threads")
    print("| score | prompts | float32 success | bfloat16 success | agreement |\n|---|---:|---:|---:|---:|")
    for group in ("efficacy", "generalization", "specificity"):
        pairs = [(a["success"], b["success"]) for a, b in zip(rows32, rows16) if a["group"] == group]
        assert all(a["prompt"] == b["prompt"] for a, b in zip(rows32, rows16))
        same = sum(x == y for x, y in pairs)
        print(f"| {group} | {len(pairs)} | {sum(x for x, _ in pairs) / len(pairs):.3f} | {sum(y for _, y in pairs) / len(pairs):.3f} "
              f"| {100 * same / len(pairs):.1f} % |")
    rewrite = [(a["nll_new"], b["nll_new"]) for a, b in zip(rows32, rows16) if a["group"] == "efficacy"]
    print(f"mean |ΔNLL| of the new target on the rewrite prompts: {sum(abs(x - y) for x, y in rewrite) / len(rewrite):.4f} nats "
          f"(mean NLL float32 {sum(x for x, _ in rewrite) / len(rewrite):.3f})")
    change32, change16 = w32 - base, w16 - base
    print(f"edited-weight change: |Δ16 − Δ32| / |Δ32| = {float((change16 - change32).norm() / change32.norm()):.4f}")
    print(f"value search s/edit: float32 {t32['value s/edit']:.3f}, bfloat16 {t16['value s/edit']:.3f}; "
          f"editing s/edit: {t32['total s/edit']:.3f}, {t16['total s/edit']:.3f}")


if __name__ == "__main__":
    main()

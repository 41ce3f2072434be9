"""CPU seconds per edit of the batched value optimisation at several batch sizes.

    OMP_NUM_THREADS=1 python benchmarks/value_batch_speed.py --records 100 --batches 10 100
    OMP_NUM_THREADS=1 python benchmarks/value_batch_speed.py --records 100 --batches 100 --requests-per-pass 100   # one pass

The same records (the first `--records` of real CounterFact, MEND split) are optimised in
batches of each size with the paper's LLaMA3-8B hyper-parameters (lr 0.1, clamp 0.75, weight
decay 0.5, 25 steps) on SmolLM2-135M-Instruct at layer 8 (AlphaEdit's last layer), with
AlphaEdit's context templates. `--requests-per-pass` is how many requests share a forward
and backward pass (grouped by length); it sets the memory, not the result, as does
`--no-recompute` (keep the upper blocks' activations instead of re-running the blocks).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from sphere_pl import load_edit_requests, load_model_and_tokenizer
from sphere_pl.editing.keys import GENERATION_PREFIXES, generate_context_templates
from sphere_pl.editing.values import ValueOptimization, optimize_values
from sphere_pl.models import resolve_templates

COUNTERFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact-val.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--batches", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--requests-per-pass", type=lambda t: t if t == "auto" else int(t), default="auto")
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default="auto",
                        help="values.recompute_activations (re-run blocks in the backward pass; --no-recompute keeps their activations)")
    args = parser.parse_args()

    model, tok = load_model_and_tokenizer(None)
    templates = resolve_templates(model)
    contexts = generate_context_templates(model, tok, 10, list(GENERATION_PREFIXES), 0)
    requests = load_edit_requests(str(COUNTERFACT))[: args.records]
    hp = ValueOptimization(num_grad_steps=args.steps, lr=0.1, clamp_norm_factor=0.75, weight_decay=0.5, requests_per_pass=args.requests_per_pass,
                           recompute_activations=args.recompute, compute_dtype=args.compute_dtype)
    print(f"SmolLM2-135M-Instruct, {len(requests)} CounterFact records, layer {args.layer}, {args.steps} steps, paper hyper-parameters, "
          f"{torch.get_num_threads()} thread(s), requests_per_pass {args.requests_per_pass}, recompute_activations {args.recompute}, "
          f"compute_dtype {args.compute_dtype}")  # fmt: skip
    print("| batch | CPU s per edit | wall s per edit | mean steps | peak RSS so far (GB) | plan (last batch) |\n|---:|---:|---:|---:|---:|---|")
    for size in args.batches:
        cpu, wall, steps = time.process_time(), time.perf_counter(), []
        for start in range(0, len(requests), size):
            _, info = optimize_values(model, tok, templates, requests[start : start + size], contexts, args.layer, hp)
            steps += info["steps"].tolist()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(f"| {size} | {cpu / len(requests):.2f} | {wall / len(requests):.2f} | {sum(steps) / len(steps):.1f} | {peak:.2f} | "
              f"{info['plan'].describe()} |", flush=True)


if __name__ == "__main__":
    main()

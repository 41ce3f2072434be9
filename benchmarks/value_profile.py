"""Where the value search spends its time, by kind of operation, at several pass sizes.

    OMP_NUM_THREADS=1 python benchmarks/value_profile.py --records 100 --steps 5 --passes 10:10 100:100 100:4 10:4

Each `BATCH:PER_PASS` runs the first `--records` real CounterFact records (MEND split) in
batches of BATCH requests, PER_PASS requests per forward/backward pass, under
torch.profiler, with the paper's LLaMA3-8B hyper-parameters on SmolLM2-135M-Instruct at
layer 8 and AlphaEdit's context templates. It prints, per edit, the CPU time of each kind
of operation and the padding: the share of suffix and prefix token slots that are padding.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sphere_pl import load_edit_requests, load_model_and_tokenizer
from sphere_pl.editing.keys import GENERATION_PREFIXES, generate_context_templates
from sphere_pl.editing.values import ValueOptimization, optimize_values
from sphere_pl.models import resolve_templates

COUNTERFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact-val.json"

# aten operator -> kind; the first pattern contained in the name wins
KINDS = [
    ("attention", ("scaled_dot_product", "softmax_backward", "_efficient_attention", "flash_attention")),
    ("LM head + log-softmax", ("log_softmax",)),
    ("matmul (projections, LM head)", ("mm", "matmul", "linear", "addmm", "bmm")),
    ("gathers / index / cat / pad", ("index", "gather", "cat", "pad", "slice", "select", "scatter", "copy_", "clone", "contiguous")),
    ("elementwise (norms, SiLU, rotary)", ("mul", "add", "silu", "rsqrt", "pow", "mean", "neg", "sigmoid", "exp", "div", "sub", "sum")),
]


def kind_of(name: str) -> str:
    for kind, patterns in KINDS:
        if any(p in name for p in patterns):
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--passes", nargs="+", default=["10:10", "100:100", "100:4", "10:4"], help="BATCH:REQUESTS_PER_PASS")
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default="auto",
                        help="values.recompute_activations (the figures in BENCHMARKS.md's profile were taken with --no-recompute)")
    args = parser.parse_args()

    model, tok = load_model_and_tokenizer(None)
    model.requires_grad_(False)
    templates = resolve_templates(model)
    contexts = generate_context_templates(model, tok, 10, list(GENERATION_PREFIXES), 0)
    requests = load_edit_requests(str(COUNTERFACT))[: args.records]
    print(f"SmolLM2-135M-Instruct, {len(requests)} CounterFact records, layer {args.layer}, {args.steps} steps, paper hyper-parameters "
          f"(lr 0.1, clamp 0.75, weight decay 0.5), {torch.get_num_threads()} thread(s); CPU ms per edit")  # fmt: skip
    rows = {}
    for spec in args.passes:
        batch, per_pass = (int(x) for x in spec.split(":"))
        hp = ValueOptimization(num_grad_steps=args.steps, lr=0.1, clamp_norm_factor=0.75, weight_decay=0.5, requests_per_pass=per_pass,
                               recompute_activations=args.recompute)
        slots = defaultdict(int)  # the token slots the upper blocks computed: optimize_values reports them
        cpu = time.process_time()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for start in range(0, len(requests), batch):
                _, info = optimize_values(model, tok, templates, requests[start : start + batch], contexts, args.layer, hp)
                for kind, count in info["token_slots"].items():
                    slots[kind] += count
        cpu = time.process_time() - cpu
        by_kind = defaultdict(float)
        for event in prof.key_averages():
            by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e3  # ms
        row = {k: v / len(requests) for k, v in by_kind.items()}
        row["total (process CPU, profiled)"] = cpu * 1e3 / len(requests)
        s = slots
        row["suffix slots that are padding (%)"] = 100 * (1 - s["suffix real"] / s["suffix padded"])
        row["prefix slots that are padding (%)"] = 100 * (1 - s["prefix real"] / s["prefix padded"])
        rows[f"batch {batch}, {per_pass} per pass"] = row
    kinds = [k for k, _ in KINDS] + ["other", "total (process CPU, profiled)", "suffix slots that are padding (%)", "prefix slots that are padding (%)"]
    print("| | " + " | ".join(rows) + " |\n|---|" + "---:|" * len(rows))
    for k in kinds:
        print(f"| {k} | " + " | ".join(f"{r.get(k, 0.0):.0f}" for r in rows.values()) + " |")


if __name__ == "__main__":
    main()

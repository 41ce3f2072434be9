"""Key-statistics (C0) speed on SmolLM2-135M-Instruct: tokens per second and peak memory.

    python benchmarks/stats_speed.py --samples 200 --seq-len 256 --layers 4 5 6 7 8
    python benchmarks/stats_speed.py --random-init llama3-8b --dtype bfloat16 --tokenizer DIR   # LLaMA3-8B's shapes (GPU)

Computes C0 for the given layers from scratch (a fresh cache directory) over WikiText-2, in
one forward per batch that stops after the highest layer, and prints tokens/s, the peak
resident memory of the process, the convergence report and the ratio to the official code's
speed on this machine (420 s for 202,578 tokens over 5 layers, one forward per layer).
On a GPU, when there is one; the forward runs in the model's dtype, the sums in --accumulate-dtype.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from sphere_pl import load_model_and_tokenizer
from sphere_pl.editing.lm import PhaseTimer
from sphere_pl.editing.stats import KeyStatistics, accumulate_moments, model_fingerprint
from sphere_pl.models import resolve_templates

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"
OFFICIAL_TOKENS_PER_SECOND = 202_578 / 420  # 5 layers, measured on this 2-core machine


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 5, 6, 7, 8])
    parser.add_argument("--accumulate-dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--dtype", default="float32", help="the model's dtype (float32, bfloat16, float16)")
    parser.add_argument("--random-init", metavar="CONFIG", default=None,
                        help="random weights with this architecture (benchmarks/configs name or config.json): timing only")
    parser.add_argument("--tokenizer", default=None, help="with --random-init: a tokenizer directory (default: the embedded SmolLM2's)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.random_init:
        from random_model import build_random_model

        model, tokenizer = build_random_model(args.random_init, args.tokenizer, args.dtype, device)
    else:
        model, tokenizer = load_model_and_tokenizer(None, args.dtype)
        model.to(device)
    templates = resolve_templates(model)
    after_load = peak_rss_gb()
    timer = PhaseTimer()  # the convergence reports (an eigvalsh per layer), timed apart
    with tempfile.TemporaryDirectory() as cache:
        cfg = KeyStatistics(corpus=str(CORPUS), num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                            cache_dir=cache, accumulate_dtype=args.accumulate_dtype, checkpoint_every=0)  # fmt: skip
        fingerprints = {layer: model_fingerprint(model, templates, layer) for layer in args.layers}
        start = time.perf_counter()
        _, tokens, convergence = accumulate_moments(model, tokenizer, templates, args.layers, cfg, fingerprints, f"{cache}/partial.safetensors", timer=timer)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    rate = tokens / seconds
    name = f"random {args.random_init}" if args.random_init else "SmolLM2-135M-Instruct"
    where = f"{torch.cuda.get_device_name()}" if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name} ({args.dtype}) on {where}, layers {args.layers}, {args.samples} x {args.seq_len} tokens, batch {args.batch_size}, "
          f"sums in {args.accumulate_dtype}")  # fmt: skip
    print(f"{tokens} tokens in {seconds:.1f} s: {rate:.0f} tokens/s; official code on this machine: {OFFICIAL_TOKENS_PER_SECOND:.0f} tokens/s "
          f"(ratio {rate / OFFICIAL_TOKENS_PER_SECOND:.1f}x)")  # fmt: skip
    report_s = timer.seconds["convergence_report"]
    print(f"of which convergence reports: {report_s:.1f} s ({len(convergence) // len(args.layers)} reports x {len(args.layers)} layers: C0 in float64, "
          f"eigvalsh); forward and sums alone: {tokens / (seconds - report_s):.0f} tokens/s")
    print(f"peak RSS {peak_rss_gb():.2f} GB (after loading the model: {after_load:.2f} GB)")
    if device == "cuda":
        print(f"peak GPU memory allocated by torch {torch.cuda.max_memory_allocated() / 1024**3:.2f} GB")
    print("\nconvergence (layer, sequences, relative change of C0 since the last report, eigenvalues below 2e-2):")
    for row in convergence:
        print(f"  layer {row['layer']}  {row['sequences']:>6}  {row['relative_change']:.4f}  {row['nullspace_dim']}")


if __name__ == "__main__":
    main()

"""Checkpoint size and write time: the compact safetensors format against the former one.

    python benchmarks/checkpoint_size.py --ckpt runs/quickstart/checkpoints/last.ckpt

Reads a checkpoint of a real run (either format), writes it the way `EditCheckpoint` does
(safetensors, fsync, rename) and, for comparison, as the former format stored it (torch.save,
with AlphaEdit's d_in x d_in null-space projectors and K Kᵀ sums per layer), and times both.
Then prints the sizes computed for AlphaEdit on LLaMA3-8B and Qwen2.5-7B (5 layers, float32,
history_size 1), after a number of edits, from their down-projection shapes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from sphere_pl.files import load_checkpoint_file, save_checkpoint_file

MB = 1e6
# (d_out, d_in) of the MLP down-projection; the paper edits 5 layers
MODELS = {"SmolLM2-135M": (576, 1536), "LLaMA3-8B": (4096, 14336), "Qwen2.5-7B": (3584, 18944)}


def timed_write(write, path: str) -> float:
    start = time.perf_counter()
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - start


def former_state(checkpoint: dict) -> dict:
    """The checkpoint as the former format held it: P and K Kᵀ per layer in the method state."""
    state = checkpoint["sphere_pl"]
    method = dict(state["method"])
    weights = list(state["weights"].values())
    layers, d_in = len(weights), weights[0].shape[1]
    keys = method.get("_extra_state", {}).get("batch_keys", [])
    moments = torch.zeros(layers, d_in, d_in)
    for batch in keys:
        for i, k in enumerate(batch):
            moments[i] += k @ k.T
    method.setdefault("projectors", torch.eye(d_in).expand(layers, d_in, d_in).clone())
    method.setdefault("previous_key_moments", moments)
    return {**checkpoint, "sphere_pl": {**state, "method": method}}


def compact_state(checkpoint: dict) -> dict:
    """What this version writes for the same run: AlphaEdit's P and K Kᵀ are recomputed on
    resume, so a checkpoint of an earlier version is compared without them."""
    state = checkpoint["sphere_pl"]
    method = {k: v for k, v in state["method"].items() if k not in ("projectors", "previous_key_moments")}
    return {**checkpoint, "sphere_pl": {**state, "method": method}}


def computed_size(d_out: int, d_in: int, edits: int, layers: int = 5, history: int = 1, bytes_per: int = 4) -> tuple[float, float]:
    """(compact, former) bytes of an AlphaEdit checkpoint after `edits` edits."""
    weights = layers * d_out * d_in * bytes_per * (1 + history)  # edited weights + kept batch patches
    # keys until there are d_in per layer; then one folded sum plus at most d_in / 4 kept keys (upper bound)
    method = edits * d_in if edits < d_in else d_in * d_in + (d_in // 4) * d_in
    compact = weights + layers * method * bytes_per
    former = weights + layers * d_in * edits * bytes_per + 2 * layers * d_in * d_in * bytes_per
    return compact, former


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `fit` (e.g. the quickstart's last.ckpt)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    checkpoint = load_checkpoint_file(args.ckpt)
    state = checkpoint["sphere_pl"]
    print(f"{args.ckpt}: {state['edits_applied']} edits, {len(state['weights'])} edited modules, "
          f"{len(state['recent_patches'])} kept batch patches, method {state['settings']['method']['name']}")
    former, compact = former_state(checkpoint), compact_state(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for label, write in (
            ("compact safetensors (now)", lambda p: save_checkpoint_file(compact, p)),
            ("former torch.save with P and K Kᵀ", lambda p: torch.save(former, p)),
        ):
            path = os.path.join(tmp, "c.ckpt")
            seconds = min(timed_write(write, path) for _ in range(args.repeats))
            rows.append((label, os.path.getsize(path) / MB, seconds))
        print("\n| format | size (MB) | write time (s, best of %d) |\n|---|---:|---:|" % args.repeats)
        for label, size, seconds in rows:
            print(f"| {label} | {size:.1f} | {seconds:.3f} |")

    print("\nComputed AlphaEdit checkpoint sizes (5 layers, float32, history_size 1; compact past d_in edits is an upper bound):\n")
    print("| model | down_proj (d_out x d_in) | edits | compact (MB) | former (MB) |\n|---|---|---:|---:|---:|")
    for name, (d_out, d_in) in MODELS.items():
        for edits in (100, 2000, 10000):
            compact, previous = computed_size(d_out, d_in, edits)
            print(f"| {name} | {d_out} x {d_in} | {edits} | {compact / MB:,.0f} | {previous / MB:,.0f} |")


if __name__ == "__main__":
    main()

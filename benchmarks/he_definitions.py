"""Which HE definition moves most under the edits of the method comparison?

    python benchmarks/he_definitions.py                         # ../studies/compare-methods
    python benchmarks/he_definitions.py --study ../studies/long-horizon

For each variant of a study (`python -m sphere_pl study`, e.g. benchmarks/studies/compare_methods.yaml)
whose last checkpoint (`<variant>/checkpoints/last.ckpt`, the edited weights) is on disk, it compares the edited `down_proj` weights with the pretrained ones under every HE
definition: the power s (0 = logarithmic energy, 1, 2), rows normalised (the paper's
hyperspherical energy) or raw, and mean or sum over neuron pairs. It prints the relative
change (HE_after − HE_before) / |HE_before|, averaged over the edited layers. Mean and sum
differ by the constant N(N−1), so their relative changes are equal: one column shows both.
PRUNE's checkpoint holds the live (unrestrained) weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sphere_pl import load_model_and_tokenizer
from sphere_pl.files import load_checkpoint_file
from sphere_pl.sphere import hyperspherical_energy

ROOT = Path(__file__).resolve().parents[1]
DEFINITIONS = [(s, normalize) for normalize in (True, False) for s in (0.0, 1.0, 2.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=str(ROOT.parent / "studies" / "compare-methods"), help="a study's directory")
    args = parser.parse_args()
    states = sorted(Path(args.study).glob("*/checkpoints/last.ckpt"))
    if not states:
        raise SystemExit(f"no variant checkpoint (<variant>/checkpoints/last.ckpt) under {args.study}: "
                         "run python -m sphere_pl study --config benchmarks/studies/compare_methods.yaml first")
    model, _ = load_model_and_tokenizer(None)
    header = " | ".join(f"s={s:g} {'hyperspherical' if n else 'raw rows'}" for s, n in DEFINITIONS)
    print(f"| variant | edits | {header} |")
    print("|---|---:|" + "---:|" * len(DEFINITIONS))
    for path in states:
        state = load_checkpoint_file(path)["sphere_pl"]
        cells = []
        for s, normalize in DEFINITIONS:
            changes = []
            for name, after in state["weights"].items():
                before = model.get_submodule(name).weight.detach()
                he0 = hyperspherical_energy(before, s=s, normalize_rows=normalize)
                he1 = hyperspherical_energy(after, s=s, normalize_rows=normalize)
                # the sum over pairs is the mean times N(N-1): the same relative change
                assert torch.isclose(
                    (hyperspherical_energy(after, s=s, reduction="sum", normalize_rows=normalize) - hyperspherical_energy(before, s=s, reduction="sum", normalize_rows=normalize)) / he0.abs() / (before.shape[0] * (before.shape[0] - 1)),
                    (he1 - he0) / he0.abs(), rtol=1e-6,
                )  # fmt: skip
                changes.append(float((he1 - he0) / he0.abs()))
            cells.append(f"{sum(changes) / len(changes):+.2e}")
        print(f"| {path.parent.parent.name} | {state['edits_applied']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

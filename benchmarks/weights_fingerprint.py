"""Digests of the edited weights of two fixed runs, to show a restructure or speed-up moved no result.

    python benchmarks/weights_fingerprint.py --out before.json              # tiny model + one SmolLM2 batch
    python benchmarks/weights_fingerprint.py --out after.json --compare before.json

Run 1 (`tiny`): a random 4-layer LLaMA of SmolLM2's vocabulary (seed 0), AlphaEdit + SPHERE and
MEMIT + SPHERE on layers 1-2, two batches of 5 quickstart records each.
Run 2 (`smollm2`): the embedded SmolLM2-135M-Instruct, AlphaEdit + SPHERE on layers 4-8, one
batch of the first 10 records of counterfact-val.json at the paper's value settings.
Every run states its value-search settings explicitly (`--requests-per-pass`, `--recompute`,
`--compute-dtype`), so that a change of defaults does not change what is compared.
The statistics (C0) come from the shared cache or are computed once.
Compare two outputs from one machine: float32 kernels differ between CPUs in the last bits. On
2026-12-07 a file recorded on an AVX-512 machine differed in every digest on an AVX2-only one, while
the recording's own commit (e162f23), run on the second machine, gave the current code's digests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from sphere_pl import Editor, SphereProjection, create_method, load_edit_requests, load_model_and_tokenizer
from sphere_pl.editing.stats import KeyStatistics
from sphere_pl.editing.values import ValueOptimization

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PAPER = dict(lr=0.1, clamp_norm_factor=0.75, weight_decay=0.5)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def run(model, tok, method: str, layers, requests, batch: int, values: ValueOptimization, stats: KeyStatistics, model_id: str) -> dict:
    alpha = 0.5 if method == "alphaedit" else 0.8
    editor = Editor(model, tok, method=create_method(method, layers=layers, values=values, stats=stats),
                    filters=[SphereProjection(0.5, alpha)], model_id=model_id)
    for start in range(0, len(requests), batch):
        editor.apply(requests[start : start + batch])
    return {f"{method}/{label}": digest(w) for label, w in editor.edited_weights().items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, default=None, help="a previous output: exit 1 unless every digest is equal")
    parser.add_argument("--requests-per-pass", type=lambda t: t if t == "auto" else int(t), default=4)
    parser.add_argument("--recompute", type=lambda t: t if t == "auto" else t == "yes", default=True, help="yes, no or auto")
    parser.add_argument("--compute-dtype", default=None, help="values.compute_dtype (omitted: the library's default)")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()

    settings = dict(requests_per_pass=args.requests_per_pass, recompute_activations=args.recompute)
    if args.compute_dtype:
        settings["compute_dtype"] = args.compute_dtype
    stats = KeyStatistics(corpus=str(DATA / "wikitext-2" / "valid.txt"), num_samples=200, seq_len=256)
    out = {"settings": {k: str(v) for k, v in settings.items()}}

    from transformers import LlamaConfig, LlamaForCausalLM

    smol, tok = load_model_and_tokenizer(None)
    quick = load_edit_requests(str(ROOT / "sphere_pl" / "data" / "quickstart_edits.json"), schema="counterfact")[:10]
    for method in ("alphaedit", "memit"):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
        tiny = LlamaForCausalLM(cfg).eval()
        values = ValueOptimization(num_grad_steps=10, lr=0.5, clamp_norm_factor=4.0, weight_decay=1e-3, **settings)
        tiny_stats = KeyStatistics(corpus=stats.corpus, num_samples=20, seq_len=64)
        out.update({f"tiny/{k}": v for k, v in run(tiny, tok, method, [1, 2], quick, 5, values, tiny_stats, "fingerprint:tiny-llama-seed0").items()})
    if not args.skip_smollm2:
        records = load_edit_requests(str(DATA / "counterfact" / "counterfact-val.json"), limit=10)
        values = ValueOptimization(num_grad_steps=25, **PAPER, **settings)
        out.update({f"smollm2/{k}": v for k, v in run(smol, tok, "alphaedit", [4, 5, 6, 7, 8], records, 10, values, stats, "embedded:smollm2-135m-instruct").items()})
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    if args.compare:
        before = json.loads(args.compare.read_text())
        moved = [k for k in before if k != "settings" and before[k] != out.get(k)]
        print("identical" if not moved else f"MOVED: {moved}")
        return 1 if moved else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Digests of two real CLI `fit` runs (edited weights from the last checkpoint, and every logged
metric), to show that a restructure of the Lightning layer moved no result.

    python benchmarks/run_fingerprint.py --out before.json
    python benchmarks/run_fingerprint.py --out after.json --compare before.json

Run 1 (`tiny`): a random 4-layer LLaMA (seed 0, saved to a temporary directory) with the byte
tokenizer, AlphaEdit + SPHERE on layers 1-2, 3 batches of 4 quickstart edits, explicit value
settings. Run 2 (`guarded`): run 1 with the collapse guard on (`action: warn`, 2 canaries, the
perplexity canary, an HE-score threshold every scored batch breaches), so every guard signal and
its breach are recorded. Run 3 (`smollm2`): `configs/quickstart.yaml` on the embedded SmolLM2, its
first batch of 10 edits. Both run `python -m sphere_pl fit` in a subprocess with a CSV logger; metrics that
measure time are left out.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
TIMING = ("seconds", "time", "_s_", "per_edit")


def fit(config: dict, directory: Path) -> dict:
    config["trainer"].update(default_root_dir=str(directory), enable_progress_bar=False,
                             logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(directory), "name": "csv", "version": 0}})
    config.setdefault("checkpoint", {})["dirpath"] = str(directory / "checkpoints")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "sphere_pl", "fit", "--config", str(path)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"fit failed:\n{result.stderr[-4000:]}")
    from sphere_pl.lightning.checkpoint_io import load_checkpoint_file

    state = load_checkpoint_file(directory / "checkpoints" / "last.ckpt")["sphere_pl"]
    digests = {name: hashlib.sha256(w.contiguous().numpy().tobytes()).hexdigest()[:16] for name, w in sorted(state["weights"].items())}
    with open(directory / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metrics: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if value != "" and not any(t in key for t in TIMING):
                metrics.setdefault(key, []).append(value)
    return {"weights": digests, "metrics": metrics}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, default=None)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import save_tiny_model

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_tiny_model(tmp / "tiny-model", seed=0)
        tiny = {
            "trainer": {"accelerator": "cpu", "enable_model_summary": False},
            "model": {"model": {"name_or_path": model_dir}, "method": {"class_path": "sphere_pl.AlphaEdit", "init_args": {
                "layers": [1, 2], "values": {"num_grad_steps": 5, "lr": 0.5, "requests_per_pass": 4, "recompute_activations": False},
                "stats": {"corpus": str(CORPUS), "num_samples": 20, "seq_len": 64, "cache_dir": str(tmp / "stats")},
                "context_templates": ["Hello there. {}", "A b c. {}"]}}},
            "data": {"source": "quickstart", "dataset_size_limit": 12, "num_edits": 4, "num_holdout": 4, "cache_dir": str(tmp / "data")},
        }
        out["tiny"] = fit(tiny, tmp / "tiny")
        guarded = json.loads(json.dumps(tiny))
        guarded["guard"] = {"enabled": True, "action": "warn", "he_score": 1e-12, "canaries": 2, "perplexity_path": str(CORPUS),
                            "perplexity_windows": 2, "perplexity_seq_len": 64}
        out["guarded"] = fit(guarded, tmp / "guarded")
        if not args.skip_smollm2:
            quick = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
            quick["data"]["dataset_size_limit"] = 10
            out["smollm2"] = fit(quick, tmp / "smollm2")
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True))
    print(json.dumps({k: v["weights"] for k, v in out.items()}, indent=1))
    if args.compare:
        before = json.loads(args.compare.read_text())
        moved = [f"{run}/weights" for run in before if before[run]["weights"] != out.get(run, {}).get("weights")]
        for run in before:
            mine = out.get(run, {}).get("metrics", {})
            moved += [f"{run}/{key}" for key, values in before[run]["metrics"].items() if mine.get(key) != values]
            moved += [f"{run}/{key} (new)" for key in mine if key not in before[run]["metrics"]]
        print("identical" if not moved else "MOVED:\n  " + "\n  ".join(moved))
        return 1 if moved else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

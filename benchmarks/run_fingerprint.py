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
#: metrics the shell's redesign renamed (the guard's canaries became monitors of their own): compared under their old names
RENAMED = {"canary/specificity": "guard/canary_specificity", "canary/perplexity": "guard/perplexity"}


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
    from sphere_pl.lightning import state as run_state

    state = run_state.read(directory / "checkpoints" / "last.ckpt").section
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
    parser.add_argument("--only", nargs="+", choices=("tiny", "guarded", "smollm2"), help="run only these (default: all)")
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
        runs = set(args.only or ("tiny", "guarded", "smollm2")) - ({"smollm2"} if args.skip_smollm2 else set())
        guarded = json.loads(json.dumps(tiny))
        guarded["guard"] = {"enabled": True, "action": "warn", "conditions": [
            {"metric": "guard/he_score/*", "above": 1e-12}, {"metric": "canary/specificity", "drop_from_start": 0.3},
            {"metric": "canary/perplexity", "ratio_to_start_above": 2.0}]}
        guarded["canary_specificity"] = {"records": 2}
        guarded["canary_perplexity"] = {"path": str(CORPUS), "windows": 2, "seq_len": 64}
        if "tiny" in runs:
            out["tiny"] = fit(tiny, tmp / "tiny")
        if "guarded" in runs:
            out["guarded"] = fit(guarded, tmp / "guarded")
        if "smollm2" in runs:
            quick = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
            quick["data"]["dataset_size_limit"] = 10
            out["smollm2"] = fit(quick, tmp / "smollm2")
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True))
    print(json.dumps({k: v["weights"] for k, v in out.items()}, indent=1))
    if args.compare:
        before = json.loads(args.compare.read_text())
        compared = [run for run in before if run in out]
        moved = [f"{run}/weights" for run in compared if before[run]["weights"] != out[run]["weights"]]
        for run in compared:
            mine = {RENAMED.get(key, key): values for key, values in out[run]["metrics"].items()}
            moved += [f"{run}/{key}" for key, values in before[run]["metrics"].items() if mine.get(key) != values]
            moved += [f"{run}/{key} (new)" for key in mine if key not in before[run]["metrics"]]
        print("identical" if not moved else "MOVED:\n  " + "\n  ".join(moved))
        return 1 if moved else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

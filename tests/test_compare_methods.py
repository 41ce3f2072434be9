"""benchmarks/compare_methods.py as a user runs it: a subprocess on a tiny model, killed with
SIGKILL partway and run again, must end with the same table as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import CORPUS
from helpers import REPO, cli_env

SCRIPT = REPO / "benchmarks" / "compare_methods.py"


def command(model_dir: str, out: Path) -> list[str]:
    return [
        sys.executable, str(SCRIPT), "--methods", "memit", "prune", "--edits", "6", "--batch", "2", "--holdout", "2",
        "--model", model_dir, "--corpus", str(CORPUS), "--stats-samples", "20", "--steps", "3", "--out", str(out),
    ]


def metrics(out: Path) -> dict[str, list[dict]]:
    """Every progress row of every variant, without the timing columns."""
    rows = {}
    for progress in sorted(out.glob("*/progress.jsonl")):
        rows[progress.parent.name] = [
            {k: v for k, v in json.loads(line).items() if "seconds" not in k} for line in progress.read_text().splitlines()
        ]
    return rows


def test_comparison_resumes_after_sigkill_with_identical_results(tiny_model_dir, tmp_path):
    env = cli_env(tmp_path)
    reference = tmp_path / "reference"
    result = subprocess.run(command(tiny_model_dir, reference), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (reference / "table.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [
        "pretrained (no edit)", "memit", "memit+sphere", "prune", "prune+sphere"
    ]
    assert (reference / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(len(rows) == 3 and rows[-1]["edits"] == 6 for rows in metrics(reference).values())

    # kill the run once the second variant has saved its first batch, then run the same command again
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(command(tiny_model_dir, interrupted), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = interrupted / "memit+sphere" / "progress.jsonl"
    deadline = time.monotonic() + 300
    while not (target.exists() and target.read_text().strip()) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "table.md").exists()  # it did not finish
    result = subprocess.run(command(tiny_model_dir, interrupted), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # the second run redid nothing that was saved: memit was finished, memit+sphere went on after its first batch
    redone = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert not any(r["variant"] == "memit" for r in redone)
    assert min(r["edits"] for r in redone if r["variant"] == "memit+sphere") > 2
    assert metrics(interrupted) == metrics(reference)

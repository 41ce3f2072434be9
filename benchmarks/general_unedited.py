"""Which general-ability task can the unedited model show? Each task's score on the embedded
SmolLM2-135M-Instruct (or `--model`) beside what guessing gets: the majority class for the binary
tasks (NLI, closed-domain QA), 0 for the tasks that must produce a number or a name (reasoning,
open-domain QA). A task whose unedited score is at chance cannot show an edit's damage; the
long-stream studies need one above it (issue 30, item 4).

    python benchmarks/general_unedited.py                                 # prints, and writes the rows
    python benchmarks/general_unedited.py --tasks reasoning --limit 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sphere_pl import PretrainedModel
from sphere_pl.evaluation.general import ClosedQATask, NLITask, OpenQATask, ReasoningTask
from sphere_pl.monitors.summary import machine as this_machine

GENERAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "general"
TASKS = {
    "nli": (NLITask, "test-NLI.tsv", 200),
    "closed_qa": (ClosedQATask, "test-ClosedDomainQA.jsonl", 200),
    "open_qa": (OpenQATask, "test-OpenDomainQA.jsonl", 100),
    "reasoning": (ReasoningTask, "test-reasoning.jsonl", 100),
}
ROWS = Path(__file__).resolve().parent / "results" / "general_unedited.json"


def chance(items) -> float:
    """The score of always giving the more frequent answer (binary items), else 0."""
    labels = [getattr(item, "label", None) for item in items]
    if None in labels:
        return 0.0
    return max(labels.count(0), labels.count(1)) / len(labels)


def measure(task, model, tokenizer) -> dict:
    items = task.load(tokenizer)
    start = time.perf_counter()
    values = task.evaluate(model, tokenizer, items)
    seconds = time.perf_counter() - start
    return {"items": len(items), "chance": chance(items), "seconds": round(seconds, 1),
            **{name: round(float(value), 4) for name, value in values.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: 200 binary, 100 generated)")
    parser.add_argument("--model", default=None, help="hub name or local path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=ROWS, help="where the rows go (JSON)")
    args = parser.parse_args()
    loaded = PretrainedModel(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    machine = this_machine()
    print(f"model {loaded.model_id}, {next(model.parameters()).dtype}, {machine}")
    rows = {}
    for name in args.tasks:
        cls, file, limit = TASKS[name]
        rows[name] = measure(cls(str(GENERAL / file), limit=args.limit or limit), model, tokenizer)
        print(name, rows[name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": loaded.model_id, "machine": machine, "tasks": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

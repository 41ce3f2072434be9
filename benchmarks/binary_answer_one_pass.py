"""The binary general-ability tasks (NLI, closed-domain QA) with one forward pass per prompt.

With RECT's one new token, `BinaryAnswerTask.update` takes the greedy answer from the top-1
prediction of the pass that scores the two answer words; it used to call `generate` for it, a
second pass over every prompt. This prints, per task, on the real files in `../shared/data/general`
and the embedded SmolLM2-135M-Instruct (or `--model`):

- how many generated answers (and parsed predictions) differ from `generate_continuations`;
- the largest difference of the answer words' NLLs from `target_nll` (the same batches: 0 expected);
- the seconds of the old two calls and of the new `update`, one after another in one process.

    python benchmarks/binary_answer_one_pass.py                  # 500 items per task (the paper's count)
    python benchmarks/binary_answer_one_pass.py --limit 200 --tasks nli
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sphere_pl import PretrainedModel
from sphere_pl.evaluation.general import ClosedQATask, NLITask
from sphere_pl.evaluation.general.common import answer_after, classify_answer
from sphere_pl.evaluation.generation import generate_continuations, greedy_is_argmax
from sphere_pl.evaluation.scoring import target_nll

GENERAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "general"
TASKS = {"nli": (NLITask, "test-NLI.tsv"), "closed_qa": (ClosedQATask, "test-ClosedDomainQA.jsonl")}


def compare(task, model, tokenizer) -> dict:
    items = task.load(tokenizer)
    prompts = [item.prompt for item in items]
    start = time.perf_counter()
    generated = generate_continuations(model, tokenizer, prompts, task.max_new_tokens, task.batch_size)
    nll = target_nll(model, tokenizer, prompts + prompts, [task.positive] * len(items) + [task.negative] * len(items), task.batch_size)
    two_calls = time.perf_counter() - start
    start = time.perf_counter()
    rows = task.update(model, tokenizer, items)
    one_pass = time.perf_counter() - start
    old_preds = [classify_answer(answer_after(text, task.marker), task.positive, task.negative) for text in generated]
    nll_gap = max(
        max(abs(row[f"nll_{task.positive}"] - float(a)), abs(row[f"nll_{task.negative}"] - float(b)))
        for row, a, b in zip(rows, nll[: len(items)], nll[len(items) :])
    )
    return {
        "items": len(items),
        "answers differing": sum(row["generated"] != text for row, text in zip(rows, generated)),
        "predictions differing": sum(row["prediction"] != p for row, p in zip(rows, old_preds)),
        "largest NLL gap": nll_gap,
        "generate + target_nll (s)": round(two_calls, 2),
        "update, one pass (s)": round(one_pass, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=500, help="items per task (the first ones of each file)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--model", default=None, help="hub name or local path (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    loaded = PretrainedModel(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"model {loaded.model_id}, {next(model.parameters()).dtype}, {torch.get_num_threads()} threads; "
          f"greedy is the top-1 logit: {greedy_is_argmax(model)}")
    for name in args.tasks:
        cls, file = TASKS[name]
        print(name, compare(cls(str(GENERAL / file), limit=args.limit), model, tokenizer), flush=True)


if __name__ == "__main__":
    main()

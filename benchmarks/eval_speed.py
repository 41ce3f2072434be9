"""Records per second of every evaluation suite on SmolLM2-135M-Instruct (the embedded model).

    python benchmarks/eval_speed.py                  # defaults below
    python benchmarks/eval_speed.py --records 200 --general-limit 50

Each suite scores the first records of its real file in ../shared/data, once to warm up
(tokenizer caches, lazy imports) on a few records and once timed. Scoring uses the batched
paths the editing run uses (`scoring_batch_size` 32 prompts per forward; generation in
batches of 8). Whether an evaluation every batch costs less than the edit batch it follows
is measured by `benchmarks/edit_speed.py` (its `evaluation` phase against the editing phases).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from sphere_pl import load_edit_requests, load_model_and_tokenizer
from sphere_pl.evaluation import FactEvaluator
from sphere_pl.evaluation.general import create_task
from sphere_pl.evaluation.generation_quality import GenerationQualityEvaluator
from sphere_pl.evaluation.generative_efficacy import GenerativeEfficacyEvaluator

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TASK_FILES = {
    "reasoning": SHARED / "general" / "test-reasoning.jsonl",
    "nli": SHARED / "general" / "test-NLI.tsv",
    "closed_qa": SHARED / "general" / "test-ClosedDomainQA.jsonl",
    "open_qa": SHARED / "general" / "test-OpenDomainQA.jsonl",
}


def timed(evaluate, items) -> float:
    evaluate(items[:2])  # warm-up
    start = time.perf_counter()
    evaluate(items)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200, help="CounterFact / ZsRE records scored")
    parser.add_argument("--general-limit", type=int, default=50, help="examples per general-ability task")
    parser.add_argument("--generation-records", type=int, default=20, help="records for the generation metrics")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 512 tokens for perplexity")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer(None)
    print(f"model loaded in {time.perf_counter() - start:.1f} s\n")
    cache = str(ROOT / "runs" / "eval_speed_cache")
    counterfact = load_edit_requests(SHARED / "counterfact" / "counterfact-val.json", cache_dir=cache, limit=args.records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two real ZsRE records have an empty new answer: skipped
        zsre = load_edit_requests(SHARED / "zsre" / "zsre_mend_train-1k.json", cache_dir=cache, on_bad_record="skip")[: args.records]

    rows = []

    def report(name: str, unit: str, count: int, seconds: float, note: str = "") -> None:
        rows.append((name, count, unit, seconds, count / seconds, note))
        print(f"{name:<28} {count:>5} {unit:<9} {seconds:8.2f} s  {count / seconds:8.2f} {unit}/s  {note}")

    facts = FactEvaluator(batch_size=32)
    n_prompts = sum(1 + len(r.paraphrase_prompts) + len(r.neighborhood_prompts) for r in counterfact)
    report("counterfact scoring", "records", len(counterfact), timed(lambda x: facts.evaluate(model, tok, x), counterfact),
           f"{n_prompts} prompts x 2 targets")  # fmt: skip
    report("zsre scoring", "records", len(zsre), timed(lambda x: facts.evaluate(model, tok, x), zsre), "3 prompts each")
    for name, path in TASK_FILES.items():
        task = create_task(name, path=str(path), limit=args.general_limit, batch_size=8)
        items = task.load(tok)
        report(f"general/{name}", "examples", len(items), timed(lambda x, t=task: t.evaluate(model, tok, x), items),
               f"{task.max_new_tokens} new tokens")  # fmt: skip
    perplexity = create_task("perplexity", path=str(SHARED / "wikitext-2" / "test.txt"), max_windows=args.windows, seq_len=512)
    windows = perplexity.load(tok)
    report("general/perplexity", "windows", len(windows), timed(lambda x: perplexity.evaluate(model, tok, x), windows), "512 tokens each")
    generated = counterfact[: args.generation_records]
    efficacy = GenerativeEfficacyEvaluator()
    report("generated efficacy", "records", len(generated), timed(lambda x: efficacy.evaluate(model, tok, x), generated),
           "rewrite + paraphrase, greedy")  # fmt: skip
    quality = GenerationQualityEvaluator(corpus=str(SHARED / "wikitext-2" / "test.txt"), max_new_tokens=100)
    report("fluency + consistency", "records", len(generated), timed(lambda x: quality.evaluate(model, tok, x), generated),
           "100 new tokens, greedy")  # fmt: skip

    print("\n| suite | items | seconds | items/s | notes |\n|---|---:|---:|---:|---|")
    for name, count, unit, seconds, rate, note in rows:
        print(f"| {name} | {count} {unit} | {seconds:.2f} | {rate:.2f} | {note} |")


if __name__ == "__main__":
    main()

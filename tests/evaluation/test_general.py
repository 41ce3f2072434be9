"""General-ability tasks: prompts, parsers, metrics vs brute force, readers, and scoring with a tiny model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer

from sphere_pl.evaluation.base import EvalDataError
from sphere_pl.evaluation.general import (
    GENERAL_TASKS,
    INVALID,
    ClosedQATask,
    NLITask,
    OpenQATask,
    PerplexityTask,
    ReasoningTask,
    answer_after,
    classify_answer,
    common,
    create_task,
    normalize_answer,
    soft_exact_match,
)
from sphere_pl.evaluation.general.closed_qa import closed_qa_prompt, parse_closed_qa
from sphere_pl.evaluation.general.common import (
    BinaryItem,
    binary_answer_metrics,
    update_binary_answer_metrics,
)
from sphere_pl.evaluation.general.nli import nli_prompt, parse_nli
from sphere_pl.evaluation.general.open_qa import open_qa_prompt, parse_open_qa
from sphere_pl.evaluation.general.perplexity import windows
from sphere_pl.evaluation.general.reasoning import (
    parse_reasoning,
    reasoning_correct,
    split_solution,
)
from sphere_pl.evaluation.generation import generate_continuations, greedy_is_argmax
from sphere_pl.evaluation.scoring import score_targets, target_nll

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GENERAL = DATA / "general"
NLI_HEADER = "index\tsentence1\tsentence2\tlabel\n"


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(), tiny_tokenizer()


def run(task, model, tokenizer, items) -> tuple[dict[str, float], list[dict]]:
    """Metrics of `items` alone (as floats) and their rows."""
    task.reset()
    rows = task.update(model, tokenizer, items)
    values = {k: float(v) for k, v in task.compute().items()}
    task.reset()
    return values, rows


def write_jsonl(path: Path, lines: list) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8")
    return str(path)


def write_tsv(path: Path, rows: list[str], header: str = NLI_HEADER) -> str:
    path.write_text(header + "".join(row + "\n" for row in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- prompts (literal strings of SOURCES.md / RECT_eval)


def test_prompts_are_exactly_rects():
    nli = parse_nli(
        {"index": "7", "sentence1": "A cat sat.", "sentence2": "An animal sat", "label": "entailment"}, "line 2", "f.tsv"
    )
    assert nli.prompt == "A cat sat. entails An animal sat. True or False? answer:"
    assert nli.label == 1 and nli_prompt("x", "y") == "x entails y. True or False? answer:"

    boolq = parse_closed_qa({"question": "is it wet", "title": "Rain", "answer": False, "passage": "Rain is wet."}, "line 1", "f")
    assert boolq.prompt == (
        "Please answer the given question based on the passage. The answer should be exact 'yes' or 'no'. "
        "passage: Rain is wet. question: is it wet. answer: "
    )
    assert boolq.label == 0 and closed_qa_prompt("P", "Q").endswith("passage: P question: Q. answer: ")

    nq = parse_open_qa({"question": "who won?", "answer": ["Ann", "Bo"], "output": ["\n\nAnn won.", "ignored"]}, "line 3", "f")
    assert (
        nq.prompt
        == "Refer to the passage below and answer the following question.\nPassage: \n\nAnn won.\nQuestion: who won?\nAnswer:"
    )
    assert nq.answers == ("Ann", "Bo") and open_qa_prompt("p", "q").endswith("\nAnswer:")

    gsm = parse_reasoning({"question": "How many?", "answer": "2 + 3 = <<2+3=5>>5 apples.\n#### 5"}, "line 4", "f")
    assert (
        gsm.prompt
        == "Q: How many? A:Let's think step by step. 2 + 3 = <<2+3=5>>5 apples.\n Therefore, the answer (arabic numerals) is:"
    )
    assert gsm.gold == "5" and gsm.record == "line 4"


def test_generation_lengths_follow_rect():
    assert NLITask("x").max_new_tokens == 1 and ClosedQATask("x").max_new_tokens == 1
    assert OpenQATask("x").max_new_tokens == 20 and ReasoningTask("x").max_new_tokens == 5
    assert NLITask("x").limit == 500 and PerplexityTask("x").max_windows == 50


# ---------------------------------------------------------------- parsers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", 1),
        (" Yes.", 1),
        ("YES", 1),
        ("no", 0),
        ("No,", 0),
        ("yes or no", 1),
        ("no, yes", 1),
        ("not", 0),
        ("know", 0),
        ("maybe", INVALID),
        ("", INVALID),
        ("y e s", INVALID),
    ],
)
def test_classify_yes_no(text, expected):
    assert classify_answer(answer_after(text, "answer: "), "yes", "no") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" True", 1),
        ("true.", 1),
        (" FALSE", 0),
        ("untrue", 1),
        ("false or true", 1),
        (" False", 0),
        (" T", INVALID),
        ("\n", INVALID),
    ],
)
def test_classify_true_false(text, expected):
    assert classify_answer(answer_after(text, "answer:"), "true", "false") == expected


def test_answer_after_takes_the_text_after_the_last_marker():
    assert answer_after(" yes. answer: no ", "answer: ") == "no"
    assert answer_after("  maybe\n", "answer: ") == "maybe"
    assert classify_answer(answer_after(" true answer: false", "answer:"), "true", "false") == 0
    # RECT parses the decoded prompt + continuation: the same, since the prompt ends with the marker
    prompt = "a entails b. True or False? answer:"
    for continuation in (" true", " false answer: true", "x"):
        assert answer_after(prompt + continuation, "answer:") == answer_after(continuation, "answer:")


def test_reasoning_parsing():
    assert split_solution("a\nb\n#### 18") == ("a\nb\n", "18")
    assert split_solution("no separator 18") is None
    assert split_solution("####18") is None  # RECT splits on "#### " with the space
    assert reasoning_correct(" 18 dollars", "18")
    assert reasoning_correct("$18.", "18")
    assert reasoning_correct(" 180", "18")  # substring, as in RECT
    assert not reasoning_correct(" 1 8", "18")
    assert not reasoning_correct(" 2125", "2,125")  # the gold is compared as written
    assert not reasoning_correct(" 18. Therefore, the answer (arabic numerals) is: 7", "18")  # only after the last marker


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
    assert normalize_answer("An apple a day keeps THE doctor away.") == "apple day keeps doctor away"
    assert normalize_answer("theatre anatomy") == "theatre anatomy"  # articles only as whole words
    assert normalize_answer(" \n ") == ""


def rect_soft_match(output: str, golds: list[str]) -> bool:
    """RECT's loop, re-stated: first/last word, then every span i..j, each compared with normalize()."""
    normalized, golds = normalize_answer(output), [normalize_answer(g) for g in golds]
    words = normalized.split()
    if not words:
        return False
    spans = [words[0], words[-1]] + [" ".join(words[i : j + 1]) for i in range(len(words)) for j in range(i, len(words))]
    return any(normalize_answer(span) == gold for span in spans for gold in golds)


@pytest.mark.parametrize(
    ("output", "golds", "expected"),
    [
        ("It was Wilhelm Röntgen, in 1901.", ["Wilhelm Conrad Röntgen", "Wilhelm Röntgen"], True),
        ("Wilhelm", ["Wilhelm Röntgen"], False),
        ("the answer is Paris.", ["paris"], True),
        ("New York City", ["York City"], True),
        ("newyork", ["New York"], False),
        ("The", ["the"], False),  # a gold that normalises to nothing never matches
        ("", ["x"], False),
        ("in 1901 and 1902", ["1902"], True),
        ("1,000 people", ["1000"], True),  # punctuation goes before matching
        ("a b c d", ["b d"], False),  # spans are contiguous
    ],
)
def test_soft_exact_match(output, golds, expected):
    assert soft_exact_match(output, golds) == expected == rect_soft_match(output, golds)


# ---------------------------------------------------------------- metrics vs brute force


def brute_force(golds, preds, likelihood):
    """RECT's sklearn metrics in plain Python: weighted F1 and multiclass MCC over the labels present."""
    labels = sorted(set(golds) | set(preds))
    n = len(golds)

    def weighted_f1(y, p):
        total = 0.0
        for c in sorted(set(y) | set(p)):
            tp = sum(1 for a, b in zip(y, p) if a == c and b == c)
            fp = sum(1 for a, b in zip(y, p) if a != c and b == c)
            fn = sum(1 for a, b in zip(y, p) if a == c and b != c)
            f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
            total += (tp + fn) * f1
        return total / len(y)

    t = {c: sum(1 for a in golds if a == c) for c in labels}
    p = {c: sum(1 for b in preds if b == c) for c in labels}
    c = sum(1 for a, b in zip(golds, preds) if a == b)
    cov_tp = c * n - sum(t[k] * p[k] for k in labels)
    cov_pp = n * n - sum(p[k] ** 2 for k in labels)
    cov_tt = n * n - sum(t[k] ** 2 for k in labels)
    mcc = cov_tp / math.sqrt(cov_pp * cov_tt) if cov_pp * cov_tt else 0.0
    valid = [(a, b) for a, b in zip(golds, preds) if b != INVALID]
    acc = sum(a == b for a, b in valid) / len(valid) if valid else 0.0
    return {
        "acc": acc,
        "f1": weighted_f1(golds, preds),
        "mcc": mcc,
        "f1_likelihood": weighted_f1(golds, likelihood),
        "acc_likelihood": sum(a == b for a, b in zip(golds, likelihood)) / n,
        "invalid_rate": sum(b == INVALID for b in preds) / n,
    }


CASES = [
    # golds, generated predictions (with invalid), likelihood predictions
    ([1, 1, 0, 0, 1, 0, 1, 1, 0, 1], [1, -1, 0, 1, -1, 0, 1, 0, -1, 1], [1, 1, 0, 1, 0, 0, 1, 1, 1, 1]),
    ([1, 0, 1, 0, 1, 1], [1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]),  # perfect generation, constant likelihood
    ([1, 0, 1, 0], [-1, -1, -1, -1], [1, 0, 0, 1]),  # every answer invalid
    ([1, 1, 1, 1, 0], [0, 0, -1, 1, 1], [1, 1, 1, 1, 1]),  # worse than chance: negative MCC
    ([0, 0, 0], [0, 1, -1], [0, 0, 0]),  # one gold class only
]


@pytest.mark.parametrize(("golds", "preds", "likelihood"), CASES)
def test_binary_metrics_equal_brute_force(golds, preds, likelihood):
    metrics = binary_answer_metrics()
    half = len(golds) // 2  # two updates: the states accumulate
    for part in (slice(0, half), slice(half, None)):
        update_binary_answer_metrics(
            metrics, torch.tensor(preds[part]), torch.tensor(likelihood[part]), torch.tensor(golds[part])
        )
    got = {k: float(v) for k, v in metrics.compute().items()}
    want = brute_force(golds, preds, likelihood)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_brute_force_agrees_with_hand_values():
    """The reference itself, on the first case, against values worked out by hand."""
    want = brute_force(*CASES[0])
    assert want["acc"] == pytest.approx(5 / 7) and want["invalid_rate"] == pytest.approx(0.3)
    # class 1: tp 3, fp 1, fn 3 -> 6/10; class 0: tp 2, fp 1, fn 2 -> 4/7; weights 6 and 4
    assert want["f1"] == pytest.approx((6 * 0.6 + 4 * 4 / 7) / 10)
    # binary MCC when no answer is invalid equals the textbook formula
    tp, tn, fp, fn = 3, 1, 1, 0
    textbook = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert brute_force([1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0] * 5)["mcc"] == pytest.approx(textbook)


# ---------------------------------------------------------------- readers


def closed_ok(i=0):
    return {"question": f"is {i} even", "title": "T", "answer": True, "passage": f"{i} is a number."}


def open_ok(i=0):
    return {"question": f"who is {i}?", "answer": [f"Ann {i}"], "output": [f"Ann {i} is."]}


def reasoning_ok(i=0):
    return {"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"}


JSONL_BAD = [
    (ClosedQATask, closed_ok, {"answer": "yes"}, "answer"),
    (ClosedQATask, closed_ok, {"question": None}, "question"),
    (ClosedQATask, closed_ok, {"passage": 5}, "passage"),
    (ClosedQATask, closed_ok, {"passage": "  "}, "passage"),
    (OpenQATask, open_ok, {"answer": "Ann"}, "answer"),
    (OpenQATask, open_ok, {"answer": [3]}, "answer"),
    (OpenQATask, open_ok, {"output": []}, "output"),
    (OpenQATask, open_ok, {"output": [{"text": "x"}]}, "output"),
    (ReasoningTask, reasoning_ok, {"answer": "5 with no separator"}, "answer"),
    (ReasoningTask, reasoning_ok, {"answer": "5\n####  "}, "answer"),
    (ReasoningTask, reasoning_ok, {"question": 12}, "question"),
]


@pytest.mark.parametrize(("task_cls", "good", "change", "field"), JSONL_BAD)
def test_jsonl_bad_record_is_fatal_and_named(tmp_path, task_cls, good, change, field):
    path = write_jsonl(tmp_path / "data.jsonl", [good(0), {**good(1), **change}, good(2)])
    with pytest.raises(EvalDataError) as info:
        task_cls(path).load()
    message = str(info.value)
    assert path in message and "line 2" in message and repr(field) in message
    assert info.value.field == field


@pytest.mark.parametrize("task_cls", [ClosedQATask, OpenQATask, ReasoningTask])
def test_jsonl_not_json_and_not_an_object(tmp_path, task_cls):
    good = {ClosedQATask: closed_ok, OpenQATask: open_ok, ReasoningTask: reasoning_ok}[task_cls]
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), "{not json", good(1), "[1, 2]"])
    with pytest.raises(EvalDataError, match=r"line 2: field '<record>'"):
        task_cls(path).load()
    task = task_cls(path, on_bad_record="skip")
    items = task.load()
    assert [i.record for i in items] == ["line 1", "line 3"]
    assert [e.where for e in task.skipped] == ["line 2", "line 4"]


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ("1\tA dog ran.\tAn animal ran.\tneutral", "label"),
        ("1\tA dog ran.\tAn animal ran.\t", "label"),
        ("1\tA dog ran.\tAn animal ran.", "<record>"),
        ("1\t \tAn animal ran.\tentailment", "sentence1"),
        ("1\tA dog ran.\t\tnot_entailment", "sentence2"),
    ],
)
def test_nli_bad_row_is_fatal_and_named(tmp_path, row, field):
    path = write_tsv(tmp_path / "nli.tsv", ["0\tA cat sat.\tA cat sat.\tentailment", row])
    with pytest.raises(EvalDataError) as info:
        NLITask(path).load()
    assert path in str(info.value) and "line 3" in str(info.value) and repr(field) in str(info.value)


def test_nli_header_and_quotes(tmp_path):
    with pytest.raises(EvalDataError, match="'<header>'"):
        NLITask(
            write_tsv(tmp_path / "h.tsv", ["0\ta\tb\tentailment"], header="idx\ts1\ts2\tlabel\n"), on_bad_record="skip"
        ).load()
    # quotation marks stay part of the sentence
    path = write_tsv(tmp_path / "q.tsv", ['0\t"Go," he said.\tHe spoke.\tnot_entailment'])
    (item,) = NLITask(path).load()
    assert item.prompt == '"Go," he said. entails He spoke.. True or False? answer:' and item.label == 0


def test_skip_mode_leaves_bad_records_out_and_never_scores_them(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    rows = ["0\tA.\tB.\tentailment", "1\tBAD.\tB.\tcontradiction", "2\tC.\tD.\tnot_entailment", "3\tE.\tF.\tentailment"]
    path = write_tsv(tmp_path / "nli.tsv", rows)
    task = NLITask(path, limit=3, on_bad_record="skip")
    items = task.load()
    assert [i.record for i in items] == ["line 2 (index 0)", "line 4 (index 2)", "line 5 (index 3)"]  # limit counts good records
    assert len(task.skipped) == 1 and task.skipped[0].where == "line 3" and task.skipped[0].field == "label"
    seen = []
    real = common.score_targets  # the one pass that scores (and, with one new token, answers) every prompt
    monkeypatch.setattr(common, "score_targets", lambda m, t, prompts, *a, **k: seen.extend(prompts) or real(m, t, prompts, *a, **k))
    out = task.update(model, tok, items)
    assert len(out) == 3 and not any("BAD" in p for p in seen) and len(seen) == 6  # each prompt with both answer words
    with pytest.raises(EvalDataError, match="line 3"):
        NLITask(path).load()
    assert len(NLITask(path, limit=1).load()) == 1  # fatal mode stops before reaching it


REAL = [
    (NLITask, "test-NLI.tsv", "line 2 (index 0)"),
    (ClosedQATask, "test-ClosedDomainQA.jsonl", "line 1"),
    (OpenQATask, "test-OpenDomainQA.jsonl", "line 1"),
    (ReasoningTask, "test-reasoning.jsonl", "line 1"),
]


@pytest.mark.parametrize(("task_cls", "name", "first"), REAL)
def test_load_real_files(task_cls, name, first):
    path = GENERAL / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    items = task_cls(str(path), limit=7).load()
    assert len(items) == 7 and items[0].record == first
    for item in items:
        assert isinstance(item.prompt, str) and len(item.prompt) > 40
        if task_cls in (NLITask, ClosedQATask):
            assert item.label in (0, 1) and item.prompt.endswith("answer:" if task_cls is NLITask else "answer: ")
        elif task_cls is OpenQATask:
            assert item.answers and all(isinstance(a, str) for a in item.answers) and item.prompt.endswith("\nAnswer:")
        else:
            assert item.gold.strip().replace(",", "").lstrip("-").isdigit() and "####" not in item.prompt
    if task_cls is ReasoningTask:
        assert items[0].gold == "18"  # GSM8K test #1: Janet's ducks
    if task_cls is NLITask:
        assert [i.label for i in items[:2]] == [0, 1]


# ---------------------------------------------------------------- update on the tiny model


def binary_items(task_cls):
    if task_cls is NLITask:
        return [
            parse_nli({"index": str(i), "sentence1": f"S{i}.", "sentence2": "T", "label": lab}, f"line {i + 2}", "f")
            for i, lab in enumerate(["entailment", "not_entailment", "entailment"])
        ]
    return [parse_closed_qa({**closed_ok(i), "answer": bool(i % 2)}, f"line {i + 1}", "f") for i in range(3)]


@pytest.mark.parametrize("task_cls", [NLITask, ClosedQATask])
def test_binary_update_on_tiny_model(tiny, task_cls):
    model, tok = tiny
    task = task_cls("unused", batch_size=2)
    items = binary_items(task_cls)
    rows = task.update(model, tok, items)
    assert len(rows) == 3 and json.loads(json.dumps(rows)) == rows
    pos, neg = task.positive, task.negative
    nll = target_nll(model, tok, [i.prompt for i in items] * 2, [pos] * 3 + [neg] * 3)
    for row, item, p, n in zip(rows, items, nll[:3].tolist(), nll[3:].tolist()):
        assert row["gold"] == item.label and row["prediction"] in (INVALID, 0, 1)
        assert row[f"nll_{pos}"] == pytest.approx(p) and row[f"nll_{neg}"] == pytest.approx(n)
        assert row["likelihood_prediction"] == int(p < n)
    values = {k: float(v) for k, v in task.compute().items()}
    assert set(values) == {"acc", "f1", "mcc", "f1_likelihood", "acc_likelihood", "invalid_rate"}
    assert all(0.0 <= values[k] <= 1.0 for k in ("acc", "f1", "f1_likelihood", "acc_likelihood", "invalid_rate")) and -1.0 <= values["mcc"] <= 1.0
    want = brute_force([i.label for i in items], [r["prediction"] for r in rows], [r["likelihood_prediction"] for r in rows])
    assert values == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("task_cls", [NLITask, ClosedQATask])
def test_one_token_answers_are_what_generate_answers(tiny, task_cls):
    """With one new token the answer is the top-1 of the scoring pass; it must be what `generate`
    (left-padded, in its own batches) decodes, and the NLLs exactly `target_nll`'s."""
    model, tok = tiny
    task = task_cls("unused", batch_size=3)
    items = binary_items(task_cls) * 4  # 12 prompts: several batches in both paths, repeats deduplicated
    items = [BinaryItem(f"r{i}", item.prompt + " x" * (i % 5), item.label) for i, item in enumerate(items)]
    prompts = [item.prompt for item in items]
    rows = task.update(model, tok, items)
    generated = generate_continuations(model, tok, prompts, 1, batch_size=3)
    assert [row["generated"] for row in rows] == generated
    nll = target_nll(model, tok, prompts * 2, [task.positive] * len(items) + [task.negative] * len(items), batch_size=3)
    assert [row[f"nll_{task.positive}"] for row in rows] == nll[: len(items)].tolist()
    assert [row[f"nll_{task.negative}"] for row in rows] == nll[len(items) :].tolist()


def test_a_generation_config_that_changes_greedy_decoding_keeps_generate(tiny):
    """Penalties and suppressed tokens in a model's generation config (Qwen2.5 ships a repetition
    penalty of 1.05) make `generate` pick other tokens than the top-1: such a model is answered by `generate`."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    assert greedy_is_argmax(model)
    model.generation_config.repetition_penalty = 1.0  # the neutral value
    assert greedy_is_argmax(model)
    model.generation_config.repetition_penalty = 1.05
    assert not greedy_is_argmax(model)
    model.generation_config.repetition_penalty = None
    items = [BinaryItem(f"r{i}", item.prompt + " y" * i, item.label) for i, item in enumerate(binary_items(NLITask) * 3)]
    prompts = [item.prompt for item in items]
    top1 = score_targets(model, tok, prompts, ["true"] * len(items)).next_token.tolist()
    model.generation_config.suppress_tokens = sorted(set(top1))  # generate may not answer with any of them
    assert not greedy_is_argmax(model)
    rows = NLITask("unused", batch_size=3).update(model, tok, items)
    generated = generate_continuations(model, tok, prompts, 1, batch_size=3)
    assert [row["generated"] for row in rows] == generated
    assert generated != [tok.decode([t], skip_special_tokens=True) for t in top1]  # (two ids may decode alike, e.g. to '\ufffd')


def test_binary_update_parses_generations(tiny, monkeypatch):
    """Controlled generations through the whole update: parse, acc without invalid answers, rows."""
    model, tok = tiny
    monkeypatch.setattr(common, "generate_continuations", lambda *a, **k: [" Yes", " maybe", "no"])
    task = ClosedQATask("unused", max_new_tokens=2)  # more than one new token: the answers come from generation
    items = binary_items(ClosedQATask)  # labels 0, 1, 0
    values, rows = run(task, model, tok, items)
    assert [r["prediction"] for r in rows] == [1, INVALID, 0] and [r["correct"] for r in rows] == [False, False, True]
    assert values["acc"] == pytest.approx(0.5) and values["invalid_rate"] == pytest.approx(1 / 3)


def test_reasoning_and_open_qa_update(tiny, monkeypatch):
    model, tok = tiny
    gsm = [parse_reasoning(reasoning_ok(i), f"line {i + 1}", "f") for i in range(3)]  # golds 1, 2, 3
    task = ReasoningTask("unused", batch_size=2)
    rows = task.update(model, tok, gsm)  # real generation: one row per item, acc in [0, 1]
    assert len(rows) == 3 and 0.0 <= float(task.compute()["acc"]) <= 1.0
    monkeypatch.setattr("sphere_pl.evaluation.general.reasoning.generate_continuations", lambda *a, **k: [" 1.", " 20", " 4"])
    values, rows = run(task, model, tok, gsm)
    assert values == {"acc": pytest.approx(2 / 3)} and [r["correct"] for r in rows] == [True, True, False]

    nq = [parse_open_qa(open_ok(i), f"line {i + 1}", "f") for i in range(2)]
    task = OpenQATask("unused")
    rows = task.update(model, tok, nq)
    assert len(rows) == 2 and set(task.compute()) == {"acc", "answer_length"}
    assert 0.0 <= float(task.compute()["acc"]) <= 1.0
    monkeypatch.setattr(
        "sphere_pl.evaluation.general.open_qa.generate_continuations", lambda *a, **k: [" The Ann 0!\nQuestion", " Bob"]
    )
    values, rows = run(task, model, tok, nq)
    assert values["acc"] == pytest.approx(0.5) and values["answer_length"] == pytest.approx((3 + 1) / 2)
    assert rows[0]["prediction"] == "ann 0 question" and rows[0]["correct"] and not rows[1]["correct"]


# ---------------------------------------------------------------- perplexity


TEXT = " = Title = \n \n The quick brown fox jumps over the lazy dog . It was <unk> , said the @-@ fox . \n" * 4


def test_windows():
    assert windows(range(10), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(range(10), 3, max_windows=2) == [[0, 1, 2], [3, 4, 5]]
    assert windows(range(2), 3) == []


def test_perplexity_matches_model_loss_float64(tmp_path, tiny):
    model, tok = tiny
    model64 = copy.deepcopy(model).double()
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    ids = tok(TEXT).input_ids
    task = PerplexityTask(str(path), max_windows=5, seq_len=48, batch_size=2)
    items = task.load(tok)
    assert len(items) == 5 and items == [ids[i * 48 : (i + 1) * 48] for i in range(5)]
    losses, exact = [], []
    with torch.no_grad():
        for window in items:
            x = torch.tensor([window])
            out = model64(input_ids=x, labels=x)
            losses.append(out.loss.item())  # mean over the 47 predicted tokens (transformers upcasts logits to float32 only)
            logprobs = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)  # (47, vocab) float64
            exact.append(-logprobs.gather(1, x[0, 1:, None]).mean().item())
    assert exact == pytest.approx(losses, rel=1e-6)
    mean = sum(exact) / len(exact)
    for batch_size in (1, 2, 5):
        task.batch_size = batch_size
        values, rows = run(task, model64, tok, items)
        assert values["nll"] == pytest.approx(mean, rel=1e-6) and values["perplexity"] == pytest.approx(math.exp(mean), rel=1e-6)
        assert [r["nll"] for r in rows] == pytest.approx(exact, rel=1e-10) and all(r["tokens"] == 47 for r in rows)
    # float32 model, two updates accumulating
    task.reset()
    task.update(model, tok, items[:2])
    task.update(model, tok, items[2:])
    assert float(task.compute()["nll"]) == pytest.approx(mean, rel=1e-4)


def test_perplexity_load_errors(tmp_path, tiny):
    tok = tiny[1]
    path = tmp_path / "short.txt"
    path.write_text("too short", encoding="utf-8")
    with pytest.raises(EvalDataError, match="fewer than one window"):
        PerplexityTask(str(path), seq_len=64).load(tok)
    with pytest.raises(ValueError, match="tokenizer"):
        PerplexityTask(str(path)).load()
    with pytest.raises(ValueError):
        PerplexityTask(str(path), seq_len=1)


def test_perplexity_real_wikitext(tiny):
    path = DATA / "wikitext-2" / "test.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    model, tok = tiny
    task = PerplexityTask(str(path), max_windows=2, seq_len=64)
    items = task.load(tok)
    head = path.read_text(encoding="utf-8")[:128]
    assert len(items) == 2 and tok.decode(items[0] + items[1]) == head  # byte tokenizer: the text as is
    values, rows = run(task, model, tok, items)
    assert (
        len(rows) == 2 and values["perplexity"] > 1.0 and values["perplexity"] == pytest.approx(math.exp(values["nll"]), rel=1e-5)
    )


# ---------------------------------------------------------------- registry


def test_registry():
    assert set(GENERAL_TASKS) == {"reasoning", "nli", "closed_qa", "open_qa", "perplexity", "fluency"}
    for name, cls in GENERAL_TASKS.items():
        assert cls.name == name
    task = create_task("open_qa", path="x", limit=3)
    assert isinstance(task, OpenQATask) and task.limit == 3
    with pytest.raises(ValueError, match=r"unknown general task 'rte'.*closed_qa.*nli.*open_qa.*perplexity.*reasoning"):
        create_task("rte", path="x")
    with pytest.raises(ValueError, match="on_bad_record"):
        create_task("nli", path="x", on_bad_record="ignore")
    with pytest.raises(ValueError, match="limit"):
        create_task("nli", path="x", limit=0)


def test_fluency_task_scores_the_same_prompts_from_the_end_of_a_file_by_ngram_entropy():
    """FluencyTask: the rewrite prompts of the file's last `limit` records (never edited by a run that
    edits the file's first records), greedy continuations scored one by one with ROME's entropy."""
    from sphere_pl.evaluation.fluency import ngram_entropy
    from sphere_pl.evaluation.general import FluencyTask
    from sphere_pl.evaluation.generation_quality import scored_text

    path = DATA / "counterfact" / "counterfact-train.json"
    task = FluencyTask(str(path), start=-3, limit=3, max_new_tokens=6, batch_size=2)
    items = task.load()
    last = json.loads(path.read_text())[-3:]
    assert [r.case_id for r in items] == [r["case_id"] for r in last]
    model, tok = tiny_llama(), tiny_tokenizer()
    values, rows = task.evaluate_cases(model, tok, items)
    assert [row["prompts"] for row in rows] == [[r["prompt"]] for r in last]
    # greedy: each continuation is the argmax token after token, from a plain forward pass
    for row in rows:
        ids = tok(row["prompts"][0]).input_ids
        for _ in range(6):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        prompt_len = len(tok(row["prompts"][0]).input_ids)
        assert row["generated"][0] == tok.decode(ids[prompt_len:], skip_special_tokens=True)
        assert row["fluency"] == pytest.approx(ngram_entropy(scored_text(row["prompts"][0], row["generated"][0])))
    assert float(values["fluency"]) == pytest.approx(sum(r["fluency"] for r in rows) / 3)
    with pytest.raises(EvalDataError, match="the file has only"):
        FluencyTask(str(path), start=9999, limit=5).load()

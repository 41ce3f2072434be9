"""ZsRE: the MEND-format reader, top-1 token accuracy against a brute-force float64 loop, the
ZsRE metrics and the routing of mixed CounterFact / ZsRE requests."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from helpers import brute_force_accuracy, tiny_llama, tiny_tokenizer
from sphere_pl.data.readers import load_edit_requests
from sphere_pl.data.records import EditDataError, EditRequest
from sphere_pl.evaluation import FactEvaluator, ZsREEvaluator, score_targets

ZSRE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "zsre" / "zsre_mend_train-1k.json"
needs_data = pytest.mark.skipif(not ZSRE.is_file(), reason=f"shared data not found at {ZSRE}")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(), tiny_tokenizer()


def test_token_accuracy_matches_a_brute_force_loop(tiny):
    model, tok = tiny
    model64 = copy.deepcopy(model).double()
    prompts = ["Tokyo is the capital of", "The mother tongue of Victor Hugo is", "Hi", "Q"]
    targets = ["Japan", "French and more", "x", "y z"]
    # (non-zero accuracies on a real model: tests/integration/test_smollm2_evaluation.py)
    scores = score_targets(model64, tok, prompts, targets, batch_size=2)
    expected = torch.tensor([brute_force_accuracy(model64, tok, p, t) for p, t in zip(prompts, targets)], dtype=torch.float64)
    torch.testing.assert_close(scores.token_accuracy, expected, rtol=0, atol=0)


def zsre_request(case_id, benchmark="zsre", **fields):
    base = dict(
        case_id=case_id, prompt="What is the product made by {}?", subject="UniFirst", target_new="unmanned aircraft",
        target_true="uniform", paraphrase_prompts=("What will be the product of UniFirst?",),
        neighborhood_prompts=("nq question: who voiced gaston?",), neighborhood_true="Richard White", benchmark=benchmark,
    )  # fmt: skip
    base.update(fields)
    return EditRequest(**base)


def test_zsre_evaluator_averages_token_accuracy_per_group(tiny):
    model, tok = tiny
    requests = [zsre_request(0), zsre_request(1, subject="Delta Serpentis", target_new="Virgo", paraphrase_prompts=("a", "b"))]
    values, rows = ZsREEvaluator("zs/").evaluate_cases(model, tok, requests)
    assert set(values) == {"zs/efficacy_accuracy", "zs/generalization_accuracy", "zs/specificity_accuracy"}
    assert len(rows) == 2 + 3 + 2
    for group in ("efficacy", "generalization", "specificity"):
        mine = [r for r in rows if r["group"] == group]
        prompts, targets = [r["prompt"] for r in mine], [r["target"] for r in mine]
        expected = score_targets(model, tok, prompts, targets).token_accuracy.double().mean()
        assert values[f"zs/{group}_accuracy"].item() == pytest.approx(expected.item(), abs=1e-7)
    # specificity scores the unrelated question's own answer
    assert {r["target"] for r in rows if r["group"] == "specificity"} == {"Richard White"}


def test_fact_evaluator_routes_each_request_to_its_benchmark(tiny):
    model, tok = tiny
    cf = zsre_request(10, benchmark="counterfact")
    zs = zsre_request(11)
    values, rows = FactEvaluator().evaluate_cases(model, tok, [cf, zs])
    assert "efficacy_score" in values and "efficacy_accuracy" in values
    assert {(r["benchmark"], r["case_id"]) for r in rows} == {("counterfact", 10), ("zsre", 11)}
    only_cf = FactEvaluator().evaluate(model, tok, [cf])
    assert "efficacy_accuracy" not in only_cf and "efficacy_score" in only_cf


@needs_data
def test_reader_on_the_real_mend_file_teaches_the_gold_answer_as_the_papers_code(tmp_path):
    """The paper's convention (dsets/zsre.py of the official code): the edit teaches answers[0]; `alt`
    is not read, so the two records with an empty one are editable."""
    requests = load_edit_requests(ZSRE, cache_dir=str(tmp_path / "cache"))
    raw = json.loads(ZSRE.read_text())
    assert len(requests) == len(raw) == 1000
    for request, record in zip(requests, raw):
        assert request.case_id == raw.index(record) and request.benchmark == "zsre"
        assert request.target_new == record["answers"][0] and request.target_true == "<|endoftext|>"
        assert request.rewrite_prompt == record["src"] and request.prompt == record["src"].replace(record["subject"], "{}")
        assert request.paraphrase_prompts == (record["rephrase"],)
        assert request.neighborhood_prompts == (record["loc"] + "?",) and request.neighborhood_true == record["loc_ans"]
    assert sum(r.target_new != rec["alt"] for r, rec in zip(requests, raw)) > 900  # another edit than MEND's (983 of 1000 here)


@needs_data
def test_reader_on_the_real_mend_file_with_mends_alt_convention(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(EditDataError, match=r"case_id=534 .*zsre_mend_train-1k.json.*field 'alt': is empty"):
        load_edit_requests(ZSRE, cache_dir=cache, zsre_target="alt")  # two real records have an empty new answer
    with pytest.warns(UserWarning, match=r"skipped 2 bad record\(s\)") as caught:
        requests = load_edit_requests(ZSRE, cache_dir=cache, on_bad_record="skip", zsre_target="alt")
    message = str(caught[0].message)
    assert "case_id=534" in message and "case_id=723" in message
    assert len(requests) == 998
    raw = json.loads(ZSRE.read_text())
    first = requests[0]
    assert first.case_id == 0 and first.benchmark == "zsre"
    assert first.rewrite_prompt == raw[0]["src"]
    assert (first.target_new, first.target_true) == (raw[0]["alt"], raw[0]["answers"][0])
    # positions are kept as case_ids: record 535 follows the skipped 534
    assert [r.case_id for r in requests[533:536]] == [533, 535, 536]


def test_an_unknown_zsre_target_convention_is_refused_with_the_valid_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown ZsRE target convention 'gold'; choose one of \['alt', 'answer'\]"):
        load_edit_requests(tmp_path / "never-read.json", zsre_target="gold")


@pytest.mark.parametrize(
    "change, field",
    [({"src": "What is made?"}, "subject"), ({"answers": []}, "answers"), ({"loc_ans": " "}, "loc_ans"), ({"rephrase": None}, "rephrase")],
)
def test_reader_names_the_bad_field(tmp_path, change, field):
    record = {
        "subject": "UniFirst", "src": "What is the product made by UniFirst?", "rephrase": "What will be the product of UniFirst?",
        "alt": "unmanned aircraft", "answers": ["uniform"], "loc": "nq question: who voiced gaston", "loc_ans": "Richard White",
    }  # fmt: skip
    good = dict(record)
    record.update(change)
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(EditDataError, match=rf"case_id=1 .*field '{field}"):
        load_edit_requests(path, cache_dir=str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [r.case_id for r in load_edit_requests(path, cache_dir=str(tmp_path / "c2"), on_bad_record="skip")] == [0]


def test_knowedit_records_score_by_token_accuracy_without_paraphrases_and_with_the_subjects_own_relations(tiny, tmp_path):
    """A WikiData_counterfact record has no paraphrase: it adds no generalization row (and no NaN to the mean);
    its specificity prompts are the subject's own other relations, scored against their recorded answer. A record
    with Forgetfulness prompts only has no specificity row."""
    model, tok = tiny
    records = [
        {"subject": "Goursez Vreizh", "prompt": "The name of the country which Goursez Vreizh is associated with is",
         "target_new": "Franche-Comté", "ground_truth": "France",
         "locality": {"Relation_Specificity": [{"prompt": "The name of the founder of Goursez Vreizh is", "ground_truth": "Jean Le Fustec"}]}},
        {"subject": "Emily I Jones", "prompt": "The gender of Emily I Jones is", "target_new": "male", "ground_truth": "female",
         "locality": {"Forgetfulness": [{"prompt": "The occupation of Emily I Jones is", "ground_truth": "researcher"}]}},
    ]  # fmt: skip
    path = tmp_path / "knowedit_wiki.json"
    path.write_text(json.dumps(records))
    requests = load_edit_requests(path, cache_dir=str(tmp_path / "cache"))
    values, rows = ZsREEvaluator("zs/").evaluate_cases(model, tok, requests)
    assert sorted((r["case_id"], r["group"]) for r in rows) == [(0, "efficacy"), (0, "specificity"), (1, "efficacy")]
    assert [r["target"] for r in rows if r["group"] == "specificity"] == ["Jean Le Fustec"]
    for group in ("efficacy", "specificity"):
        mine = [r for r in rows if r["group"] == group]
        expected = score_targets(model, tok, [r["prompt"] for r in mine], [r["target"] for r in mine]).token_accuracy.double().mean()
        assert values[f"zs/{group}_accuracy"].item() == pytest.approx(expected.item(), abs=1e-7)
    assert torch.isnan(values["zs/generalization_accuracy"])  # no paraphrase seen: NaN, as TokenAccuracy says, not 0

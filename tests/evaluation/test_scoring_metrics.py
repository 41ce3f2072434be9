"""target_nll against a brute-force reference, and the CounterFact metrics against hand-computed values."""

import copy
import math

import pytest
import torch

from sphere_pl.evaluation.counterfact import (
    COUNTERFACT_GROUPS,
    CounterFactEvaluator,
    CounterFactMagnitude,
    CounterFactScore,
    counterfact_metrics,
)
from helpers import tiny_llama, tiny_tokenizer
from sphere_pl.data.records import EditRequest
from sphere_pl.evaluation.scoring import compare_targets, target_nll

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Hi",
    "Tokyo is the capital of",
    "The mother tongue of Victor Hugo is",
    "Q",
]
TARGETS = ["Paris", "Rome and Milan", "Japan", "French", "x"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(), tiny_tokenizer()


@pytest.fixture(scope="module")
def model64(tiny):
    return copy.deepcopy(tiny[0]).double()


def brute_force_nll(model64, tokenizer, prompt, target):
    """One example, full forward, full-vocabulary log-softmax, float64."""
    prompt_ids = tokenizer(prompt).input_ids
    target_ids = tokenizer(" " + target, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model64(ids).logits[0].double(), dim=-1)
    n = len(prompt_ids)
    return -sum(logprobs[n + j - 1, t].item() for j, t in enumerate(target_ids)) / len(target_ids)


@pytest.fixture(scope="module")
def reference(tiny, model64):
    tok = tiny[1]
    return torch.tensor([brute_force_nll(model64, tok, p, t) for p, t in zip(PROMPTS, TARGETS)], dtype=torch.float64)


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_target_nll_matches_brute_force_float64(tiny, model64, reference, batch_size):
    tok = tiny[1]
    nll = target_nll(model64, tok, PROMPTS, TARGETS, batch_size=batch_size)
    assert nll.shape == (len(PROMPTS),) and nll.dtype == torch.float64
    torch.testing.assert_close(nll, reference, rtol=1e-10, atol=1e-10)


def test_target_nll_float32_model(tiny, reference):
    model, tok = tiny
    nll = target_nll(model, tok, PROMPTS, TARGETS, batch_size=3)
    assert nll.dtype == torch.float32 and not nll.requires_grad
    torch.testing.assert_close(nll.double(), reference, rtol=1e-4, atol=1e-5)


def test_target_nll_only_scores_target_positions(tiny):
    """The LM head sees one row per target token, never every position of the padded batch."""
    model, tok = tiny
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    try:
        target_nll(model, tok, PROMPTS, TARGETS)
    finally:
        handle.remove()
    n_target_tokens = sum(len(tok(" " + t, add_special_tokens=False).input_ids) for t in TARGETS)
    assert rows == [torch.Size([n_target_tokens, model.config.hidden_size])]


def test_target_nll_edge_cases(tiny):
    model, tok = tiny
    assert target_nll(model, tok, [], []).shape == (0,)
    with pytest.raises(ValueError, match="targets"):
        target_nll(model, tok, ["a", "b"], ["x"])
    with pytest.raises(ValueError, match="empty"):
        target_nll(model, tok, ["a"], [" "])
    with pytest.raises(ValueError, match="no tokens"):
        target_nll(model, tok, [""], ["x"])


def test_compare_targets_is_two_target_nll_calls(tiny):
    model, tok = tiny
    new = ["Rome"] * len(PROMPTS)
    nll_new, nll_true = compare_targets(model, tok, PROMPTS, new, TARGETS, batch_size=4)
    torch.testing.assert_close(nll_new, target_nll(model, tok, PROMPTS, new))
    torch.testing.assert_close(nll_true, target_nll(model, tok, PROMPTS, TARGETS))
    # a single string applies to every prompt
    torch.testing.assert_close(compare_targets(model, tok, PROMPTS, "Rome", TARGETS)[0], nll_new)
    with pytest.raises(ValueError):
        compare_targets(model, tok, PROMPTS, new[:2], TARGETS)


def test_targets_that_share_the_model_input_share_one_row(tiny, model64):
    """With one-token targets (here: one byte after the space) a prompt's new and true target are
    read from the same forward pass; the values still equal one-at-a-time brute force."""
    model, tok = tiny
    new, true = ["A"] * len(PROMPTS), ["B"] * len(PROMPTS)
    rows = []
    handle = model64.base_model.register_forward_hook(lambda m, a, k, out: rows.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        nll_new, nll_true = compare_targets(model64, tok, PROMPTS, new, true, batch_size=4)
    finally:
        handle.remove()
    assert sum(rows) == len(set(PROMPTS))  # one row per distinct prompt, not two
    expected_new = [brute_force_nll(model64, tok, p, "A") for p in PROMPTS]
    expected_true = [brute_force_nll(model64, tok, p, "B") for p in PROMPTS]
    torch.testing.assert_close(nll_new, torch.tensor(expected_new, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(nll_true, torch.tensor(expected_true, dtype=torch.float64), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- metrics


def random_nll(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) * 6, torch.rand(n, generator=g) * 6


def expected(prefer, nll_new, nll_true):
    """(score, magnitude) in plain Python."""
    pairs = list(zip(nll_new.tolist(), nll_true.tolist()))
    if prefer == "true":
        pairs = [(t, n) for n, t in pairs]
    score = sum(1 for pref, other in pairs if pref < other) / len(pairs)
    magnitude = sum(math.exp(-pref) - math.exp(-other) for pref, other in pairs) / len(pairs)
    return score, magnitude


@pytest.mark.parametrize("prefer", ["new", "true"])
def test_metrics_match_hand_computed(prefer):
    nll_new, nll_true = random_nll(0, 50)
    score, magnitude = CounterFactScore(prefer), CounterFactMagnitude(prefer)
    score.update(nll_new, nll_true)
    magnitude.update(nll_new, nll_true)
    want_score, want_magnitude = expected(prefer, nll_new, nll_true)
    assert 0 < want_score < 1
    assert score.compute().item() == pytest.approx(want_score, abs=1e-7)
    assert magnitude.compute().item() == pytest.approx(want_magnitude, abs=1e-6)


def test_ties_count_for_neither_side():
    nll = torch.tensor([1.0, 2.0])
    for prefer in ("new", "true"):
        metric = CounterFactScore(prefer)
        metric.update(nll, nll.clone())
        assert metric.compute().item() == 0.0


@pytest.mark.parametrize("cls", [CounterFactScore, CounterFactMagnitude])
def test_accumulation_equals_one_big_update_and_reset(cls):
    chunks = [random_nll(seed, n) for seed, n in [(1, 7), (2, 1), (3, 0), (4, 20)]]
    accumulated, whole = cls("new"), cls("new")
    for nll_new, nll_true in chunks:
        accumulated.update(nll_new, nll_true)
    whole.update(torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]))
    torch.testing.assert_close(accumulated.compute(), whole.compute())
    assert accumulated.count.item() == 28

    accumulated.reset()
    nll_new, nll_true = random_nll(5, 9)
    accumulated.update(nll_new, nll_true)
    want = expected("new", nll_new, nll_true)[0 if cls is CounterFactScore else 1]
    assert accumulated.compute().item() == pytest.approx(want, abs=1e-6)


def test_merged_states_sum():
    """dist_reduce_fx='sum': merging two workers' states equals one metric seeing everything."""
    (a_new, a_true), (b_new, b_true) = random_nll(6, 10), random_nll(7, 13)
    a, b, whole = CounterFactMagnitude("true"), CounterFactMagnitude("true"), CounterFactMagnitude("true")
    a.update(a_new, a_true)
    b.update(b_new, b_true)
    whole.update(torch.cat([a_new, b_new]), torch.cat([a_true, b_true]))
    a.merge_state(b)
    torch.testing.assert_close(a.compute(), whole.compute())


def test_metric_validation():
    with pytest.raises(ValueError, match="prefer"):
        CounterFactScore("old")
    with pytest.raises(ValueError, match="shape"):
        CounterFactScore("new").update(torch.zeros(3), torch.zeros(2))
    assert CounterFactScore.higher_is_better and CounterFactScore.full_state_update is False


def test_counterfact_metrics_keys_and_preferences():
    metrics = counterfact_metrics("val/")
    assert sorted(metrics.keys(keep_base=False)) == sorted(
        f"val/{g}_{k}" for g in ("efficacy", "generalization", "specificity") for k in ("score", "magnitude")
    )
    for group, prefer in COUNTERFACT_GROUPS.items():
        assert metrics[f"{group}_score"].prefer == prefer == metrics[f"val/{group}_magnitude"].prefer
    assert COUNTERFACT_GROUPS == {"efficacy": "new", "generalization": "new", "specificity": "true"}


# ---------------------------------------------------------------- evaluator

REQUESTS = [
    EditRequest(
        case_id=0,
        prompt="{} is located in the city of",
        subject="The Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
        paraphrase_prompts=("Where is the Eiffel Tower? It is in", "The Eiffel Tower stands in"),
        neighborhood_prompts=("The Louvre is located in the city of",),
        neighborhood_true="Paris",
    ),
    EditRequest(case_id=1, prompt="The mother tongue of {} is", subject="Victor Hugo", target_new="English", target_true="French"),
    EditRequest(
        case_id=2,
        prompt="{}, the capital of",
        subject="Tokyo",
        target_new="China",
        target_true="Japan",
        paraphrase_prompts=("Tokyo is the capital city of",),
        neighborhood_prompts=("Osaka is a city in", "Kyoto, a city of"),
        neighborhood_true="Japan",
    ),
]


def test_evaluator_routes_prompt_groups(tiny, model64):
    model, tok = tiny
    groups = {
        "efficacy": [(r.rewrite_prompt, r.target_new, r.target_true) for r in REQUESTS],
        "generalization": [(p, r.target_new, r.target_true) for r in REQUESTS for p in r.paraphrase_prompts],
        "specificity": [(p, r.target_new, r.neighborhood_true) for r in REQUESTS for p in r.neighborhood_prompts],
    }
    assert [len(v) for v in groups.values()] == [3, 3, 3]
    evaluator = CounterFactEvaluator(prefix="cf/")
    values = evaluator.evaluate(model, tok, REQUESTS)
    assert sorted(values) == sorted(f"cf/{g}_{k}" for g in groups for k in ("score", "magnitude"))
    for group, rows in groups.items():
        prompts, new, true = map(list, zip(*rows))
        nll_new = torch.tensor([brute_force_nll(model64, tok, p, t) for p, t in zip(prompts, new)])
        nll_true = torch.tensor([brute_force_nll(model64, tok, p, t) for p, t in zip(prompts, true)])
        score, magnitude = expected(COUNTERFACT_GROUPS[group], nll_new, nll_true)
        assert values[f"cf/{group}_score"].item() == pytest.approx(score, abs=1e-6)
        assert values[f"cf/{group}_magnitude"].item() == pytest.approx(magnitude, abs=1e-5)
    # evaluate leaves no state behind
    assert all(m.count.item() == 0 for m in evaluator.metrics.values())


def test_evaluator_accumulates_and_skips_empty_groups(tiny):
    model, tok = tiny
    evaluator = CounterFactEvaluator()
    evaluator.update(model, tok, REQUESTS[:2])
    evaluator.update(model, tok, REQUESTS[2:])
    accumulated = evaluator.compute()
    torch.testing.assert_close(accumulated, CounterFactEvaluator().evaluate(model, tok, REQUESTS))
    counts = {k: m.count.item() for k, m in evaluator.metrics.items()}
    assert counts["efficacy_score"] == 3 and counts["generalization_score"] == 3 and counts["specificity_score"] == 3

    # a request without paraphrases or neighbors: no crash, those groups count nothing (NaN, not 0)
    values = evaluator.evaluate(model, tok, [REQUESTS[1]])
    assert not math.isnan(values["efficacy_score"].item())
    for key in ("generalization_score", "generalization_magnitude", "specificity_score", "specificity_magnitude"):
        assert math.isnan(values[key].item())
    assert CounterFactEvaluator().evaluate(model, tok, []) is not None


def test_evaluator_is_order_independent(tiny):
    model, tok = tiny
    shuffled = REQUESTS[::-1]
    torch.testing.assert_close(
        CounterFactEvaluator(batch_size=2).evaluate(model, tok, shuffled),
        CounterFactEvaluator().evaluate(model, tok, REQUESTS),
    )


def test_target_nll_restores_training_mode(tiny):
    model, tok = tiny
    model.train()
    try:
        target_nll(model, tok, PROMPTS[:2], TARGETS[:2])
        assert model.training
    finally:
        model.eval()

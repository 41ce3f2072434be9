"""Fluency (n-gram entropy), tf-idf consistency and generation-based efficacy, against
brute-force or hand-computed values."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer
from torchmetrics import MetricCollection

from sphere_pl.data.readers import load_edit_requests
from sphere_pl.data.records import EditRequest
from sphere_pl.evaluation.consistency import (
    Consistency,
    ReferenceTexts,
    TfidfModel,
    read_corpus,
    tfidf_similarity,
)
from sphere_pl.evaluation.base import compute_or_nan
from sphere_pl.evaluation.fluency import (
    Fluency,
    mean_ngram_entropy,
    ngram_entropy,
    word_tokens,
)
from sphere_pl.evaluation.generation import generate_continuations
from sphere_pl.evaluation.generation_quality import (
    GenerationQualityEvaluator,
    scored_text,
)
from sphere_pl.evaluation.generative_efficacy import (
    GenerativeEfficacyEvaluator,
    starts_with_target,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
COUNTERFACT = DATA / "counterfact" / "most_orthogonal.json"
WIKITEXT = DATA / "wikitext-2" / "test.txt"

needs_data = pytest.mark.skipif(not (COUNTERFACT.is_file() and WIKITEXT.is_file()), reason=f"shared data not found at {DATA}")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(), tiny_tokenizer()


# ---------------------------------------------------------------------------------------
# fluency


@pytest.mark.parametrize(
    "text, tokens",
    [
        # nltk.word_tokenize's documented example
        (
            "Good muffins cost $3.88 (roughly 3,36 euros)\nin New York.  Please buy me\ntwo of them.\nThanks.",
            ["Good", "muffins", "cost", "$", "3.88", "(", "roughly", "3,36", "euros", ")", "in", "New", "York", ".", "Please", "buy", "me", "two", "of", "them", ".", "Thanks", "."],
        ),
        ("They'll save and invest more.", ["They", "'ll", "save", "and", "invest", "more", "."]),
        ("hi, my name can't hello,", ["hi", ",", "my", "name", "ca", "n't", "hello", ","]),
        ('He said "hi" to Mr. Smith of the U.S. team. Then left!',
         ["He", "said", "``", "hi", "''", "to", "Mr.", "Smith", "of", "the", "U.S.", "team", ".", "Then", "left", "!"]),
        ("I cannot -- wait...", ["I", "can", "not", "--", "wait", "..."]),
    ],
)
def test_word_tokens_follow_treebank_rules(text, tokens):
    assert word_tokens(text) == tokens


def brute_entropy(tokens: list[str], n: int) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return -sum(c / len(grams) * math.log2(c / len(grams)) for c in Counter(grams).values())


def test_ngram_entropy_matches_brute_force():
    text = "the cat sat on the mat and the cat ran , the dog sat on the cat"
    tokens = text.split()  # no sentence ends, no clitics: plain whitespace split is the tokenisation
    assert word_tokens(text) == tokens
    expected = (2 / 3 * brute_entropy(tokens, 2) + 4 / 3 * brute_entropy(tokens, 3)) / 2
    assert ngram_entropy(text) == pytest.approx(expected, rel=1e-12)
    # custom orders and weights: the mean of the weighted entropies
    assert ngram_entropy(text, ns=(1, 2, 3), weights=(1.0, 0.5, 2.0)) == pytest.approx(
        (brute_entropy(tokens, 1) + 0.5 * brute_entropy(tokens, 2) + 2.0 * brute_entropy(tokens, 3)) / 3, rel=1e-12
    )
    # five distinct words: H2 = log2(4), H3 = log2(3)
    assert ngram_entropy("a b c d e") == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2, rel=1e-12)


def test_repetition_gives_low_entropy():
    assert ngram_entropy("Paris Paris Paris Paris Paris Paris") == 0.0
    varied = "The tower stands in Paris and draws visitors from every country in the world each year"
    looping = "The tower is in Paris . " * 6
    # a 6-token loop has (about) 6 equally frequent bi- and trigrams however long it runs
    assert ngram_entropy(looping) == pytest.approx(math.log2(6), abs=0.03)
    assert ngram_entropy(looping * 3) == pytest.approx(math.log2(6), abs=0.01)
    assert ngram_entropy(looping) < ngram_entropy(varied) - 1.0
    assert ngram_entropy("Paris") == 0.0  # no bigram, no trigram (as in ROME)


def test_mean_ngram_entropy_and_fluency_metric():
    texts = ["a b c d e", "x x x x", "one two three four five six"]
    values = [ngram_entropy(t) for t in texts]
    assert mean_ngram_entropy(texts) == pytest.approx(sum(values) / 3)
    assert math.isnan(mean_ngram_entropy([]))
    metric = Fluency()
    assert torch.isnan(compute_or_nan(MetricCollection({"fluency": metric}))["fluency"])  # nothing seen: NaN
    metric.update(values[0])
    metric.update(values[1:])
    assert metric.compute().item() == pytest.approx(sum(values) / 3, rel=1e-6)
    assert metric.count.item() == 3
    with pytest.raises(ValueError, match="NaN"):
        metric.update(float("nan"))


# ---------------------------------------------------------------------------------------
# tf-idf

CORPUS = ["The cat sat on the mat.", "The dog sat.", "A cat and a dog!"]
#: terms of each document (lowercased, two or more word characters: "a" is not a term)
CORPUS_TERMS = [{"the", "cat", "sat", "on", "mat"}, {"the", "dog", "sat"}, {"cat", "and", "dog"}]


def reference_idf() -> dict[str, float]:
    n = len(CORPUS_TERMS)
    vocab = set().union(*CORPUS_TERMS)
    return {t: math.log((1 + n) / (1 + sum(t in d for d in CORPUS_TERMS))) + 1 for t in vocab}


def reference_cosine(counts_a: dict[str, int], counts_b: dict[str, int]) -> float:
    idf = reference_idf()
    a = {t: c * idf[t] for t, c in counts_a.items() if t in idf}
    b = {t: c * idf[t] for t, c in counts_b.items() if t in idf}
    dot = sum(a[t] * b.get(t, 0.0) for t in a)
    return dot / math.sqrt(sum(v * v for v in a.values())) / math.sqrt(sum(v * v for v in b.values()))


def test_tfidf_from_corpus_matches_smooth_idf():
    model = TfidfModel.from_corpus(CORPUS)
    idf = reference_idf()
    assert list(model.vocabulary) == sorted(idf) and list(model.vocabulary.values()) == list(range(len(idf)))
    for term, column in model.vocabulary.items():
        assert model.idf[column] == pytest.approx(idf[term], rel=1e-15)
    vectors = model.vectorize(["the CAT sat", "zebra", "cat cat dog"])
    assert vectors.dtype == np.float64 and vectors.shape == (3, len(idf))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), [1.0, 0.0, 1.0], rtol=1e-12)
    # tf is the raw count: "cat cat dog" weighs cat as 2 * idf(cat)
    cat, dog = model.vocabulary["cat"], model.vocabulary["dog"]
    assert vectors[2, cat] / vectors[2, dog] == pytest.approx(2 * idf["cat"] / idf["dog"], rel=1e-12)


def test_tfidf_similarity_matches_independent_float64():
    model = TfidfModel.from_corpus(CORPUS)
    text_a, text_b = "The cat, the CAT and the dog; a zebra", "A dog sat on a mat"
    counts_a = {"the": 3, "cat": 2, "and": 1, "dog": 1, "zebra": 1}
    counts_b = {"dog": 1, "sat": 1, "on": 1, "mat": 1}
    assert tfidf_similarity(model, text_a, text_b) == pytest.approx(reference_cosine(counts_a, counts_b), rel=1e-12)
    assert tfidf_similarity(model, text_a, text_a) == pytest.approx(1.0, rel=1e-12)
    assert tfidf_similarity(model, "cat", "dog") == 0.0
    assert math.isnan(tfidf_similarity(model, "zebra", "cat"))  # no vocabulary term: undefined


def test_tfidf_from_files_round_trip(tmp_path):
    model = TfidfModel.from_corpus(CORPUS)
    np.save(tmp_path / "idf.npy", model.idf)
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps(dict(model.vocabulary)))
    loaded = TfidfModel.from_files(tmp_path / "idf.npy", tmp_path / "tfidf_vocab.json")
    texts = ["the cat sat on the mat", "a dog and a cat"]
    np.testing.assert_array_equal(loaded.vectorize(texts), model.vectorize(texts))

    # a hand-made pair: columns as the JSON says, not in sorted order
    np.save(tmp_path / "small_idf.npy", np.array([2.0, 3.0]))
    (tmp_path / "small_vocab.json").write_text(json.dumps({"rome": 1, "paris": 0}))
    small = TfidfModel.from_files(tmp_path / "small_idf.npy", tmp_path / "small_vocab.json")
    np.testing.assert_allclose(small.vectorize(["Paris paris Rome x"])[0], np.array([4.0, 3.0]) / 5.0, rtol=1e-15)

    np.save(tmp_path / "short_idf.npy", np.array([2.0]))
    with pytest.raises(ValueError, match="1 idf values"):
        TfidfModel.from_files(tmp_path / "short_idf.npy", tmp_path / "small_vocab.json")
    np.save(tmp_path / "object_idf.npy", np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError):  # pickled objects are refused
        TfidfModel.from_files(tmp_path / "object_idf.npy", tmp_path / "small_vocab.json")


@needs_data
def test_wikitext_corpus_documents_are_articles():
    documents = read_corpus(WIKITEXT)
    # 60 top-level "= Title =" headings stand between blank lines (4 more such lines are inside paragraphs)
    assert len(documents) == 60
    assert documents[1][0].startswith("Du Fu ( Wade")  # its first paragraph; headings are not paragraphs
    assert "= 1 / s and a nominal k =" in documents[27]  # an equation line, kept in its article
    assert not any("<unk>" in p or "@-@" in p or p.startswith("= =") for doc in documents for p in doc)
    model = TfidfModel.from_corpus(WIKITEXT)
    assert model.idf.min() >= 1.0 and model.idf[model.vocabulary["the"]] < model.idf[model.vocabulary["belgium"]]
    assert model.idf[model.vocabulary["belgium"]] > 3.0  # in few of the 64 articles


# ---------------------------------------------------------------------------------------
# reference texts


def request(case_id=0, target="Rome", relation_id=None, target_new_id=None, generation_prompts=()):
    return EditRequest(
        case_id=case_id,
        prompt="{} is located in",
        subject="The Eiffel Tower",
        target_new=target,
        target_true="Paris",
        paraphrase_prompts=("Where is the Eiffel Tower? It is in",),
        generation_prompts=generation_prompts,
        relation_id=relation_id,
        target_new_id=target_new_id,
    )


def test_references_snippets_then_corpus_fallback(tmp_path):
    snippets = [
        {"relation_id": "P17", "target_id": "Q220", "samples": [{"name": "Colosseum", "text": "The Colosseum is in Rome."}]},
        {"relation_id": "P17", "target_id": "Q220", "samples": [{"name": "Trevi", "text": "Trevi Fountain, Rome."}]},
    ]
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snippets))
    corpus = [
        "Rome is the capital of Italy.\nRomeo is a name, not a city.\nThey flew to Rome , Italy .",
        "Parisian cafes.\nPeople from Rome eat pasta.",
    ]
    refs = ReferenceTexts.from_files(tmp_path / "attribute_snippets.json", corpus=corpus, max_passages=2)

    found = refs.lookup(request(relation_id="P17", target_new_id="Q220"))
    assert found.texts == ("The Colosseum is in Rome.", "Trevi Fountain, Rome.") and "P17" in found.source

    # no ids, or ids without snippets: corpus paragraphs that mention the target (whole words, at most 2)
    for r in (request(), request(relation_id="P17", target_new_id="Q1")):
        fallback = refs.lookup(r)
        assert fallback.texts == ("Rome is the capital of Italy.", "They flew to Rome , Italy .")
        assert "corpus" in fallback.source
    assert ReferenceTexts(passages=["They flew to Rome , Italy ."]).lookup(request(target="Rome, Italy")).texts
    assert ReferenceTexts(passages=["Parisian cafes."]).lookup(request(target="Paris")).texts == ()

    none = refs.lookup(request(target="Atlantis", relation_id="P17", target_new_id="Q1"))
    assert none.texts == () and "Atlantis" in none.reason and "Q1" in none.reason
    assert "no attribute snippets or corpus" in ReferenceTexts().lookup(request()).reason


# ---------------------------------------------------------------------------------------
# generation-based efficacy


def run(evaluator, model, tok, items) -> tuple[dict[str, float], list[dict]]:
    values, rows = evaluator.evaluate_cases(model, tok, items)
    return {k: float(v) for k, v in values.items()}, rows


@pytest.mark.parametrize(
    "generated, target, expected",
    [
        (" Paris, the capital", "Paris", True),
        ("Paris", "Paris", True),
        ("\n  New   York City", "New York", True),
        (" Washington, D.C", "Washington, D.C.", True),  # trailing punctuation of the target ignored
        (" Parisian", "Paris", False),  # must end at a word boundary
        (" paris", "Paris", False),  # case-sensitive
        (" It is Paris", "Paris", False),  # must be the start
        (" Par", "Paris", False),
        (" C++ and", "C++", True),
    ],
)
def test_starts_with_target(generated, target, expected):
    assert starts_with_target(generated, target) is expected


def test_generative_efficacy_on_tiny_model(tiny):
    model, tok = tiny
    subjects = ["The Eiffel Tower", "Rome", "The Louvre", "Big Ben", "The Colosseum", "Lake Como"]
    long = generate_continuations(model, tok, [f"{s} is located in" for s in subjects], max_new_tokens=12)
    # the random model writes bytes; its text up to the first undecodable byte is a target it must produce
    subject, target = max(zip(subjects, (t.split("\ufffd")[0] for t in long)), key=lambda st: len(st[1].strip()))
    assert len(target.strip()) >= 2 and len(tok(" " + target, add_special_tokens=False).input_ids) >= 3
    rewrite = f"{subject} is located in"

    hit = EditRequest(0, "{} is located in", subject, target, "Paris", paraphrase_prompts=(rewrite, rewrite + " the city of"))
    miss = EditRequest(1, "{} is located in", subject, "Zzqx Qqzx", "Paris", paraphrase_prompts=(rewrite,))
    evaluator = GenerativeEfficacyEvaluator()

    values, rows = run(evaluator, model, tok, [hit])
    assert rows[0]["max_new_tokens"] == len(tok(" " + target, add_special_tokens=False).input_ids) + 2
    assert rows[0]["rewrite"]["match"] is True and values["generated_efficacy"] == 1.0
    assert rows[0]["paraphrases"][0]["match"] is True  # same prompt, same greedy text
    values, rows = run(GenerativeEfficacyEvaluator(max_new_tokens=1), model, tok, [hit])
    assert rows[0]["max_new_tokens"] == 1 and values["generated_efficacy"] == 0.0  # one byte cannot hold the target

    values, rows = run(evaluator, model, tok, [miss])
    assert not rows[0]["rewrite"]["generated"].lstrip().startswith("Zzqx")
    assert values == {"generated_efficacy": 0.0, "generated_generalization": 0.0}

    # both together: budgets differ per record, each still scored on its own generation
    values, rows = run(evaluator, model, tok, [hit, miss])
    assert [r["generated_efficacy"] for r in rows] == [1.0, 0.0] and values["generated_efficacy"] == 0.5
    paraphrase_matches = [d["match"] for r in rows for d in r["paraphrases"]]
    assert values["generated_generalization"] == pytest.approx(sum(paraphrase_matches) / 3)


# ---------------------------------------------------------------------------------------
# generation quality


@needs_data
def test_generation_quality_on_counterfact_records(tiny):
    model, tok = tiny
    records = load_edit_requests(COUNTERFACT)
    chosen = [records[0], records[4]]  # targets "Belgium" (in WikiText) and "HBO" (not in it)
    assert [r.target_new for r in chosen] == ["Belgium", "HBO"]
    assert all(len(r.generation_prompts) == 10 for r in chosen)
    assert (chosen[0].relation_id, chosen[0].target_new_id) == ("P27", "Q31")
    tfidf = TfidfModel.from_corpus(WIKITEXT)
    references = ReferenceTexts.from_files(corpus=WIKITEXT, max_passages=3)
    evaluator = GenerationQualityEvaluator(tfidf, references, max_new_tokens=8, prompts_per_record=2)
    values, rows = run(evaluator, model, tok, chosen)

    assert [r["case_id"] for r in rows] == [r.case_id for r in chosen]
    for record, row in zip(chosen, rows):
        expected_prompts = list(record.generation_prompts[:2]) or [record.rewrite_prompt]
        assert row["prompts"] == expected_prompts and len(row["generated"]) == len(expected_prompts)
        texts = [scored_text(p, g) for p, g in zip(row["prompts"], row["generated"])]
        assert math.isfinite(row["fluency"]) and row["fluency"] == pytest.approx(mean_ngram_entropy(texts))

    belgium, hbo = rows
    refs = references.lookup(chosen[0]).texts
    assert belgium["n_references"] == len(refs) == 3 and all("Belgium" in t for t in refs)
    texts = [scored_text(p, g) for p, g in zip(belgium["prompts"], belgium["generated"])]
    assert belgium["consistency"] == pytest.approx(tfidf_similarity(tfidf, " ".join(texts), " ".join(refs)), rel=1e-12)
    assert hbo["consistency"] is None and "HBO" in hbo["consistency_reason"]

    assert values["fluency"] == pytest.approx((belgium["fluency"] + hbo["fluency"]) / 2, rel=1e-6)
    assert values["consistency"] == pytest.approx(belgium["consistency"], rel=1e-6)  # HBO is not counted as 0


@needs_data
def test_counterfact_ids_select_attribute_snippets(tmp_path):
    records = load_edit_requests(COUNTERFACT)
    snippets = [{"relation_id": "P27", "target_id": "Q31", "samples": [{"name": "Hergé", "text": "Hergé was a Belgian citizen."}]}]
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snippets))
    refs = ReferenceTexts.from_files(tmp_path / "attribute_snippets.json", corpus=WIKITEXT, max_passages=3)
    assert refs.lookup(records[0]).texts == ("Hergé was a Belgian citizen.",)  # P27 / Q31: Belgium
    australia = refs.lookup(records[1])  # no snippets for its ids: WikiText paragraphs instead
    assert len(australia.texts) == 3 and all("Australia" in t for t in australia.texts)


def test_generation_quality_prompts_and_missing_tfidf(tiny):
    model, tok = tiny
    with_prompts = request(case_id=5, generation_prompts=("Rome is", "The Eiffel Tower is in", "In Rome,"))
    without = request(case_id=6)
    evaluator = GenerationQualityEvaluator(max_new_tokens=4, prompts_per_record=2)
    values, rows = run(evaluator, model, tok, [with_prompts, without])
    assert rows[0]["prompts"] == ["Rome is", "The Eiffel Tower is in"]
    assert rows[1]["prompts"] == ["The Eiffel Tower is located in"]
    assert all(r["consistency"] is None and r["consistency_reason"] == "no tf-idf model given" for r in rows)
    assert math.isfinite(values["fluency"]) and math.isnan(values["consistency"])  # nothing scored: NaN, not 0
    assert isinstance(evaluator.metrics["consistency"], Consistency)


def test_scored_text_joins_like_a_decoder():
    assert scored_text("Rome is", " big") == "Rome is big"
    assert scored_text("Rome is", "big") == "Rome is big"  # SentencePiece-style decode without the space
    assert scored_text("Rome is", "") == "Rome is"
    assert scored_text("A", " b\n\nc") == "A b c"
    assert scored_text("Caf\u00e9", "") == "Cafe\u0301"  # NFKD

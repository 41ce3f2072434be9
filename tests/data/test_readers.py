"""Tests for sphere_pl.data_readers against the shared CounterFact files and small bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from sphere_pl.data import readers as data_readers
from sphere_pl.data.readers import (
    COUNTERFACT_URL,
    MULTI_COUNTERFACT_URL,
    EditSourceError,
    load_edit_requests,
)
from sphere_pl.data.records import EditDataError, EditRequest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "counterfact"
MOST_ORTHOGONAL = DATA / "most_orthogonal.json"
VAL = DATA / "counterfact-val.json"

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


def _raw(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _mend(case_id=1, **overrides) -> dict:
    rec = {
        "case_id": case_id,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux spoke the language",
        "locality_prompt": "The mother tongue of Léon Blum is",
        "locality_ground_truth": "French",
    }
    rec.update(overrides)
    return rec


def _cf(case_id=1, **overrides) -> dict:
    rec = {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    }
    rec.update(overrides)
    return rec


def _write(tmp_path: Path, name: str, records) -> Path:
    path = tmp_path / name
    path.write_text(records if isinstance(records, str) else json.dumps(records), encoding="utf-8")
    return path


# --------------------------------------------------------------------- shared data files


@needs_data
def test_full_counterfact_schema_matches_raw_json(cache):
    raw = _raw(MOST_ORTHOGONAL)
    reqs = load_edit_requests(str(MOST_ORTHOGONAL), schema="counterfact", cache_dir=cache)
    assert len(raw) == 10 and len(reqs) == 10
    for req, rec in zip(reqs, raw):
        rw = rec["requested_rewrite"]
        assert isinstance(req, EditRequest)
        assert req.case_id == rec["case_id"]
        assert req.subject == rw["subject"]
        assert req.prompt == rw["prompt"]
        assert req.rewrite_prompt == rw["prompt"].replace("{}", rw["subject"])
        assert req.target_new == rw["target_new"]["str"]
        assert req.target_true == rw["target_true"]["str"]
        assert req.paraphrase_prompts == tuple(rec["paraphrase_prompts"])
        assert req.neighborhood_prompts == tuple(rec["neighborhood_prompts"])
        assert len(req.neighborhood_prompts) == 10
        assert req.neighborhood_true == rw["target_true"]["str"]


@needs_data
def test_auto_detects_full_schema(cache):
    auto = load_edit_requests(MOST_ORTHOGONAL, cache_dir=cache)  # a Path works too
    explicit = load_edit_requests(str(MOST_ORTHOGONAL), schema="counterfact", cache_dir=cache)
    assert auto == explicit


@needs_data
def test_flat_schema_auto_and_limit(cache):
    raw = _raw(VAL)
    reqs = load_edit_requests(str(VAL), cache_dir=cache)
    assert len(reqs) == len(raw) == 1919
    for req, rec in zip(reqs, raw):
        assert req.case_id == rec["case_id"]
        assert req.rewrite_prompt == rec["prompt"]
        assert req.prompt.count("{}") == 1
        assert req.target_new == rec["target_new"]
        assert req.target_true == rec["ground_truth"]
        assert req.paraphrase_prompts == (rec["rephrase_prompt"],)
        assert req.neighborhood_prompts == (rec["locality_prompt"],)
        assert req.neighborhood_true == rec["locality_ground_truth"]

    first = load_edit_requests(str(VAL), schema="mend_counterfact", cache_dir=cache, limit=50)
    assert len(first) == 50
    assert [r.case_id for r in first] == [rec["case_id"] for rec in raw[:50]]
    assert [r.rewrite_prompt for r in first] == [rec["prompt"] for rec in raw[:50]]


@needs_data
def test_flat_and_full_schema_agree_on_shared_case(cache):
    """case_id 6716 is in both most_orthogonal.json (full) and counterfact-val.json (flat)."""
    full = {r.case_id: r for r in load_edit_requests(str(MOST_ORTHOGONAL), cache_dir=cache)}
    flat = {r.case_id: r for r in load_edit_requests(str(VAL), cache_dir=cache)}
    a, b = full[6716], flat[6716]
    assert (a.prompt, a.subject, a.target_new, a.target_true) == (b.prompt, b.subject, b.target_new, b.target_true)
    assert b.neighborhood_prompts[0] in a.neighborhood_prompts


# --------------------------------------------------------------------- small valid inputs


def test_jsonl_and_prompt_dicts_and_rewrite_list(tmp_path, cache):
    rec = _cf(7, neighborhood_prompts=[{"prompt": "The mother tongue of Léon Blum is", "target": "French"}])
    rec["requested_rewrite"] = [rec["requested_rewrite"]]
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    (req,) = load_edit_requests(str(path), cache_dir=cache)
    assert req.case_id == 7
    assert req.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert req.neighborhood_prompts == ("The mother tongue of Léon Blum is",)


def test_several_rewrites_use_first_with_warning(tmp_path, cache):
    rec = _cf(3)
    second = dict(rec["requested_rewrite"], subject="Edwin of Northumbria", prompt="{} follows the religion of")
    rec["requested_rewrite"] = [rec["requested_rewrite"], second]
    path = _write(tmp_path, "multi.json", [rec])
    with pytest.warns(UserWarning, match="only the first"):
        (req,) = load_edit_requests(str(path), cache_dir=cache)
    assert req.subject == "Danielle Darrieux"


def test_flat_template_replaces_first_occurrence_only(tmp_path, cache):
    path = _write(tmp_path, "twice.json", [_mend(1, prompt="Paris, Paris is in", subject="Paris")])
    (req,) = load_edit_requests(str(path), cache_dir=cache)
    assert req.prompt == "{}, Paris is in"


# --------------------------------------------------------------------- bad records


def _assert_data_error(path, match_field: str, case_id: str, cache, schema="auto"):
    with pytest.raises(EditDataError) as info:
        load_edit_requests(str(path), schema=schema, cache_dir=cache)
    msg = str(info.value)
    assert case_id in msg
    assert match_field in msg
    assert str(path) in msg
    return info.value


def test_missing_field(tmp_path, cache):
    bad = _mend(42)
    del bad["locality_ground_truth"]
    path = _write(tmp_path, "missing.json", [_mend(1), bad])
    err = _assert_data_error(path, "locality_ground_truth", "42", cache)
    assert err.case_id == 42 and err.field == "locality_ground_truth"
    assert str(err).endswith("is missing")  # (tmp_path names contain test names: match the end)


def test_missing_nested_field(tmp_path, cache):
    bad = _cf(9)
    del bad["requested_rewrite"]["target_true"]
    path = _write(tmp_path, "missing_nested.json", [_cf(1), bad])
    err = _assert_data_error(path, "target_true", "9", cache)
    assert err.field == "requested_rewrite.target_true"


def test_empty_target_new_flat(tmp_path, cache):
    path = _write(tmp_path, "empty_flat.json", [_mend(1), _mend(77, target_new="  ")])
    err = _assert_data_error(path, "target_new", "77", cache)
    assert str(err).endswith("is empty")


def test_empty_target_new_full(tmp_path, cache):
    bad = _cf(78)
    bad["requested_rewrite"]["target_new"]["str"] = ""
    path = _write(tmp_path, "empty_full.json", [bad])
    err = _assert_data_error(path, "target_new", "78", cache)
    assert err.field == "requested_rewrite.target_new.str"


def test_wrong_type(tmp_path, cache):
    path = _write(tmp_path, "wrong_type.json", [_mend(1), _mend(5, ground_truth=["French"])])
    err = _assert_data_error(path, "ground_truth", "5", cache)
    assert str(err).endswith("expected a string, got list ['French']")


def test_subject_not_in_prompt(tmp_path, cache):
    path = _write(tmp_path, "subject.json", [_mend(1), _mend(13, subject="Léon Blum")])
    err = _assert_data_error(path, "subject", "13", cache)
    assert err.field == "subject"


def test_full_prompt_without_placeholder(tmp_path, cache):
    bad = _cf(21)
    bad["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is"
    path = _write(tmp_path, "noplaceholder.json", [bad])
    _assert_data_error(path, "requested_rewrite.prompt", "21", cache)


def test_duplicate_case_id(tmp_path, cache):
    path = _write(tmp_path, "dup.json", [_mend(1), _mend(8), _mend(8, target_new="German")])
    err = _assert_data_error(path, "case_id", "8", cache)
    assert str(err).endswith("duplicate: record #2 repeats record #1")
    # limit keeps only the first two records, which are fine
    assert [r.case_id for r in load_edit_requests(str(path), cache_dir=cache, limit=2)] == [1, 8]


def test_missing_case_id_named_by_index(tmp_path, cache):
    bad = _mend()
    del bad["case_id"]
    path = _write(tmp_path, "nocase.json", [_mend(1), _mend(2), bad])
    err = _assert_data_error(path, "case_id", "#2", cache)
    assert err.case_id == "#2"
    assert str(err).endswith("is missing")


def test_string_case_ids_pass(tmp_path, cache):
    path = _write(tmp_path, "strid.json", [_mend("a"), _mend("b")])
    assert [r.case_id for r in load_edit_requests(str(path), cache_dir=cache)] == ["a", "b"]


# --------------------------------------------------------------------- bad files / schema


def test_not_json(tmp_path, cache):
    path = _write(tmp_path, "garbage.json", "this is { not json")
    with pytest.raises(EditSourceError) as info:
        load_edit_requests(str(path), cache_dir=cache)
    assert str(path) in str(info.value)
    # read as JSON lines (it does not open a list): the line and column, not a byte offset
    assert "line 1: invalid JSON at column 1: Expecting value" in str(info.value)


def test_empty_file(tmp_path, cache):
    path = _write(tmp_path, "empty.json", "")
    with pytest.raises(EditSourceError, match="empty.json"):
        load_edit_requests(str(path), cache_dir=cache)


def test_missing_path(tmp_path, cache):
    path = tmp_path / "does_not_exist.json"
    with pytest.raises(FileNotFoundError) as info:
        load_edit_requests(str(path), cache_dir=cache)
    assert str(path) in str(info.value)


def test_unknown_schema_lists_keys(tmp_path, cache):
    path = _write(tmp_path, "zsre_like.json", [{"src": "q", "alt": "a", "subject": "s"}])
    with pytest.raises(EditSourceError) as info:
        load_edit_requests(str(path), cache_dir=cache)
    msg = str(info.value)
    assert "'alt'" in msg and "'src'" in msg and str(path) in msg


def test_bad_arguments(tmp_path, cache):
    path = _write(tmp_path, "ok.json", [_mend(1)])
    with pytest.raises(ValueError, match="schema"):
        load_edit_requests(str(path), schema="nonsense", cache_dir=cache)
    with pytest.raises(ValueError, match="limit"):
        load_edit_requests(str(path), cache_dir=cache, limit=-1)


# --------------------------------------------------------------------- URL (no network)


def test_url_is_passed_to_datasets_with_cache_dir(monkeypatch, tmp_path):
    calls = []

    def fake_load_dataset(builder, **kwargs):
        calls.append((builder, kwargs))
        return datasets.Dataset.from_list([_cf(1), _cf(2)])

    monkeypatch.setattr(data_readers.datasets, "load_dataset", fake_load_dataset)
    reqs = load_edit_requests(COUNTERFACT_URL, cache_dir=str(tmp_path / "dl"))
    assert [r.case_id for r in reqs] == [1, 2]
    assert calls == [("json", {"data_files": COUNTERFACT_URL, "split": "train", "cache_dir": str(tmp_path / "dl")})]

    # default cache dir lives under the user's home
    load_edit_requests(MULTI_COUNTERFACT_URL)
    assert calls[-1][1]["data_files"] == MULTI_COUNTERFACT_URL
    assert calls[-1][1]["cache_dir"] == str(Path("~/.cache/sphere_pl/data").expanduser())


def test_url_errors_name_the_url(monkeypatch):
    def failing_load_dataset(builder, **kwargs):
        raise ConnectionError("unreachable")

    monkeypatch.setattr(data_readers.datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(EditSourceError) as info:
        load_edit_requests(COUNTERFACT_URL, cache_dir="unused")
    assert COUNTERFACT_URL in str(info.value) and "unreachable" in str(info.value)


def test_url_constants():
    assert COUNTERFACT_URL == "https://memit.baulab.info/data/dsets/counterfact.json"
    assert MULTI_COUNTERFACT_URL == "https://memit.baulab.info/data/dsets/multi_counterfact.json"


# --------------------------------------------------------------------- KnowEdit (EasyEdit's benchmark files)

KNOWEDIT = DATA.parent / "knowedit"
KNOWEDIT_ZSRE = KNOWEDIT / "benchmark_ZsRE_ZsRE-test-all.json"
KNOWEDIT_WIKI = KNOWEDIT / "benchmark_wiki_counterfact_train_cf.json"
needs_knowedit = pytest.mark.skipif(not KNOWEDIT.is_dir(), reason=f"shared data not found at {KNOWEDIT}")


def _first(answer):
    return answer[0] if isinstance(answer, list) else answer


@needs_knowedit
@pytest.mark.parametrize("target", ["answer", "alt"])
def test_knowedit_zsre_is_detected_and_read_record_by_record_from_the_raw_json(cache, target):
    """Every record of the shared KnowEdit ZsRE file, read field by field from the raw JSON here: the three
    whose subject is not in the question are named (and skipped), the rest match."""
    raw = _raw(KNOWEDIT_ZSRE)
    bad = [i for i, r in enumerate(raw) if r["subject"] not in r["prompt"]]
    with pytest.raises(EditDataError) as info:
        load_edit_requests(str(KNOWEDIT_ZSRE), cache_dir=cache, zsre_target=target)
    assert info.value.case_id == bad[0] and info.value.field == "subject" and str(KNOWEDIT_ZSRE) in str(info.value)
    with pytest.warns(UserWarning, match=f"skipped {len(bad)} bad record"):
        requests = load_edit_requests(str(KNOWEDIT_ZSRE), cache_dir=cache, zsre_target=target, on_bad_record="skip")
    kept = [(i, r) for i, r in enumerate(raw) if i not in bad]
    assert len(requests) == len(kept) == len(raw) - 3
    for request, (i, r) in zip(requests, kept):
        assert request.case_id == i and request.benchmark == "zsre"
        assert request.rewrite_prompt == r["prompt"] and request.subject == r["subject"]
        if target == "answer":
            assert (request.target_new, request.target_true) == (r["ground_truth"][0], data_readers.ZSRE_NO_TRUE_TARGET)
        else:
            assert (request.target_new, request.target_true) == (r["target_new"], r["ground_truth"][0])
        assert request.paraphrase_prompts == (r["rephrase_prompt"],)
        specificity = r["locality"]["Relation_Specificity"]
        assert request.neighborhood_prompts == tuple(s["prompt"] for s in specificity)
        assert request.neighborhood_true == specificity[0]["ground_truth"][0]


@needs_knowedit
def test_knowedit_wiki_counterfact_teaches_the_new_target_whatever_the_zsre_convention(cache):
    """WikiData_counterfact records are counterfactual edits (one true answer): `answer` does not turn them
    into edits towards the truth. 174 records have no Relation_Specificity prompt: no neighbourhood. Two have
    an empty answer (a true target, a specificity answer): named and skipped."""
    raw = _raw(KNOWEDIT_WIKI)
    empty = [i for i, r in enumerate(raw) if not r["ground_truth"].strip()
             or any(not _first(s["ground_truth"]).strip() for s in r["locality"].get("Relation_Specificity", []))]
    assert len(empty) == 2
    with pytest.warns(UserWarning, match="skipped 2 bad record") as caught:
        requests = load_edit_requests(str(KNOWEDIT_WIKI), cache_dir=cache, zsre_target="answer", on_bad_record="skip")
    assert all(f"case_id={i} in" in str(caught[0].message) for i in empty)
    kept = [(i, r) for i, r in enumerate(raw) if i not in empty]
    assert len(requests) == len(kept)
    for request, (i, r) in zip(requests, kept):
        assert request.case_id == i and request.benchmark == "zsre" and request.rewrite_prompt == r["prompt"]
        assert (request.target_new, request.target_true) == (r["target_new"], r["ground_truth"])
        assert request.paraphrase_prompts == ()
        specificity = r["locality"].get("Relation_Specificity", [])
        assert request.neighborhood_prompts == tuple(s["prompt"] for s in specificity)
        assert request.neighborhood_true == (_first(specificity[0]["ground_truth"]) if specificity else "")
    assert sum(not r.neighborhood_prompts for r in requests) == sum("Relation_Specificity" not in r["locality"] for _, r in kept) == 174


def _knowedit(**overrides) -> dict:
    rec = {"subject": "Epaspidoceras", "target_new": "Noctuidae", "prompt": "Which family does Epaspidoceras belong to?",
           "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
           "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]}]}}
    rec.update(overrides)
    return rec


@pytest.mark.parametrize("record, index, field", [
    (_knowedit(ground_truth=[]), 1, "ground_truth"),
    (_knowedit(target_new=" "), 1, "target_new"),
    (_knowedit(locality={"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]},
                                                   {"prompt": "Epaspidoceras was described by", "ground_truth": ["Spath"]}]}), 1,
     "locality.Relation_Specificity"),
    (_knowedit(locality={"Relation_Specificity": [{"prompt": "", "ground_truth": ["genus"]}]}), 1, "locality.Relation_Specificity[0].prompt"),
])
def test_a_bad_knowedit_record_is_named_by_position_and_field(tmp_path, cache, record, index, field):
    path = _write(tmp_path, "knowedit.json", [_knowedit(), record])
    with pytest.raises(EditDataError) as info:
        load_edit_requests(str(path), cache_dir=cache)
    assert (info.value.case_id, info.value.field) == (index, field) and str(path) in str(info.value)

"""Readers turning CounterFact-style JSON files into validated `EditRequest`s.

Records are read through Hugging Face `datasets` (`load_dataset("json", ...)`), so a URL is
downloaded once into `cache_dir` and reused afterwards. Four schemas are understood:

* ``counterfact``: ROME/MEMIT CounterFact and multi-CounterFact,
  ``{case_id, requested_rewrite{prompt, subject, target_new{str}, target_true{str}},
  paraphrase_prompts[], neighborhood_prompts[], ...}``.
* ``mend_counterfact``: the flat MEND/EasyEdit split, ``{case_id, prompt, subject,
  target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth}``.
* ``zsre``: MEND-format ZsRE question answering, ``{subject, src, rephrase, alt, answers[],
  loc, loc_ans}`` (no case_id: the record's position is used). The edit teaches ``answers[0]``
  as the paper's code does, or ``alt`` with `zsre_target="alt"` (MEND's and EasyEdit's).
* ``knowedit``: EasyEdit's KnowEdit files (ZsRE and WikiData_counterfact), ``{subject, prompt,
  target_new, ground_truth, rephrase_prompt, locality{Relation_Specificity[]}}``, scored by token
  accuracy; see `read_knowedit_record`.

Every record is checked before anything is returned; a bad record raises `EditDataError`
naming its case_id (or ``#index`` when it has none) and the offending field.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import datasets

from ..errors import SettingsError, SpherePLError
from .records import EditDataError, EditRequest

DSETS_BASE_URL = "https://memit.baulab.info/data/dsets/"
COUNTERFACT_URL = DSETS_BASE_URL + "counterfact.json"
MULTI_COUNTERFACT_URL = DSETS_BASE_URL + "multi_counterfact.json"
ZSRE_URL = DSETS_BASE_URL + "zsre_mend_eval.json"

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "sphere_pl", "data")

QUICKSTART = "quickstart"
QUICKSTART_PATH = Path(__file__).with_name("quickstart_edits.json")
# Named sources: the project's offline set and the canonical remote CounterFact files.
NAMED_SOURCES = {QUICKSTART: str(QUICKSTART_PATH), "counterfact": COUNTERFACT_URL, "multi_counterfact": MULTI_COUNTERFACT_URL, "zsre": ZSRE_URL}

class EditSourceError(SpherePLError, ValueError):
    """An edit data file or URL that cannot be read as records (the message names it)."""

    hint = "check data.source (a local JSON/JSONL file, a named source or a URL) and data.schema"


# ---------------------------------------------------------------------------------------
# small field helpers shared by the readers


def _case_id(raw: dict, index: int, source: str | None) -> int | str:
    cid = raw.get("case_id")
    name = f"#{index}"
    if cid is None:
        raise EditDataError(name, "case_id", "is missing", source)
    if isinstance(cid, float) and cid.is_integer():  # Arrow may widen a mixed int column to float
        cid = int(cid)
    if isinstance(cid, bool) or not isinstance(cid, (int, str)):
        raise EditDataError(name, "case_id", f"expected an int or string, got {type(cid).__name__} {cid!r}", source)
    if isinstance(cid, str) and not cid.strip():
        raise EditDataError(name, "case_id", "is empty", source)
    return cid


def _get(container: Any, key: str, case_id, path: str, source: str | None) -> Any:
    """`container[key]`, treating None (how `datasets` fills absent keys) as missing."""
    value = container.get(key) if isinstance(container, dict) else None
    if value is None:
        raise EditDataError(case_id, path, "is missing", source)
    return value


def _string(value: Any, case_id, path: str, source: str | None) -> str:
    if not isinstance(value, str):
        raise EditDataError(case_id, path, f"expected a string, got {type(value).__name__} {value!r}", source)
    if not value.strip():
        raise EditDataError(case_id, path, "is empty", source)
    return value


def _fields(raw: dict, case_id, source: str | None, *names: str) -> tuple[str, ...]:
    """The named top-level string fields of a flat record, checked in the order named (the first bad one is
    the one reported)."""
    return tuple(_string(_get(raw, name, case_id, name, source), case_id, name, source) for name in names)


def _prompt_list(value: Any, case_id, path: str, source: str | None) -> tuple[str, ...]:
    """A list of prompts; items are strings or dicts with a "prompt" key."""
    if not isinstance(value, (list, tuple)):
        raise EditDataError(case_id, path, f"expected a list of prompts, got {type(value).__name__}", source)
    prompts = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            item = _get(item, "prompt", case_id, f"{path}[{i}].prompt", source)
        prompts.append(_string(item, case_id, f"{path}[{i}]", source))
    return tuple(prompts)


def _check_template(template: str, subject: str, case_id, path: str, source: str | None) -> None:
    if template.count("{}") != 1:
        raise EditDataError(case_id, path, f"must contain the placeholder '{{}}' exactly once: {template!r}", source)
    try:
        template.format(subject)
    except (IndexError, KeyError, ValueError) as e:
        raise EditDataError(case_id, path, f"is not a valid template ({e}): {template!r}", source) from None


def _case_id_or_position(raw: dict, index: int, source: str | None) -> int | str:
    """The record's case_id, or its position in the file when it has none (as ROME/MEMIT's ZsRE loader)."""
    return index if raw.get("case_id") is None else _case_id(raw, index, source)


def _template_of(filled: str, subject: str, case_id, path: str, source: str | None) -> str:
    """The template of a prompt with its subject filled in (`path`: the prompt's field): the subject's first
    occurrence becomes ``{}``; braces of its own, or a subject it does not contain, are refused."""
    if "{" in filled or "}" in filled:
        raise EditDataError(case_id, path, f"contains braces, cannot build a template: {filled!r}", source)
    if subject not in filled:
        raise EditDataError(case_id, "subject", f"{subject!r} does not occur in {path} {filled!r}", source)
    return filled.replace(subject, "{}", 1)


def _build(case_id, source: str | None, **fields) -> EditRequest:
    """EditRequest(...), re-raising its own validation errors with the source attached."""
    try:
        return EditRequest(case_id=case_id, **fields)
    except EditDataError as e:
        problem = e.problem
        raise EditDataError(case_id, e.field, problem, source) from None


# ---------------------------------------------------------------------------------------
# one reader per schema: raw record dict -> EditRequest


def read_counterfact_record(raw: dict, index: int, source: str | None = None) -> EditRequest:
    """One ROME/MEMIT CounterFact or multi-CounterFact record.

    ``requested_rewrite`` is normally a dict. If it is a list (as some multi-CounterFact
    variants store it), a one-element list is unwrapped; with several rewrites only the
    **first** is used (a `UserWarning` says so): the record's paraphrase and neighborhood
    prompts and its case_id are shared by all of them, so splitting it into several
    requests would be ambiguous (which prompts test which rewrite?) and would duplicate
    case_ids. ``neighborhood_true`` is the rewrite's ``target_true``.
    """
    cid = _case_id(raw, index, source)
    rw = _get(raw, "requested_rewrite", cid, "requested_rewrite", source)
    rw_path = "requested_rewrite"
    if isinstance(rw, list):
        if not rw:
            raise EditDataError(cid, rw_path, "is an empty list", source)
        if len(rw) > 1:
            warnings.warn(
                "CounterFact record with several requested_rewrite entries: only the first is used",
                stacklevel=3,
            )
        rw, rw_path = rw[0], "requested_rewrite[0]"
    if not isinstance(rw, dict):
        raise EditDataError(cid, rw_path, f"expected an object, got {type(rw).__name__}", source)

    subject = _string(_get(rw, "subject", cid, f"{rw_path}.subject", source), cid, f"{rw_path}.subject", source)
    prompt = _string(_get(rw, "prompt", cid, f"{rw_path}.prompt", source), cid, f"{rw_path}.prompt", source)
    _check_template(prompt, subject, cid, f"{rw_path}.prompt", source)
    targets = {}
    for key in ("target_new", "target_true"):
        target = _get(rw, key, cid, f"{rw_path}.{key}", source)
        path = f"{rw_path}.{key}"
        if isinstance(target, dict):  # {"str": ..., "id": ...}
            target, path = _get(target, "str", cid, f"{path}.str", source), f"{path}.str"
        targets[key] = _string(target, cid, path, source)

    paraphrases = _prompt_list(
        _get(raw, "paraphrase_prompts", cid, "paraphrase_prompts", source), cid, "paraphrase_prompts", source
    )
    neighborhood = _prompt_list(
        _get(raw, "neighborhood_prompts", cid, "neighborhood_prompts", source), cid, "neighborhood_prompts", source
    )
    generation = raw.get("generation_prompts")
    generation = () if generation is None else _prompt_list(generation, cid, "generation_prompts", source)
    relation_id = rw.get("relation_id")
    new_id = rw["target_new"].get("id") if isinstance(rw["target_new"], dict) else None
    return _build(
        cid,
        source,
        prompt=prompt,
        subject=subject,
        target_new=targets["target_new"],
        target_true=targets["target_true"],
        paraphrase_prompts=paraphrases,
        neighborhood_prompts=neighborhood,
        neighborhood_true=targets["target_true"],
        generation_prompts=generation,
        relation_id=None if relation_id is None else str(relation_id),
        target_new_id=None if new_id is None else str(new_id),
    )


def read_mend_counterfact_record(raw: dict, index: int, source: str | None = None) -> EditRequest:
    """One flat MEND/EasyEdit CounterFact record.

    ``prompt`` has the subject filled in; the template replaces the subject's first
    occurrence with ``{}``. ``rephrase_prompt`` and ``locality_prompt`` become the single
    paraphrase and neighborhood prompt, ``locality_ground_truth`` the neighborhood answer.
    """
    cid = _case_id(raw, index, source)

    prompt, subject, target_new, target_true, rephrase, locality, locality_true = _fields(
        raw, cid, source, "prompt", "subject", "target_new", "ground_truth",
        "rephrase_prompt", "locality_prompt", "locality_ground_truth",
    )
    template = _template_of(prompt, subject, cid, "prompt", source)
    return _build(
        cid,
        source,
        prompt=template,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=(rephrase,),
        neighborhood_prompts=(locality,),
        neighborhood_true=locality_true,
    )


ZSRE_TARGETS = {
    "answer": "the gold answer answers[0] (the paper's and the ROME/MEMIT lineage's: the model is taught the answer)",
    "alt": "the MEND alternative alt (MEND's and EasyEdit's: the model is taught another answer)",
}
#: the official loader's placeholder for the "true" target under the `answer` convention; ZsRE scores
#: token accuracy of the new target, so it is never compared against
ZSRE_NO_TRUE_TARGET = "<|endoftext|>"


def read_zsre_record(raw: dict, index: int, source: str | None = None, target: str = "answer") -> EditRequest:
    """One MEND-format ZsRE record ``{subject, src, rephrase, alt, answers[], loc, loc_ans}``.

    Such files have no case_id: it is the record's position (as ROME/MEMIT's loader does),
    unless the record has one. The question ``src`` with its subject replaced by ``{}`` is the
    prompt. `target` chooses what the edit teaches (`ZSRE_TARGETS`): ``answer`` (default, as the
    paper's code, `dsets/zsre.py`) edits towards ``answers[0]``, with the official loader's
    placeholder as the "true" target; ``alt`` edits towards ``alt`` with ``answers[0]`` as the true
    one. ``rephrase`` is the paraphrase, and the unrelated question ``loc`` + "?" with answer
    ``loc_ans`` the neighborhood check. The subject's first occurrence becomes the placeholder (the
    official loader replaces every occurrence, and then refuses a template with more than one).
    """
    if target not in ZSRE_TARGETS:
        raise SettingsError(f"unknown ZsRE target convention {target!r}; choose one of {sorted(ZSRE_TARGETS)}")
    cid = _case_id_or_position(raw, index, source)

    src, subject, rephrase, loc, loc_ans = _fields(raw, cid, source, "src", "subject", "rephrase", "loc", "loc_ans")
    answers = _get(raw, "answers", cid, "answers", source)
    if not isinstance(answers, (list, tuple)) or not answers:
        raise EditDataError(cid, "answers", f"expected a non-empty list of answers, got {answers!r}", source)
    answer = _string(answers[0], cid, "answers[0]", source)
    template = _template_of(src, subject, cid, "src", source)
    # `alt` is read only where it is the target: the official loader never reads it (two records of the
    # MEND file have an empty one)
    new, true = (answer, ZSRE_NO_TRUE_TARGET) if target == "answer" else (_fields(raw, cid, source, "alt")[0], answer)
    return _build(
        cid,
        source,
        prompt=template,
        subject=subject,
        target_new=new,
        target_true=true,
        paraphrase_prompts=(rephrase,),
        neighborhood_prompts=(loc + "?",),
        neighborhood_true=loc_ans,
        benchmark="zsre",
    )


def _first_answer(value: Any, case_id, path: str, source: str | None) -> str:
    """KnowEdit gives an answer as a string or as a list of accepted strings: the (first) string."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise EditDataError(case_id, path, "is an empty list of answers", source)
        return _string(value[0], case_id, f"{path}[0]", source)
    return _string(value, case_id, path, source)


def read_knowedit_record(raw: dict, index: int, source: str | None = None, target: str = "answer") -> EditRequest:
    """One KnowEdit record (EasyEdit's benchmark files): ZsRE ``{subject, prompt, target_new,
    ground_truth[], rephrase_prompt, locality{Relation_Specificity[{prompt, ground_truth[]}]}, ...}``
    or WikiData_counterfact ``{subject, prompt, target_new, ground_truth, locality{...}, ...}``.

    Both are judged by token accuracy (``benchmark="zsre"``), as KnowEdit judges reliability and
    generalization; its locality compares the edited model's predictions with the unedited model's,
    where sphere_pl scores the specificity prompts against their recorded answer. A ZsRE record
    (a list of answers) follows `target` as `read_zsre_record` does: ``answer`` teaches the first
    ground truth, ``alt`` KnowEdit's ``target_new``; a WikiData_counterfact record (one true answer) is a
    counterfactual edit and always teaches ``target_new``. The specificity prompts are the
    ``Relation_Specificity`` ones: other relations *of the edited subject*, whose answers must not move
    (MEND's ZsRE asks an unrelated question instead); a record's prompts must share one answer.
    ``Forgetfulness`` and ``portability`` are not read. No case_id: the record's position.
    """
    if target not in ZSRE_TARGETS:
        raise SettingsError(f"unknown ZsRE target convention {target!r}; choose one of {sorted(ZSRE_TARGETS)}")
    cid = _case_id_or_position(raw, index, source)

    prompt, subject, target_new = _fields(raw, cid, source, "prompt", "subject", "target_new")
    raw_truth = _get(raw, "ground_truth", cid, "ground_truth", source)
    truth = _first_answer(raw_truth, cid, "ground_truth", source)
    template = _template_of(prompt, subject, cid, "prompt", source)
    question = isinstance(raw_truth, (list, tuple))
    if question and target == "answer":
        new, true = truth, ZSRE_NO_TRUE_TARGET
    else:
        new, true = target_new, truth
    rephrase = raw.get("rephrase_prompt")
    paraphrases = () if rephrase is None else (_string(rephrase, cid, "rephrase_prompt", source),)
    locality = raw.get("locality") or {}
    neighbours = locality.get("Relation_Specificity") if isinstance(locality, dict) else None
    if neighbours is not None and not isinstance(neighbours, (list, tuple)):
        raise EditDataError(cid, "locality.Relation_Specificity", f"expected a list, got {type(neighbours).__name__}", source)
    prompts, answers = [], []
    for i, item in enumerate(neighbours or ()):
        path = f"locality.Relation_Specificity[{i}]"
        prompts.append(_string(_get(item, "prompt", cid, f"{path}.prompt", source), cid, f"{path}.prompt", source))
        answers.append(_first_answer(_get(item, "ground_truth", cid, f"{path}.ground_truth", source), cid, f"{path}.ground_truth", source))
    if len(set(answers)) > 1:
        raise EditDataError(cid, "locality.Relation_Specificity", f"its prompts have different answers {answers}: sphere_pl keeps one per record", source)
    return _build(
        cid,
        source,
        prompt=template,
        subject=subject,
        target_new=new,
        target_true=true,
        paraphrase_prompts=paraphrases,
        neighborhood_prompts=tuple(prompts),
        neighborhood_true=answers[0] if answers else "",
        benchmark="zsre",
    )


READERS: dict[str, Callable[..., EditRequest]] = {
    "counterfact": read_counterfact_record,
    "mend_counterfact": read_mend_counterfact_record,
    "zsre": read_zsre_record,
    "knowedit": read_knowedit_record,
}
#: the readers that take the ZsRE target convention
TARGETED = ("zsre", "knowedit")


def detect_schema(keys, source: str | None = None) -> str:
    """Schema name from a record's keys (`requested_rewrite` -> counterfact, ...)."""
    keys = set(keys)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"prompt", "ground_truth", "target_new", "locality"} <= keys:
        return "knowedit"  # before mend_counterfact, whose keys it shares
    if {"prompt", "ground_truth"} <= keys:
        return "mend_counterfact"
    if {"src", "alt", "loc"} <= keys:
        return "zsre"
    where = f" in {source}" if source else ""
    raise EditSourceError(
        f"cannot detect the edit data schema{where}: keys found {sorted(keys)}; expected 'requested_rewrite' "
        f"(counterfact), 'prompt' + 'ground_truth' + 'target_new' + 'locality' (knowedit), 'prompt' + 'ground_truth' "
        f"(mend_counterfact) or 'src' + 'alt' + 'loc' (zsre); "
        "pass schema= explicitly"
    )


# ---------------------------------------------------------------------------------------
# loading


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def check_json_syntax(path: Path) -> None:
    """Fail early, naming the record and line, on what `datasets` would report as a byte offset:
    an empty file, an empty list, and malformed JSON (one array of records, or JSON lines)."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise EditSourceError(f"edit data file {path} is empty: expected a JSON list of records, or one record per line")
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text[start] == "[":  # one array: decode record by record to say which one is broken
        pos, index = start + 1, 0
        while True:
            pos = _skip_space(text, pos)
            if text.startswith("]", pos):
                if index == 0:
                    raise EditSourceError(f"edit data file {path} holds an empty list: no records to edit")
                return
            try:
                _, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise EditSourceError(f"{path}: record #{index}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
            index += 1
            pos = _skip_space(text, pos)
            if text.startswith(",", pos):
                pos += 1
            elif not text.startswith("]", pos):
                line = text.count("\n", 0, pos) + 1
                raise EditSourceError(f"{path}: after record #{index - 1}: expected ',' or ']' at line {line}: the list is not closed or a comma is missing")
    else:  # JSON lines
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise EditSourceError(f"{path}: line {number}: invalid JSON at column {e.colno}: {e.msg}") from None


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _load_records(source: str, cache_dir: str | None) -> datasets.Dataset:
    if not _is_url(source):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"edit data file not found: {source}")
        if not path.is_file():
            raise EditSourceError(f"edit data source is not a file: {source}")
        if path.suffix in (".json", ".jsonl", ".jsonlines", ""):
            check_json_syntax(path)
    cache = os.path.expanduser(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
    try:
        ds = datasets.load_dataset("json", data_files=source, split="train", cache_dir=cache)
    except Exception as e:  # datasets/pyarrow/network errors: name the source, keep the cause
        cause = e.__cause__ or e.__context__
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if cause is not None and str(cause):
            detail += f" (caused by {type(cause).__name__}: {cause})"
        raise EditSourceError(f"cannot read edit data from {source}: {detail}") from e
    return ds


def load_edit_requests(
    source: str | os.PathLike,
    schema: str = "auto",
    cache_dir: str | None = None,
    limit: int | None = None,
    on_bad_record: str = "fatal",
    zsre_target: str = "answer",
) -> list[EditRequest]:
    """Read and validate edit requests from a local JSON/JSONL file or an http(s) URL.

    schema: "counterfact", "mend_counterfact", "zsre", "knowedit" or "auto" (detected from the first record's
    keys; `datasets` reports every column of the file for each record).
    cache_dir: where `datasets` keeps downloads and its Arrow cache
    (default ``~/.cache/sphere_pl/data``).
    limit: keep only the first `limit` records; those kept are validated.
    on_bad_record: "fatal" (default) raises on the first bad record; "skip" leaves bad records
    out with a warning that names each of them (they are never edited or scored).
    zsre_target: what a ZsRE record's edit teaches, "answer" (answers[0], the paper's) or "alt"
    (MEND's and EasyEdit's); see `read_zsre_record` and `read_knowedit_record`.

    Raises FileNotFoundError for a missing local file, EditSourceError for an unreadable or
    malformed source (or an undetectable schema), and EditDataError for a bad record
    (missing field, wrong type, empty value, subject absent from prompt, duplicate case_id).
    Nothing is returned unless every kept record is valid.
    """
    source = os.fspath(source)
    if schema != "auto" and schema not in READERS:
        raise SettingsError(f"unknown edit data schema {schema!r}; choose 'auto' or one of {sorted(READERS)}")
    if zsre_target not in ZSRE_TARGETS:
        raise SettingsError(f"unknown ZsRE target convention {zsre_target!r}; choose one of {sorted(ZSRE_TARGETS)}")
    if on_bad_record not in ("fatal", "skip"):
        raise SettingsError(f"on_bad_record must be 'fatal' or 'skip', got {on_bad_record!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise SettingsError(f"limit must be a non-negative int or None, got {limit!r}")

    ds = _load_records(source, cache_dir)
    if len(ds) == 0:
        raise EditSourceError(f"no records in edit data {source}")
    if schema == "auto":
        schema = detect_schema(ds.column_names, source)
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))

    reader = functools.partial(READERS[schema], target=zsre_target) if schema in TARGETED else READERS[schema]
    requests: list[EditRequest] = []
    seen: dict[Any, int] = {}
    skipped: list[str] = []
    for index, raw in enumerate(ds):
        try:
            request = reader(raw, index, source)
            if request.case_id in seen:
                raise EditDataError(
                    request.case_id, "case_id", f"duplicate: record #{index} repeats record #{seen[request.case_id]}", source
                )
        except EditDataError as e:
            if on_bad_record == "fatal":
                raise
            skipped.append(str(e))
            continue
        seen[request.case_id] = index
        requests.append(request)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} bad record(s) of {source}:\n  " + "\n  ".join(skipped), stacklevel=2)
    if not requests:
        raise EditSourceError(f"no valid records in edit data {source} ({len(skipped)} skipped)")
    return requests

"""Consistency of generated text with the new fact: tf-idf cosine similarity to reference text.

ROME scores a record's generations (joined by spaces) against reference texts about the
*new* target, also joined: Wikipedia snippets about other subjects that really have the
relation to that target (`attribute_snippets.json`, keyed relation_id -> target id). A model
that has absorbed "Eiffel Tower is in Rome" should talk like text about Rome.

Term weights follow scikit-learn's ``TfidfVectorizer`` defaults, as ROME's ``idf.npy`` was
fitted with them: lowercase, tokens = ``(?u)\\b\\w\\w+\\b`` (two or more word characters),
raw term counts times idf, each vector scaled to unit l2 norm; smooth idf
``idf(t) = ln((1 + n_documents) / (1 + df(t))) + 1``. Terms outside the vocabulary are ignored.

The idf comes either from ROME's files (`TfidfModel.from_files`) or from a local corpus
(`TfidfModel.from_corpus`, e.g. WikiText). Reference texts come from ROME's snippets file when
given (`ReferenceTexts`); otherwise, or for a record without relation/target ids, from
corpus paragraphs that mention the new target. A record with no reference text is not
scored, and its row says why.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SettingsError
from ..data.records import EditRequest
from .base import RunningMean

#: scikit-learn's default token pattern (TfidfVectorizer / CountVectorizer)
TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")

# ---------------------------------------------------------------------------------------
# corpus: documents and paragraphs

_HEADING = re.compile(r"^\s*((?:=\s+)+)(?!=)\S.*?(?:\s+=)+\s*$")  # "= Title =", "= = Section = =", ...
_WIKITEXT_JOINERS = re.compile(r" @([-,.])@ ")


def clean_wikitext(text: str) -> str:
    """Undo WikiText's tokenisation marks that would otherwise create odd terms:
    "two @-@ part" -> "two-part", "1 @,@ 000" -> "1,000"; "<unk>" (a rare word) is dropped."""
    return _WIKITEXT_JOINERS.sub(r"\1", text).replace("<unk>", " ")


def _heading_level(lines: list[str], i: int) -> int | None:
    """1 for "= Title =", 2 for "= = Section = =", ...; None for other lines. A heading stands
    between blank lines, so a line of an equation such as "= 1 / s and k =" is not one."""
    match = _HEADING.match(lines[i])
    if not match or (i > 0 and lines[i - 1].strip()) or (i + 1 < len(lines) and lines[i + 1].strip()):
        return None
    return match.group(1).count("=")


def read_corpus(path_or_texts: str | os.PathLike | Iterable[str]) -> list[list[str]]:
    """Documents as lists of paragraphs.

    A path is a text file. With top-level ``= Title =`` headings (WikiText) each article is a
    document and each non-empty line in it a paragraph (headings are not paragraphs; text
    before the first title is dropped); without them each non-empty line is a document of
    one paragraph. An iterable of strings gives one document per string, its non-empty lines
    its paragraphs. WikiText marks are cleaned (`clean_wikitext`) and runs of spaces
    collapsed; empty paragraphs are dropped.
    """
    if isinstance(path_or_texts, (str, os.PathLike)):
        lines = Path(path_or_texts).read_text(encoding="utf-8").splitlines()
        levels = [_heading_level(lines, i) for i in range(len(lines))]
        if 1 in levels:
            documents: list[list[str]] = []
            for line, level in zip(lines, levels):
                if level == 1:
                    documents.append([])
                elif level is None and documents:
                    documents[-1].append(line)
        else:
            documents = [[line] for line in lines]
    else:
        if isinstance(path_or_texts, (bytes, bytearray)):
            raise TypeError("from a corpus: pass a path or an iterable of str, not bytes")
        documents = [text.splitlines() for text in path_or_texts]
    documents = [[q for q in (" ".join(clean_wikitext(p).split()) for p in doc) if q] for doc in documents]
    return [doc for doc in documents if doc]


# ---------------------------------------------------------------------------------------
# tf-idf


def terms(text: str) -> list[str]:
    """scikit-learn's default analyzer: lowercase, then every run of two or more word characters."""
    return TOKEN_PATTERN.findall(text.lower())


@dataclass(frozen=True, eq=False)
class TfidfModel:
    """A fixed vocabulary (term -> column) and its idf weights (float64, one per column)."""

    vocabulary: Mapping[str, int]
    idf: np.ndarray

    def __post_init__(self):
        idf = np.asarray(self.idf, dtype=np.float64)
        if idf.ndim != 1:
            raise ValueError(f"idf must be one-dimensional, got shape {idf.shape}")
        if not np.isfinite(idf).all():
            raise ValueError("idf has non-finite values")
        columns = list(self.vocabulary.values())
        if len(set(columns)) != len(columns):
            raise ValueError("vocabulary maps two terms to the same column")
        if columns and (min(columns) < 0 or max(columns) >= len(idf)):
            raise ValueError(f"vocabulary columns must lie in [0, {len(idf)}), got {min(columns)}..{max(columns)}")
        object.__setattr__(self, "idf", idf)

    @classmethod
    def from_corpus(cls, path_or_texts: str | os.PathLike | Iterable[str], min_df: int = 1) -> TfidfModel:
        """Document frequencies of a corpus (see `read_corpus` for what a document is), smooth idf.

        The vocabulary is every term in at least `min_df` documents, columns in sorted term order
        (as scikit-learn assigns them).
        """
        documents = read_corpus(path_or_texts)
        if not documents:
            raise ValueError("the corpus has no documents")
        df: Counter[str] = Counter()
        for doc in documents:
            df.update(set(terms(" ".join(doc))))
        vocab = sorted(t for t, d in df.items() if d >= min_df)
        if not vocab:
            raise ValueError("the corpus has no terms")
        n = len(documents)
        idf = np.array([math.log((1 + n) / (1 + df[t])) + 1 for t in vocab], dtype=np.float64)
        return cls({t: i for i, t in enumerate(vocab)}, idf)

    @classmethod
    def from_files(cls, idf_npy: str | os.PathLike, vocab_json: str | os.PathLike) -> TfidfModel:
        """ROME's ``idf.npy`` (idf per column) and ``tfidf_vocab.json`` ({term: column})."""
        idf = np.load(idf_npy, allow_pickle=False)
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()):
            raise SettingsError(f"{os.fspath(vocab_json)}: expected a JSON object mapping terms to integer columns")
        if len(idf) != len(vocab):
            raise SettingsError(f"{os.fspath(idf_npy)} has {len(idf)} idf values but {os.fspath(vocab_json)} has {len(vocab)} terms")
        return cls(vocab, idf)

    def vectorize(self, texts: Sequence[str]) -> np.ndarray:
        """l2-normalised tf-idf vectors, shape (len(texts), vocabulary size), float64; an all-zero
        row for a text without vocabulary terms."""
        out = np.zeros((len(texts), len(self.idf)), dtype=np.float64)
        for row, text in enumerate(texts):
            for term, count in Counter(terms(text)).items():
                column = self.vocabulary.get(term)
                if column is not None:
                    out[row, column] = count * self.idf[column]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=out, where=norms > 0)


def tfidf_similarity(model: TfidfModel, text_a: str, text_b: str) -> float:
    """Cosine of the tf-idf vectors of two texts, in [0, 1]; NaN when either has no vocabulary term
    (the cosine is undefined there, as in ROME)."""
    a, b = model.vectorize([text_a, text_b])
    if not a.any() or not b.any():
        return math.nan
    return float(np.dot(a, b))


# ---------------------------------------------------------------------------------------
# reference texts


@dataclass(frozen=True)
class References:
    """A record's reference texts and where they came from; `reason` says why there are none."""

    texts: tuple[str, ...] = ()
    source: str = ""
    reason: str | None = None


@dataclass
class ReferenceTexts:
    """Reference texts about a record's new target.

    snippets: relation_id -> target id -> texts (ROME's ``attribute_snippets.json``, see
    `from_files`). passages: corpus paragraphs; a record without snippets gets the first
    `max_passages` of them (in corpus order) that mention its new target as whole words.
    """

    snippets: Mapping[str, Mapping[str, Sequence[str]]] | None = None
    passages: Sequence[str] | None = None
    max_passages: int = 10
    _cache: dict[str, tuple[str, ...]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.max_passages < 1:
            raise SettingsError(f"max_passages must be positive, got {self.max_passages}")

    @classmethod
    def from_files(
        cls,
        snippets_json: str | os.PathLike | None = None,
        corpus: str | os.PathLike | Iterable[str] | None = None,
        max_passages: int = 10,
    ) -> ReferenceTexts:
        """ROME's snippets file and/or a corpus for passages (paragraphs, see `read_corpus`)."""
        snippets = read_attribute_snippets(snippets_json) if snippets_json is not None else None
        passages = [p for doc in read_corpus(corpus) for p in doc] if corpus is not None else None
        return cls(snippets, passages, max_passages)

    def lookup(self, request: EditRequest) -> References:
        """Snippets for (relation_id, target_new_id) when given and present; else corpus passages
        mentioning ``target_new``; else no texts, with the reason."""
        missing = None
        if self.snippets is not None:
            if request.relation_id is None or request.target_new_id is None:
                missing = "the record has no relation_id/target_new_id for attribute snippets"
            else:
                texts = tuple(self.snippets.get(request.relation_id, {}).get(request.target_new_id, ()))
                if texts:
                    return References(texts, f"attribute_snippets[{request.relation_id}][{request.target_new_id}]")
                missing = f"no attribute snippets for {request.relation_id}/{request.target_new_id}"
        if self.passages is None:
            return References(reason=missing or "no attribute snippets or corpus given")
        texts = self.passages_mentioning(request.target_new)
        if texts:
            return References(texts, f"corpus passages mentioning {request.target_new!r}")
        reason = f"no corpus passage mentions {request.target_new!r}"
        return References(reason=f"{missing}; {reason}" if missing else reason)

    def passages_mentioning(self, target: str) -> tuple[str, ...]:
        """The first `max_passages` passages that contain `target` as whole words (case-sensitive;
        spaces around punctuation, as in WikiText's "Paris , France", do not matter)."""
        if target not in self._cache:
            pattern = mention_pattern(target)
            found: list[str] = []
            for passage in self.passages or ():
                if pattern.search(passage):
                    found.append(passage)
                    if len(found) == self.max_passages:
                        break
            self._cache[target] = tuple(found)
        return self._cache[target]


def mention_pattern(target: str) -> re.Pattern:
    """`target` as whole words: its word runs in order, any whitespace between words, optional
    spaces around its punctuation, and no word character right before or after."""
    parts = []
    for piece in re.findall(r"\w+|\s+|[^\w\s]+", target.strip()):
        if piece.isspace():
            parts.append(r"\s+")
        elif re.match(r"\w", piece):
            parts.append(re.escape(piece))
        else:
            parts.append(r"\s*" + re.escape(piece) + r"\s*")
    return re.compile(r"(?<!\w)" + "".join(parts) + r"(?!\w)")


def read_attribute_snippets(path: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """ROME's ``attribute_snippets.json``: a list of ``{relation_id, target_id, samples: [{name, text}]}``,
    as relation_id -> target_id -> texts."""
    source = os.fspath(path)
    with open(source, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, list):
        raise SettingsError(f"{source}: expected a JSON list of snippet groups, got {type(raw).__name__}")
    snippets: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for i, group in enumerate(raw):
        if not isinstance(group, dict) or not all(k in group for k in ("relation_id", "target_id", "samples")):
            raise SettingsError(f"{source}: entry {i}: expected an object with relation_id, target_id and samples")
        if not isinstance(group["samples"], list):
            raise SettingsError(f"{source}: entry {i}: field 'samples' is not a list")
        for j, sample in enumerate(group["samples"]):
            if not isinstance(sample, dict) or not isinstance(sample.get("text"), str):
                raise SettingsError(f"{source}: entry {i}: samples[{j}] has no string 'text'")
            snippets[str(group["relation_id"])][str(group["target_id"])].append(sample["text"])
    return {rel: dict(targets) for rel, targets in snippets.items()}


# ---------------------------------------------------------------------------------------
# metric


class Consistency(RunningMean):
    """Mean tf-idf similarity (0..1) of a record's generations to its reference texts, over scored records."""

    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

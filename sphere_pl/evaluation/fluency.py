"""Fluency of generated text: ROME's weighted bi-/tri-gram entropy, and its torchmetrics metric.

ROME (and MEMIT, SPHERE) call a generation fluent when its word n-grams are varied: a model
broken by editing tends to repeat itself ("Paris Paris Paris ..."), which drives the entropy
of its n-gram distribution down. For one text, with H_n the entropy in bits of the frequency
distribution of its word n-grams,

    ngram_entropy = mean_i(weights[i] * H_{ns[i]}) = (2/3 * H_2 + 4/3 * H_3) / 2   (defaults)

A text with fewer than n words has no n-grams and contributes H_n = 0, as in ROME.
A record's fluency is the mean over its generations; the benchmark's, the mean over records.

Words: ROME splits text with ``nltk.word_tokenize`` (Punkt sentence splitting, then the
Treebank-style word rules). nltk is not a dependency here, so `word_tokens` approximates it
with its own regular expressions for the same rules: punctuation (, ; : ? ! $ % & # @ * and
brackets, ``--``, ``...``) becomes separate tokens, except commas and colons before a digit
("3,36" stays whole); clitics are split ("they'll" -> "they", "'ll"; "can't" -> "ca", "n't";
"cannot" -> "can", "not"); a double quote becomes two backticks when it opens a quotation and
two single quotes when it closes one; the period that ends a sentence is split off while
other periods ("3.88", "U.S.") stay.
Where it differs from nltk: sentence ends are found by a rule (``.``/``?``/``!`` followed by
whitespace, unless the word is a single letter, contains an inner period, or is a common
abbreviation such as "Mr." or "etc.") instead of Punkt's trained model, so a period after
an abbreviation Punkt knows but this list lacks is split off here (and vice versa); rare
Treebank contractions ("'tis", "whaddya") are not split.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from .base import RunningMean

# ---------------------------------------------------------------------------------------
# word tokens (an approximation of nltk.word_tokenize; see the module docstring)

#: words ending in "." that do not end a sentence (lowercased, period removed)
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "rev", "st", "jr", "sr", "gen", "col", "lt", "sgt", "capt", "gov", "sen",
    "rep", "mt", "ft", "vs", "etc", "inc", "ltd", "co", "corp", "no", "vol", "fig", "al", "approx", "dept", "univ",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "e.g", "i.e",
})  # fmt: skip
_CLOSERS = "\"')]}»”’"
_SENTENCE_END = re.compile(r"(?<=[.!?])[" + re.escape(_CLOSERS) + r"]*(?=\s)")
_PAD = [
    (re.compile(r"[«“‘„»”’]"), r" \g<0> "),  # typographic quotes
    (re.compile(r"`+"), r" \g<0> "),
    (re.compile(r'(^|(?<=[\s(\[{<]))"'), " `` "),  # an opening double quote
    (re.compile(r'"'), " '' "),  # any other double quote closes
    (re.compile(r"(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", re.IGNORECASE), "' "),  # opening single quote
    (re.compile(r"[,:](?!\d)"), r" \g<0> "),  # but "3,36" and "10:30" stay whole
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&?!*\u2012-\u2015\[\](){}<>]"), r" \g<0> "),
    (re.compile(r"--"), " -- "),
]
_CLITICS = re.compile(r"(?<=[^'\s])('[sSmMdD]|'ll|'LL|'re|'RE|'ve|'VE|n't|N'T|')(?=\s)")
_SPLIT_WORDS = re.compile(r"(?i)\b(can)(not)\b|\b(gon|wan)(na)\b|\b(got)(ta)\b|\b(gim|lem)(me)\b")


def _sentences(text: str) -> list[str]:
    """Split after ".", "?" or "!" (and closing quotes) followed by whitespace, unless the word is an abbreviation."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        words = text[start : match.start()].split()
        if words and _is_abbreviation(words[-1]):
            continue
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def _is_abbreviation(word: str) -> bool:
    """A word ending in a single period that is not a sentence end: "J.", "U.S.", "Mr.", "etc."."""
    if not word.endswith(".") or word.endswith(".."):
        return False
    stem = word[:-1].lstrip("\"'([{«“‘")
    initial = len(stem) == 1 and stem.isalpha()
    dotted = "." in stem and stem.replace(".", "").isalpha()
    return initial or dotted or stem.lower() in _ABBREVIATIONS


def _sentence_tokens(sentence: str) -> list[str]:
    text = sentence.strip()
    # the sentence-final period (not an ellipsis), with any closing quotes or brackets after it
    final = re.search(r"(?<!\.)\.([" + re.escape(_CLOSERS) + r"]*)$", text)
    if final:
        text = text[: final.start()] + " . " + final.group(1)
    for pattern, replacement in _PAD:
        text = pattern.sub(replacement, text)
    text = _CLITICS.sub(r" \1", " " + text + " ")
    text = _SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    return text.split()


def word_tokens(text: str) -> list[str]:
    """Word and punctuation tokens of `text`, approximating ``nltk.word_tokenize`` (module docstring)."""
    return [token for sentence in _sentences(text) for token in _sentence_tokens(sentence)]


# ---------------------------------------------------------------------------------------
# entropy


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: the mean of weights[i] * (entropy in bits of the text's ns[i]-grams)."""
    if len(ns) != len(weights) or not ns:
        raise ValueError(f"ns {tuple(ns)} and weights {tuple(weights)} must be non-empty and of equal length")
    tokens = word_tokens(text)
    weighted = []
    for n, weight in zip(ns, weights):
        if n < 1:
            raise ValueError(f"n-gram sizes must be positive, got {n}")
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


def mean_ngram_entropy(texts: Iterable[str], **kwargs) -> float:
    """Mean `ngram_entropy` of `texts` (ROME's per-record fluency over its generations); NaN for none."""
    values = [ngram_entropy(t, **kwargs) for t in texts]
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------------------
# metrics


class Fluency(RunningMean):
    """Mean per-record fluency (`mean_ngram_entropy` of the record's generations), in bits."""

    plot_lower_bound = 0.0

"""CounterFact's generation metrics: does an edited model still write fluent text, and does that
text agree with the new fact?

For each record the model continues its ``generation_prompts`` (or, for a record without
them, its rewrite prompt). As in ROME, the scored text is the prompt followed by its
continuation, NFKD-normalised with blank lines turned into spaces; then

* fluency: the mean `ngram_entropy` of the record's texts (`sphere_pl.evaluation.fluency`);
* consistency: `tfidf_similarity` of all the record's texts joined by spaces with all its
  reference texts joined by spaces (`sphere_pl.evaluation.consistency`), when a tf-idf model
  and references are given and the record has references.

Both metrics average over records. ROME decodes with top-k sampling (k=5) up to 100 tokens
*including* the prompt; here ``max_new_tokens`` counts new tokens only, and the default is
greedy decoding (pass ``top_k=5`` to sample as ROME does, seeded by ``seed``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import numpy as np
from torch import Tensor, nn
from torchmetrics import MetricCollection

from ..errors import SettingsError
from ..data.records import EditRequest
from .base import Evaluator
from .consistency import Consistency, ReferenceTexts, TfidfModel
from .base import compute_or_nan
from .fluency import Fluency, mean_ngram_entropy
from .generation import generate_continuations


def scored_text(prompt: str, continuation: str) -> str:
    """The text ROME scores: prompt + continuation, NFKD-normalised, blank lines -> spaces.

    A space is put between them when neither side has one at the join, since some tokenizers
    (SentencePiece) decode a continuation without its leading space.
    """
    joiner = "" if not continuation or prompt[-1:].isspace() or continuation[:1].isspace() else " "
    return unicodedata.normalize("NFKD", prompt + joiner + continuation).replace("\n\n", " ")


class GenerationQualityEvaluator(Evaluator):
    """Fluency and consistency of each record's generations; metric keys ``fluency``, ``consistency``.

    Consistency needs idf statistics and reference texts: pass built `tfidf` / `references`, or
    file paths (what a YAML config gives): `idf_file` + `vocab_file` (ROME's ``idf.npy`` and
    ``tfidf_vocab.json``) or `corpus` (idf computed from a text corpus such as WikiText-2),
    and `snippets_file` (ROME's ``attribute_snippets.json``) and/or `corpus` (passages that
    mention the new target) for references. Without any of them only fluency is measured.
    """

    name = "generation_quality"

    def __init__(
        self,
        tfidf: TfidfModel | None = None,
        references: ReferenceTexts | None = None,
        max_new_tokens: int = 100,
        batch_size: int = 8,
        top_k: int | None = None,
        seed: int = 0,
        prompts_per_record: int | None = None,
        corpus: str | None = None,
        idf_file: str | None = None,
        vocab_file: str | None = None,
        snippets_file: str | None = None,
        max_passages: int = 10,
    ):
        if prompts_per_record is not None and prompts_per_record < 1:
            raise SettingsError(f"prompts_per_record must be positive or None (all), got {prompts_per_record}")
        if (idf_file is None) != (vocab_file is None):
            raise SettingsError("idf_file and vocab_file come together (ROME's idf.npy and tfidf_vocab.json)")
        if tfidf is None and idf_file is not None:
            tfidf = TfidfModel.from_files(idf_file, vocab_file)
        elif tfidf is None and corpus is not None:
            tfidf = TfidfModel.from_corpus(corpus)
        if references is None and (snippets_file is not None or corpus is not None):
            references = ReferenceTexts.from_files(snippets_file, corpus, max_passages)
        self.tfidf, self.references = tfidf, references
        self.max_new_tokens, self.batch_size, self.top_k, self.seed = max_new_tokens, batch_size, top_k, seed
        self.prompts_per_record = prompts_per_record
        self.metrics = MetricCollection({"fluency": Fluency(), "consistency": Consistency()}, compute_groups=False)

    def prompts(self, request: EditRequest) -> list[str]:
        prompts = list(request.generation_prompts) or [request.rewrite_prompt]
        return prompts[: self.prompts_per_record] if self.prompts_per_record else prompts

    def compute(self) -> dict[str, Tensor]:
        return compute_or_nan(self.metrics)

    def update(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> list[dict]:
        per_record = [self.prompts(r) for r in requests]
        flat = [p for prompts in per_record for p in prompts]
        continuations = generate_continuations(
            model, tokenizer, flat, self.max_new_tokens, batch_size=self.batch_size, top_k=self.top_k, seed=self.seed
        )
        rows, start = [], 0
        for request, prompts in zip(requests, per_record):
            generated = continuations[start : start + len(prompts)]
            start += len(prompts)
            texts = [scored_text(p, g) for p, g in zip(prompts, generated)]
            fluency = mean_ngram_entropy(texts)
            self.metrics["fluency"].update(fluency)
            row = {"case_id": request.case_id, "prompts": prompts, "generated": generated, "fluency": fluency}
            row.update(self._consistency(request, texts))
            if row["consistency"] is not None:
                self.metrics["consistency"].update(row["consistency"])
            rows.append(row)
        return rows

    def _consistency(self, request: EditRequest, texts: list[str]) -> dict:
        """The row's consistency fields: a score with its reference source, or None with the reason."""
        if self.tfidf is None:
            return {"consistency": None, "consistency_reason": "no tf-idf model given"}
        if self.references is None:
            return {"consistency": None, "consistency_reason": "no reference texts given"}
        refs = self.references.lookup(request)
        if not refs.texts:
            return {"consistency": None, "consistency_reason": refs.reason}
        fields = {"reference_source": refs.source, "n_references": len(refs.texts)}
        generated, reference = self.tfidf.vectorize([" ".join(texts), " ".join(refs.texts)])
        if not reference.any():
            return {**fields, "consistency": None, "consistency_reason": "the reference texts have no tf-idf vocabulary term"}
        if not generated.any():
            # nothing in common with the references: similarity 0 (ROME's cosine would be NaN)
            return {**fields, "consistency": 0.0, "consistency_note": "the generated text has no tf-idf vocabulary term"}
        # the same number as tfidf_similarity(tfidf, joined texts, joined references)
        return {**fields, "consistency": float(np.dot(generated, reference))}

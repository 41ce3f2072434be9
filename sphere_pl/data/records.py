"""The unit of work: one counterfactual edit request, and the batches they travel in."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import SpherePLError


class EditDataError(SpherePLError, ValueError):
    """Bad edit data. The message always names the record (case_id) and the field."""

    hint = "fix that record, or set data.on_bad_record: skip to leave bad records out (they are named in a warning)"

    def __init__(self, case_id, field_name: str, problem: str, source: str | None = None):
        where = f" in {source}" if source else ""
        super().__init__(f"record case_id={case_id!r}{where}: field {field_name!r}: {problem}")
        self.case_id = case_id
        self.field = field_name
        self.problem = problem
        self.source = source


BENCHMARKS = ("counterfact", "zsre")


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite: `prompt.format(subject)` should continue with `target_new`.

    Targets are stored without a leading space; scoring and editing prepend one.
    Paraphrase and neighborhood prompts are complete strings (subject filled in).
    Neighborhood prompts are about other subjects whose true answer is
    `neighborhood_true` (for CounterFact: the edited fact's true target).
    """

    case_id: int | str
    prompt: str
    subject: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_true: str = ""
    # optional, for generation-based evaluation (full-schema CounterFact records carry them)
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    target_new_id: str | None = None
    #: which benchmark's metrics judge this fact: "counterfact" (NLL comparison) or "zsre" (token accuracy)
    benchmark: str = "counterfact"

    def __post_init__(self):
        self.validate()

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)

    def validate(self) -> None:
        for name in ("prompt", "subject", "target_new", "target_true"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise EditDataError(self.case_id, name, f"expected a string, got {type(value).__name__}")
            if not value.strip():
                raise EditDataError(self.case_id, name, "is empty")
        if self.prompt.count("{}") != 1:
            raise EditDataError(
                self.case_id, "prompt", f"must contain the subject placeholder '{{}}' exactly once: {self.prompt!r}"
            )
        if self.benchmark not in BENCHMARKS:
            raise EditDataError(self.case_id, "benchmark", f"must be one of {list(BENCHMARKS)}, got {self.benchmark!r}")
        for name in ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts"):
            for i, p in enumerate(getattr(self, name)):
                if not isinstance(p, str) or not p.strip():
                    raise EditDataError(self.case_id, f"{name}[{i}]", "is empty or not a string")
        if self.neighborhood_prompts and not self.neighborhood_true.strip():
            raise EditDataError(self.case_id, "neighborhood_true", "is empty but neighborhood prompts are given")


@dataclass
class EditBatch:
    """Edit requests applied together as one sequential step; `index` counts batches from 0."""

    index: int
    requests: list[EditRequest] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

"""General-ability tasks (as in RECT / PRUNE / SPHERE): held-out checks that editing leaves the model's other skills intact.

Each task reads its own file (`load`), scores items with a model (`update`) and reports
torchmetrics values (`compute`). `create_task("nli", path=...)` builds one by name.
"""

from __future__ import annotations

from ...errors import SettingsError
from .closed_qa import ClosedQATask
from .common import INVALID, BinaryItem, answer_after, classify_answer
from .fluency_task import FluencyTask
from .nli import NLITask
from .open_qa import OpenQATask, normalize_answer, soft_exact_match
from .perplexity import PerplexityTask
from .reasoning import ReasoningTask

GENERAL_TASKS: dict[str, type] = {
    "reasoning": ReasoningTask,
    "nli": NLITask,
    "closed_qa": ClosedQATask,
    "fluency": FluencyTask,
    "open_qa": OpenQATask,
    "perplexity": PerplexityTask,
}


def create_task(name: str, **kwargs):
    """The task registered as `name`, built with `kwargs` (its constructor's arguments)."""
    if name not in GENERAL_TASKS:
        raise SettingsError(f"unknown general task {name!r}; valid names: {sorted(GENERAL_TASKS)}")
    return GENERAL_TASKS[name](**kwargs)


__all__ = [
    "GENERAL_TASKS",
    "INVALID",
    "BinaryItem",
    "ClosedQATask",
    "FluencyTask",
    "NLITask",
    "OpenQATask",
    "PerplexityTask",
    "ReasoningTask",
    "answer_after",
    "classify_answer",
    "create_task",
    "normalize_answer",
    "soft_exact_match",
]

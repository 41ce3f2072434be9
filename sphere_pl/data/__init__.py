"""Edit records and the readers that turn CounterFact-style files into them."""

from .readers import COUNTERFACT_URL, MULTI_COUNTERFACT_URL, QUICKSTART_PATH, EditSourceError, load_edit_requests
from .records import EditBatch, EditDataError, EditRequest

__all__ = [
    "COUNTERFACT_URL",
    "MULTI_COUNTERFACT_URL",
    "QUICKSTART_PATH",
    "EditBatch",
    "EditDataError",
    "EditRequest",
    "EditSourceError",
    "load_edit_requests",
]

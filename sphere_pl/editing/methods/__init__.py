"""Editing methods, one module each, registered by name (`create_method("alphaedit")`)."""

from .alphaedit import AlphaEdit
from .ft import FineTune
from .memit import MEMIT
from .prune import PRUNE, restrain_singular_values
from .rect import RECT, RelativeChangeSparsifier
from .rome import ROME
from .ultraedit import UltraEdit
from .base import METHODS, BatchEdit, EditMethod, LocateThenEdit, create_method, register_method

__all__ = ["FineTune", "MEMIT", "METHODS", "PRUNE", "RECT", "ROME", "AlphaEdit", "RelativeChangeSparsifier", "UltraEdit", "BatchEdit", "EditMethod", "LocateThenEdit", "create_method", "register_method", "restrain_singular_values"]

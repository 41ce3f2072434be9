"""Editing methods, one module each, registered by name (`create_method("alphaedit")`)."""

from .alphaedit import AlphaEdit
from .base import METHODS, BatchEdit, EditMethod, LocateThenEdit, create_method, register_method

__all__ = ["METHODS", "AlphaEdit", "BatchEdit", "EditMethod", "LocateThenEdit", "create_method", "register_method"]

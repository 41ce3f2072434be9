"""Editing methods: one module each, with its update rule and cross-batch state."""

from .alphaedit import AlphaEdit
from .base import EditContext, EditMethod, NonFiniteUpdateError, WeightWriter

__all__ = ["AlphaEdit", "EditContext", "EditMethod", "NonFiniteUpdateError", "WeightWriter"]

"""The editing core: the `Editor`, the weight writer, patches, keys, values, statistics and methods."""

from .editor import EditFailedError, Editor
from .methods import METHODS, AlphaEdit, EditMethod, LocateThenEdit, create_method, register_method
from .patch import Patch, PatchError
from .writer import NonFiniteUpdateError, WeightWriter

__all__ = [
    "METHODS",
    "AlphaEdit",
    "EditFailedError",
    "EditMethod",
    "Editor",
    "LocateThenEdit",
    "NonFiniteUpdateError",
    "Patch",
    "PatchError",
    "WeightWriter",
    "create_method",
    "register_method",
]

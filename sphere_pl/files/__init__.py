"""Files written whole or not at all, and the checkpoint file format (no Lightning, no pickle)."""

from .atomic import atomic_write, atomic_write_json, atomic_write_text
from .checkpoint import CheckpointFormatError, is_safetensors_checkpoint, load_checkpoint_file, save_checkpoint_file

__all__ = [
    "CheckpointFormatError",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "is_safetensors_checkpoint",
    "load_checkpoint_file",
    "save_checkpoint_file",
]

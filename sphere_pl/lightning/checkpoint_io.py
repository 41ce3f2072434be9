"""`SafetensorsCheckpointIO`: Lightning's checkpoint plugin over the safetensors format of
`sphere_pl.files.checkpoint` (no pickle on reading, every write atomic). `EditCheckpoint`
installs it when the trainer has the default one."""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from ..files.checkpoint import load_checkpoint_file, save_checkpoint_file


class SafetensorsCheckpointIO(CheckpointIO):
    """Writes `save_checkpoint_file` files and reads both formats."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafetensorsCheckpointIO takes no storage_options")
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location)

    def remove_checkpoint(self, path) -> None:
        if os.path.exists(path):
            os.remove(path)

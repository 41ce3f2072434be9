"""The Lightning adapter: the editing core as a LightningModule and a DataModule, the run record,
checkpoints (the file plugin, the `sphere_pl` section, the callback that writes them), the
single-device strategy, progress output and the W&B logger."""

from .checkpoint import EditCheckpoint, RunDirectoryInUseError, RunLock
from .datamodule import EditDataModule
from .module import SequentialEditor
from .progress import EditProgress
from .record import RunRecord
from .strategy import EditingStrategy

__all__ = [
    "EditCheckpoint",
    "EditDataModule",
    "EditProgress",
    "EditingStrategy",
    "RunDirectoryInUseError",
    "RunLock",
    "RunRecord",
    "SequentialEditor",
]

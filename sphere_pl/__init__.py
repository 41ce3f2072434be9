"""sphere_pl: sequential knowledge editing of language models with SPHERE, on PyTorch Lightning."""

from .callbacks import EditCheckpoint, HypersphericalEnergyMonitor
from .datamodule import EditDataModule
from .methods import AlphaEdit, EditMethod
from .module import SequentialEditor
from .projection import SphereProjection

__all__ = [
    "AlphaEdit",
    "EditCheckpoint",
    "EditDataModule",
    "EditMethod",
    "HypersphericalEnergyMonitor",
    "SequentialEditor",
    "SphereProjection",
]
__version__ = "0.1.0"

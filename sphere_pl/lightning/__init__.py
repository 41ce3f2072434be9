"""Lightning wrapping of the editing core: the module, the edit DataModule, callbacks, CLI and loggers."""

from .callbacks import EditCheckpoint, HypersphericalEnergyMonitor, RunSummary
from .datamodule import EditDataModule
from .general import GeneralAbilityMonitor
from .he_analysis import HEAnalysis
from .module import SequentialEditor

__all__ = [
    "EditCheckpoint",
    "EditDataModule",
    "GeneralAbilityMonitor",
    "HEAnalysis",
    "HypersphericalEnergyMonitor",
    "RunSummary",
    "SequentialEditor",
]

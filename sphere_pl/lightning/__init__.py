"""Lightning wrapping of the editing core: the module, the edit DataModule, callbacks, CLI and loggers."""

from .callbacks import EditCheckpoint, HypersphericalEnergyMonitor, RunSummary
from .datamodule import EditDataModule
from .facts import FactMonitor
from .general import GeneralAbilityMonitor
from .he_analysis import HEAnalysis
from .module import SequentialEditor
from .recorder import RunRecorder
from .strategy import EditingStrategy

__all__ = [
    "EditCheckpoint",
    "EditDataModule",
    "EditingStrategy",
    "FactMonitor",
    "GeneralAbilityMonitor",
    "HEAnalysis",
    "HypersphericalEnergyMonitor",
    "RunRecorder",
    "RunSummary",
    "SequentialEditor",
]

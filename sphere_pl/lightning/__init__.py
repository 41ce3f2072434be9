"""Lightning wrapping of the editing core: the module, the edit DataModule, callbacks, CLI and loggers."""

from .callbacks import EditCheckpoint, HypersphericalEnergyMonitor, RunSummary
from .collapse import CollapseStop
from .datamodule import EditDataModule
from .facts import FactMonitor
from .general import GeneralAbilityMonitor
from .guard import CollapseGuard
from .he_analysis import HEAnalysis
from .module import SequentialEditor
from .recorder import RunRecorder
from .strategy import EditingStrategy

__all__ = [
    "CollapseGuard",
    "CollapseStop",
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

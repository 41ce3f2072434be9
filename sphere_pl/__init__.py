"""sphere_pl: sequential knowledge editing of language models with SPHERE, on PyTorch Lightning.

The editing core (`Editor`, `Patch`, methods, the SPHERE filter, evaluators, data) runs without
Lightning and never imports it. The shell around it, imported only when one of its names is
used: the Lightning adapter (`sphere_pl.lightning`: `SequentialEditor`, `EditDataModule`, the
run record and checkpoints), the monitors (`sphere_pl.monitors`: HE, facts, general ability,
canaries, the collapse guard and rule, the HE analysis, the summary) and the commands
(`sphere_pl.commands`: `python -m sphere_pl fit --config ...`, export/apply/rollback, study).
"""

import importlib

from .data import EditBatch, EditDataError, EditRequest, load_edit_requests
from .editing import METHODS, AlphaEdit, EditFailedError, EditMethod, Editor, LocateThenEdit, Patch, PatchError, create_method, register_method
from .editing.methods import MEMIT, PRUNE, RECT, ROME, FineTune, UltraEdit
from .errors import SettingsError, SpherePLError
from .filters import DeltaFilter
from .models import PretrainedModel, load_model_and_tokenizer
from .sphere import SphereProjection, hyperspherical_energy

# the shell's public names, and the package that defines each (imported on first use)
_SHELL = {
    "SequentialEditor": "lightning",
    "EditDataModule": "lightning",
    "EditCheckpoint": "lightning",
    "CollapseGuard": "monitors",
    "CollapseStop": "monitors",
    "FactMonitor": "monitors",
    "GeneralAbilityMonitor": "monitors",
    "HEAnalysis": "monitors",
    "HypersphericalEnergyMonitor": "monitors",
    "PerplexityCanary": "monitors",
    "RunSummary": "monitors",
    "SpecificityCanary": "monitors",
}


def __getattr__(name: str):
    if name in _SHELL:
        return getattr(importlib.import_module(f"{__name__}.{_SHELL[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "MEMIT",
    "PRUNE",
    "RECT",
    "ROME",
    "AlphaEdit",
    "DeltaFilter",
    "EditBatch",
    "EditDataError",
    "EditFailedError",
    "EditMethod",
    "EditRequest",
    "Editor",
    "FineTune",
    "LocateThenEdit",
    "Patch",
    "PatchError",
    "PretrainedModel",
    "SettingsError",
    "SphereProjection",
    "SpherePLError",
    "UltraEdit",
    "create_method",
    "hyperspherical_energy",
    "load_edit_requests",
    "load_model_and_tokenizer",
    "register_method",
    *_SHELL,
]
__version__ = "0.3.0"

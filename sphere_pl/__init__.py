"""sphere_pl: sequential knowledge editing of language models with SPHERE, on PyTorch Lightning.

The editing core (`Editor`, `Patch`, methods) runs without Lightning; `sphere_pl.lightning`
wraps it for configured, logged, checkpointed runs (`python -m sphere_pl fit --config ...`).
"""

from .data import EditBatch, EditDataError, EditRequest, load_edit_requests
from .editing import METHODS, AlphaEdit, EditFailedError, EditMethod, Editor, LocateThenEdit, Patch, PatchError, create_method, register_method
from .editing.methods import MEMIT, PRUNE, RECT, ROME, FineTune
from .models import PretrainedModel, load_model_and_tokenizer
from .sphere import SphereProjection, hyperspherical_energy
from .lightning import CollapseGuard, CollapseStop, EditCheckpoint, EditDataModule, FactMonitor, GeneralAbilityMonitor, HEAnalysis, HypersphericalEnergyMonitor, RunSummary, SequentialEditor

__all__ = [
    "GeneralAbilityMonitor",
    "HEAnalysis",
    "MEMIT",
    "METHODS",
    "PRUNE",
    "RECT",
    "ROME",
    "FineTune",
    "AlphaEdit",
    "EditBatch",
    "EditCheckpoint",
    "EditDataError",
    "EditDataModule",
    "EditFailedError",
    "CollapseGuard",
    "CollapseStop",
    "FactMonitor",
    "EditMethod",
    "EditRequest",
    "Editor",
    "HypersphericalEnergyMonitor",
    "LocateThenEdit",
    "Patch",
    "PatchError",
    "PretrainedModel",
    "RunSummary",
    "SequentialEditor",
    "SphereProjection",
    "create_method",
    "hyperspherical_energy",
    "load_edit_requests",
    "load_model_and_tokenizer",
    "register_method",
]
__version__ = "0.2.0"

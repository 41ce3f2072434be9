"""The monitors: what a run measures and judges around its edits, each a Lightning callback that
reads the editor and writes through the module's `RunRecord`.

HE of the edited layers, the edit facts, general ability, the canaries (perplexity and never-edited
specificity after every batch), the collapse guard and the collapse rule (one rule language,
`rules.py`), the HE analysis, and the run's header and summary. The fit command calls them in
the order `sphere_pl.commands.run.RUN_ORDER` states.
"""

from .canaries import PerplexityCanary, SpecificityCanary
from .collapse import CollapseStop
from .facts import FactMonitor
from .general import GeneralAbilityMonitor
from .guard import CollapseGuard
from .he import HypersphericalEnergyMonitor
from .he_analysis import HEAnalysis
from .rules import CollapseRule
from .schedule import Schedule
from .summary import RunHeader, RunSummary

__all__ = [
    "CollapseGuard",
    "CollapseRule",
    "CollapseStop",
    "FactMonitor",
    "GeneralAbilityMonitor",
    "HEAnalysis",
    "HypersphericalEnergyMonitor",
    "PerplexityCanary",
    "RunHeader",
    "RunSummary",
    "Schedule",
    "SpecificityCanary",
]

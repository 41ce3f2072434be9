"""`CollapseGuard`: judges every batch as it is applied, and stops, reverts or quarantines it.

After each batch the guard reads, on the weights that are evaluated (PRUNE: its restrained ones):

* HE per edited layer, from the HE monitor (the run's `he` settings), and from it the **HE step
  score** `guard/he_score/layerN`: |HE_t − HE_{t−1}| over the median of that layer's last `he_window`
  steps (the first step, from the pretrained weights, counts as history; a layer is scored once it
  has `he_min_history` steps). A batch that moves HE a hundred times as far as the batches before it
  is what a collapse looks like (ROME in the method comparison: 183);
* **norm growth** per edited layer, `guard/norm_growth/layerN`: ‖W_t‖_F / ‖W_0‖_F − 1;
* the **canaries** (`canary/specificity`, `canary/perplexity`), from their monitors.

It judges that row with the collapse rule language (`rules.py`): a condition that holds is a
breach. `action: warn` prints and records it; `stop` also reverts the batch exactly (weights and
method state, from the editor's kept patch) and ends the run cleanly, so the last checkpoint holds
the state before it and a resumed run starts with it again; `rollback` reverts the batch, finds the
request(s) the breach comes from by bisection (each half tried on the state before the batch and
reverted exactly), records them in `quarantine.jsonl`, applies the rest as the batch and goes on.
Where no culprit can be isolated it stops as `stop` does.
"""

from __future__ import annotations

import statistics

import lightning as L

from ..errors import SettingsError
from ..lightning.record import QUARANTINE
from . import protocol
from .canaries import PERPLEXITY, SPECIFICITY, PerplexityCanary, SpecificityCanary
from .he import HypersphericalEnergyMonitor
from .rules import CollapseRule, find_callback, recorded_metrics

ACTIONS = ("warn", "stop", "rollback")
HE_SCORE, NORM_GROWTH = protocol.GUARD + "he_score/", protocol.GUARD + "norm_growth/"
#: the guard's conditions when none are given (each only where its signal is measured): in the recorded method
#: comparison the 200-edit runs scored at most 19.1 (RECT + SPHERE), ROME's collapsing batch 183 and ROME + SPHERE's
#: 214 (`benchmarks/guard_thresholds.py`); FT's held-out specificity fell 0.18 over 200 edits, ROME's 0.12-0.14
DEFAULT_CONDITIONS = (
    {"metric": HE_SCORE + "*", "above": 50.0},
    {"metric": SPECIFICITY, "drop_from_start": 0.3},
    {"metric": PERPLEXITY, "ratio_to_start_above": 2.0},
)


class CollapseGuard(L.Callback):
    """Args:
    enabled: check at all (off by default).
    action: "warn" (print and record), "stop" (revert the breaching batch and end the run) or
        "rollback" (revert it, quarantine the requests that cause the breach, apply the rest, go on).
    conditions: the breach conditions in the rule language, on `guard/he_score/*`,
        `guard/norm_growth/*`, `canary/specificity`, `canary/perplexity` (None: HE score above 50,
        canary specificity 0.3 under its pre-edit value, canary perplexity over 2x its pre-edit
        value, each where it is measured).
    he_window, he_min_history: steps the median is taken over, and steps needed before scoring.
    """

    def __init__(self, enabled: bool = False, action: str = "warn", conditions: list[dict] | None = None, he_window: int = 5,
                 he_min_history: int = 2):
        if action not in ACTIONS:
            raise SettingsError(f"guard.action must be one of {list(ACTIONS)}, got {action!r}")
        for name, value in (("he_window", he_window), ("he_min_history", he_min_history)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SettingsError(f"guard.{name} must be an integer >= 1, got {value!r}")
        if he_min_history > he_window:
            raise SettingsError(f"guard.he_min_history ({he_min_history}) cannot exceed guard.he_window ({he_window})")
        self.enabled, self.action, self.he_window, self.he_min_history = enabled, action, he_window, he_min_history
        self.given_conditions = conditions
        self.rule = CollapseRule(conditions, 1, "guard") if conditions else None
        self.state: dict = {}  # checkpointed: the last HE and the steps so far, the first norms, breaches, quarantined records
        self.he: HypersphericalEnergyMonitor | None = None
        self.canaries: list = []

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        self.he = find_callback(trainer, HypersphericalEnergyMonitor) or HypersphericalEnergyMonitor()
        self.canaries = [c for c in (find_callback(trainer, PerplexityCanary), find_callback(trainer, SpecificityCanary)) if c is not None and c.enabled]
        if self.rule is None:
            measured = {c.metric for c in self.canaries}
            self.rule = CollapseRule([c for c in DEFAULT_CONDITIONS if c["metric"] in measured or c["metric"].startswith(protocol.GUARD)], 1, "guard")
        if self.action != "warn" and pl_module.editor.history_size < 1:
            raise SettingsError(f"guard.action = {self.action!r} reverts the breaching batch from its kept patch: model.history_size must be >= 1")
        self.rule.check_metrics(recorded_metrics(trainer, pl_module))

    def metric_names(self, trainer, pl_module) -> set[str]:
        if not self.enabled:
            return set()
        labels = pl_module.editor.weight_labels
        return {HE_SCORE + label for label in labels} | {NORM_GROWTH + label for label in labels} | {
            protocol.GUARD + name for name in ("he_score_max", "breach", "breaches", "quarantined")}

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        if not self.state:  # resumed: what the signals compare with came with the checkpoint
            he, norms = self._weights(pl_module)
            self.state = {"he": he, "norm0": norms, "steps": {}, "breaches": [], "quarantined": []}
        if self.state["quarantined"] or pl_module.record.path(QUARANTINE).exists():
            self._write_quarantine(pl_module)  # a resumed run's file says what its checkpoint says

    # ------------------------------------------------------------------ measuring
    def _weights(self, pl_module) -> tuple[dict[str, float], dict[str, float]]:
        """HE (the HE monitor's, evaluated weights) and Frobenius norm per edited layer."""
        editor = pl_module.editor
        he, _ = self.he.energies(editor)
        with editor.evaluation_weights():
            norms = {label: float(w.double().norm()) for label, w in editor.edited_weights().items()}
        return he, norms

    def measure(self, trainer, pl_module) -> tuple[dict[str, float], dict]:
        """The guard's row for the model as it is (HE step scores, norm growth, canaries) and what joins the
        history once the batch stays applied (`_keep`)."""
        row, taken = self.signals(*self._weights(pl_module))
        for canary in self.canaries:
            row[canary.metric] = canary.measure(trainer, pl_module)
        return row, taken

    def signals(self, he: dict[str, float], norms: dict[str, float]) -> tuple[dict[str, float], dict]:
        """HE step scores and norm growth from this state's HE and norms (per `layerN`), against the state kept."""
        row, steps = {}, {}
        for layer, value in he.items():
            steps[layer] = abs(value - self.state["he"][layer])
            history = self.state["steps"].get(layer, [])
            if len(history) >= self.he_min_history:
                base = statistics.median(history[-self.he_window :])
                row[HE_SCORE + layer] = steps[layer] / base if base > 0 else (float("inf") if steps[layer] > 0 else 0.0)
            row[NORM_GROWTH + layer] = norms[layer] / self.state["norm0"][layer] - 1
        return row, {"he": he, "steps": steps}

    def breaches(self, row: dict, pl_module) -> list[str]:
        return self.rule.reasons(row, pl_module.record.history)

    def _keep(self, taken: dict) -> None:
        """The batch stays applied: its HE is the last one, its steps join the history."""
        for layer, step in taken["steps"].items():
            self.state["steps"][layer] = self.state["steps"].get(layer, []) + [step]
        self.state["he"] = taken["he"]

    # ------------------------------------------------------------------ judging
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        editor = pl_module.editor
        row, taken = self.measure(trainer, pl_module)
        breaches = self.breaches(row, pl_module)
        record = self._public(row, breaches)
        if not breaches:
            self._keep(taken)
            pl_module.record.record(record)
            return
        ids = list(editor.outcome.applied)
        print(f"sphere_pl: guard: batch {batch.index} (case_ids {ids}) breached: " + "; ".join(breaches), flush=True)
        self.state["breaches"].append({"batch": int(batch.index), "edits": editor.edits_applied, "case_ids": ids, "signals": breaches,
                                       "action": self.action})
        if self.action == "warn":
            self._keep(taken)
        elif self.action == "stop":
            editor.rollback(1)  # exactly the state before the batch: weights and method state
            self._end(trainer, pl_module, batch)
        elif self._quarantine(trainer, pl_module, batch, breaches):
            record.update(pl_module.edit_info())  # the batch as applied without its culprits
        else:
            self._end(trainer, pl_module, batch)
        record[protocol.GUARD + "breaches"] = float(len(self.state["breaches"]))
        record[protocol.GUARD + "quarantined"] = float(len(self.state["quarantined"]))
        pl_module.record.record(record)

    @staticmethod
    def _public(row: dict, breaches: list[str]) -> dict[str, float]:
        """The recorded row: the guard's own signals (the canaries record theirs), the largest HE score, the breach flag."""
        scores = [v for k, v in row.items() if k.startswith(HE_SCORE)]
        own = {k: v for k, v in row.items() if k.startswith(protocol.GUARD)}
        return {**own, protocol.GUARD + "he_score_max": max(scores) if scores else 0.0, protocol.GUARD + "breach": float(bool(breaches))}

    def _end(self, trainer, pl_module, batch) -> None:
        """End the run on the state before the batch (already reverted exactly)."""
        print(f"sphere_pl: guard: batch {batch.index} reverted; the run ends after {pl_module.editor.edits_applied} edits. The last "
              "checkpoint holds the state before that batch (no checkpoint is written of a reverted batch)", flush=True)
        trainer.should_stop = True

    # ------------------------------------------------------------------ quarantine
    def _culprits(self, trainer, pl_module, requests: list, breaches: list[str]) -> list[tuple]:
        """(request, breaches) of every request the breach comes from: halves tried one at a time on the
        state before the batch, each reverted exactly; a part that passes holds no culprit."""
        if not breaches:
            return []
        if len(requests) == 1:
            return [(requests[0], breaches)]
        found = []
        for part in (requests[: len(requests) // 2], requests[len(requests) // 2 :]):
            with pl_module.editor.trial(part):
                part_breaches = self.breaches(self.measure(trainer, pl_module)[0], pl_module)
            found += self._culprits(trainer, pl_module, part, part_breaches)
        return found

    def _quarantine(self, trainer, pl_module, batch, breaches: list[str]) -> bool:
        """Revert the batch, find its culprits, quarantine them and apply the rest. False where no culprit
        can be isolated, with the state before the batch in place."""
        editor = pl_module.editor
        requests = list(batch.requests)
        editor.rollback(1)
        culprits = self._culprits(trainer, pl_module, requests, breaches)
        bad = {id(r) for r, _ in culprits}
        rest = [r for r in requests if id(r) not in bad]
        if not culprits or not rest:
            print(f"sphere_pl: guard: no culprit could be isolated in batch {batch.index} "
                  f"({'every part passes alone' if not culprits else 'every request breaches'})", flush=True)
            return False
        editor.apply(rest, withheld=[r.case_id for r, _ in culprits])
        row, taken = self.measure(trainer, pl_module)
        still = self.breaches(row, pl_module)
        if still:
            print(f"sphere_pl: guard: batch {batch.index} without {[r.case_id for r, _ in culprits]} still breaches: " + "; ".join(still), flush=True)
            editor.rollback(1)
            return False
        self._keep(taken)
        self.state["quarantined"].extend([{"case_id": r.case_id, "batch": int(batch.index), "signals": b} for r, b in culprits])
        path = self._write_quarantine(pl_module)
        print(f"sphere_pl: guard: batch {batch.index}: quarantined case_ids {[r.case_id for r, _ in culprits]} (written to {path}); "
              f"the other {len(rest)} request(s) applied, the run goes on", flush=True)
        return True

    def _write_quarantine(self, pl_module):
        """`quarantine.jsonl` mirrors the checkpointed guard state, rewritten whole (never appended): a run killed
        after a quarantine and resumed from the checkpoint before it lists each record once."""
        return pl_module.record.write_jsonl(QUARANTINE, self.state["quarantined"])

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict:
        return {"state": self.state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.state = state_dict.get("state", {})


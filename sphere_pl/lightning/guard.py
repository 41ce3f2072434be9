"""`CollapseGuard`: signals of a collapsing edit stream, checked after every batch as it happens.

After each batch, on the weights that are evaluated (PRUNE: its restrained ones):

* **HE step score** per edited layer: |HE_t − HE_{t−1}| over the median of that layer's last
  `he_window` steps (the first step, from the pretrained weights, counts as history; a layer is
  scored once it has `he_min_history` steps). A batch that moves HE a hundred times as far as the
  batches before it is what a collapse looks like (ROME in the method comparison: 183).
* **Norm growth** per edited layer: ‖W_t‖_F / ‖W_0‖_F − 1.
* **Canaries**: the first `canaries` never-edited (held-out) records, their specificity scored
  before editing and after every batch; and perplexity on `perplexity_windows` windows of
  `perplexity_path`, before and after.

A signal beyond its threshold is a breach. `action: warn` prints it and records it; `action: stop`
also reverts the batch exactly (weights and method state, from the editor's kept patch) and ends
the run cleanly, so the last checkpoint holds the state before that batch and a resumed run
starts with it again. `action: rollback` reverts the batch, finds the request(s) that cause the
breach by bisection (each half tried on the state before the batch and reverted exactly), writes
them with their signals to `quarantine.jsonl` in the run directory, applies the rest of the batch
as the batch and goes on: the run then ends with the weights of an unguarded run of the stream
without those records. Where no culprit can be isolated (every part passes alone, or the rest
still breaches) it stops as `stop` does, naming the batch's case_ids and signals. Everything is
recorded as `guard/*`. Thresholds set to null are not checked.
"""

from __future__ import annotations

import json
import os
import statistics

import lightning as L
import torch

from ..evaluation.counterfact import CounterFactScore
from ..evaluation.scoring import compare_targets
from ..evaluation.general.perplexity import PerplexityTask, window_nll
from ..sphere import hyperspherical_energy

ACTIONS = ("warn", "stop", "rollback")


class CollapseGuard(L.Callback):
    """Args:
    enabled: check at all (off by default).
    action: "warn" (print and record), "stop" (revert the breaching batch and end the run) or
        "rollback" (revert it, quarantine the requests that cause the breach, apply the rest, go on).
    he_score: the largest HE step score allowed (default 50: in the recorded method comparison the
        200-edit AlphaEdit, MEMIT, RECT, PRUNE and FT runs, with and without SPHERE, scored at most
        19.1 (RECT + SPHERE), ROME's collapsing batch 183 and ROME + SPHERE's 214;
        `benchmarks/guard_thresholds.py`).
    he_window, he_min_history: steps the median is taken over, and steps needed before scoring.
    norm_growth: the largest relative growth of an edited weight's norm (None: recorded only).
    canaries: never-edited records scored after every batch (0: none).
    canary_drop: the largest fall of their specificity below its value before editing (default
        0.3: in the comparison FT's held-out specificity fell 0.18 over 200 edits, ROME's 0.12-0.14).
    perplexity_path: a plain-text file for the perplexity canary (None: none).
    perplexity_windows, perplexity_seq_len: its windows.
    perplexity_ratio: the largest ratio of perplexity to its value before editing.
    """

    def __init__(
        self,
        enabled: bool = False,
        action: str = "warn",
        he_score: float | None = 50.0,
        he_window: int = 5,
        he_min_history: int = 2,
        norm_growth: float | None = None,
        canaries: int = 0,
        canary_drop: float | None = 0.3,
        perplexity_path: str | None = None,
        perplexity_windows: int = 2,
        perplexity_seq_len: int = 256,
        perplexity_ratio: float | None = 2.0,
    ):
        if action not in ACTIONS:
            raise ValueError(f"guard.action must be one of {list(ACTIONS)}, got {action!r}")
        for name, value in (("he_score", he_score), ("norm_growth", norm_growth), ("canary_drop", canary_drop), ("perplexity_ratio", perplexity_ratio)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"guard.{name} must be a positive number or null (not checked), got {value!r}")
        if perplexity_ratio is not None and perplexity_ratio <= 1:
            raise ValueError(f"guard.perplexity_ratio must be above 1 (a ratio to the perplexity before editing), got {perplexity_ratio}")
        for name, value, least in (("he_window", he_window, 1), ("he_min_history", he_min_history, 1), ("canaries", canaries, 0),
                                   ("perplexity_windows", perplexity_windows, 1), ("perplexity_seq_len", perplexity_seq_len, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"guard.{name} must be an integer >= {least}, got {value!r}")
        if he_min_history > he_window:
            raise ValueError(f"guard.he_min_history ({he_min_history}) cannot exceed guard.he_window ({he_window})")
        self.enabled, self.action = enabled, action
        self.he_score, self.he_window, self.he_min_history = he_score, he_window, he_min_history
        self.norm_growth, self.canaries, self.canary_drop = norm_growth, canaries, canary_drop
        self.perplexity_path, self.perplexity_windows, self.perplexity_seq_len = perplexity_path, perplexity_windows, perplexity_seq_len
        self.perplexity_ratio = perplexity_ratio
        self._windows: list[list[int]] | None = None
        self.state: dict = {}  # checkpointed: what the signals compare with, and the breaches so far

    # ------------------------------------------------------------------ measuring
    def _canary_requests(self, trainer) -> list:
        return list(getattr(trainer.datamodule, "holdout_requests", []))[: self.canaries]

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        if self.canaries and len(self._canary_requests(trainer)) < self.canaries:
            have = len(self._canary_requests(trainer))
            raise ValueError(f"guard.canaries = {self.canaries}, but the data holds {have} never-edited records (data.num_holdout)")
        self.load_windows(pl_module.editor.tokenizer)

    def load_windows(self, tokenizer) -> None:
        """The perplexity canary's token windows (none without `perplexity_path`)."""
        if self.perplexity_path is not None:
            task = PerplexityTask(self.perplexity_path, self.perplexity_windows, self.perplexity_seq_len)
            self._windows = task.load(tokenizer)

    def measure(self, editor, requests: list) -> dict[str, float]:
        """The raw signals of `editor`'s model as it is: HE and weight norm per edited layer, canary specificity, perplexity."""
        out: dict[str, float] = {}
        with editor.evaluation_weights():
            for layer, weight in editor.edited_weights().items():
                out[f"he/{layer}"] = float(hyperspherical_energy(weight))
                out[f"norm/{layer}"] = float(weight.double().norm())
            if self._windows is not None:
                device = next(editor.model.parameters()).device
                sums = window_nll(editor.model, torch.tensor(self._windows, device=device))
                out["perplexity"] = float(torch.exp(sums.double().sum() / (len(self._windows) * (self.perplexity_seq_len - 1))))
            if requests and all(r.benchmark == "counterfact" for r in requests):
                # only the neighborhood prompts (the specificity group): a fifth of a full evaluation's prompts
                prompts = [p for r in requests for p in r.neighborhood_prompts]
                new = [r.target_new for r in requests for _ in r.neighborhood_prompts]
                true = [r.neighborhood_true for r in requests for _ in r.neighborhood_prompts]
                nll_new, nll_true = compare_targets(editor.model, editor.tokenizer, prompts, new, true, batch_size=editor.scoring_batch_size)
                score = CounterFactScore("true")
                score.update(nll_new.cpu(), nll_true.cpu())
                out["canary_specificity"] = float(score.compute())
        if requests and "canary_specificity" not in out:  # ZsRE canaries: token accuracy, through the full evaluation
            scores = editor.evaluate(requests)
            if "specificity_accuracy" in scores:
                out["canary_specificity"] = scores["specificity_accuracy"]
        return out

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.enabled or self.state:
            return  # resumed: the baselines came with the checkpoint
        start = self.measure(pl_module.editor, self._canary_requests(trainer))
        self.state = {"start": start, "last": dict(start), "steps": {}, "breaches": []}
        pl_module.recorder.record({f"guard/{k}": v for k, v in _public(start).items()})

    # ------------------------------------------------------------------ checking
    def signals(self, now: dict[str, float]) -> tuple[dict[str, float], list[str], dict[str, float]]:
        """The guard's signals after a batch, the breaches among them, and each layer's HE step, which
        `_keep` adds to the history once the batch stays applied (a tried part changes nothing)."""
        start, last, steps = self.state["start"], self.state["last"], self.state["steps"]
        taken: dict[str, float] = {}
        values: dict[str, float] = {}
        breaches: list[str] = []
        for key in [k for k in now if k.startswith("he/")]:
            layer = key.split("/", 1)[1]
            step = abs(now[key] - last[key])
            history = steps.get(layer, [])
            if len(history) >= self.he_min_history:
                base = statistics.median(history[-self.he_window :])
                score = step / base if base > 0 else (float("inf") if step > 0 else 0.0)
                values[f"he_score/layer{layer}"] = score
                if self.he_score is not None and score > self.he_score:
                    breaches.append(f"layer {layer}: HE step {step:.3g} is {score:.0f}x the median of the last {len(history[-self.he_window:])} ({base:.3g})")
            taken[layer] = step
            growth = now[f"norm/{layer}"] / start[f"norm/{layer}"] - 1
            values[f"norm_growth/layer{layer}"] = growth
            if self.norm_growth is not None and growth > self.norm_growth:
                breaches.append(f"layer {layer}: weight norm grew {growth:.3g} (> {self.norm_growth})")
        if "canary_specificity" in now:
            values["canary_specificity"] = now["canary_specificity"]
            drop = start["canary_specificity"] - now["canary_specificity"]
            if self.canary_drop is not None and drop > self.canary_drop:
                breaches.append(f"canary specificity {now['canary_specificity']:.3f}, {drop:.3f} under {start['canary_specificity']:.3f} before editing")
        if "perplexity" in now:
            values["perplexity"] = now["perplexity"]
            ratio = now["perplexity"] / start["perplexity"]
            if self.perplexity_ratio is not None and ratio > self.perplexity_ratio:
                breaches.append(f"canary perplexity {now['perplexity']:.2f}, {ratio:.2f}x its {start['perplexity']:.2f} before editing")
        return values, breaches, taken

    def _keep(self, now: dict[str, float], taken: dict[str, float]) -> None:
        """The batch stays applied: its measurements become the last ones, its steps join the history."""
        for layer, step in taken.items():
            self.state["steps"][layer] = self.state["steps"].get(layer, []) + [step]
        self.state["last"] = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        editor, canaries = pl_module.editor, self._canary_requests(trainer)
        with editor.timer("guard"):  # its cost beside the editing phases
            now = self.measure(editor, canaries)
        values, breaches, taken = self.signals(now)
        row = self._row(values, breaches)
        if not breaches:
            self._keep(now, taken)
            pl_module.recorder.record(row)
            return
        ids = list(editor.case_ids[-1]) if editor.case_ids else []
        print(f"sphere_pl: guard: batch {batch.index} (case_ids {ids}) breached: " + "; ".join(breaches), flush=True)
        entry = {"batch": int(batch.index), "edits": editor.edits_applied, "case_ids": ids, "signals": breaches, "action": self.action}
        self.state["breaches"].append(entry)
        if self.action == "warn":
            self._keep(now, taken)
        elif self.action == "stop":
            editor.rollback(1)  # exactly the state before the batch: weights and method state
            self._end(trainer, pl_module, batch)
        elif not self._quarantine(trainer, pl_module, batch, canaries, breaches):
            self._end(trainer, pl_module, batch)
        row["guard/breaches"] = float(len(self.state["breaches"]))
        row["guard/quarantined"] = float(len(self.state.get("quarantined", [])))
        pl_module.recorder.record(row)

    def _row(self, values: dict[str, float], breaches: list[str]) -> dict[str, float]:
        scores = [v for k, v in values.items() if k.startswith("he_score/")]
        row = {f"guard/{k}": v for k, v in values.items()}
        row.update({"guard/he_score_max": max(scores) if scores else 0.0, "guard/breach": float(bool(breaches))})
        return row

    def _end(self, trainer, pl_module, batch) -> None:
        """End the run on the state before the batch (already reverted exactly: the guard's last
        measurements are still those of this state)."""
        editor = pl_module.editor
        print(f"sphere_pl: guard: batch {batch.index} reverted; the run ends after {editor.edits_applied} edits. The last "
              "checkpoint holds the state before that batch (no checkpoint is written of a reverted batch)", flush=True)
        trainer.should_stop = True

    def _breaches(self, editor, canaries: list) -> list[str]:
        return self.signals(self.measure(editor, canaries))[1]

    def _culprits(self, editor, requests: list, canaries: list, breaches: list[str]) -> list[tuple]:
        """(request, breaches) of every request the breach comes from: halves tried one at a time on the
        state before the batch, each reverted exactly; a part that passes holds no culprit."""
        if not breaches:
            return []
        if len(requests) == 1:
            return [(requests[0], breaches)]
        found = []
        for part in (requests[: len(requests) // 2], requests[len(requests) // 2 :]):
            with editor.trial(part):
                part_breaches = self._breaches(editor, canaries)
            found += self._culprits(editor, part, canaries, part_breaches)
        return found

    def _quarantine(self, trainer, pl_module, batch, canaries: list, breaches: list[str]) -> bool:
        """Revert the batch, find its culprits, quarantine them and apply the rest. False where no culprit
        can be isolated, with the state before the batch in place."""
        editor = pl_module.editor
        requests = list(batch.requests)
        editor.rollback(1)
        with editor.timer("guard"):
            culprits = self._culprits(editor, requests, canaries, breaches)
        bad = {id(r) for r, _ in culprits}
        rest = [r for r in requests if id(r) not in bad]
        if not culprits or not rest:
            print(f"sphere_pl: guard: no culprit could be isolated in batch {batch.index} "
                  f"({'every part passes alone' if not culprits else 'every request breaches'})", flush=True)
            return False
        editor.apply(rest, withheld=[r.case_id for r, _ in culprits])
        now = self.measure(editor, canaries)
        _, still, taken = self.signals(now)
        if still:
            print(f"sphere_pl: guard: batch {batch.index} without {[r.case_id for r, _ in culprits]} still breaches: " + "; ".join(still), flush=True)
            editor.rollback(1)
            return False
        self._keep(now, taken)
        self.state.setdefault("quarantined", []).extend([{"case_id": r.case_id, "batch": int(batch.index), "signals": b} for r, b in culprits])
        path = self._write_quarantine(trainer)
        print(f"sphere_pl: guard: batch {batch.index}: quarantined case_ids {[r.case_id for r, _ in culprits]} (written to {path}); "
              f"the other {len(rest)} request(s) applied, the run goes on", flush=True)
        return True

    def check_can_revert(self, pl_module) -> None:
        """`stop` and `rollback` revert a batch from the editor's kept patches: refuse a run that keeps none."""
        if self.enabled and self.action != "warn" and pl_module.editor.history_size < 1:
            raise ValueError(f"guard.action = {self.action!r} reverts the breaching batch from its kept patch: model.history_size must be >= 1")

    def on_fit_start(self, trainer, pl_module) -> None:
        self.check_can_revert(pl_module)
        if self.enabled and (self.state.get("quarantined") or os.path.exists(self._quarantine_path(trainer))):
            self._write_quarantine(trainer)  # a resumed run's file says what its checkpoint says

    @staticmethod
    def _quarantine_path(trainer) -> str:
        return os.path.join(trainer.default_root_dir, "quarantine.jsonl")

    def _write_quarantine(self, trainer) -> str:
        """`quarantine.jsonl` mirrors the checkpointed guard state, rewritten whole (never appended): a run
        killed after a quarantine and resumed from the checkpoint before it lists each record once."""
        path = self._quarantine_path(trainer)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for entry in self.state.get("quarantined", []):
                f.write(json.dumps(entry) + "\n")
        os.replace(path + ".tmp", path)
        return path

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict:
        return {"state": self.state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.state = state_dict.get("state", {})


def _public(measured: dict[str, float]) -> dict[str, float]:
    """Raw measurements under recordable names (he/4 -> he/layer4)."""
    out = {}
    for key, value in measured.items():
        kind, _, layer = key.partition("/")
        out[f"{kind}/layer{layer}" if layer else kind] = value
    return out

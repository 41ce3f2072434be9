"""What every editing method is given and must provide, and the locate-then-edit family's shared part.

A method turns a batch of requests into weight deltas and hands each to a `WeightWriter`,
which runs the delta filters (the SPHERE projection among them) and writes. That is what
makes the projection method-agnostic: no method can write around it.

Cross-batch state follows a transaction rule: `edit` computes, `commit` changes state.
The editor calls `commit` only once every write of the batch has succeeded, so a failed
batch leaves the method exactly as it was, and `revert` undoes committed batches exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from ...data.records import EditRequest
from ..keys import GENERATION_PREFIXES, KeyReader, generate_context_templates
from ..lm import LoadedModel
from ..stats import KeyStatistics, second_moments
from ..value_memory import GB, MemoryBudget
from ...models import weights_fingerprint
from ..norm_anchor import NormAnchor, anchor, mlp_outputs, reference_norm
from ..precision import PrecisionChoice, choose_compute_dtype
from ...placement import execution_devices
from ..values import ValueOptimization, check_value_memory, optimize_values, prepare_value_search
from ...errors import SettingsError
from ...filters import DeltaFilter
from ..writer import WeightWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BatchEdit:
    """What `edit` returns: scalars worth logging and the state change to `commit`."""

    info: dict[str, float] = dataclasses.field(default_factory=dict)
    state: object = None


class EditMethod(nn.Module):
    """Base class of every editing method.

    A new method must implement:

    * ``edit(lm, requests, writer) -> BatchEdit``: compute the batch's deltas and pass each
      to ``writer.write(module_name, delta)`` (nn.Linear layout). Never write a weight any
      other way and never change the method's own state here: return the state change in
      ``BatchEdit.state``.
    * a registered name: decorate the class with ``@register_method("name")``.

    It may implement:

    * ``setup(lm)``: state computed once from the unedited model (statistics, projectors),
      before any edit or restore. Call ``super().setup(lm)``.
    * ``commit(state)`` / ``revert_state(state_dict, num_batches)``: fold a successful batch's
      state change in, and give the ``state_dict()`` of ``num_batches`` commits ago *exactly*
      (bit for bit). Stateless methods need neither.
    * ``delta_filters()``: the method's own post-processing of each delta; the writer runs
      these before the configured filters (e.g. SPHERE's projection).
    * ``check_requests(lm, requests)``: after set-up, refuse requests it cannot edit within its
      settings (the value search's memory budget), before any edit.
    * ``evaluation_weights(lm, writer)``: a context manager that puts other weights in place
      while the model is evaluated (PRUNE); the default evaluates the live weights.
    * ``settings()``: its hyper-parameters as a JSON-friendly dict, extending the base's.

    State that a resume needs lives in buffers or ``get_extra_state``: it is checkpointed
    with ``state_dict()``.
    """

    name: ClassVar[str] = ""
    #: the paper's SPHERE suppression strength α for this method (0.8; AlphaEdit 0.5), the run
    #: config's default filter (`SequentialEditor` with `filters: null`)
    sphere_strength: ClassVar[float] = 0.8

    def __init__(self, layers: list[int]):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise SettingsError("an editing method needs at least one layer to edit (layers is empty)")
        duplicates = sorted({layer for layer in layers if layers.count(layer) > 1})
        if duplicates:
            raise SettingsError(f"layers lists layer(s) {duplicates} more than once: {layers}")
        if any(not isinstance(layer, int) or layer < 0 for layer in layers):
            raise SettingsError(f"layers must be non-negative layer indices, got {layers}")
        self.layers = layers

    def edited_modules(self, templates) -> list[str]:
        return [templates.down_proj_at(layer) for layer in self.layers]

    def weight_labels(self) -> list[str]:
        """A short name for each edited module, in `edited_modules`' order (HE and the guard record under it)."""
        return [f"layer{layer}" for layer in self.layers]

    def setup(self, lm: LoadedModel) -> None:
        num_layers = len(lm.model.get_submodule(lm.templates.layers))
        too_high = [layer for layer in self.layers if layer >= num_layers]
        if too_high:
            raise SettingsError(f"layers {too_high} do not exist: the model has {num_layers} layers (0..{num_layers - 1})")

    def edit(self, lm: LoadedModel, requests: list[EditRequest], writer: WeightWriter) -> BatchEdit:
        raise NotImplementedError

    def check_requests(self, lm: LoadedModel, requests: list[EditRequest]) -> None:
        """After `setup`: raise for requests this method cannot edit within its settings (default: none)."""

    def commit(self, state) -> None:
        """Fold in the state change of a batch whose writes all succeeded."""

    @classmethod
    def revert_state(cls, state: dict, num_batches: int) -> dict:
        """The `state_dict()` as it was `num_batches` commits ago (exactly). Stateless: unchanged.

        A pure function of the saved state, so a checkpoint can be rolled back without
        loading the model (`sphere-pl rollback`).
        """
        return state

    def revert(self, num_batches: int) -> None:
        """Undo the last `num_batches` commits exactly."""
        self.load_state_dict(type(self).revert_state(self.state_dict(), num_batches))

    def delta_filters(self) -> list[DeltaFilter]:
        return []

    @contextmanager
    def evaluation_weights(self, lm: LoadedModel, writer: WeightWriter):
        """Weights to evaluate with, in place for the duration (default: the live ones).
        PRUNE evaluates a restrained version of its cumulative delta."""
        yield

    def settings(self) -> dict:
        """The method's name and hyper-parameters, JSON-friendly (recorded in patches and checkpoints)."""
        return {"name": self.name, "layers": list(self.layers)}


def single_layer(method: EditMethod, layer: int, layers: list[int] | None) -> int:
    """The one layer of a one-layer method (ROME, FT), refusing a list of several (a common
    mistake when a MEMIT-style config is reused)."""
    if layers is None:
        return layer
    layers = list(layers)
    if len(layers) != 1:
        raise SettingsError(
            f"{type(method).__name__} edits exactly one layer: give `layer: <index>`, got layers {layers} "
            "(MEMIT, AlphaEdit, RECT and PRUNE take several)"
        )
    return layers[0]


# ----------------------------------------------------------------------------- registry

METHODS: dict[str, type[EditMethod]] = {}


def register_method(name: str):
    """Class decorator: make a method available by `name` (in YAML: `method: name`)."""

    def decorate(cls: type[EditMethod]) -> type[EditMethod]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} is already taken by {METHODS[name].__qualname__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def create_method(method: str | EditMethod, **kwargs) -> EditMethod:
    """A method instance from a registered name (with `kwargs`) or an instance as it is."""
    if isinstance(method, EditMethod):
        if kwargs:
            raise ValueError("keyword arguments apply only when the method is given by name")
        return method
    key = str(method).strip().lower()
    if key not in METHODS:
        raise SettingsError(f"unknown editing method {method!r}; known methods: {sorted(METHODS)}")
    return METHODS[key](**kwargs)


# --------------------------------------------------------------- locate-then-edit family


class LocateThenEdit(EditMethod):
    """ROME/MEMIT-family base: keys, target values and residual spreading; subclasses solve.

    For a batch: target values z are optimised at the last edited layer; then, layer by
    layer from the lowest, the keys K (d_in x n) are read with the layers below already
    updated, the residual R = (z − h) / (layers left) is spread over the layers still to
    come, and ``solve(i, K, R)`` gives that layer's delta, written through the writer.

    A subclass must implement ``solve(index, keys, residuals) -> delta`` and may override
    ``batch_state(final_keys)`` (the state change to commit; the keys are read again after
    all layers were written), ``commit``/``revert_state`` and ``setup`` (calling super).

    ``writes_each_layer`` says when the deltas reach the weights. True (AlphaEdit): each
    layer's delta goes through the writer (filters included) before the next layer's keys
    are read. False (MEMIT's official code): each raw delta is added provisionally
    (`writer.provisionally`) so the next layers see it, then the weights are restored and
    every delta is written through the writer at the end of the batch.
    """

    writes_each_layer: ClassVar[bool] = True

    def __init__(
        self,
        layers: list[int],
        values: ValueOptimization,
        stats: KeyStatistics,
        context_templates: list[str] | None = None,
        context_prefixes: list[str] = list(GENERATION_PREFIXES),
        context_length: int = 10,
        context_seed: int = 0,
        norm_anchor: NormAnchor | None = None,
    ):
        super().__init__(layers)
        self.norm_anchor = norm_anchor
        self.anchor_norm: float | None = None  # ρ, measured (or read from its cache) at set-up
        self.values = values
        self.stats = stats
        self.context_prefixes = list(context_prefixes)
        self.context_length = context_length
        self.context_seed = context_seed
        if context_templates is not None:
            bad = [t for t in context_templates if t.count("{}") != 1]
            if bad:
                raise SettingsError(f"context_templates must each contain '{{}}' exactly once: {bad}")
        self.context_groups = [["{}"], list(context_templates)] if context_templates else None
        self.value_budget: MemoryBudget | None = None  # what `auto` value-search settings plan with (set-up)
        self.precision: PrecisionChoice | None = None  # what the value search multiplies in, measured at set-up
        self._last_plan = None

    @property
    def search_values(self) -> ValueOptimization:
        """The value-search settings as they run: `values` with the precision chosen at set-up."""
        if self.precision is None:
            return self.values
        return dataclasses.replace(self.values, compute_dtype="bfloat16" if self.precision.used == "bfloat16" else "float32")

    # Context templates are plain strings: they travel in the checkpoint as extra state, and so do the
    # value search's memory budget and precision, so that a resumed run searches as the first one did.
    def get_extra_state(self):
        budget = self.value_budget
        return {"context_groups": self.context_groups, "value_budget": None if budget is None else [budget.bytes, budget.source],
                "precision": None if self.precision is None else self.precision.as_dict()}

    def set_extra_state(self, state):
        self.context_groups = state["context_groups"]
        started = state.get("precision")
        if started is not None and self.precision is not None and started["used"] != self.precision.used:
            log.warning("value search: the run started in %s (%s); it goes on in %s, not in the %s measured here",
                        started["used"], started["reason"], started["used"], self.precision.used)
            self.precision = PrecisionChoice(**{**started, "reason": f"{started['reason']}; as when the run started"})
        saved, now = state.get("value_budget"), self.value_budget
        if saved is None or now is None:
            return
        if saved[0] <= 1.1 * now.bytes:  # free memory moves a little between runs: plan as the run started
            self.value_budget = MemoryBudget(int(saved[0]), f"{saved[1]}, as when the run started")
        else:
            log.warning(
                "value search: the run started with a %.2f GB memory budget, this device now gives only %.2f GB: passes are planned "
                "within the smaller one, so target values may differ from an uninterrupted run in their last bits",
                saved[0] / GB, now.bytes / GB,
            )

    def setup(self, lm: LoadedModel) -> None:
        super().setup(lm)
        if self.context_groups is None:
            self.context_groups = generate_context_templates(
                lm.model, lm.tokenizer, self.context_length, self.context_prefixes, self.context_seed
            )
        config = lm.model.config
        hidden = config.hidden_size
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        upper = list(lm.model.get_submodule(lm.templates.layers))[self.layers[-1]:]  # the blocks the value search runs
        self.precision = choose_compute_dtype(self.values.compute_dtype, self.values.force_compute_dtype,
                                              execution_devices(lm.model, upper), hidden, intermediate, next(lm.model.parameters()).dtype)
        if self.precision.used != self.values.compute_dtype and self.values.compute_dtype != "auto":
            log.warning("value search: %s", self.precision.describe())
        self.value_budget = prepare_value_search(lm.model, lm.templates, self.layers[-1], self.search_values, lm.device)
        if self.norm_anchor is not None:
            layer = self.layers[-1]

            def bare_pushes(requests):  # the official reference: bare prompts, the method's own value settings
                return optimize_values(lm.model, lm.tokenizer, lm.templates, requests, [["{}"]], layer, self.search_values,
                                       budget=self.value_budget)[1]["delta"]

            # what decides the pushes (not how passes are sized, which changes last bits only)
            values_key = {k: v for k, v in dataclasses.asdict(self.search_values).items()
                          if k not in ("requests_per_pass", "recompute_activations", "memory_budget_gb")}
            self.anchor_norm = reference_norm(lm, self.norm_anchor, layer, bare_pushes, values_key, self.stats.cache_dir, weights_fingerprint(lm.model))

    def check_requests(self, lm: LoadedModel, requests: list[EditRequest]) -> None:
        """A request whose value search would not fit the memory budget even alone stops the run here."""
        if self.value_budget is not None and requests:
            check_value_memory(lm.model, lm.tokenizer, lm.templates, requests, self.context_groups, self.layers[-1], self.search_values,
                               self.value_budget)

    def value_search(self, lm: LoadedModel, requests: list[EditRequest], layer: int, reference: torch.Tensor | None = None):
        """`optimize_values` with this method's settings and memory budget; logs the plan when it changes."""
        with lm.timer("value_optimisation"):
            z, info = optimize_values(lm.model, lm.tokenizer, lm.templates, requests, self.context_groups, layer, self.search_values,
                                      reference=reference, budget=self.value_budget)
        plan = info["plan"]
        chosen = (plan.requests_per_pass, plan.recompute)
        if self.values.is_auto and chosen != self._last_plan:  # the first batch's plan, then each change
            log.info("value search: %s", plan.describe())
        self._last_plan = chosen
        return z, info

    @staticmethod
    def plan_info(info: dict) -> dict[str, float]:
        """The batch's pass plan as loggable numbers (`edit/requests_per_pass`, `edit/recompute_activations`)."""
        plan = info["plan"]
        return {"requests_per_pass": float(plan.requests_per_pass), "recompute_activations": float(plan.recompute)}

    def settings(self) -> dict:
        return {
            **super().settings(),
            "values": dataclasses.asdict(self.values),
            "stats": dataclasses.asdict(self.stats),
            "context_groups": self.context_groups,
            "context_prefixes": self.context_prefixes,
            "context_length": self.context_length,
            "context_seed": self.context_seed,
            "norm_anchor": None if self.norm_anchor is None else {**dataclasses.asdict(self.norm_anchor), "reference_norm": self.anchor_norm},
        }

    def key_second_moments(self, lm: LoadedModel) -> dict[int, torch.Tensor]:
        """C0 per edited layer, shared through the on-disk cache by every method."""
        with lm.timer("statistics"):
            return second_moments(lm.model, lm.tokenizer, lm.templates, self.layers, self.stats, lm.model_id)

    def edit(self, lm: LoadedModel, requests: list[EditRequest], writer: WeightWriter) -> BatchEdit:
        model, tok, templates = lm.model, lm.tokenizer, lm.templates
        z_layer = self.layers[-1]
        targets, info = self.value_search(lm, requests, z_layer)
        self._check_values_moved(requests, info)
        anchored = {}
        if self.norm_anchor is not None:
            pushes, anchored = self.anchored_pushes(lm, requests, z_layer, info["delta"])
            targets = (info["init"] + pushes.to(info["init"].device)).to(targets.dtype)  # h − v0 + v*

        with lm.timer("keys"):
            reader = KeyReader(model, tok, templates, requests, self.context_groups, from_layer=min(self.layers))
        provisional: dict[str, torch.Tensor] = {}  # name -> delta, seen by the next layers, written at the end
        with writer.provisionally() as add_for_now:
            for i, layer in enumerate(self.layers):
                with lm.timer("keys"):
                    keys, current = reader.read([layer], output_layer=z_layer)
                with lm.timer("solve"):
                    delta = self.solve(i, keys[layer].T, (targets - current).T / (len(self.layers) - i))
                name = templates.down_proj_at(layer)
                if self.writes_each_layer:
                    writer.write(name, delta)
                else:
                    provisional[name] = delta
                    add_for_now(name, delta)
        for name, delta in provisional.items():
            writer.write(name, delta)

        with lm.timer("keys"):
            final_keys, _ = reader.read(self.layers)
        return BatchEdit(
            info={"value_loss": float(info["loss"].mean()), "value_steps": float(info["steps"].float().mean()), **self.plan_info(info), **anchored},
            state=self.batch_state(final_keys),
        )

    def anchored_pushes(self, lm: LoadedModel, requests: list[EditRequest], layer: int, pushes: torch.Tensor,
                        v0: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The value search's pushes δ after norm anchoring (NAS), and what it did: the share of requests whose
        push was dropped (‖v0 + δ‖ over threshold x ρ) and rescaled, and the mean ‖v0 + δ‖ / ρ."""
        with lm.timer("norm_anchor"):
            v0 = mlp_outputs(lm, requests, layer) if v0 is None else v0.float()
            pushes = pushes.float().to(v0.device)
            anchored, dropped = anchor(v0, pushes, self.anchor_norm, self.norm_anchor.threshold)
            share = float(dropped.float().mean())
            ratio = float(((v0 + pushes).norm(dim=-1) / self.anchor_norm).mean())
        return anchored, {"norm_anchor_dropped": share, "norm_anchor_rescaled": 1.0 - share, "norm_anchor_ratio": ratio}

    def _check_values_moved(self, requests: list[EditRequest], info: dict) -> None:
        """Target values equal to the current ones make a no-op edit: name the settings to blame."""
        if bool((info["delta_norm"] > 0).any()):
            return
        already = info["initial_loss"] < self.values.early_stop_loss
        if bool(already.all()):
            return  # the model already says every new target: nothing to change
        case_ids = [r.case_id for r in requests]
        raise ValueError(
            f"target values did not move for any request of the batch (case_ids {case_ids}): after "
            f"{self.values.num_grad_steps} steps the optimised vector is zero. Check values.lr "
            f"({self.values.lr}; a huge rate overflows and the clamp then zeroes the step) and "
            f"values.clamp_norm_factor ({self.values.clamp_norm_factor})"
        )

    def solve(self, index: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """ΔW (d_out x d_in) for `self.layers[index]` from keys (d_in x n) and residuals (d_out x n)."""
        raise NotImplementedError

    def batch_state(self, final_keys: dict[int, torch.Tensor]):
        """State change to commit, from the keys (n x d_in per layer) read after all writes."""
        return None

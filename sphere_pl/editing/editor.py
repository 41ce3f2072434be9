"""`Editor`: sequential editing of a loaded causal LM, without Lightning.

    model, tokenizer = load_model_and_tokenizer("path/or/hub-name")
    editor = Editor(model, tokenizer, method="alphaedit", filters=[SphereProjection(0.5, 0.5)])
    patch = editor.apply(requests)        # one edit batch; returns its Patch
    editor.evaluate(requests)             # CounterFact / ZsRE scores
    patch.save("batch-0.safetensors")
    editor.revert(patch)                  # exactly as before the batch

Everything a resume needs is in `state_dict()`. A batch is applied whole or not at all:
when anything fails, the edited weights are restored and the method's state is untouched
(methods change state only in `commit`, after every write succeeded).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.records import EditDataError, EditRequest
from ..errors import SettingsError, SpherePLError
from ..evaluation.facts import FactEvaluator
from ..models import has_module, linear_weight, prepare_tokenizer, resolve_templates, tensors_digest
from ..placement import check_edited_weights
from .lm import LoadedModel
from .methods.base import EditMethod, create_method
from .patch import ModuleChange, Patch, PatchError, base_fingerprint, edited_digest
from ..filters import DeltaFilter
from .writer import WeightWriter


class CheckpointMismatchError(SpherePLError, ValueError):
    """A checkpoint written by another run (other model, base weights, edited modules or data)."""

    hint = "resume with the config of the run that wrote this checkpoint (same model, data and seed), or start without --ckpt_path"


class EditFailedError(SpherePLError, RuntimeError):
    """An edit batch could not be applied; the model and the method are as before it."""

    hint = "edits already applied and checkpoints already written are intact: resume with --ckpt_path <dir>/last.ckpt"


APPLIED, QUARANTINED, REVERTED = "applied", "quarantined", "reverted"


@dataclass
class BatchOutcome:
    """What became of the latest batch of the stream: `applied` whole, applied without the requests a
    collapse guard withheld (`quarantined`), or `reverted`. `applied`: the case_ids whose edits are
    in the weights; `withheld`: those of the batch whose edits are not. Monitors read this instead
    of inferring it."""

    index: int
    status: str
    applied: list = field(default_factory=list)
    withheld: list = field(default_factory=list)


class Editor:
    """Args:
    model: an already-loaded Hugging Face causal LM (edited in place).
    tokenizer: its tokenizer (set to right padding, given a pad token if it has none).
    method: an `EditMethod` or a registered name ("alphaedit").
    filters: delta filters run on every delta after the method's own post-processing, in
        order (e.g. `[SphereProjection(0.5, method.sphere_strength)]`, the paper's setting);
        none by default: the run's config, not the core, chooses SPHERE.
    model_id: how the model is named in patches and checkpoints (default: its name_or_path).
    module_templates: module-name overrides for families sphere_pl does not know.
    history_size: how many of the latest batch patches are kept for `rollback` and checkpoints.
    scoring_batch_size: prompts per scoring forward pass in `evaluate`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        method: EditMethod | str = "alphaedit",
        filters: Sequence[DeltaFilter] | None = (),
        model_id: str | None = None,
        module_templates: dict[str, str] | None = None,
        history_size: int = 2,
        scoring_batch_size: int = 32,
    ):
        model.requires_grad_(False)
        model_id = model_id or getattr(model.config, "name_or_path", None) or type(model).__name__
        self.lm = LoadedModel(model, prepare_tokenizer(tokenizer), resolve_templates(model, module_templates), model_id)
        self.method = create_method(method)
        self.filters = list(filters or ())
        self.writer = WeightWriter(self.lm, [*self.method.delta_filters(), *self.filters])
        self.edited_modules = self.method.edited_modules(self.lm.templates)
        self.weight_labels = self.method.weight_labels()
        missing = [name for name in self.edited_modules if not has_module(model, name)]
        if missing:
            layers = self.lm.templates.layers
            count = len(model.get_submodule(layers)) if has_module(model, layers) else "an unknown number of"
            raise SettingsError(
                f"{self.method.name} edits {missing}, which the model does not have: it has {count} layers "
                f"(indices 0..{count - 1 if isinstance(count, int) else '?'}); set the method's layers (or layer) to existing indices"
            )
        check_edited_weights(model, self.edited_modules)  # a dispatched model's edited weights must be on a device
        self.base_fingerprint = base_fingerprint(model, self.edited_modules)
        self.base_digest = edited_digest(model, self.edited_modules)
        self.history_size = history_size
        self.scoring_batch_size = scoring_batch_size
        self.batches_done = 0
        self.edits_applied = 0
        self.case_ids: list[list] = []  # per applied batch
        self.withheld: list[list] = []  # per applied batch: case_ids of its stream batch left out (quarantined)
        self.recent_patches: deque[Patch] = deque(maxlen=history_size)
        self.last_info: dict[str, float] = {}
        self.outcome: BatchOutcome | None = None  # of the latest batch given to `apply` (or reverted)
        self._prepared = False
        self._pending_method_state = None

    # ------------------------------------------------------------ read-only view
    @property
    def model(self) -> nn.Module:
        return self.lm.model

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def timer(self):
        return self.lm.timer

    @property
    def edited_layers(self) -> list[int]:
        return list(self.method.layers)

    def edited_weights(self) -> dict[str, torch.Tensor]:
        """{label: current weight of an edited module (nn.Linear layout, a view)}: `layer4` where a method edits
        one module per layer, `layer18.up_proj` where it edits several (the names HE is recorded under)."""
        return {label: linear_weight(self.model.get_submodule(name)) for label, name in zip(self.weight_labels, self.edited_modules)}

    def settings(self) -> dict:
        """Method and filter settings, as recorded in patches and checkpoints."""
        return {
            "method": self.method.settings(),
            "filters": [f.settings() for f in self.filters],
        }

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Statistics, projectors and filter bases from the unedited model; once, before the first edit."""
        if self._prepared:
            return
        if self.batches_done and self._pending_method_state is None:
            raise RuntimeError("prepare() must run on the unedited model, before any batch is applied")
        with self.timer("setup"):
            # the method and the filters read the *pretrained* weights, even when resuming
            restored = None
            if self._pending_method_state is not None:
                restored = self._copy_edited_weights()
                self._set_weights(self._pending_method_state["base_weights"])
            self.method.setup(self.lm)
            for f in self.filters:
                f.prepare(self.model, self.edited_modules)
            if restored is not None:
                self._set_weights(restored)
                self.method.load_state_dict(self._pending_method_state["method"])
                self._pending_method_state = None
        self._prepared = True

    # ----------------------------------------------------------------- editing
    def check_requests(self, requests: Sequence[EditRequest]) -> None:
        """Refuse requests the model cannot take: a prompt and target longer than its context."""
        max_length = self.lm.max_length
        if not max_length:
            return
        tok = self.tokenizer
        contexts = [c for g in getattr(self.method, "context_groups", None) or [["{}"]] for c in g]
        overhead = max(len(tok(c.replace("{}", ""), add_special_tokens=False)["input_ids"]) for c in contexts)
        for r in requests:
            target = max(len(tok(" " + t, add_special_tokens=False)["input_ids"]) for t in (r.target_new, r.target_true))
            fields = [("prompt", r.rewrite_prompt, overhead)]
            fields += [(f"paraphrase_prompts[{i}]", p, 0) for i, p in enumerate(r.paraphrase_prompts)]
            fields += [(f"neighborhood_prompts[{i}]", p, 0) for i, p in enumerate(r.neighborhood_prompts)]
            for name, text, extra in fields:
                n = len(tok(text)["input_ids"]) + target + extra
                if n > max_length:
                    raise EditDataError(
                        r.case_id, name, f"needs {n} tokens with its target{' and context template' if extra else ''}, "
                        f"but the model takes at most {max_length}"
                    )

    def check_fits(self, requests: Sequence[EditRequest]) -> None:
        """After set-up, before any edit: refuse requests the method cannot edit within its settings
        (e.g. a value search that would not fit its memory budget even one request at a time)."""
        self.prepare()
        self.method.check_requests(self.lm, list(requests))

    def apply(self, requests: Sequence[EditRequest], withheld: Sequence = ()) -> Patch:
        """Edit one batch; returns the Patch of what was written. All or nothing. `withheld`: case_ids of
        the stream's batch left out of it (a collapse guard's quarantine), kept with the batch."""
        requests = list(requests)
        if not requests:
            raise ValueError("apply() needs at least one edit request")
        self.check_requests(requests)
        self.prepare()
        before = self._copy_edited_weights()
        case_ids = [r.case_id for r in requests]
        self.writer.begin_batch()
        try:
            result = self.method.edit(self.lm, requests, self.writer)
            unchanged = all(torch.equal(before[n], linear_weight(self.model.get_submodule(n))) for n in self.edited_modules)
            if unchanged:
                raise ValueError(
                    "every delta written for this batch is zero (or vanished when cast to the weights' dtype): "
                    f"nothing was edited. Method settings: {self.method.settings()}"
                )
        except Exception as e:
            self._set_weights(before)
            raise EditFailedError(
                f"edit batch {self.batches_done} (case_ids {case_ids}) failed: {e}. The edited weights and the method "
                f"state are as before this batch ({self.edits_applied} edits applied)."
            ) from e
        self.method.commit(result.state)
        patch = Patch.between(
            before,
            self.model,
            **self._metadata(first_batch=self.batches_done, last_batch=self.batches_done, case_ids=case_ids),
            info=result.info,
        )
        self.outcome = BatchOutcome(self.batches_done, QUARANTINED if withheld else APPLIED, list(case_ids), list(withheld))
        self.batches_done += 1
        self.edits_applied += len(requests)
        self.case_ids.append(case_ids)
        self.withheld.append(list(withheld))
        self.last_info = dict(result.info)
        if self.history_size:
            self.recent_patches.append(patch.to("cpu"))
        return patch

    def revert(self, patch: Patch) -> None:
        """Undo `patch`, which must hold the latest applied batches: weights and method state, exactly."""
        first, last = int(patch.metadata["first_batch"]), int(patch.metadata["last_batch"])
        if last != self.batches_done - 1 or first < 0:
            raise PatchError(
                f"this patch holds batches {first}..{last}, but the latest applied batch is {self.batches_done - 1}: "
                "revert patches in reverse order of application"
            )
        patch.check_fits(self.model, "revert")  # the model's fingerprint and the current weights' digest
        self.writer.put(patch.reverted_weights(self.model))
        self.method.revert(last - first + 1)
        self.outcome = BatchOutcome(first, REVERTED, [], [c for ids in self.case_ids[first:] for c in ids])
        del self.case_ids[first:]
        del self.withheld[first:]
        self.edits_applied = sum(len(c) for c in self.case_ids)
        self.batches_done = first
        while self.recent_patches and int(self.recent_patches[-1].metadata["last_batch"]) >= first:
            self.recent_patches.pop()

    @contextmanager
    def trial(self, requests: Sequence[EditRequest]):
        """Apply `requests` as a batch for the duration, then revert it exactly: weights, method state and
        the kept patches (a collapse guard tries parts of a batch this way)."""
        kept, outcome = list(self.recent_patches), self.outcome
        patch = self.apply(requests)
        try:
            yield patch
        finally:
            self.revert(patch)
            self.recent_patches = deque(kept, maxlen=self.history_size)
            self.outcome = outcome

    def rollback(self, num_batches: int) -> None:
        """Undo the last `num_batches` batches with the patches kept in `recent_patches`."""
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        if num_batches > self.batches_done:
            raise ValueError(f"cannot roll back {num_batches} batches: only {self.batches_done} were applied")
        if num_batches > len(self.recent_patches):
            raise ValueError(
                f"cannot roll back {num_batches} batches: only the last {len(self.recent_patches)} batch patch(es) are kept "
                f"(history_size = {self.history_size}); raise history_size to roll back further"
            )
        for _ in range(num_batches):
            self.revert(self.recent_patches[-1])

    def _metadata(self, **fields) -> dict:
        return {
            "model_id": self.lm.model_id,
            "base_fingerprint": self.base_fingerprint,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            **self.settings(),
            **fields,
            "num_edits": len(fields.get("case_ids", [])),
        }

    def _copy_edited_weights(self) -> dict[str, torch.Tensor]:
        return {name: linear_weight(self.model.get_submodule(name)).detach().clone() for name in self.edited_modules}

    def _set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.writer.put(weights)

    # -------------------------------------------------------------- evaluation
    def evaluation_weights(self):
        """Context manager: the weights the method wants evaluated (the live ones, except PRUNE's restrained ones)."""
        return self.method.evaluation_weights(self.lm, self.writer)

    def evaluate(self, requests: Sequence[EditRequest], prefix: str = "") -> dict[str, float]:
        """Efficacy / generalization / specificity of `requests`, by each request's benchmark
        (CounterFact: scores and magnitudes; ZsRE: token accuracies)."""
        return self.evaluate_cases(requests, prefix)[0]

    def evaluate_cases(self, requests: Sequence[EditRequest], prefix: str = "") -> tuple[dict[str, float], list[dict]]:
        """`evaluate`, plus one row per scored prompt (NLLs, probabilities, decision)."""
        evaluator = FactEvaluator(prefix, self.scoring_batch_size)
        with self.evaluation_weights():
            values, rows = evaluator.evaluate_cases(self.model, self.tokenizer, list(requests))
        return {k: float(v) for k, v in values.items() if not torch.isnan(v)}, rows

    # ---------------------------------------------------------------- resuming
    def state_dict(self) -> dict:
        """Everything a resume needs (plain tensors and containers: loadable with weights_only=True)."""
        return {
            "model_id": self.lm.model_id,
            "base_fingerprint": self.base_fingerprint,
            "base_digest": self.base_digest,
            "edited_modules": list(self.edited_modules),
            "settings": self.settings(),
            "batches_done": self.batches_done,
            "edits_applied": self.edits_applied,
            "case_ids": [list(c) for c in self.case_ids],
            "withheld": [list(c) for c in self.withheld],
            "weights": {n: linear_weight(self.model.get_submodule(n)).detach().cpu().clone() for n in self.edited_modules},
            "method": self.method.state_dict(),
            "recent_patches": [_patch_to_state(p) for p in self.recent_patches],
            "seconds": dict(self.timer.seconds),  # per phase, so that a resumed run's timings cover the whole run
        }

    def check_state(self, state: dict) -> None:
        """Refuse the state of another model, other base weights or other edited modules, saying what differs."""
        identity = {
            "model_id": ("model", self.lm.model_id),
            "base_fingerprint": ("base-weight fingerprint", self.base_fingerprint),
            "base_digest": ("digest of the pretrained edited weights", self.base_digest),
            "edited_modules": ("edited modules", list(self.edited_modules)),
        }
        for key, (what, mine) in identity.items():
            if state.get(key) != mine:
                raise CheckpointMismatchError(f"the saved state was made for {what} {state.get(key)!r}, but this editor has {mine!r}")

    def check_stream(self, batches: list[list]) -> None:
        """Refuse a resumed run given other edits than its state says were applied: `batches` are the
        case_ids of the stream's first `batches_done` batches (a withheld case_id is left out of both)."""
        for index, (given, saved, withheld) in enumerate(zip(batches, self.case_ids, self.withheld)):
            left_out = set(withheld)
            ids = [c for c in given if c not in left_out]
            if ids != saved:
                raise CheckpointMismatchError(
                    f"the checkpoint is from another run: its edit batch {index} held case_ids {saved}, "
                    f"this run's data puts {ids} there (different data, order, seed or num_edits)"
                )

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`, checked against this model first.

        The method's state is loaded once the method is set up (`prepare` sets it up on the
        pretrained weights first). Filters keep no state of their own that could not be
        recomputed from the pretrained weights, so none is saved.
        """
        self.check_state(state)
        if self.batches_done:
            raise RuntimeError("load_state_dict() needs a fresh editor (no batch applied)")
        base = self._copy_edited_weights()
        self._set_weights(state["weights"])
        self.batches_done = int(state["batches_done"])
        self.edits_applied = int(state["edits_applied"])
        self.case_ids = [list(c) for c in state["case_ids"]]
        self.withheld = [list(c) for c in state.get("withheld", [[] for _ in self.case_ids])]
        self.recent_patches = deque((_patch_from_state(p) for p in state["recent_patches"]), maxlen=self.history_size)
        for phase, seconds in state.get("seconds", {}).items():
            self.timer.seconds[phase] += float(seconds)
        if self._prepared:
            self.method.load_state_dict(state["method"])
        else:
            self._pending_method_state = {"method": state["method"], "base_weights": base}
def _patch_to_state(patch: Patch) -> dict:
    return {"changes": {n: dict(vars(c)) for n, c in patch.changes.items()}, "metadata": dict(patch.metadata)}


def _patch_from_state(state: dict) -> Patch:
    return Patch({n: ModuleChange(**c) for n, c in state["changes"].items()}, dict(state["metadata"]))


def rollback_state(state: dict, num_batches: int, method_cls: type[EditMethod]) -> dict:
    """An editor `state_dict()` as it was `num_batches` batches earlier, exactly, without a model.

    Uses the batch patches the state keeps (`history_size`) for the weights and the
    method's `revert_state` for its state.
    """
    done = int(state["batches_done"])
    kept = list(state["recent_patches"])
    if num_batches < 1:
        raise ValueError(f"--batches must be >= 1, got {num_batches}")
    if num_batches > done:
        raise ValueError(f"cannot roll back {num_batches} batches: only {done} were applied")
    if num_batches > len(kept):
        raise ValueError(
            f"cannot roll back {num_batches} batches: only the last {len(kept)} batch patch(es) are kept "
            "(model.history_size); raise it before the run to roll back further"
        )
    weights = {n: w.clone() for n, w in state["weights"].items()}
    for _ in range(num_batches):
        patch = _patch_from_state(kept.pop())
        actual = tensors_digest(weights[n] for n in patch.modules)
        if actual != patch.metadata["after_digest"]:
            raise PatchError(
                f"the saved weights have digest {actual}, but the patch of batch {patch.metadata['first_batch']} "
                f"reverts weights with digest {patch.metadata['after_digest']}: the checkpoint is inconsistent"
            )
        for name, change in patch.changes.items():
            weights[name] = change.backward(weights[name])
    case_ids = [list(c) for c in state["case_ids"][: done - num_batches]]
    return {
        **state,
        "weights": weights,
        "batches_done": done - num_batches,
        "edits_applied": sum(len(c) for c in case_ids),
        "case_ids": case_ids,
        "withheld": [list(c) for c in state.get("withheld", [[] for _ in state["case_ids"]])[: done - num_batches]],
        "method": method_cls.revert_state(state["method"], num_batches),
        "recent_patches": kept,
    }

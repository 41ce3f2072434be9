"""Edit patches: the weight changes of one or more edit batches, saved alone as safetensors.

A `Patch` holds, per edited module, `delta = after − before` in the weight's dtype and
metadata saying what it was made from. Applying it computes `before + delta` and reverting
it `after − delta`, element by element in the weight's dtype; wherever either round trip
would not give back the exact value (a weight near zero whose delta is larger than itself,
for instance), the patch also stores that entry's exact `before` and `after` values. So
applying a patch to the weights it was made from gives the edited weights bit for bit,
and reverting it gives the original weights bit for bit, by construction.

Both directions check first that the target weights are the right ones: the base model's
fingerprint (every parameter the patch does not touch) and an exact digest of the edited
modules' current weights. A patch for another model, or for weights that have moved on
since, is refused with both fingerprints in the message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import SpherePLError
from ..files import atomic_write
from ..models import has_module, linear_weight, set_linear_weight, tensors_digest, weights_fingerprint

FORMAT = "sphere_pl.patch/1"


class PatchError(SpherePLError, ValueError):
    """A patch that cannot be read or does not fit the weights it is applied to."""

    hint = "use a patch exported (sphere-pl export) from a run on this model and these base weights"


def base_fingerprint(model: nn.Module, edited_modules: list[str]) -> str:
    """Fingerprint of every parameter of `model` outside the edited modules: it identifies the base model."""
    prefixes = tuple(name + "." for name in edited_modules)
    return weights_fingerprint(model, keep=lambda name: not name.startswith(prefixes))


def edited_digest(model: nn.Module, edited_modules: list[str]) -> str:
    """Exact digest of the edited modules' weights (nn.Linear layout)."""
    return tensors_digest(linear_weight(model.get_submodule(name)) for name in edited_modules)


@dataclass
class ModuleChange:
    """One module's change: dense delta plus the entries whose round trip is not exact."""

    delta: torch.Tensor  # (d_out, d_in), weight dtype
    fix_index: torch.Tensor  # (k,) int64 flat indices
    fix_before: torch.Tensor  # (k,) weight dtype
    fix_after: torch.Tensor  # (k,) weight dtype

    @classmethod
    def between(cls, before: torch.Tensor, after: torch.Tensor) -> ModuleChange:
        delta = after - before
        wrong = ((before + delta) != after) | ((after - delta) != before)
        index = wrong.flatten().nonzero().flatten()
        return cls(delta, index, before.flatten()[index], after.flatten()[index])

    def forward(self, before: torch.Tensor) -> torch.Tensor:
        after = (before + self.delta.to(before.device)).contiguous()
        after.view(-1)[self.fix_index.to(before.device)] = self.fix_after.to(before.device)
        return after

    def backward(self, after: torch.Tensor) -> torch.Tensor:
        before = (after - self.delta.to(after.device)).contiguous()
        before.view(-1)[self.fix_index.to(after.device)] = self.fix_before.to(after.device)
        return before

    def to(self, device) -> ModuleChange:
        return ModuleChange(*(t.to(device) for t in (self.delta, self.fix_index, self.fix_before, self.fix_after)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.delta, self.fix_index, self.fix_before, self.fix_after))


@dataclass
class Patch:
    """The weight changes of edit batches `first_batch..last_batch`, and what they were made from.

    `metadata` holds: base model id and fingerprint, the digests of the edited weights
    before and after, the method and its settings, the filters' settings, the case_ids
    and the number of edits, and `info` (the method's scalars, e.g. the value loss).
    """

    changes: dict[str, ModuleChange]
    metadata: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def between(cls, before: dict[str, torch.Tensor], model: nn.Module, **metadata) -> Patch:
        """The change from `before` (module -> weight, nn.Linear layout) to `model`'s current weights."""
        names = list(before)
        changes = {name: ModuleChange.between(before[name], linear_weight(model.get_submodule(name)).detach()) for name in names}
        meta = dict(metadata)
        meta["modules"] = names
        meta["before_digest"] = tensors_digest(before[name] for name in names)
        meta["after_digest"] = edited_digest(model, names)
        return cls(changes, meta)

    @property
    def modules(self) -> list[str]:
        return list(self.changes)

    @property
    def case_ids(self) -> list:
        return list(self.metadata.get("case_ids", []))

    @property
    def num_edits(self) -> int:
        return int(self.metadata.get("num_edits", 0))

    @property
    def num_batches(self) -> int:
        return int(self.metadata["last_batch"]) - int(self.metadata["first_batch"]) + 1

    def delta(self, module_name: str) -> torch.Tensor:
        """The delta written to `module_name` (nn.Linear layout, weight dtype)."""
        return self.changes[module_name].delta

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.changes.values())

    def to(self, device) -> Patch:
        return Patch({name: c.to(device) for name, c in self.changes.items()}, dict(self.metadata))

    # ------------------------------------------------------------ applying
    def check_fits(self, model: nn.Module, direction: str = "apply") -> None:
        """Refuse (PatchError) unless `model` is the base this patch was made for, in the right state."""
        missing = [name for name in self.modules if not has_module(model, name)]
        if missing:
            raise PatchError(f"the model has no module(s) {missing} that this patch edits")
        for name, change in self.changes.items():
            shape = tuple(linear_weight(model.get_submodule(name)).shape)
            if tuple(change.delta.shape) != shape:
                raise PatchError(f"patch delta for {name} has shape {tuple(change.delta.shape)}, the model's weight {shape}")
        expected = self.metadata.get("base_fingerprint")
        actual = base_fingerprint(model, self.modules)
        if expected != actual:
            raise PatchError(
                f"this patch was made for model {self.metadata.get('model_id')!r} with base fingerprint {expected}; "
                f"the weights it is applied to have base fingerprint {actual}: another model, or other weights"
            )
        key = "before_digest" if direction == "apply" else "after_digest"
        expected, actual = self.metadata[key], edited_digest(model, self.modules)
        if expected != actual:
            state = "before" if direction == "apply" else "after"
            raise PatchError(
                f"the edited modules' weights have digest {actual}, but this patch {direction == 'apply' and 'applies to' or 'reverts'} "
                f"weights with digest {expected} (the weights {state} batches {self.metadata.get('first_batch')}.."
                f"{self.metadata.get('last_batch')}): other edits were applied or reverted in between"
            )

    @torch.no_grad()
    def applied_weights(self, model: nn.Module):
        """(module, weight with this patch applied) for each module, one at a time (nn.Linear layout)."""
        for name, change in self.changes.items():
            yield name, change.forward(linear_weight(model.get_submodule(name)).detach())

    @torch.no_grad()
    def reverted_weights(self, model: nn.Module):
        """(module, weight from before this patch) for each module, one at a time (nn.Linear layout)."""
        for name, change in self.changes.items():
            yield name, change.backward(linear_weight(model.get_submodule(name)).detach())

    def apply_to(self, model: nn.Module, check: bool = True) -> None:
        """Write the patched weights into `model` (checked first; bit-exact)."""
        if check:
            self.check_fits(model, "apply")
        for name, weight in self.applied_weights(model):
            set_linear_weight(model.get_submodule(name), weight)

    def revert_from(self, model: nn.Module, check: bool = True) -> None:
        """Give `model` back the weights from before this patch (checked first; bit-exact)."""
        if check:
            self.check_fits(model, "revert")
        for name, weight in self.reverted_weights(model):
            set_linear_weight(model.get_submodule(name), weight)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """safetensors file: tensors `<module>.delta|fix_index|fix_before|fix_after`, metadata as JSON."""
        tensors = {}
        for name, c in self.changes.items():
            for part in ("delta", "fix_index", "fix_before", "fix_after"):
                tensors[f"{name}.{part}"] = getattr(c, part).detach().cpu().contiguous()
        metadata = {"format": FORMAT, "sphere_pl": json.dumps(self.metadata, default=str)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        """Read a patch file (safetensors only: no code runs); PatchError names what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise PatchError(f"patch file not found: {path}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise PatchError(f"{path} is not a readable safetensors patch file ({e})") from None
        if header.get("format") != FORMAT or "sphere_pl" not in header:
            raise PatchError(f"{path} is a safetensors file but not a sphere_pl patch (no {FORMAT!r} metadata)")
        metadata = json.loads(header["sphere_pl"])
        changes = {}
        for name in metadata.get("modules", []):
            parts = {}
            for part in ("delta", "fix_index", "fix_before", "fix_after"):
                key = f"{name}.{part}"
                if key not in tensors:
                    raise PatchError(f"{path} lacks tensor {key!r} (module {name} is listed in its metadata)")
                parts[part] = tensors[key]
            changes[name] = ModuleChange(**parts)
        return cls(changes, metadata)

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"Patch(batches {m.get('first_batch')}..{m.get('last_batch')}, {self.num_edits} edits, "
            f"method {m.get('method', {}).get('name')!r}, modules {self.modules}, {self.nbytes / 2**20:.1f} MiB)"
        )

"""`sphere-pl export | apply | rollback`: edit patches out of checkpoints, into models, and undone.

    export   --ckpt_path C --out P.safetensors   the cumulative patch of a run (base model -> edited)
    apply    --patch P --model M --out DIR        a standard Hugging Face checkpoint with the edits in it
    rollback --ckpt_path C --batches k [--out C2] the checkpoint as it was k batches earlier, exactly

Checkpoints and patches are safetensors (earlier torch.save checkpoints are read with
`weights_only=True`). Every refusal
names what differs and leaves files and models as they were.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


from ..editing.editor import rollback_state
from ..editing.methods.base import METHODS
from ..editing.patch import Patch, PatchError, base_fingerprint
from .checkpoint_io import CheckpointFormatError, load_checkpoint_file, save_checkpoint_file
from ..models import EMBEDDED_MODEL, PretrainedModel, linear_weight, set_linear_weight


class CommandError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def read_checkpoint(path: str) -> dict:
    """A sphere_pl checkpoint, loaded without running pickled code."""
    if not os.path.isfile(path):
        raise CommandError(f"checkpoint not found: {path}")
    try:
        checkpoint = load_checkpoint_file(path)
    except CheckpointFormatError as e:
        raise CommandError(str(e)) from None
    except Exception as e:
        raise CommandError(f"{path} is not a readable sphere_pl checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(checkpoint, dict) or "sphere_pl" not in checkpoint:
        raise CommandError(f"{path} is not a sphere_pl checkpoint: it has no 'sphere_pl' section")
    return checkpoint


def _load_settings(load: dict, model: str | None, dtype: str | None) -> dict:
    """How to load the base model: the checkpoint's or patch's settings, with --model / --dtype applied."""
    settings = dict(load)
    if model is not None:
        settings.update(model_name_or_path=None if model == EMBEDDED_MODEL else model, gguf_file=None)
    if dtype is not None:
        settings["dtype"] = dtype
    return settings


def _load_model(settings: dict):
    loaded = PretrainedModel.from_settings(settings)
    return loaded.model, loaded.tokenizer


def _is_gguf(settings: dict) -> bool:
    """The embedded model and any gguf_file are dequantised GGUF weights, which save_pretrained refuses."""
    return settings.get("model_name_or_path") in (None, "", EMBEDDED_MODEL) or bool(settings.get("gguf_file"))


def export(args) -> None:
    state = read_checkpoint(args.ckpt_path)["sphere_pl"]
    if not state["batches_done"]:
        raise CommandError(f"{args.ckpt_path} holds no applied batch: there is nothing to export")
    model, _ = _load_model(_load_settings(state.get("load", {}), args.model, args.dtype))
    names = list(state["edited_modules"])
    actual = base_fingerprint(model, names)
    if actual != state["base_fingerprint"]:
        raise CommandError(
            f"the checkpoint was made from base weights with fingerprint {state['base_fingerprint']}, "
            f"the loaded model has {actual}: pass the run's model with --model"
        )
    before = {n: linear_weight(model.get_submodule(n)).detach().clone() for n in names}
    for name in names:
        set_linear_weight(model.get_submodule(name), state["weights"][name])
    case_ids = [c for batch in state["case_ids"] for c in batch]
    patch = Patch.between(
        before,
        model,
        model_id=state["model_id"],
        base_fingerprint=state["base_fingerprint"],
        load=state.get("load", {}),
        **state["settings"],
        first_batch=0,
        last_batch=state["batches_done"] - 1,
        case_ids=case_ids,
        num_edits=len(case_ids),
    )
    patch.save(args.out)
    print(f"wrote {args.out}: {patch}")


def apply(args) -> None:
    try:
        patch = Patch.load(args.patch)
    except PatchError as e:
        raise CommandError(str(e)) from None
    settings = _load_settings(patch.metadata.get("load", {}), args.model, args.dtype)
    model, tokenizer = _load_model(settings)
    try:
        patch.apply_to(model)
    except PatchError as e:
        raise CommandError(f"{args.patch} does not fit {args.model or patch.metadata.get('model_id')}: {e}") from None
    out = Path(args.out)
    if _is_gguf(settings):
        model = _plain_copy(model)  # transformers refuses to save a GGUF-loaded model as it is
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: {patch.num_edits} edits in {patch.modules}")


def _plain_copy(model):
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh


def rollback(args) -> None:
    checkpoint = read_checkpoint(args.ckpt_path)
    state = checkpoint["sphere_pl"]
    name = state["settings"]["method"]["name"]
    if name not in METHODS:
        raise CommandError(f"{args.ckpt_path} was made with method {name!r}, which is not registered here ({sorted(METHODS)})")
    try:
        new_state = rollback_state(state, args.batches, METHODS[name])
    except (ValueError, PatchError) as e:
        raise CommandError(f"{args.ckpt_path}: {e}") from None
    checkpoint["sphere_pl"] = new_state
    new_state["progress_history"] = [row for row in state.get("progress_history", []) if row.get("step", -1) < new_state["batches_done"]]
    _rewind_loops(checkpoint, new_state["batches_done"])
    out = Path(args.out) if args.out else Path(args.ckpt_path).with_name(f"rolled-back-edits-{new_state['edits_applied']:06d}.ckpt")
    tmp = out.with_name(out.name + ".tmp")
    save_checkpoint_file(checkpoint, tmp)
    os.replace(tmp, out)
    print(f"wrote {out}: {state['batches_done']} -> {new_state['batches_done']} batches ({new_state['edits_applied']} edits)")


def _rewind_loops(checkpoint: dict, batches_done: int) -> None:
    """Point Lightning's progress counters and the edit loader at the first batch not applied."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epoch_loop = loop.get("epoch_loop.state_dict", {})
    progress = loop.get("epoch_loop.batch_progress", {})
    for group in ("total", "current"):
        for key in progress.get(group, {}):
            progress[group][key] = min(progress[group][key], batches_done)
    if "_batches_that_stepped" in epoch_loop:
        epoch_loop["_batches_that_stepped"] = batches_done
    combined = loop.get("state_dict", {}).get("combined_loader")
    if combined:
        for loader_state in combined:
            if isinstance(loader_state, dict) and "completed" in loader_state:
                loader_state["completed"] = batches_done


def run_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="sphere-pl", description="edit patches and checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write the cumulative patch of a run's checkpoint")
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--out", required=True, help="patch file to write (.safetensors)")
    p.add_argument("--model", help="base model (default: the one the run loaded)")
    p.add_argument("--dtype", help="dtype to load the base model in (default: the run's)")
    p.set_defaults(run=export)
    p = sub.add_parser("apply", help="apply a patch and save a Hugging Face checkpoint")
    p.add_argument("--patch", required=True)
    p.add_argument("--model", help=f"base model: hub name, local path or {EMBEDDED_MODEL} (default: the patch's)")
    p.add_argument("--dtype", help="dtype to load the model in (default: the run's)")
    p.add_argument("--out", required=True, help="directory for save_pretrained")
    p.set_defaults(run=apply)
    p = sub.add_parser("rollback", help="undo the last batches of a checkpoint, exactly")
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--out", help="checkpoint to write (default: rolled-back-edits-<n>.ckpt beside it)")
    p.set_defaults(run=rollback)
    args = parser.parse_args(argv)
    args.run(args)

"""`sphere-pl export | apply | rollback`: edit patches out of checkpoints, into models, and undone.

    export   --ckpt_path C --out P.safetensors   the cumulative patch of a run (base model -> edited)
    apply    --patch P --model M --out DIR        a standard Hugging Face checkpoint with the edits in it
    rollback --ckpt_path C --batches k [--out C2] the checkpoint as it was k batches earlier, exactly

Each is a jsonargparse parser (`--config FILE`, `--print_config`). Checkpoints are read through
their section's reader (verified, no pickle); every refusal names what differs and leaves files
and models as they were.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from ..editing.editor import rollback_state
from ..editing.methods.base import METHODS
from ..editing.patch import Patch, PatchError, base_fingerprint
from ..errors import SpherePLError
from ..files.checkpoint import save_checkpoint_file
from ..lightning import state
from ..models import EMBEDDED_MODEL, PretrainedModel, linear_weight, set_linear_weight


class CommandError(SpherePLError, ValueError):
    """A patch command that cannot do what was asked (the message says why); nothing was written."""

    hint = "nothing was written; see `python -m sphere_pl COMMAND --help`"


def _load_settings(load: dict, model: str | None, dtype: str | None) -> dict:
    """How to load the base model: the checkpoint's or patch's settings, with --model / --dtype applied."""
    settings = dict(load)
    if model is not None:
        settings.update(model_name_or_path=None if model == EMBEDDED_MODEL else model, gguf_file=None)
    if dtype is not None:
        settings["dtype"] = dtype
    return settings


def _is_gguf(settings: dict) -> bool:
    """The embedded model and any gguf_file are dequantised GGUF weights, which save_pretrained refuses."""
    return settings.get("model_name_or_path") in (None, "", EMBEDDED_MODEL) or bool(settings.get("gguf_file"))


def export(ckpt_path: str, out: str, model: str | None = None, dtype: str | None = None) -> None:
    """Write the cumulative patch of a run's checkpoint (base model -> edited weights).

    Args:
        ckpt_path: a checkpoint written by fit.
        out: the patch file to write (.safetensors).
        model: the base model (default: the one the run loaded).
        dtype: the dtype to load the base model in (default: the run's).
    """
    section = state.read(ckpt_path).section
    if not section["batches_done"]:
        raise CommandError(f"{ckpt_path} holds no applied batch: there is nothing to export")
    loaded = PretrainedModel.from_settings(_load_settings(section.get("load", {}), model, dtype)).model
    names = list(section["edited_modules"])
    actual = base_fingerprint(loaded, names)
    if actual != section["base_fingerprint"]:
        raise CommandError(f"the checkpoint was made from base weights with fingerprint {section['base_fingerprint']}, "
                           f"the loaded model has {actual}: pass the run's model with --model")
    before = {n: linear_weight(loaded.get_submodule(n)).detach().clone() for n in names}
    for name in names:
        set_linear_weight(loaded.get_submodule(name), section["weights"][name])
    case_ids = [c for batch in section["case_ids"] for c in batch]
    patch = Patch.between(before, loaded, model_id=section["model_id"], base_fingerprint=section["base_fingerprint"],
                          load=section.get("load", {}), **section["settings"], first_batch=0, last_batch=section["batches_done"] - 1,
                          case_ids=case_ids, num_edits=len(case_ids))
    patch.save(out)
    print(f"wrote {out}: {patch}")


def apply(patch: str, out: str, model: str | None = None, dtype: str | None = None) -> None:
    """Write a patch into a clean copy of the model, saved as a standard Hugging Face model.

    Args:
        patch: a patch file written by export.
        out: the folder for save_pretrained (never the base model's own folder).
        model: the base model: hub name, local path or embedded:smollm2-135m-instruct (default: the patch's).
        dtype: the dtype to load the model in (default: the run's).
    """
    loaded_patch = Patch.load(patch)
    settings = _load_settings(loaded_patch.metadata.get("load", {}), model, dtype)
    source = settings.get("model_name_or_path")
    if source and Path(source).exists() and Path(out).resolve() == Path(source).resolve():
        raise CommandError(f"--out {out} is the base model's own folder: the edited model would overwrite it; give another folder")
    pretrained = PretrainedModel.from_settings(settings)
    try:
        loaded_patch.apply_to(pretrained.model)
    except PatchError as e:
        raise PatchError(f"{patch} does not fit {model or loaded_patch.metadata.get('model_id')}: {e}") from None
    edited = _plain_copy(pretrained.model) if _is_gguf(settings) else pretrained.model  # transformers refuses to save a GGUF-loaded model
    edited.save_pretrained(out)
    pretrained.tokenizer.save_pretrained(out)
    print(f"wrote {out}: {loaded_patch.num_edits} edits in {loaded_patch.modules}")


def _plain_copy(model):
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh


def rollback(ckpt_path: str, batches: int, out: str | None = None) -> None:
    """Undo the last batches of a checkpoint, exactly (weights, method state, the run's rows, Lightning's loops).

    Args:
        ckpt_path: a checkpoint written by fit.
        batches: how many of its last batches to undo (at most model.history_size).
        out: the checkpoint to write (default: rolled-back-edits-<n>.ckpt beside it).
    """
    run = state.read(ckpt_path)
    section = run.section
    name = section["settings"]["method"]["name"]
    if name not in METHODS:
        raise CommandError(f"{ckpt_path} was made with method {name!r}, which is not registered here ({sorted(METHODS)})")
    try:
        new = rollback_state(section, batches, METHODS[name])
    except (ValueError, PatchError) as e:
        raise CommandError(f"{ckpt_path}: {e}") from None
    new["progress_history"] = [row for row in run.history if row.get("step", -1) < new["batches_done"]]
    run.checkpoint[state.SECTION] = new
    state.rewind_loops(run.checkpoint, new["batches_done"])
    state.reseal(run.checkpoint)
    target = Path(out) if out else Path(ckpt_path).with_name(f"rolled-back-edits-{new['edits_applied']:06d}.ckpt")
    save_checkpoint_file(run.checkpoint, target)
    print(f"wrote {target}: {section['batches_done']} -> {new['batches_done']} batches ({new['edits_applied']} edits)")


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m sphere_pl", description="edit patches and checkpoints", exit_on_error=False)
    commands = parser.add_subcommands(required=True, dest="command")
    for command, help_text in ((export, "write the cumulative patch of a run's checkpoint"),
                               (apply, "apply a patch and save a Hugging Face checkpoint"),
                               (rollback, "undo the last batches of a checkpoint, exactly")):
        sub = ArgumentParser(description=help_text, exit_on_error=False)
        sub.add_argument("--config", action=ActionConfigFile)
        sub.add_function_arguments(command)
        commands.add_subcommand(command.__name__, sub, help=help_text)
    return parser


COMMANDS = {"export": export, "apply": apply, "rollback": rollback}


def main(argv: list[str]) -> None:
    parsed = _parser().parse_args(argv)
    command = parsed.command
    arguments = {k: v for k, v in vars(parsed[command]).items() if k != "config"}
    COMMANDS[command](**arguments)

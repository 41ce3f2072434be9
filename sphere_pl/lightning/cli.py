"""`python -m sphere_pl` / `sphere-pl`: a LightningCLI over the sequential editor and edit data,
plus three commands on edit patches and checkpoints.

    sphere-pl fit --config configs/quickstart.yaml
    sphere-pl fit --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    sphere-pl validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    sphere-pl test --config configs/quickstart.yaml --patch edits.safetensors
    sphere-pl export --ckpt_path last.ckpt --out edits.safetensors
    sphere-pl apply --patch edits.safetensors --model MODEL --out edited-model/
    sphere-pl rollback --ckpt_path last.ckpt --batches 1
"""

from __future__ import annotations

import logging
import os
import sys
import zipfile
from urllib.parse import urlsplit

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from ..data.readers import EditSourceError
from ..data.records import EditDataError
from ..editing.editor import CheckpointMismatchError, EditFailedError, SettingsError
from ..editing.patch import PatchError
from ..editing.stats import StatisticsFileError
from ..editing.value_memory import ValueMemoryError
from ..evaluation.base import EvalDataError
from ..models import ModelLoadError
from .checkpoint_io import CheckpointFormatError, is_safetensors_checkpoint
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import CheckpointWriteError, EditCheckpoint, EditProgressBar, HypersphericalEnergyMonitor, RunDirectoryInUseError, RunSummary
from .datamodule import EditDataModule
from .collapse import CollapseStop
from .guard import CollapseGuard
from .facts import FactMonitor
from .general import GeneralAbilityMonitor
from .he_analysis import HEAnalysis
from .loggers import AutoWandbLogger
from .module import SequentialEditor
from .strategy import EditingStrategy

TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one pass over the edit batches
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,  # every edit batch is a point on the curves
    "enable_checkpointing": False,  # EditCheckpoint replaces ModelCheckpoint (no optimizer steps here)
    "enable_model_summary": False,  # RunSummary prints what is edited instead of a table of trainable parameters (none)
    "devices": 1,
    "default_root_dir": "runs",
    "logger": lazy_instance(AutoWandbLogger, save_dir="runs"),
}
PATCH_COMMANDS = ("export", "apply", "rollback")
# The callbacks every run has, each configured under its section, in this order: the summary's header
# comes first; a batch's measurements are recorded before its checkpoint is written, so that a
# resumed run's history holds them; the collapse stop reads them. The guard checks a batch first, so that a
# batch it reverts is measured (and not checkpointed) as the state before it.
SECTIONS = {
    "summary": RunSummary,
    "guard": CollapseGuard,  # before the monitors: what they measure after a reverted batch is the state before it
    "facts": FactMonitor,
    "general": GeneralAbilityMonitor,
    "he": HypersphericalEnergyMonitor,
    "collapse": CollapseStop,
    "checkpoint": EditCheckpoint,
    "he_analysis": HEAnalysis,
}
SIGTERM_EXIT = 128 + 15  # the shell's status for a process ended by SIGTERM


class SphereCLI(LightningCLI):
    """The run summary, the fact monitor, the general-ability monitor (no tasks unless
    configured), the HE monitor, the collapse stop (no rule unless configured), the edit
    checkpoints and the HE analysis are always on (`summary:`, `facts:`, `general:`, `he:`,
    `collapse:`, `checkpoint:`, `he_analysis:`). Checkpoints are read with `weights_only=True` (no pickle code
    runs) and must be local files; the config, not the checkpoint, decides the model."""

    def add_arguments_to_parser(self, parser) -> None:
        for section, callback in SECTIONS.items():
            parser.add_lightning_class_args(callback, section)
        parser.add_argument(
            "--patch", type=str | None, default=None,
            help="validate/test: evaluate this edit patch (sphere-pl export) applied to the model, instead of a checkpoint",
        )  # fmt: skip

    def before_fit(self) -> None:
        if self.trainer.max_epochs != 1:
            raise SystemExit(
                f"error: trainer.max_epochs = {self.trainer.max_epochs}: an editing run makes one pass over its edit batches "
                "(each edit is applied once); leave it at 1 and set data.dataset_size_limit for how many edits"
            )
        if self.config["fit"].get("patch"):
            raise SystemExit("error: --patch is for validate and test; to continue editing, resume with --ckpt_path")
        if self.trainer.world_size > 1:
            raise SystemExit(
                f"error: fit edits on one process (edit batches are sequential and there are no gradients to share), "
                f"got {self.trainer.world_size} processes; evaluate on several with validate/test --ckpt_path C "
                "--trainer.strategy ddp --trainer.devices N"
            )

    def instantiate_trainer(self, **kwargs):
        """A single-device run gets `EditingStrategy`: no copy of the model back to the CPU when fit ends."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer", {})
        if trainer.get("strategy", "auto") == "auto" and str(trainer.get("devices", "auto")) == "1":
            kwargs.setdefault("strategy", EditingStrategy())
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, EditProgressBar()])  # counts edits, not batches of an epoch
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test: `predict` has nothing to predict in an editing run."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

    def before_validate(self) -> None:
        self._apply_patch("validate")

    def before_test(self) -> None:
        self._apply_patch("test")

    def _apply_patch(self, subcommand: str) -> None:
        patch = self.config[subcommand].get("patch")
        if not patch:
            return
        if self.config[subcommand].get("ckpt_path"):
            raise SystemExit("error: give --patch or --ckpt_path, not both (a checkpoint already holds its edits)")
        if not os.path.isfile(patch):
            raise SystemExit(f"error: patch not found: {patch}")
        try:
            self.model.apply_patch(patch)
        except PatchError as e:
            raise SystemExit(f"error: {patch}: {e}") from None

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would overwrite the config with hyper-parameters saved in the checkpoint;
        here the config wins (sphere_pl checkpoints do not store them)."""

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path and urlsplit(str(ckpt_path)).scheme not in ("", "file"):
            raise SystemExit(f"error: --ckpt_path {ckpt_path!r} is a URL; download it and pass a local file (checkpoints are never fetched)")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            check_checkpoint_file(str(ckpt_path))
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            kwargs["weights_only"] = True
        return kwargs


def check_checkpoint_file(path: str) -> None:
    """A missing file or one that is not a torch checkpoint, named before anything is loaded."""
    if not os.path.isfile(path):
        raise SystemExit(
            f"error: checkpoint not found: {path}\nhint: runs write <checkpoint.dirpath>/last.ckpt after every edit batch; "
            "a run stopped before its first batch finished has none: start it again without --ckpt_path"
        )
    if zipfile.is_zipfile(path) or is_safetensors_checkpoint(path):  # this version's format, or torch.save's of earlier ones
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16)  # a safetensors header names its format within its first bytes
    stripped = head[:16].lstrip()
    kind = "a JSON file" if stripped[:1] in (b"{", b"[") else "a safetensors file" if head[8:9] == b"{" else "an unrecognised file (neither safetensors nor torch.save data)"
    if kind == "a safetensors file" and b"sphere_pl.checkpoint" in head:
        kind = "a truncated or damaged checkpoint"
    raise SystemExit(
        f"error: {path} is {kind}, not a readable sphere_pl checkpoint (written by fit as <checkpoint.dirpath>/*.ckpt)"
        + ("\nhint: an exported edit patch is evaluated with --patch, not --ckpt_path" if kind == "a safetensors file" else "")
        + ("\nhint: resume from the previous numbered checkpoint (edits-*.ckpt) in the same directory" if "truncated" in kind else "")
    )


# Errors sphere_pl raises itself, each with what to do about it (printed under its one-line
# message); the CLI turns exactly these into one line and a hint.
HINTS: dict[type[Exception], str] = {
    EditDataError: "fix that record, or set data.on_bad_record: skip to leave bad records out (they are named in a warning)",
    EvalDataError: "fix that record, or set on_bad_record: skip on the task to leave bad records out (never scored)",
    EditSourceError: "check data.source (a local JSON/JSONL file, a named source or a URL) and data.schema",
    PatchError: "use a patch exported (sphere-pl export) from a run on this model and these base weights",
    SettingsError: "change model.method.init_args (e.g. layers: [4, 5, 6, 7, 8] fits a model with at least 9 layers)",
    ModelLoadError: "set model.model.name_or_path to a saved model directory or a hub name (null: the embedded SmolLM2)",
    CheckpointMismatchError: "resume with the config of the run that wrote this checkpoint (same model, data and seed), or start without --ckpt_path",
    StatisticsFileError: "point stats.from_file at the .npz files computed for this model (<module>_<dtype>_mom2_<n>.npz), or remove it to compute C0",
    CheckpointFormatError: "resume from a *.ckpt written by fit (the previous numbered checkpoint if the last one is damaged)",
    ValueMemoryError: "raise values.memory_budget_gb (or free memory on the device), or shorten that record's prompt",
    RunDirectoryInUseError: "two runs must not share checkpoints: give each its own directory",
    CheckpointWriteError: "free disk space (or point checkpoint.dirpath elsewhere), then resume with --ckpt_path <that checkpoint>",
    EditFailedError: "edits already applied and checkpoints already written are intact: resume with --ckpt_path <dir>/last.ckpt",
}
SPHERE_ERRORS = tuple(HINTS)


def _hint(error: Exception) -> str:
    return next((hint for kind, hint in HINTS.items() if isinstance(error, kind)), "see the message above")


HELP = """usage: python -m sphere_pl COMMAND [options]      (installed: sphere-pl COMMAND [options])

Sequential knowledge editing of language models: SPHERE and the methods it improves
(AlphaEdit, MEMIT, ROME, FT, RECT, PRUNE), batch after batch of edits.

commands:
  fit        apply a stream of edit batches to a model, with a checkpoint after every batch, HE and
             editing metrics logged; --ckpt_path resumes an interrupted run
  validate   score the edited facts of a checkpoint (--ckpt_path) or an exported patch (--patch)
  test       score the never-edited facts and the general-ability tasks of a checkpoint or patch
  export     write the edits of a checkpoint as a patch file (safetensors)
  apply      write a patch into a clean copy of the model, saved as a standard Hugging Face model
  rollback   undo the last N edit batches of a checkpoint, exactly
  study      run one edit stream with several variants (method x filters x settings), each a real
             fit in its own folder, resumable; a report table and plots of them side by side

`python -m sphere_pl COMMAND --help` lists a command's options, `fit --print_config` every setting.
example: python -m sphere_pl fit --config configs/quickstart.yaml
"""


def main(args: list[str] | None = None):
    """Run the CLI. Errors that sphere_pl raises itself (bad records, sources, patches, failed
    edits) end with their one-line message and a hint instead of a traceback, exit status 1;
    `SPHERE_PL_TRACEBACK=1` shows the traceback too."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv in ([], ["-h"], ["--help"]):
        print(HELP, end="")
        return None
    _show_progress_messages()
    if argv and argv[0] == "study":
        from .study import run_command as run_study

        return sys.exit(run_study(argv[1:]))
    if argv and argv[0] in PATCH_COMMANDS:
        from .commands import run_command

        return run_command(argv)
    argv = None if args is None else argv  # LightningCLI reads sys.argv itself
    try:
        return SphereCLI(
            SequentialEditor,
            EditDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "python -m sphere_pl"},
            args=argv,
        )
    except SIGTERMException:  # Lightning ends a run stopped by SIGTERM with SystemExit(None), i.e. status 0
        print("error: stopped by SIGTERM before the end of the run: the batches finished before it are checkpointed\n"
              "hint: run the same command with --ckpt_path <checkpoint.dirpath>/last.ckpt to resume it "
              f"(exit status {SIGTERM_EXIT}, so that a scheduler requeues the job)", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from None
    except SPHERE_ERRORS as e:
        if os.environ.get("SPHERE_PL_TRACEBACK"):
            raise
        raise SystemExit(f"error: {e}\nhint: {_hint(e)}") from None
    except MisconfigurationException as e:  # Lightning's refusal of a trainer setting (an accelerator this machine lacks, ...)
        if os.environ.get("SPHERE_PL_TRACEBACK"):
            raise
        raise SystemExit(f"error: invalid trainer setting: {str(e).strip().splitlines()[0]}\nhint: check the trainer.* settings "
                         "(trainer.accelerator: auto takes a GPU where there is one)") from None
    except (ValueError, TypeError, OSError) as e:
        own = _raised_by_sphere_pl(e)
        if own is None or os.environ.get("SPHERE_PL_TRACEBACK"):
            raise
        if isinstance(own, OSError):
            raise SystemExit(f"error: {own}\nhint: check that path in the config or on the command line") from None
        raise SystemExit(
            f"error: invalid setting: {own}\nhint: change that value in the config or on the command line "
            "(`python -m sphere_pl fit --print_config` shows every setting and its current value)"
        ) from None


def _show_progress_messages() -> None:
    """sphere_pl's own INFO messages (the value search's memory plan, statistics progress) on stderr,
    as Lightning shows its own; a handler already configured by the user is left alone."""
    logger = logging.getLogger("sphere_pl")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("sphere_pl: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _raised_by_sphere_pl(error: BaseException) -> BaseException | str | None:
    """What sphere_pl's own code refused, from `error`'s chain (a setting refused while the
    config was instantiated, a file it could not open), or None for anyone else's error.

    jsonargparse reports a value that fits no member of a Union (e.g. `method: str | EditMethod`)
    as one error listing each member's; the one that is not a type mismatch is ours."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        last = None
        while tb is not None:
            last, tb = tb, tb.tb_next
        if last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(package + os.sep):
            return current
        current = current.__cause__ or current.__context__
    message = str(error)
    if "Union subtypes" in message and "Errors:" in message:
        listed = message.split("Errors:", 1)[1].split("Given value", 1)[0]
        reasons = [line.strip()[2:] for line in listed.splitlines() if line.strip().startswith("- ")]
        ours = [r for r in reasons if not r.startswith(("Expected a ", "Import path", "Not a valid subclass", "Problem with given class_path"))]
        if len(ours) == 1:
            return ours[0]
    return None

if __name__ == "__main__":
    main()

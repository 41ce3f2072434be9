"""`fit`, `validate`, `test`: a LightningCLI over `SequentialEditor` and `EditDataModule`, with every
monitor configured under its own section and called in `RUN_ORDER`.

Checkpoints are read without pickle and must be local files; the config, not the checkpoint, decides
the model. A checkpoint directory that holds a run is resumed (`--ckpt_path`) or refused.
"""

from __future__ import annotations

import os
import zipfile
from urllib.parse import urlsplit

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from ..errors import SpherePLError
from ..files.checkpoint import CheckpointFormatError, is_safetensors_checkpoint
from ..lightning import EditCheckpoint, EditDataModule, EditingStrategy, EditProgress, RunLock, SequentialEditor
from ..lightning.checkpoint import check_not_another_run
from ..lightning.loggers import AutoWandbLogger
from ..placement import is_dispatched
from ..monitors import (CollapseGuard, CollapseStop, FactMonitor, GeneralAbilityMonitor, HEAnalysis, HypersphericalEnergyMonitor,
                        PerplexityCanary, RunHeader, RunSummary, SpecificityCanary)

#: Every run's callbacks, in the order Lightning calls them; each but the header and the summary is
#: configured under its section. The header says what is about to be edited before anything is measured.
#: The guard judges a batch before anything else measures it, so that a batch it reverts is measured (and
#: not checkpointed) as the state before it. The canaries, the facts, general ability and HE record the
#: batch; the collapse rule reads what they recorded; the checkpoint is written once the batch's rows are
#: in the record, so a resumed run's history holds them; the HE analysis and the summary write the run's
#: files at its end, the summary last (after the facts' final scoring).
RUN_ORDER = (
    (None, RunHeader),
    ("guard", CollapseGuard),
    ("canary_perplexity", PerplexityCanary),
    ("canary_specificity", SpecificityCanary),
    ("facts", FactMonitor),
    ("general", GeneralAbilityMonitor),
    ("he", HypersphericalEnergyMonitor),
    ("collapse", CollapseStop),
    ("checkpoint", EditCheckpoint),
    ("he_analysis", HEAnalysis),
    (None, RunSummary),
)
SECTIONS = {section: callback for section, callback in RUN_ORDER if section is not None}

TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one pass over the edit batches
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,  # every edit batch is a point on the curves
    "enable_checkpointing": False,  # EditCheckpoint replaces ModelCheckpoint (no optimizer steps here)
    "enable_model_summary": False,  # RunHeader says what is edited instead of a table of trainable parameters (none)
    "devices": 1,
    "default_root_dir": "runs",
    "logger": lazy_instance(AutoWandbLogger, save_dir="runs"),
}


class CommandLineError(SpherePLError, ValueError):
    """A combination of command-line arguments that cannot run."""

    hint = "`python -m sphere_pl --help` says what each command takes"


class SphereCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        for section, callback in SECTIONS.items():
            parser.add_lightning_class_args(callback, section)
        parser.add_argument(
            "--patch", type=str | None, default=None,
            help="validate/test: evaluate this edit patch (sphere-pl export) applied to the model, instead of a checkpoint",
        )  # fmt: skip

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test: `predict` has nothing to predict in an editing run."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        """The sections' callbacks (registered in `RUN_ORDER`) between the header and the summary; a progress
        output that counts edits; `EditingStrategy` for a single-device run (no copy of the model back to the
        CPU when fit ends)."""
        callbacks = [RunHeader(), *callbacks, RunSummary()]
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks.append(EditProgress())
        if config.get("strategy", "auto") == "auto" and str(config.get("devices", "auto")) == "1":
            config = {**config, "strategy": EditingStrategy()}
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        if self.trainer.max_epochs != 1:
            raise CommandLineError(
                f"trainer.max_epochs = {self.trainer.max_epochs}: an editing run makes one pass over its edit batches "
                "(each edit is applied once); leave it at 1 and set data.dataset_size_limit for how many edits"
            )
        if self.config["fit"].get("patch"):
            raise CommandLineError("--patch is for validate and test; to continue editing, resume with --ckpt_path")
        if self.trainer.world_size > 1:
            raise CommandLineError(
                f"fit edits on one process (edit batches are sequential and there are no gradients to share), "
                f"got {self.trainer.world_size} processes; evaluate on several with validate/test --ckpt_path C "
                "--trainer.strategy ddp --trainer.devices N"
            )
        directory = next(c for c in self.trainer.callbacks if isinstance(c, EditCheckpoint)).directory(self.trainer)
        if RunLock.held(directory):  # before anything is loaded or measured (EditCheckpoint takes the lock in setup)
            raise RunLock.in_use(directory)
        check_not_another_run(directory, self.config["fit"].get("ckpt_path"))

    def before_validate(self) -> None:
        self._refuse_ddp_with_a_dispatched_model()
        self._apply_patch("validate")

    def before_test(self) -> None:
        self._refuse_ddp_with_a_dispatched_model()
        self._apply_patch("test")

    def _refuse_ddp_with_a_dispatched_model(self) -> None:
        """Every DDP process would load the whole model and dispatch it over the same devices (the map names
        devices, not ranks), and DDP then moves each copy to its rank's device, undoing the map."""
        if self.trainer.world_size > 1 and is_dispatched(self.model.model):
            raise CommandLineError(
                f"--trainer.strategy ddp with model.model.device_map: each of the {self.trainer.world_size} processes would "
                "dispatch the whole model over the same devices; evaluate a dispatched model in one process (no ddp strategy)")

    def _apply_patch(self, subcommand: str) -> None:
        patch = self.config[subcommand].get("patch")
        if not patch:
            return
        if self.config[subcommand].get("ckpt_path"):
            raise CommandLineError("give --patch or --ckpt_path, not both (a checkpoint already holds its edits)")
        self.model.apply_patch(patch)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would overwrite the config with hyper-parameters saved in the checkpoint;
        here the config wins (sphere_pl checkpoints do not store them)."""

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path and urlsplit(str(ckpt_path)).scheme not in ("", "file"):
            raise CommandLineError(f"--ckpt_path {ckpt_path!r} is a URL; download it and pass a local file (checkpoints are never fetched)")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            check_checkpoint_file(str(ckpt_path))
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            kwargs["weights_only"] = True
        return kwargs


def check_checkpoint_file(path: str) -> None:
    """A missing file or one that is not a checkpoint, named before anything is loaded."""
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"checkpoint not found: {path}", hint="runs write <checkpoint.dirpath>/last.ckpt after every edit "
                                    "batch; a run stopped before its first batch finished has none: start it again without --ckpt_path")
    if zipfile.is_zipfile(path) or is_safetensors_checkpoint(path):  # this version's format, or torch.save's of earlier ones
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16)  # a safetensors header names its format within its first bytes
    stripped = head[:16].lstrip()
    kind = "a JSON file" if stripped[:1] in (b"{", b"[") else "a safetensors file" if head[8:9] == b"{" else "an unrecognised file (neither safetensors nor torch.save data)"
    hint = None
    if kind == "a safetensors file" and b"sphere_pl.checkpoint" in head:
        kind, hint = "a truncated or damaged checkpoint", "resume from the previous numbered checkpoint (edits-*.ckpt) in the same directory"
    elif kind == "a safetensors file":
        hint = "an exported edit patch is evaluated with --patch, not --ckpt_path"
    raise CheckpointFormatError(f"{path} is {kind}, not a readable sphere_pl checkpoint (written by fit as <checkpoint.dirpath>/*.ckpt)", hint=hint)


def run_lightning(args: list[str] | None, cli_class: type[SphereCLI] = SphereCLI) -> SphereCLI:
    """fit / validate / test (`args`: None reads sys.argv, as LightningCLI does)."""
    return cli_class(
        SequentialEditor,
        EditDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m sphere_pl", "exit_on_error": False},
        args=args,
    )

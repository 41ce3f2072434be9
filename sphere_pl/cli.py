"""`python -m sphere_pl` / `sphere-pl`: a LightningCLI over the sequential editor and edit data.

    sphere-pl fit --config configs/quickstart.yaml
    sphere-pl fit --config configs/quickstart.yaml --ckpt_path runs/checkpoints/last.ckpt
    sphere-pl validate --config configs/quickstart.yaml --ckpt_path runs/checkpoints/last.ckpt
"""

from __future__ import annotations

from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningCLI

from .callbacks import EditCheckpoint, HypersphericalEnergyMonitor
from .datamodule import EditDataModule
from .loggers import AutoWandbLogger
from .module import SequentialEditor

TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one pass over the edit batches
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,  # every edit batch is a point on the curves
    "enable_checkpointing": False,  # EditCheckpoint replaces ModelCheckpoint (no optimizer steps here)
    "devices": 1,
    "default_root_dir": "runs",
    "logger": lazy_instance(AutoWandbLogger, save_dir="runs"),
}


class SphereCLI(LightningCLI):
    """The HE monitor and the edit checkpoints are always on, configured under `he:` and `checkpoint:`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(HypersphericalEnergyMonitor, "he")
        parser.add_lightning_class_args(EditCheckpoint, "checkpoint")


def main(args=None) -> LightningCLI:
    return SphereCLI(
        SequentialEditor,
        EditDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()

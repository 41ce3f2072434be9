"""The W&B logger's online/offline decision and an offline round trip through its reader (sphere_pl.files.wandb_offline).

Never contacts W&B: credentials are removed from the environment, HOME/netrc and
every wandb directory point into tmp_path, and runs that are started are offline.
"""

import logging
import os

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from sphere_pl.files.wandb_offline import _iter_log_records, find_offline_runs, read_offline_history
from sphere_pl.lightning.loggers import AutoWandbLogger, decide_wandb_mode

FAKE_KEY = "a" * 40  # valid format for wandb, never sent anywhere


@pytest.fixture(autouse=True)
def isolated_wandb_env(tmp_path, monkeypatch):
    for var in (
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_MODE",
        "WANDB_BASE_URL",
        "WANDB_PROJECT",
        "WANDB_RUN_ID",
        "WANDB_RESUME",
    ):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))  # absent unless a test writes it
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    for var, sub in (
        ("WANDB_DIR", "wandb_dir"),
        ("WANDB_CONFIG_DIR", "wandb_config"),
        ("WANDB_CACHE_DIR", "wandb_cache"),
        ("WANDB_DATA_DIR", "wandb_data"),
    ):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    return home


# --------------------------------------------------------------------------- decision


def test_offline_without_credentials(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sphere_pl.lightning.loggers"):
        logger = AutoWandbLogger(save_dir=tmp_path / "runs")
    assert decide_wandb_mode() == "offline"
    assert logger.mode == "offline" and logger.offline
    assert logger._wandb_init["mode"] == "offline"
    assert logger._wandb_init["project"] == "sphere_pl"
    assert [r.levelno for r in caplog.records if "W&B logging offline" in r.getMessage()] == [logging.INFO]
    assert logger._experiment is None  # deciding does not start a run


def test_online_with_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    logger = AutoWandbLogger(save_dir=tmp_path / "runs")
    assert logger.mode == "online" and not logger.offline
    assert logger._wandb_init["mode"] == "online"
    assert logger._experiment is None  # never start an online run in tests


@pytest.mark.parametrize(
    "machine, expected", [("api.wandb.ai", "online"), ("example.org", "offline")]
)
def test_netrc_credentials(isolated_wandb_env, machine, expected):
    netrc_file = isolated_wandb_env / ".netrc"
    netrc_file.write_text(f"machine {machine}\n  login user\n  password {FAKE_KEY}\n")
    netrc_file.chmod(0o600)
    assert decide_wandb_mode() == expected


@pytest.mark.parametrize(
    "env_mode, expected", [("offline", "offline"), ("dryrun", "offline"), ("disabled", "disabled")]
)
def test_wandb_mode_env_wins_over_credentials(tmp_path, monkeypatch, env_mode, expected):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", env_mode)
    assert AutoWandbLogger(save_dir=tmp_path / "runs").mode == expected


def test_explicit_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert AutoWandbLogger(save_dir=tmp_path, offline=True).mode == "offline"
    assert AutoWandbLogger(save_dir=tmp_path, mode="disabled").mode == "disabled"
    monkeypatch.delenv("WANDB_API_KEY")
    assert AutoWandbLogger(save_dir=tmp_path, offline=False).mode == "online"
    # log_model cannot work offline; it is dropped instead of raising.
    assert AutoWandbLogger(save_dir=tmp_path, log_model=True)._log_model is False


# --------------------------------------------------------------------------- round trip

EDITS = [4, 9, 15]  # cumulative number of edits after each step
HE = [0.5, -1.25, 3.0]  # exactly representable in float32


class _TinyModule(LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        i = self.global_step
        self.log("edits", EDITS[i], on_step=True, batch_size=1)
        self.log("he/layer0", HE[i], on_step=True, batch_size=1)
        return (self.w * x).sum() ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(8, 1)), batch_size=1)


def test_offline_round_trip(tmp_path):
    save_dir = tmp_path / "runs"
    logger = AutoWandbLogger(save_dir=save_dir)
    assert logger.mode == "offline"
    trainer = Trainer(
        max_steps=3,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    try:
        trainer.fit(_TinyModule())
    finally:
        logger.experiment.finish()
    assert "WANDB_MODE" not in os.environ  # no process-wide switch to offline

    runs = find_offline_runs(save_dir)
    assert len(runs) == 1
    rows = read_offline_history(runs[0])

    logged = [r for r in rows if "he/layer0" in r]
    assert [(r["edits"], r["he/layer0"]) for r in logged] == list(zip(EDITS, HE))
    # Lightning's own keys are still there, with the step they belong to.
    assert [r["trainer/global_step"] for r in logged] == [0, 1, 2]
    assert all(r["epoch"] == 0 for r in logged)
    assert [r["_step"] for r in rows] == list(range(len(rows)))

    # The x-axis definitions reached the run: edits is the step metric for "*",
    # defined after Lightning's own trainer/global_step one.
    from wandb.proto import wandb_internal_pb2 as pb

    globs = []
    for raw in _iter_log_records(next(runs[0].glob("run-*.wandb"))):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "metric" and record.metric.glob_name == "*":
            globs.append((record.metric.step_metric, record.metric.options.step_sync))
    assert globs == [("trainer/global_step", True), ("edits", True)]


def test_reader_large_and_nested_rows(tmp_path):
    # A 100 kB value spans several 32 kB blocks of the .wandb log (chunks of type
    # first/middle/last); nested dicts and non-float values come back as logged.
    save_dir = tmp_path / "runs"
    logger = AutoWandbLogger(save_dir=save_dir)
    blob = "".join(chr(ord("a") + i % 26) for i in range(100_000))
    logged = [
        {"edits": 1, "blob": blob},
        {"edits": 2, "nested": {"a": 1, "b": {"c": "x"}}, "flag": True, "none": None},
        {"edits": 3, "he/layer0": 0.1},
    ]
    try:
        for row in logged:
            logger.experiment.log(row)
    finally:
        logger.experiment.finish()
    rows = read_offline_history(find_offline_runs(save_dir)[0])
    assert [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows] == logged
    assert rows[0]["blob"] == blob

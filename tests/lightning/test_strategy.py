"""The end of `fit` leaves the edited model where it ran (`EditingStrategy`), unless asked otherwise.

Lightning's own teardown calls `module.cpu()` when fit ends; on a GPU that is a copy of the
whole model and the method's buffers through host memory. Here (CPU only) the copy cannot be
seen as a change of device, so the editor is subclassed to count the calls Lightning makes to
its `cpu()`; tests/test_cuda.py checks the device itself on a GPU.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml

from conftest import CORPUS
from sphere_pl import EditDataModule, PretrainedModel, SequentialEditor
from sphere_pl.lightning import EditingStrategy
from sphere_pl.commands.run import SphereCLI, TRAINER_DEFAULTS


class CountingEditor(SequentialEditor):
    """The real editor; it also counts how often the module is moved to the CPU."""

    cpu_calls = 0

    def cpu(self):
        self.cpu_calls += 1
        return super().cpu()


def fit(tiny_model_dir, tiny_method, tmp_path, strategy) -> CountingEditor:
    editor = CountingEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    data = EditDataModule(source="quickstart", dataset_size_limit=4, num_edits=2, num_holdout=0, cache_dir=str(tmp_path / "data"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, strategy=strategy, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(editor, data)
    assert editor.editor.edits_applied == 4
    return editor


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fit_with_the_editing_strategy_never_moves_the_module_to_the_cpu(tiny_model_dir, tiny_method, tmp_path):
    assert fit(tiny_model_dir, tiny_method, tmp_path / "a", EditingStrategy()).cpu_calls == 0
    # what it replaces: Lightning's own single-device strategy moves it when fit ends, and so does
    # the editing strategy when asked to
    assert fit(tiny_model_dir, tiny_method, tmp_path / "b", "single_device").cpu_calls == 1
    assert fit(tiny_model_dir, tiny_method, tmp_path / "c", EditingStrategy(to_cpu_at_end=True)).cpu_calls == 1


def test_the_editing_strategy_runs_on_the_device_the_trainer_chooses(tiny_model_dir):
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=EditingStrategy(), logger=False)
    assert trainer.strategy.root_device == torch.device("cpu") and trainer.strategy.parallel_devices == [torch.device("cpu")]
    with pytest.raises(ValueError, match="EditingStrategy runs on one device, the trainer chose 2.*--trainer.strategy ddp"):
        L.Trainer(accelerator="cpu", devices=2, strategy=EditingStrategy(), logger=False)


def test_the_cli_gives_single_device_runs_the_editing_strategy_and_leaves_ddp_alone(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {
        "model": {"name_or_path": tiny_model_dir},
        "method": {"class_path": "sphere_pl.MEMIT", "init_args": {"layers": [1], "stats": {"corpus": str(CORPUS)}}},
    }}))

    def trainer_of(*extra):
        cli = SphereCLI(SequentialEditor, EditDataModule, trainer_defaults={**TRAINER_DEFAULTS, "logger": False}, run=False,
                        args=["--config", str(config), "--trainer.default_root_dir", str(tmp_path), *extra])
        return cli.trainer

    assert isinstance(trainer_of().strategy, EditingStrategy)
    assert type(trainer_of("--trainer.strategy", "single_device").strategy).__name__ == "SingleDeviceStrategy"
    assert type(trainer_of("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu").strategy).__name__ == "DDPStrategy"

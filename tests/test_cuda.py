"""The CUDA path: the same statistics, edits, energies and resumes on a GPU as on the CPU.

Skipped where there is no GPU (CI has none). On a CUDA machine: `pytest tests/test_cuda.py`.
The reference is always a CPU run of the same code on the same tiny model and data: float32
on both devices (TF32 stays off, PyTorch's default for matrix products), so the two may
differ only by rounding order; bfloat16 is compared by the direction of its weight change.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from conftest import CONTEXT_TEMPLATES, CORPUS
from helpers import CrashBeforeBatch, SimulatedCrash
from sphere_pl import EditCheckpoint, EditDataModule, HypersphericalEnergyMonitor, PretrainedModel, SequentialEditor
from sphere_pl.editing.methods import AlphaEdit
from sphere_pl.editing.stats import KeyStatistics, accumulate_moments, model_fingerprint
from sphere_pl.editing.values import ValueOptimization
from sphere_pl.lightning import EditingStrategy
from sphere_pl.models import load_model_and_tokenizer, resolve_templates

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NUM_EDITS, NUM_BATCHES = 4, 3
EDITED = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]


def make_method(stats_cache: str, **values) -> AlphaEdit:
    return AlphaEdit(
        layers=[1, 2],
        values=ValueOptimization(num_grad_steps=5, lr=0.5, **values),
        stats=KeyStatistics(corpus=str(CORPUS), num_samples=20, seq_len=64, cache_dir=stats_cache),
        context_templates=CONTEXT_TEMPLATES,
    )


class DeviceRecorder(L.Callback):
    """Where the edited weights live while batches are applied (Lightning moves the module back to the CPU at the end)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.devices_seen = getattr(pl_module, "devices_seen", set()) | {pl_module.model.get_submodule(EDITED[0]).weight.device.type}


def fit(model_dir, stats_cache, root: Path, accelerator: str, dtype="float32", callbacks=(), ckpt_path=None, strategy="auto", **values):
    """A full Lightning run: three batches of four quickstart facts, HE every batch, a checkpoint per batch."""
    editor = SequentialEditor(PretrainedModel(model_dir, dtype), method=make_method(stats_cache, **values))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        strategy=strategy,
        max_epochs=1,
        default_root_dir=root,
        logger=CSVLogger(root, name="csv", version=0),
        callbacks=[HypersphericalEnergyMonitor(), EditCheckpoint(dirpath=str(root / "checkpoints")), DeviceRecorder(), *callbacks],
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = EditDataModule(source="quickstart", dataset_size_limit=NUM_EDITS * NUM_BATCHES, num_edits=NUM_EDITS,
                          num_holdout=4, cache_dir=str(root / "data-cache"))  # fmt: skip
    trainer.fit(editor, data, ckpt_path=ckpt_path)
    return editor, trainer


def weights(editor) -> dict[str, torch.Tensor]:
    return {name: editor.model.get_submodule(name).weight.detach().float().cpu() for name in EDITED}


def max_abs_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def largest_change(editor, model_dir) -> float:
    """The largest change the edits made to an edited weight (float32 pretrained weights from disk)."""
    pretrained, _ = load_model_and_tokenizer(model_dir)
    return max_abs_diff(weights(editor), {name: pretrained.get_submodule(name).weight.detach() for name in EDITED})


def he_rows(trainer) -> dict[tuple[int, str], float]:
    import csv

    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {(int(r["step"]), k): float(v) for r in rows for k, v in r.items() if k.startswith("he/") and v != ""}


@pytest.fixture(scope="module")
def cpu_run(tiny_model_dir, stats_cache, tmp_path_factory):
    return fit(tiny_model_dir, stats_cache, tmp_path_factory.mktemp("cpu"), "cpu")


@pytest.fixture(scope="module")
def gpu_run(tiny_model_dir, stats_cache, tmp_path_factory):
    return fit(tiny_model_dir, stats_cache, tmp_path_factory.mktemp("gpu"), "gpu")


def test_key_statistics_on_the_gpu_equal_the_cpu_ones(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    templates = resolve_templates(model)
    sums = {}
    for device in ["cpu", "cuda"]:
        model.to(device)
        cfg = KeyStatistics(corpus=str(CORPUS), num_samples=24, seq_len=64, batch_size=8, accumulate_dtype="float64", checkpoint_every=0)
        prints = {layer: model_fingerprint(model, templates, layer) for layer in [1, 2]}
        moments, tokens, _ = accumulate_moments(model, tokenizer, templates, [1, 2], cfg, prints, "/nonexistent/partial.safetensors")
        assert tokens == 24 * 64
        sums[device] = {layer: m.double().cpu() for layer, m in moments.items()}
    for layer in [1, 2]:
        cpu, gpu = sums["cpu"][layer], sums["cuda"][layer]
        assert float((gpu - cpu).norm() / cpu.norm()) < 1e-5, layer


def test_a_gpu_run_computes_its_key_statistics_on_the_gpu(tiny_model_dir, tmp_path, monkeypatch):
    """The model is loaded on the CPU and Lightning moves it only after `setup()`, where C0 is computed:
    the module must already be on the GPU there (on LLaMA3-8B the CPU would take hours)."""
    import sphere_pl.editing.stats as stats_module

    devices, accumulate = [], stats_module.accumulate_moments

    def recording(model, *args, **kwargs):
        devices.append(next(model.parameters()).device.type)
        return accumulate(model, *args, **kwargs)

    monkeypatch.setattr(stats_module, "accumulate_moments", recording)
    editor, _ = fit(tiny_model_dir, str(tmp_path / "empty-stats-cache"), tmp_path / "run", "gpu")
    assert devices and set(devices) == {"cuda"}
    assert editor.method.projectors.device.type == "cpu"  # moved back with the module when fit ended...
    assert editor.devices_seen == {"cuda"}  # ...after editing on the GPU


def test_a_gpu_run_edits_like_the_cpu_run(cpu_run, gpu_run, tiny_model_dir):
    (cpu_editor, cpu_trainer), (gpu_editor, gpu_trainer) = cpu_run, gpu_run
    assert gpu_editor.devices_seen == {"cuda"} and cpu_editor.devices_seen == {"cpu"}
    assert gpu_editor.editor.edits_applied == cpu_editor.editor.edits_applied == NUM_EDITS * NUM_BATCHES
    change = largest_change(cpu_editor, tiny_model_dir)
    assert change > 1e-5  # the edits moved the weights...
    assert max_abs_diff(weights(gpu_editor), weights(cpu_editor)) <= 1e-3 * change  # ...the same way on both devices
    cpu_he, gpu_he = he_rows(cpu_trainer), he_rows(gpu_trainer)
    assert len(cpu_he) >= 2 * NUM_BATCHES and gpu_he.keys() == cpu_he.keys()
    assert gpu_he == pytest.approx(cpu_he, rel=1e-4)


def test_a_gpu_run_resumes_exactly_and_its_checkpoint_resumes_on_the_cpu(gpu_run, tiny_model_dir, stats_cache, tmp_path):
    reference = weights(gpu_run[0])
    with pytest.raises(SimulatedCrash):
        fit(tiny_model_dir, stats_cache, tmp_path / "crashed", "gpu", callbacks=[CrashBeforeBatch(2)])
    ckpt = tmp_path / "crashed" / "checkpoints" / f"edits-{2 * NUM_EDITS:06d}.ckpt"
    assert ckpt.is_file()
    on_gpu, _ = fit(tiny_model_dir, stats_cache, tmp_path / "resumed-gpu", "gpu", ckpt_path=str(ckpt))
    assert on_gpu.editor.edits_applied == NUM_EDITS * NUM_BATCHES
    assert max_abs_diff(weights(on_gpu), reference) <= 1e-6
    on_cpu, _ = fit(tiny_model_dir, stats_cache, tmp_path / "resumed-cpu", "cpu", ckpt_path=str(ckpt))
    assert on_gpu.devices_seen == {"cuda"} and on_cpu.devices_seen == {"cpu"}
    assert on_cpu.editor.edits_applied == NUM_EDITS * NUM_BATCHES
    assert max_abs_diff(weights(on_cpu), reference) <= 1e-3 * largest_change(gpu_run[0], tiny_model_dir)


def bfloat16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    _, exponent = torch.frexp(x.float().abs().clamp_min(1e-30))  # x = m * 2**e, 0.5 <= m < 1
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8)


def test_a_bfloat16_gpu_run_writes_the_float32_change_where_bfloat16_can_hold_it(gpu_run, tiny_model_dir, stats_cache, tmp_path):
    """The tiny model's edits are mostly below one bfloat16 step of its weights (they vanish when written,
    as they would in any bfloat16 model); where the float32 run changed a weight by more than 4 steps the
    bfloat16 run must make the same change, within the bfloat16 forward's error (CPU: 12-17 %)."""
    editor, trainer = fit(tiny_model_dir, stats_cache, tmp_path / "bf16", "gpu", dtype="bfloat16")
    assert editor.editor.edits_applied == NUM_EDITS * NUM_BATCHES
    assert editor.model.get_submodule(EDITED[0]).weight.dtype == torch.bfloat16
    pretrained16, _ = load_model_and_tokenizer(tiny_model_dir, "bfloat16")
    pretrained32, _ = load_model_and_tokenizer(tiny_model_dir, "float32")
    for name in EDITED:
        before16 = pretrained16.get_submodule(name).weight.detach().float()
        delta16 = editor.model.get_submodule(name).weight.detach().float().cpu() - before16
        delta32 = gpu_run[0].model.get_submodule(name).weight.detach().cpu() - pretrained32.get_submodule(name).weight.detach()
        held = delta32.abs() > 4 * bfloat16_ulp(before16)
        assert int(held.sum()) >= 10, name
        relative_error = float((delta16[held] - delta32[held]).norm() / delta32[held].norm())
        print(f"{name}: {int(held.sum())} weights changed by > 4 bfloat16 steps; relative error of the bf16 change {relative_error:.3f}")
        assert relative_error < 0.3, name
    assert all(torch.isfinite(torch.tensor(v)) for v in he_rows(trainer).values())


def logged(trainer, key: str) -> list[float]:
    import csv

    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key, "") != ""]


def test_an_editing_strategy_run_ends_with_the_model_and_method_still_on_the_gpu(tiny_model_dir, stats_cache, tmp_path):
    """`EditingStrategy` (the CLI's for one device) skips Lightning's copy back to the CPU at the end of fit."""
    editor, _ = fit(tiny_model_dir, stats_cache, tmp_path / "run", "gpu", strategy=EditingStrategy())
    assert editor.editor.edits_applied == NUM_EDITS * NUM_BATCHES
    assert editor.model.get_submodule(EDITED[0]).weight.device.type == "cuda"
    assert editor.method.projectors.device.type == "cuda"


def test_auto_settings_on_the_gpu_run_a_batch_in_one_pass_and_the_bfloat16_search_edits_like_float32(gpu_run, tiny_model_dir, stats_cache, tmp_path):
    """On a GPU `auto` runs the whole batch in one pass (small passes are launch-bound) without recomputation;
    compute_dtype bfloat16 runs the upper blocks on bfloat16 copies and moves the weights the float32 way."""
    editor, trainer = fit(tiny_model_dir, stats_cache, tmp_path / "bf16-search", "gpu", compute_dtype="bfloat16")
    assert logged(trainer, "edit/requests_per_pass") == [float(NUM_EDITS)] * NUM_BATCHES
    assert logged(trainer, "edit/recompute_activations") == [0.0] * NUM_BATCHES
    change = largest_change(gpu_run[0], tiny_model_dir)
    assert max_abs_diff(weights(editor), weights(gpu_run[0])) <= 0.1 * change


def test_a_model_split_between_the_gpu_and_offloaded_cpu_blocks_edits_as_all_on_the_gpu(tiny_model_dir, stats_cache):
    """accelerate's dispatch: blocks 0 and 3 kept on the CPU and run on the GPU through their hooks, the edited
    blocks 1 and 2 on the GPU; the edited weights equal those of the same edits with everything on the GPU."""
    from sphere_pl import Editor
    from sphere_pl.data.readers import QUICKSTART_PATH, load_edit_requests
    from sphere_pl.models import linear_weight

    requests = load_edit_requests(str(QUICKSTART_PATH))[:NUM_EDITS]
    results = []
    for device_map in ({"": 0}, {"model.embed_tokens": 0, "model.layers.0": "cpu", "model.layers.1": 0, "model.layers.2": 0,
                                 "model.layers.3": "cpu", "model.norm": 0, "model.rotary_emb": 0, "lm_head": "cpu"}):
        model, tok = load_model_and_tokenizer(tiny_model_dir, device_map=device_map)
        editor = Editor(model, tok, make_method(stats_cache), [], model_id=tiny_model_dir)
        editor.apply(requests)
        results.append({name: linear_weight(model.get_submodule(name)).detach().cpu() for name in EDITED})
        assert all(model.get_submodule(name).weight.device.type == "cuda" for name in EDITED)
    for name in EDITED:
        assert torch.equal(results[0][name], results[1][name]), name

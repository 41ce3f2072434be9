"""Checkpoints as safetensors: every value round-trips, bad files are named, no pickle runs."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from sphere_pl.files import CheckpointFormatError, is_safetensors_checkpoint, load_checkpoint_file, save_checkpoint_file
from sphere_pl.lightning.checkpoint_io import SafetensorsCheckpointIO


def _nested() -> dict:
    base = torch.randn(6, 4)
    return {
        "epoch": 0,
        "global_step": 7,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.batch_progress": {"total": {"ready": 3, "completed": 3}}}},
        "callbacks": {"EditCheckpoint{'dirpath': None}": {"saved": ["a.ckpt", "b.ckpt"]}},
        "optimizer_states": [],
        "sphere_pl": {
            "weights": {"model.layers.1.mlp.down_proj": base},
            "view": base[:, 1:3].T,  # non-contiguous view sharing storage with another tensor
            "same_again": base,  # the very same tensor twice
            "keys": [[torch.randn(4, 2).double(), torch.arange(5)], []],
            "mask": torch.tensor([True, False]),
            "rng": torch.get_rng_state(),
            "half": torch.randn(3, dtype=torch.bfloat16),
            "scalar": torch.tensor(2.5),
            "pair": (1, "two", None),
            "progress_history": [{"step": 0, "value": float("nan"), "inf": float("inf")}],
            "folded": None,
            "flag": True,
        },
    }


def _assert_same(a, b, where="") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_every_value_round_trips_exactly(tmp_path):
    checkpoint = _nested()
    path = tmp_path / "c.ckpt"
    save_checkpoint_file(checkpoint, path)
    assert is_safetensors_checkpoint(path)
    _assert_same(load_checkpoint_file(path), checkpoint)
    # the Lightning plugin reads and writes the same format
    io = SafetensorsCheckpointIO()
    io.save_checkpoint(checkpoint, tmp_path / "sub" / "d.ckpt")
    _assert_same(io.load_checkpoint(tmp_path / "sub" / "d.ckpt"), checkpoint)
    io.remove_checkpoint(tmp_path / "sub" / "d.ckpt")
    assert not (tmp_path / "sub" / "d.ckpt").exists()


def test_values_that_cannot_be_stored_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint field /sphere_pl/bad holds a set"):
        save_checkpoint_file({"sphere_pl": {"bad": {1, 2}}}, tmp_path / "x.ckpt")
    with pytest.raises(TypeError, match=r"checkpoint field /loops has non-string keys \[3\]"):
        save_checkpoint_file({"loops": {3: "x"}}, tmp_path / "x.ckpt")


def test_truncated_and_foreign_files_are_refused_with_what_they_are(tmp_path):
    path = tmp_path / "c.ckpt"
    save_checkpoint_file(_nested(), path)
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not is_safetensors_checkpoint(torn)
    with pytest.raises(CheckpointFormatError, match="torn.ckpt is not a readable sphere_pl checkpoint"):
        load_checkpoint_file(torn)

    patch = tmp_path / "edits.safetensors"
    save_file({"w.delta": torch.zeros(2)}, patch, metadata={"format": "sphere_pl.patch"})
    with pytest.raises(CheckpointFormatError, match="not a sphere_pl checkpoint.*--patch, not --ckpt_path"):
        load_checkpoint_file(patch)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_torch_save_checkpoints_of_earlier_versions_load_without_pickle(tmp_path):
    old = tmp_path / "old.ckpt"
    torch.save({"sphere_pl": {"weights": {"w": torch.ones(2, 3)}, "batches_done": 2}}, old)
    loaded = load_checkpoint_file(old)
    assert loaded["sphere_pl"]["batches_done"] == 2 and torch.equal(loaded["sphere_pl"]["weights"]["w"], torch.ones(2, 3))

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"sphere_pl": _RunsCode(marker)}, crafted)
    with pytest.raises(Exception, match="(?i)unpickl|weights_only"):
        load_checkpoint_file(crafted)
    assert not marker.exists()

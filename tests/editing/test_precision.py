"""The value search's precision is chosen by measuring the device (`sphere_pl.editing.precision`):
the rule on given rates, a real measurement on this machine, and a method that keeps the precision
its run started with when it is resumed elsewhere."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sphere_pl import Editor
from sphere_pl.editing.precision import choose_compute_dtype, decide, over_devices
from sphere_pl.placement import execution_devices
from helpers import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize("asked, force, rates, used", [
    ("bfloat16", False, {"float32": 120.0, "bfloat16": 23.0}, "float32"),   # the Xeon without AVX512_BF16 (issue 31)
    ("bfloat16", True, {"float32": 120.0, "bfloat16": 23.0}, "bfloat16"),   # insisted on
    ("bfloat16", False, {"float32": 100.0, "bfloat16": 150.0}, "bfloat16"),  # the AMD machine with avx512_bf16
    ("bfloat16", False, {"float32": 100.0, "bfloat16": 100.0}, "bfloat16"),  # not slower: as asked
    ("auto", False, {"float32": 100.0, "bfloat16": 105.0}, "float32"),       # within the margin: float32
    ("auto", False, {"float32": 100.0, "bfloat16": 150.0}, "bfloat16"),
])
def test_the_rule_on_measured_rates(asked, force, rates, used):
    choice = decide(asked, force, rates, "cpu")
    assert choice.used == used and choice.rates == rates and choice.asked == asked
    if asked == "bfloat16" and used == "float32":
        assert "5.2x slower" in choice.reason and "force_compute_dtype" in choice.reason and "bfloat16 23 GFLOP/s, float32 120" in choice.reason


def test_a_dispatch_over_several_devices_takes_bfloat16_only_where_every_device_does():
    fast, slow = {"float32": 100.0, "bfloat16": 150.0}, {"float32": 120.0, "bfloat16": 23.0}
    two_fast = over_devices([decide("bfloat16", False, fast, "cuda:0"), decide("bfloat16", False, fast, "cuda:1")])
    assert two_fast.used == "bfloat16" and two_fast.device == "cuda:0" and "cuda:1: bfloat16 (150 / 100 GFLOP/s)" in two_fast.reason
    mixed = over_devices([decide("bfloat16", False, fast, "cuda:0"), decide("bfloat16", False, slow, "cuda:1")])
    assert mixed.used == "float32" and mixed.device == "cuda:1" and mixed.rates == slow  # the slow device decides
    assert "5.2x slower" in mixed.reason and "cuda:0: bfloat16" in mixed.reason
    forced = over_devices([decide("bfloat16", True, fast, "cuda:0"), decide("bfloat16", True, slow, "cuda:1")])
    assert forced.used == "bfloat16"  # insisted on: every device runs it
    one = decide("auto", False, fast, "cpu")
    assert over_devices([one]) is one  # one device: its own choice, unchanged


def test_the_devices_measured_are_those_the_upper_blocks_compute_on(tiny_model_dir, tmp_path):
    from sphere_pl import load_model_and_tokenizer
    whole, _ = load_model_and_tokenizer(tiny_model_dir)
    assert execution_devices(whole, list(whole.model.layers)) == [torch.device("cpu")]
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk",
                  "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched, _ = load_model_and_tokenizer(tiny_model_dir, device_map=device_map, offload_folder=str(tmp_path / "o"))
    # blocks on disk compute where their hook brings the weights: the CPU here, not `meta`
    assert execution_devices(dispatched, list(dispatched.model.layers)[2:]) == [torch.device("cpu")]
    choice = choose_compute_dtype("bfloat16", False, execution_devices(dispatched, list(dispatched.model.layers)), 64, 128)
    assert choice.device == "cpu" and set(choice.rates) == {"float32", "bfloat16"}


def test_a_real_measurement_here_is_positive_and_the_choice_follows_it():
    choice = choose_compute_dtype("bfloat16", False, torch.device("cpu"), 64, 128)
    assert set(choice.rates) == {"float32", "bfloat16"} and all(r > 0 for r in choice.rates.values())
    assert choice.used == decide("bfloat16", False, choice.rates, "cpu").used
    nothing = choose_compute_dtype("float32", False, torch.device("cpu"), 64, 128)
    assert nothing.used == "float32" and nothing.rates == {}  # float32 asked: nothing measured
    half = choose_compute_dtype("float32", False, torch.device("cpu"), 64, 128, torch.bfloat16)
    assert half.used == "bfloat16" and half.rates == {}  # a half-precision model runs in its own dtype


def test_a_resumed_method_keeps_the_precision_its_run_started_with(method_factory):
    from sphere_pl.editing.values import ValueOptimization

    def prepared():
        method = method_factory("alphaedit", values=ValueOptimization(num_grad_steps=5, lr=0.5, compute_dtype="bfloat16"))
        editor = Editor(tiny_llama(seed=0), tiny_tokenizer(), method)
        editor.prepare()
        return method

    first = prepared()
    assert first.search_values.compute_dtype == first.precision.used and first.precision.rates  # measured at set-up
    state = first.get_extra_state()
    other = "float32" if first.precision.used == "bfloat16" else "bfloat16"
    started = {**state, "precision": {**state["precision"], "used": other}}  # as if measured otherwise where the run began
    resumed = prepared()
    resumed.set_extra_state(started)
    assert resumed.precision.used == other and resumed.search_values.compute_dtype == other
    assert "as when the run started" in resumed.precision.reason
    assert dataclasses.asdict(resumed.values) == dataclasses.asdict(first.values)  # the settings themselves are untouched


"""The value search's precision is chosen by measuring the device (`sphere_pl.editing.precision`):
the rule on given rates, a real measurement on this machine, and a method that keeps the precision
its run started with when it is resumed elsewhere."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sphere_pl import Editor
from sphere_pl.editing.precision import choose_compute_dtype, decide
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


"""UltraEdit against a plain float64 re-implementation of the official turn (tests/editing/ultraedit_reference.py):
the deltas written and the lifelong statistics, over two turns (the statistics carry over), with UltraEdit's
settings and with StableEdit's (exact variance merge, full whitening, ridge 10), and with a statistics warm-up."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_llama, tiny_tokenizer
from sphere_pl import Editor
from sphere_pl.data.readers import QUICKSTART_PATH, load_edit_requests
from sphere_pl.editing.methods import UltraEdit
from ultraedit_reference import ultraedit_turn

TARGETS = {"mlp.gate_proj": [1], "mlp.up_proj": [2]}
MODULES = ["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj"]
REQUESTS = load_edit_requests(str(QUICKSTART_PATH))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_turns(method: UltraEdit, batches) -> tuple[list[dict], list[dict]]:
    """Each turn's written deltas (W after − W before) and the method's statistics after it."""
    editor = Editor(tiny_llama(seed=0), tiny_tokenizer(), method)
    deltas, statistics = [], []
    for batch in batches:
        before = {n: editor.model.get_submodule(n).weight.detach().clone() for n in MODULES}
        editor.apply(batch)
        deltas.append({n: editor.model.get_submodule(n).weight.detach() - before[n] for n in MODULES})
        statistics.append(method.statistics)
    return deltas, statistics


def reference_turns(batches, warmup=(), **settings) -> tuple[list[dict], list[dict]]:
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    statistics, deltas, after = {}, [], []
    if warmup:
        _, statistics = ultraedit_turn(model, tok, warmup, MODULES, statistics, **settings)  # statistics only: nothing written
    for batch in batches:
        delta, statistics = ultraedit_turn(model, tok, batch, MODULES, statistics, **settings)
        for name, d in delta.items():
            with torch.no_grad():
                model.get_submodule(name).weight += d.float()
        deltas.append(delta)
        after.append(statistics)
    return deltas, after


def assert_same(method_deltas, method_stats, ref_deltas, ref_stats, tolerance=2e-4):
    for turn, (mine, theirs) in enumerate(zip(method_deltas, ref_deltas)):
        for name in MODULES:
            assert float(theirs[name].norm()) > 0
            assert rel(mine[name], theirs[name]) < tolerance, (turn, name, rel(mine[name], theirs[name]))
    for mine, theirs in zip(method_stats, ref_stats):
        (shape_key, stats), = mine.items()  # gate_proj and up_proj share one shape: one set of statistics
        (shape, reference), = theirs.items()
        assert shape_key == f"{shape[1]}x{shape[0]}"
        assert float(stats["n"]) == reference["n"]
        assert rel(stats["mean"], reference["mean"]) < 1e-5 and rel(stats["m2"], reference["m2"]) < 1e-5


BATCHES = [REQUESTS[:7], REQUESTS[7:14]]


@pytest.mark.parametrize("settings", [
    dict(lr=1e-2, ridge=1.0, mini_batch=3),                                                   # UltraEdit
    dict(lr=1e-2, ridge=10.0, mini_batch=3, variance="exact", whitening="full"),              # StableEdit's options
])
def test_two_turns_equal_the_official_loop_in_float64(settings):
    method = UltraEdit(targets=TARGETS, **settings)
    mine = run_turns(method, BATCHES)
    theirs = reference_turns(BATCHES, **settings)
    assert_same(*mine, *theirs)
    if settings.get("whitening") == "full":  # the gradient covariance was really used in the second turn
        assert float(method.statistics[next(iter(method.statistics))]["n"]) > 64 + 1
        plain = run_turns(UltraEdit(targets=TARGETS, **{**settings, "whitening": "diagonal"}), BATCHES)
        assert rel(plain[0][1][MODULES[0]], mine[0][1][MODULES[0]]) > 1e-2  # and it changes the update


def test_a_statistics_warm_up_fills_the_statistics_and_writes_nothing(tmp_path):
    warmup = REQUESTS[20:30]
    source = tmp_path / "warmup.json"
    source.write_text(json.dumps([{"case_id": r.case_id, "prompt": r.prompt.replace("{}", r.subject), "subject": r.subject,
                                   "target_new": r.target_new, "ground_truth": r.target_true, "rephrase_prompt": r.rewrite_prompt,
                                   "locality_prompt": r.rewrite_prompt, "locality_ground_truth": r.target_true} for r in warmup]))
    settings = dict(lr=1e-2, ridge=1.0, mini_batch=3)
    method = UltraEdit(targets=TARGETS, warmup_source=str(source), warmup_records=10, **settings)
    mine = run_turns(method, BATCHES[:1])
    assert_same(*mine, *reference_turns(BATCHES[:1], warmup=warmup, **settings))
    cold = run_turns(UltraEdit(targets=TARGETS, **settings), BATCHES[:1])
    assert rel(cold[0][0][MODULES[0]], mine[0][0][MODULES[0]]) > 1e-2  # the warm-up changed the first update


def test_statistics_revert_exactly_and_labels_name_one_module_per_layer():
    method = UltraEdit(targets=TARGETS, lr=1e-2, mini_batch=3)
    editor = Editor(tiny_llama(seed=0), tiny_tokenizer(), method)
    editor.apply(BATCHES[0])
    after_one = {k: {kk: v.clone() for kk, v in s.items()} for k, s in method.statistics.items()}
    editor.apply(BATCHES[1])
    editor.rollback(1)
    assert all(torch.equal(method.statistics[k][kk], v) for k, s in after_one.items() for kk, v in s.items())
    assert method.weight_labels() == ["layer1", "layer2"] and list(editor.edited_weights()) == ["layer1", "layer2"]
    both = UltraEdit(targets={"mlp.gate_proj": [1, 2], "mlp.up_proj": [2]})
    assert both.weight_labels() == ["layer1.gate_proj", "layer2.gate_proj", "layer2.up_proj"]


@pytest.mark.parametrize("settings, message", [
    (dict(targets={}), "at least one submodule"),
    (dict(targets={"mlp.up_proj": [1, 1]}), "more than once"),
    (dict(lr=0.0), "ultraedit.lr = 0.0 must be a positive number"),
    (dict(variance="biased"), r"ultraedit.variance must be one of \['ultraedit', 'exact'\]"),
    (dict(warmup_records=5), "warmup_records needs warmup_source"),
])
def test_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        UltraEdit(**settings)

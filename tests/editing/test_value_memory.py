"""The value search's memory plan (`auto` settings) and its bfloat16 copies, against measurements.

* The estimate of what a pass keeps for its backward is checked against what autograd really
  saves (every saved tensor's storage, counted once, parameters excluded) on a model with
  SmolLM2's block and vocabulary shapes.
* Under `values.memory_budget_gb`, the measured peak of the process's resident memory during
  the search stays under the budget, where the unbudgeted plan goes over it.
* The plan itself is a pure function: explicit settings win, `auto` follows the stated policy.
* With float32, `auto` gives bit for bit what the explicit settings it chose give.
* bfloat16 copies: made once and reused while the weights they copy are unchanged, rebuilt when
  one changes, the model itself untouched; their search lands near the float32 one.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from helpers import tiny_llama, tiny_tokenizer
from sphere_pl.data.records import EditRequest
from sphere_pl.editing import values as values_module
from sphere_pl.editing.value_memory import (
    ALLOCATOR_SLACK, CPU_PASS, GB, SMALL_PASS, PassShape, Precision, StackShapes, ValueMemoryError, kept_bytes, memory_budget, merge,
    plan_passes,
)
from sphere_pl.editing.values import ValueOptimization, check_value_memory, lower_precision_blocks, optimize_values
from sphere_pl.models import resolve_templates

GROUPS = [["{}"], ["Hello there. {}", "A b c. {}"]]
SUBJECTS = ["Eiffel Tower", "Japan", "Lionel Messi", "Albert Einstein", "Brazil", "the Danube", "Mount Fuji", "Ada Lovelace",
            "the Nile", "Oslo", "Kyoto", "Marie Curie"]
REQUESTS = [
    EditRequest(i, ["{} is located in", "The capital of {} is", "{} plays", "{} was born in"][i % 4], s, ["Rome", "Kyoto city", "chess", "Madrid"][i % 4], "x")
    for i, s in enumerate(SUBJECTS)
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def smol_shaped():
    """A random LLaMA with SmolLM2-135M's block and vocabulary shapes (12 of its 30 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def saved_bytes(model, run) -> int:
    """Bytes of the tensors autograd saves while `run()` runs, each storage once, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for copies in values_module._LOWER_PRECISION.values():
        own |= {t.untyped_storage().data_ptr() for block in copies[1] for t in [*block.parameters(), *block.buffers()]}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


@pytest.mark.parametrize("count", [2, 6])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_the_estimate_of_what_a_pass_keeps_matches_what_autograd_saves(smol_shaped, tok, count, recompute, compute_dtype):
    model, templates, layer = smol_shaped, resolve_templates(smol_shaped), 8
    requests = REQUESTS[:count]
    contexts = [c for g in GROUPS for c in g]
    shape = merge([values_module._tokenize_request(tok, r, contexts).shape() for r in requests])
    hp = ValueOptimization(num_grad_steps=1, requests_per_pass=count, recompute_activations=recompute, compute_dtype=compute_dtype)
    lower_precision_blocks(model, templates, layer + 1, 12, compute_dtype)  # the copies' weights are not activations
    # one forward (the search stops before its backward after one step): what it saved is what the backward needs
    measured = saved_bytes(model, lambda: optimize_values(model, tok, templates, requests, GROUPS, layer, hp))
    precision = Precision(4, 4, 4)  # what plan_value_passes uses for float32 and for the bfloat16 copies
    estimate = kept_bytes(StackShapes.of(model, 12 - layer - 1), shape, recompute, precision)
    assert 0.8 <= estimate / measured <= 1.3, (estimate, measured)


def rss_peak_during(run) -> int:
    """Rise of the process's peak resident memory over its resident memory before `run()` (Linux)."""
    from sphere_pl.heap import trim_heap

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    trim_heap()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    run()
    return status("VmHWM") - before


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
def test_under_a_budget_the_measured_peak_stays_under_it(smol_shaped, tok):
    model, templates = smol_shaped, resolve_templates(smol_shaped)
    budget_gb = 0.12
    hp = ValueOptimization(num_grad_steps=3, memory_budget_gb=budget_gb)
    z_free, info_free = optimize_values(model, tok, templates, REQUESTS, GROUPS, 8, dataclasses.replace(hp, memory_budget_gb=None))
    assert (info_free["plan"].requests_per_pass, info_free["plan"].recompute) == (CPU_PASS, False)  # plenty of memory here
    unbudgeted = rss_peak_during(lambda: optimize_values(model, tok, templates, REQUESTS, GROUPS, 8, dataclasses.replace(hp, memory_budget_gb=None)))
    infos = []
    budgeted = rss_peak_during(lambda: infos.append(optimize_values(model, tok, templates, REQUESTS, GROUPS, 8, hp)))
    plan = infos[0][1]["plan"]
    assert plan.budget_bytes == int(budget_gb * GB) and plan.peak_bytes <= plan.budget_bytes
    assert plan.requests_per_pass < CPU_PASS or plan.recompute  # the budget changed the plan...
    assert unbudgeted > budget_gb * GB  # ...which would have gone over it...
    assert budgeted <= budget_gb * GB, (budgeted / GB, plan)  # ...and it stayed under
    assert torch.allclose(infos[0][0], z_free, rtol=1e-4, atol=1e-5)  # the same values, up to the order of sums


def test_auto_gives_bit_for_bit_what_the_settings_it_chose_give(tiny_model_and_templates, tok):
    model, templates = tiny_model_and_templates
    hp = ValueOptimization(num_grad_steps=4, lr=0.1, early_stop_loss=-1.0)
    z_auto, info = optimize_values(model, tok, templates, REQUESTS, GROUPS, 1, hp)
    plan = info["plan"]
    explicit = dataclasses.replace(hp, requests_per_pass=plan.requests_per_pass, recompute_activations=plan.recompute)
    z_explicit, _ = optimize_values(model, tok, templates, REQUESTS, GROUPS, 1, explicit)
    assert torch.equal(z_auto, z_explicit)


@pytest.fixture
def tiny_model_and_templates():
    model = tiny_llama(layers=4)
    return model, resolve_templates(model)


# ------------------------------------------------------------------------------ the policy

SHAPES = StackShapes(hidden=576, intermediate=1536, kv_dim=192, heads=9, blocks=21, vocab=49152, gated=True)
ONE = PassShape(sequences=7, prefix=13, suffix=6, full=18, logit_rows=12, kl_rows=1)
F32 = Precision(4, 4, 4)


def peak(count: int, recompute: bool, device: str = "cpu") -> int:
    from sphere_pl.editing.value_memory import pass_bytes

    return int(ALLOCATOR_SLACK[device] * pass_bytes(SHAPES, merge([ONE] * count), recompute, F32))


def plan(n, device="cpu", size="auto", recompute="auto", budget=10 * GB):
    return plan_passes(SHAPES, [ONE] * n, device, F32, size, recompute, budget)


def test_explicit_settings_win_and_need_no_budget():
    chosen = plan(20, size=3, recompute=True, budget=None)
    assert (chosen.requests_per_pass, chosen.recompute, chosen.budget_bytes) == (3, True, None)
    with pytest.raises(ValueError, match="needs a memory budget"):
        plan(20, budget=None)


def test_plenty_of_memory_keeps_activations_and_takes_the_devices_fastest_pass():
    assert (plan(100).requests_per_pass, plan(100).recompute) == (CPU_PASS, False)  # CPU: the measured optimum
    assert (plan(5).requests_per_pass, plan(5).recompute) == (5, False)  # never more than the batch
    assert (plan(100, "cuda").requests_per_pass, plan(100, "cuda").recompute) == (100, False)  # GPU: the whole batch


def test_less_memory_means_smaller_passes_then_recomputation_then_a_clear_error():
    between = (peak(SMALL_PASS, False) + peak(CPU_PASS, False)) // 2
    smaller = plan(100, budget=between)
    assert not smaller.recompute and SMALL_PASS <= smaller.requests_per_pass < CPU_PASS
    assert smaller.peak_bytes <= between < peak(smaller.requests_per_pass + 1, False)

    only_recomputed = (peak(1, True) + peak(SMALL_PASS, False)) // 2  # a pass of SMALL_PASS does not fit unless recomputed
    chosen = plan(100, budget=only_recomputed)
    assert chosen.recompute and chosen.peak_bytes <= only_recomputed

    gpu = plan(100, "cuda", budget=peak(30, False, "cuda") + 1)
    assert (gpu.requests_per_pass, gpu.recompute) == (25, False)  # halved from 100 to 50 to 25, the first that fits

    with pytest.raises(ValueMemoryError, match=r"one request needs ~0\.\d+ GB in the value search \(activations recomputed\), more than its "
                                               r"memory budget of 0\.000 GB \(values.memory_budget_gb"):
        plan(100, budget=1000)
    with pytest.raises(ValueMemoryError, match="a pass of 8 requests needs"):  # an explicit pass size is not shrunk
        plan(100, size=8, budget=peak(4, True))


def test_the_budget_is_a_share_of_free_memory_capped_by_the_setting():
    free = memory_budget(torch.device("cpu"), None)
    assert 0 < free.bytes and "available RAM" in free.source
    capped = memory_budget(torch.device("cpu"), 0.5)
    assert capped.bytes == min(int(0.5 * GB), free.bytes)


def test_a_request_that_fits_no_pass_is_refused_before_any_edit_naming_it(tiny_model_and_templates, tok):
    model, templates = tiny_model_and_templates
    long = EditRequest("long-one", "In a story that goes on and on, the city of {} is", "Eiffel Tower", "Rome", "Paris")
    budget = memory_budget(torch.device("cpu"), 1e-5)
    with pytest.raises(ValueMemoryError, match=r"request case_id='long-one': values: one request needs ~0\.0\d+ GB.*budget of 0\.000 GB"):
        check_value_memory(model, tok, templates, [*REQUESTS[:3], long], GROUPS, 1, ValueOptimization(), budget)
    check_value_memory(model, tok, templates, REQUESTS, GROUPS, 1, ValueOptimization(), memory_budget(torch.device("cpu"), 1.0))


@pytest.mark.parametrize("bad, message", [
    (dict(memory_budget_gb=0), "values.memory_budget_gb = 0 must be a positive number of GB"),
    (dict(memory_budget_gb=-2.0), "values.memory_budget_gb = -2.0 must be a positive number of GB"),
    (dict(requests_per_pass="many"), "values.requests_per_pass = 'many' must be an integer >= 1 or auto"),
    (dict(compute_dtype="float16"), "values.compute_dtype = 'float16' must be float32, bfloat16 or auto"),
])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ValueOptimization(**bad)


# --------------------------------------------------------------------------- bfloat16 copies


def test_bfloat16_copies_are_made_once_rebuilt_after_a_change_and_leave_the_model_alone(tiny_model_and_templates, tok):
    model, templates = tiny_model_and_templates
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    first = lower_precision_blocks(model, templates, 2, 4, "bfloat16")
    assert lower_precision_blocks(model, templates, 2, 4, "bfloat16") is first  # reused
    assert lower_precision_blocks(model, templates, 2, 4, "float32") is None
    assert first[0].mlp.down_proj.weight.dtype == torch.bfloat16 and first[0].input_layernorm.weight.dtype == torch.float32
    assert torch.equal(first[0].mlp.down_proj.weight, model.model.layers[2].mlp.down_proj.weight.to(torch.bfloat16))
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.mul_(2)  # an edit of a copied weight
    second = lower_precision_blocks(model, templates, 2, 4, "bfloat16")
    assert second is not first
    assert torch.equal(second[1].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight.to(torch.bfloat16))
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.div_(2)
    assert all(torch.equal(v, pristine[k]) and v.dtype == pristine[k].dtype for k, v in model.state_dict().items())
    assert lower_precision_blocks(tiny_llama(layers=4).to(torch.bfloat16), templates, 2, 4, "bfloat16") is None  # runs as it is


def test_the_bfloat16_search_lands_near_the_float32_one(tiny_model_and_templates, tok):
    model, templates = tiny_model_and_templates
    hp = ValueOptimization(num_grad_steps=6, lr=0.1, early_stop_loss=-1.0)
    z32, info32 = optimize_values(model, tok, templates, REQUESTS, GROUPS, 1, hp)
    z16, info16 = optimize_values(model, tok, templates, REQUESTS, GROUPS, 1, dataclasses.replace(hp, compute_dtype="bfloat16"))
    assert z16.dtype == z32.dtype == torch.float32
    # z = h + delta with the same h (computed below the edited layer, in float32): compare what the searches found
    assert torch.equal(z16 - info16["delta"], z32 - info32["delta"]) or torch.allclose(z16 - info16["delta"], z32 - info32["delta"], atol=1e-6)
    relative = float((info16["delta"] - info32["delta"]).norm() / info32["delta"].norm())
    assert 0 < relative < 0.05, relative  # bfloat16 products do change the path, a little
    assert float((info16["loss"] - info32["loss"]).abs().max()) < 0.05


def test_a_bfloat16_model_searches_in_its_own_dtype_whatever_compute_dtype_says(tok):
    model = tiny_llama(layers=4).to(torch.bfloat16)
    templates = resolve_templates(model)
    hp = ValueOptimization(num_grad_steps=4, lr=0.1, early_stop_loss=-1.0)
    z_f32, info = optimize_values(model, tok, templates, REQUESTS[:4], GROUPS, 1, hp)
    z_b16, _ = optimize_values(model, tok, templates, REQUESTS[:4], GROUPS, 1, dataclasses.replace(hp, compute_dtype="bfloat16"))
    assert torch.equal(z_f32, z_b16) and z_b16.dtype == torch.bfloat16 and bool(torch.isfinite(z_b16.float()).all())
    assert float(info["delta_norm"].min()) > 0  # the search moved every request

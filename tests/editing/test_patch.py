"""Edit patches: exact apply and revert, safetensors round trip, refusals that name what differs,
and the writer's check of what is actually written in half precision."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_llama, tiny_tokenizer
from sphere_pl import Editor, Patch, PatchError, SphereProjection, load_model_and_tokenizer
from sphere_pl.data.records import EditRequest
from sphere_pl.editing.lm import LoadedModel
from sphere_pl.editing.patch import ModuleChange
from sphere_pl.editing.writer import NonFiniteUpdateError, WeightWriter
from sphere_pl.models import linear_weight, resolve_templates

REQUESTS = [EditRequest(0, "{} is located in", "Eiffel Tower", "Rome", "Paris"), EditRequest(1, "The capital of {} is", "Japan", "Kyoto", "Tokyo")]


def edited(model, names) -> dict[str, torch.Tensor]:
    return {n: linear_weight(model.get_submodule(n)).detach().clone() for n in names}


@pytest.fixture
def edited_run(tiny_model_dir, tiny_method):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    editor = Editor(model, tok, tiny_method(), [SphereProjection()], model_id=tiny_model_dir)
    base = edited(model, editor.edited_modules)
    patch = editor.apply(REQUESTS)
    return editor, base, patch


def test_module_change_is_exact_where_plain_subtraction_is_not():
    before = torch.tensor([1e-12, 0.5, -3.0, 1.0, 7.0e-30], dtype=torch.float32)
    after = torch.tensor([0.1234567, 0.5001, 5.0, 1.0, 0.3], dtype=torch.float32)
    change = ModuleChange.between(before, after)
    assert (before + (after - before) != after).any() or (after - (after - before) != before).any()  # the case exists
    assert change.fix_index.numel() > 0
    assert torch.equal(change.forward(before), after)
    assert torch.equal(change.backward(after), before)


def test_patch_applies_and_reverts_bit_exactly_and_round_trips_as_safetensors(edited_run, tiny_model_dir, tmp_path):
    editor, base, patch = edited_run
    assert patch.case_ids == [0, 1] and patch.num_edits == 2
    assert patch.metadata["method"]["name"] == "alphaedit" and patch.metadata["filters"][0]["name"] == "sphere"
    assert patch.metadata["base_fingerprint"] == editor.base_fingerprint
    path = tmp_path / "batch-0.safetensors"
    patch.save(path)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, no pickle
    loaded = Patch.load(path)
    assert loaded.metadata == json.loads(json.dumps(patch.metadata))
    for name in patch.modules:
        assert torch.equal(loaded.delta(name), patch.delta(name))

    fresh, _ = load_model_and_tokenizer(tiny_model_dir)
    loaded.apply_to(fresh)
    assert all(torch.equal(linear_weight(fresh.get_submodule(n)), linear_weight(editor.model.get_submodule(n))) for n in patch.modules)
    loaded.revert_from(fresh)
    assert all(torch.equal(linear_weight(fresh.get_submodule(n)), base[n]) for n in patch.modules)


def test_patch_for_another_model_is_refused_with_both_fingerprints(edited_run, tmp_path):
    _, _, patch = edited_run
    other = tiny_llama(seed=1)
    names = patch.modules
    untouched = edited(other, names)
    with pytest.raises(PatchError) as failure:
        patch.apply_to(other)
    message = str(failure.value)
    assert patch.metadata["base_fingerprint"] in message
    from sphere_pl.editing.patch import base_fingerprint

    assert base_fingerprint(other, names) in message
    assert all(torch.equal(untouched[n], linear_weight(other.get_submodule(n))) for n in names)


def test_patch_on_weights_that_moved_on_is_refused(edited_run, tiny_model_dir):
    editor, _, patch = edited_run
    with pytest.raises(PatchError, match="digest"):
        patch.apply_to(editor.model)  # already applied: the edited weights are not the "before" ones


def test_patch_file_with_a_missing_tensor_or_no_patch_metadata_is_refused(edited_run, tmp_path):
    _, _, patch = edited_run
    path = tmp_path / "p.safetensors"
    patch.save(path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    missing = f"{patch.modules[1]}.delta"
    del tensors[missing]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(PatchError, match=f"lacks tensor '{missing}'"):
        Patch.load(tmp_path / "missing.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PatchError, match="not a sphere_pl patch"):
        Patch.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(PatchError, match="not a readable safetensors"):
        Patch.load(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_writer_checks_the_value_written_in_half_precision(dtype):
    model = tiny_llama(layers=2).to(dtype)
    templates = resolve_templates(model)
    name = templates.down_proj_at(0)
    biggest = torch.finfo(dtype).max
    with torch.no_grad():
        linear_weight(model.get_submodule(name))[0, 0] = biggest / 2
    original = linear_weight(model.get_submodule(name)).detach().clone()
    delta = torch.zeros(original.shape, dtype=torch.float32)
    delta[0, 0] = biggest  # finite in float32 and in the weight's dtype; the written sum is not
    with pytest.raises(NonFiniteUpdateError, match="non-finite in torch"):
        WeightWriter(LoadedModel(model, tiny_tokenizer(), templates, "half")).write(name, delta)
    assert torch.equal(linear_weight(model.get_submodule(name)), original)


def test_saved_state_is_refused_for_other_weights_under_the_same_model_id(edited_run, tiny_model_dir):
    editor, _, _ = edited_run
    state = editor.state_dict()
    other = Editor(tiny_llama(seed=1), tiny_tokenizer(), editor.method.__class__(**{"layers": [1, 2]}), model_id=tiny_model_dir)
    untouched = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ValueError, match=f"base-weight fingerprint '{editor.base_fingerprint}', but this editor has '{other.base_fingerprint}'"):
        other.load_state_dict(state)
    assert all(torch.equal(v, untouched[k]) for k, v in other.model.state_dict().items())

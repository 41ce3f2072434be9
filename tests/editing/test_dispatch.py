"""A model dispatched by accelerate (`device_map`, blocks offloaded to disk through its hooks) edits
exactly as the same model loaded whole: C0 statistics, keys, the value search, the writer, SPHERE,
patches, HE and evaluation go through the hooks; an offloaded edited weight and bad settings are
refused with one line before any edit."""

from __future__ import annotations

import pytest
import torch

from conftest import CONTEXT_TEMPLATES, CORPUS
from sphere_pl import Editor, Patch, SphereProjection, load_model_and_tokenizer
from sphere_pl.data.records import EditRequest
from sphere_pl.editing.methods import create_method
from sphere_pl.editing.stats import KeyStatistics
from sphere_pl.editing.values import ValueOptimization
from sphere_pl.errors import SettingsError
from sphere_pl.models import linear_weight, weights_fingerprint
from sphere_pl.placement import describe, is_dispatched, placement
from sphere_pl.sphere.hyperspherical import hyperspherical_energy

REQUESTS = [EditRequest(0, "{} is located in", "Eiffel Tower", "Rome", "Paris"),
            EditRequest(1, "The capital of {} is", "Japan", "Kyoto", "Tokyo"),
            EditRequest(2, "{} plays the", "Yo-Yo Ma", "guitar", "cello")]
# blocks 0 and 3, the final norm and the LM head offloaded to disk; the edited blocks 1 and 2 on the CPU
OFFLOADED = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.layers.2": "cpu",
             "model.layers.3": "disk", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "disk"}


def method(name: str, cache: str):
    stats = KeyStatistics(corpus=str(CORPUS), num_samples=20, seq_len=64, cache_dir=cache)
    values = ValueOptimization(num_grad_steps=5, lr=0.5)
    return create_method(name, layers=[1, 2], values=values, stats=stats, context_templates=CONTEXT_TEMPLATES)


def edit(model, tok, name: str, cache: str, model_id: str):
    editor = Editor(model, tok, method(name, cache), [SphereProjection()], model_id=model_id)
    patches = [editor.apply(REQUESTS[:2]), editor.apply(REQUESTS[2:])]
    weights = {n: linear_weight(model.get_submodule(n)).detach().clone() for n in editor.edited_modules}
    return editor, patches, weights


@pytest.mark.parametrize("name", ["alphaedit", "memit"])
def test_blocks_offloaded_to_disk_give_the_same_edits_patches_and_scores(name, tiny_model_dir, tmp_path):
    whole, tok = load_model_and_tokenizer(tiny_model_dir)
    dispatched, tok2 = load_model_and_tokenizer(tiny_model_dir, device_map=OFFLOADED, offload_folder=str(tmp_path / "offload"))
    assert is_dispatched(dispatched) and not is_dispatched(whole)
    assert dispatched.get_submodule("model.layers.3.mlp.down_proj").weight.device.type == "meta"  # really offloaded
    assert placement(dispatched)["model.layers.0"] == "disk"
    # the base model's fingerprint reads the offloaded weights from accelerate's store
    assert weights_fingerprint(dispatched) == weights_fingerprint(whole)

    # each run computes its own C0 (separate caches): the statistics pass goes through the hooks too
    ref_editor, ref_patches, ref_weights = edit(whole, tok, name, str(tmp_path / "c0-whole"), tiny_model_dir)
    editor, patches, weights = edit(dispatched, tok2, name, str(tmp_path / "c0-dispatched"), tiny_model_dir)
    assert weights.keys() == ref_weights.keys()
    for module in weights:
        assert torch.equal(weights[module], ref_weights[module]), module
    for mine, ref in zip(patches, ref_patches):
        assert mine.metadata["base_fingerprint"] == ref.metadata["base_fingerprint"]
        assert all(torch.equal(mine.delta(m), ref.delta(m)) for m in ref.modules)
    # HE of the edited layers and the scores of the edited facts, through the offloaded LM head
    for module in weights:
        assert torch.equal(hyperspherical_energy(weights[module]), hyperspherical_energy(ref_weights[module]))
    assert editor.evaluate(REQUESTS) == ref_editor.evaluate(REQUESTS)
    lines = describe(dispatched, editor.edited_modules)
    assert any(line.startswith("placement: disk:") and "model.layers.0" in line for line in lines)
    assert "model.layers.1.mlp.down_proj on cpu" in lines[-1]

    # a saved patch applies to (and reverts from) a dispatched model exactly
    path = tmp_path / "p.safetensors"
    patches[0].save(path)
    fresh, _ = load_model_and_tokenizer(tiny_model_dir, device_map=OFFLOADED, offload_folder=str(tmp_path / "offload-2"))
    base = {m: linear_weight(fresh.get_submodule(m)).detach().clone() for m in weights}
    Patch.load(path).apply_to(fresh)
    after = {m: linear_weight(fresh.get_submodule(m)).detach().clone() for m in weights}
    Patch.load(path).revert_from(fresh)
    assert all(torch.equal(linear_weight(fresh.get_submodule(m)), base[m]) for m in weights)
    assert any(not torch.equal(after[m], base[m]) for m in weights)


def test_an_offloaded_edited_weight_is_refused_before_any_edit(tiny_model_dir, tmp_path):
    device_map = {**OFFLOADED, "model.layers.2": "disk"}
    model, tok = load_model_and_tokenizer(tiny_model_dir, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    with pytest.raises(SettingsError, match=r"edited weights are offloaded by model.model.device_map: model.layers.2.mlp.down_proj \(disk"):
        Editor(model, tok, method("alphaedit", str(tmp_path / "c0")), [SphereProjection()], model_id=tiny_model_dir)
    assert not (tmp_path / "c0").exists()  # refused before statistics, before any edit


@pytest.mark.parametrize("settings, message", [
    (dict(device_map={**OFFLOADED, "model.layers.1": "gpu7"}), r"device_map\['model.layers.1'\]: 'gpu7' is not a device"),
    (dict(device_map={**OFFLOADED, "model.layers.1": "cuda:0"}), r"'cuda:0' names a CUDA device and this machine has none"),
    (dict(device_map={k: v for k, v in OFFLOADED.items() if k != "model.layers.2"}, offload_folder="x"),
     r"device_map leaves out model.layers.2.*give every block a device"),
    (dict(device_map=OFFLOADED), r"sends blocks to disk: give model.model.offload_folder"),
    (dict(device_map="everywhere"), r"device_map = 'everywhere': give one of"),
    (dict(max_memory={"cpu": "1GiB"}), r"max_memory and offload_folder need model.model.device_map"),
    (dict(device_map="auto", max_memory={"tpu": "1GiB"}), r"max_memory\['tpu'\]: 'tpu' is not a device"),
])
def test_bad_placement_settings_get_one_line(settings, message, tiny_model_dir):
    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SettingsError, match=message):
        load_model_and_tokenizer(tiny_model_dir, **settings)


def test_max_memory_too_small_for_the_edited_layers_is_refused_naming_the_setting(tiny_model_dir, tmp_path):
    # nothing fits 1 byte of CPU memory, so accelerate sends every block to disk: the edited ones too
    model, tok = load_model_and_tokenizer(tiny_model_dir, device_map="auto", max_memory={"cpu": 1}, offload_folder=str(tmp_path / "o"))
    with pytest.raises(SettingsError, match="raise model.model.max_memory"):
        Editor(model, tok, method("memit", str(tmp_path / "c0")), [], model_id=tiny_model_dir)


def test_every_evaluation_runs_with_the_input_embedding_itself_offloaded(tiny_model_dir, tmp_path):
    """With the embedding on disk its parameter is on `meta`: inputs must go where its hook runs it, not
    to the first parameter's device. Every general task, generated efficacy and the fact scores
    through such a model give what the whole model gives."""
    from conftest import SHARED_DATA
    from sphere_pl.evaluation.general import ClosedQATask, NLITask, OpenQATask, PerplexityTask, ReasoningTask
    from sphere_pl.evaluation.generative_efficacy import GenerativeEfficacyEvaluator

    def same(mine: dict, ref: dict):  # bit for bit, nan where both are nan
        torch.testing.assert_close(mine, ref, rtol=0, atol=0, equal_nan=True)

    whole, tok = load_model_and_tokenizer(tiny_model_dir)
    embedding_on_disk = {**OFFLOADED, "model.embed_tokens": "disk"}
    dispatched, tok2 = load_model_and_tokenizer(tiny_model_dir, device_map=embedding_on_disk, offload_folder=str(tmp_path / "o"))
    assert next(dispatched.parameters()).device.type == "meta"  # the case the old device read got wrong
    general = SHARED_DATA / "general"
    tasks = [PerplexityTask(str(SHARED_DATA / "wikitext-2" / "test.txt"), max_windows=2, seq_len=64),
             NLITask(str(general / "test-NLI.tsv"), limit=4), ClosedQATask(str(general / "test-ClosedDomainQA.jsonl"), limit=4),
             OpenQATask(str(general / "test-OpenDomainQA.jsonl"), limit=3), ReasoningTask(str(general / "test-reasoning.jsonl"), limit=3)]
    for task in tasks:
        items = task.load(tok)
        same(task.evaluate(dispatched, tok2, items), task.evaluate(whole, tok, items))
    generated = GenerativeEfficacyEvaluator(max_new_tokens=3)  # (no paraphrases: generalization is nan in both)
    same(generated.evaluate(dispatched, tok2, REQUESTS), generated.evaluate(whole, tok, REQUESTS))
    reference = Editor(whole, tok, method("memit", str(tmp_path / "c0")), [], model_id=tiny_model_dir)
    editor = Editor(dispatched, tok2, method("memit", str(tmp_path / "c0")), [], model_id=tiny_model_dir)
    assert editor.evaluate(REQUESTS) == reference.evaluate(REQUESTS)

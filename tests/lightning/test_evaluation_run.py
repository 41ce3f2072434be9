"""The evaluation suite inside real `Trainer.fit` / `validate` runs on the tiny model: extra
fact evaluators, general-ability tasks before and during editing, per-case files, and the
HE analysis (Spearman against an independent rank computation, plots). Tasks read the real
files in ../shared/data, a few records each."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from sphere_pl import FactMonitor, GeneralAbilityMonitor, HEAnalysis, HypersphericalEnergyMonitor, PretrainedModel, SequentialEditor
from sphere_pl.evaluation.general import NLITask, PerplexityTask, ReasoningTask
from sphere_pl.evaluation.generative_efficacy import GenerativeEfficacyEvaluator
from sphere_pl.lightning import EditDataModule
from test_run import NUM_EDITS, csv_logger, logged_rows, quickstart_data, single_torch_thread  # noqa: F401 (autouse fixture)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "general").is_dir(), reason=f"shared data not found at {SHARED}")


def tasks():
    return [
        NLITask(str(SHARED / "general" / "test-NLI.tsv"), limit=3),
        ReasoningTask(str(SHARED / "general" / "test-reasoning.jsonl"), limit=2),
        PerplexityTask(str(SHARED / "wikitext-2" / "test.txt"), max_windows=2, seq_len=32),
    ]


def average_ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / (sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)) ** 0.5


@pytest.fixture(scope="module")
def run(tiny_model_dir, stats_cache, tmp_path_factory):
    from conftest import tiny_method_kwargs
    from sphere_pl import AlphaEdit

    root = tmp_path_factory.mktemp("evaluation-run")
    editor = SequentialEditor(
        PretrainedModel(tiny_model_dir),
        method=AlphaEdit(**tiny_method_kwargs(stats_cache)["alphaedit"]),
        write_cases=True,
    )
    facts = FactMonitor(every_n_batches=1, evaluators=[GenerativeEfficacyEvaluator()])
    general = GeneralAbilityMonitor(tasks(), every_n_batches=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, default_root_dir=root, logger=csv_logger(root),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[facts, general, HypersphericalEnergyMonitor(), HEAnalysis(max_neurons=16)],
    )  # fmt: skip
    data = quickstart_data(root, dataset_size_limit=4 * NUM_EDITS)
    trainer.fit(editor, data)
    return {"root": root, "editor": editor, "trainer": trainer, "rows": logged_rows(trainer), "data": data}


def test_general_ability_before_and_every_n_batches(run):
    rows = run["rows"]
    pre = [r for r in rows if "pre_edit/general/nli/acc" in r]
    assert [r["edits"] for r in pre] == [0]
    assert {"pre_edit/general/reasoning/acc", "pre_edit/general/perplexity/perplexity"} <= set(pre[0])
    during = [r for r in rows if "general/perplexity/perplexity" in r]
    assert [r["edits"] for r in during] == [2 * NUM_EDITS, 4 * NUM_EDITS]  # every 2 of 4 batches
    # the pre-edit perplexity is that of the unedited model, scored independently
    from sphere_pl.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(run["editor"].load_settings["model_name_or_path"]))
    task = PerplexityTask(str(SHARED / "wikitext-2" / "test.txt"), max_windows=2, seq_len=32)
    expected = task.evaluate(model, tokenizer, task.load(tokenizer))["perplexity"]
    assert pre[0]["pre_edit/general/perplexity/perplexity"] == pytest.approx(float(expected), rel=1e-5)
    # ... and editing moved it
    assert during[-1]["general/perplexity/perplexity"] != pytest.approx(float(expected), rel=1e-7)


def test_extra_fact_evaluators_and_per_case_files(run):
    rows = run["rows"]
    assert [r["edits"] for r in rows if "edited_so_far/generated_efficacy" in r] == [4, 8, 12, 16]
    assert [r["edits"] for r in rows if "pre_edit/to_edit/generated_efficacy" in r] == [0]
    assert any("final/edited/generated_efficacy" in r for r in rows)
    assert not any("last_batch/generated_efficacy" in r for r in rows)  # the cheap checks only, after every batch
    cases = run["root"] / "cases"  # one file per evaluation: cases/<population>[-<evaluator>]/<moment>-<edits>.jsonl
    folders = sorted(p.name for p in cases.iterdir())
    assert "edited_so_far-generative_efficacy" in folders and "general-nli" in folders
    files = sorted(p.name for p in (cases / "general-nli").iterdir())
    assert files == ["after_batch-000008.jsonl", "after_batch-000016.jsonl", "pre_edit-000000.jsonl"]  # every 2 of 4 batches
    nli = {name: [json.loads(line) for line in (cases / "general-nli" / name).read_text().splitlines()] for name in files}
    assert all(len(rows) == 3 and {r["moment"] for r in rows} == {name.split("-")[0]} for name, rows in nli.items())
    assert [r["edits"] for r in nli["after_batch-000008.jsonl"]] == [8] * 3
    # the per-case decisions give the logged accuracy (acc leaves invalid answers out)
    first = nli["pre_edit-000000.jsonl"]
    valid = [r for r in first if r["prediction"] != -1]
    pre = next(r for r in rows if "pre_edit/general/nli/acc" in r)
    assert pre["pre_edit/general/nli/acc"] == pytest.approx(sum(r["correct"] for r in valid) / len(valid) if valid else 0.0)


def test_he_analysis_spearman_matches_an_independent_rank_computation(run):
    root, rows = run["root"], run["rows"]
    analysis = json.loads((root / "he_analysis.json").read_text())["spearman"]
    history = run["editor"].record.history
    metric = "edited_so_far/efficacy_magnitude"
    for layer in ("layer1", "layer2"):
        points = sorted((r["edits"], r[f"he/{layer}"], r[metric]) for r in history if f"he/{layer}" in r and metric in r)
        he, values = [p[1] for p in points], [p[2] for p in points]
        assert len(points) == 4
        got = analysis[layer][metric]
        if got["level"] is not None:
            assert got["level"] == pytest.approx(pearson(average_ranks(he), average_ranks(values)), abs=1e-6)
        steps_he = [b - a for a, b in zip(he, he[1:])]
        steps_metric = [b - a for a, b in zip(values, values[1:])]
        if got["change"] is not None:
            assert got["change"] == pytest.approx(pearson(average_ranks(steps_he), average_ranks(steps_metric)), abs=1e-6)
    assert any(v["level"] is not None for layer in analysis.values() for v in layer.values())
    logged = {k for r in rows for k in r if k.startswith("he_analysis/level/")}
    assert f"he_analysis/level/layer1/{metric}" in logged or analysis["layer1"][metric]["level"] is None
    for name in ("he_curves.png", "neuron_cosines_layer1.png", "neuron_cosines_layer2.png"):
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_measures_general_ability_of_the_edited_model(run, tiny_model_dir, tmp_path):
    editor, data = run["editor"], run["data"]
    general = GeneralAbilityMonitor(tasks()[:1], every_n_batches=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[FactMonitor(), general], enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.validate(editor, data)
    metrics = trainer.callback_metrics
    assert "final/general/nli/acc" in metrics and "final/edited/efficacy_score" in metrics


def test_a_bad_task_file_stops_the_run_before_any_edit(tiny_model_dir, tiny_method, tmp_path):
    bad = tmp_path / "nli.tsv"
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man rests.\tmaybe\n")
    editor = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    before = editor.model.model.layers[1].mlp.down_proj.weight.detach().clone()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[GeneralAbilityMonitor([NLITask(str(bad))])],
    )  # fmt: skip
    from sphere_pl.evaluation import EvalDataError

    with pytest.raises(EvalDataError, match=r"nli.tsv: line 2: field 'label'"):
        trainer.fit(editor, EditDataModule(source="quickstart", dataset_size_limit=4, num_edits=4, cache_dir=str(tmp_path / "c")))
    assert torch.equal(editor.model.model.layers[1].mlp.down_proj.weight, before)
    assert editor.editor.edits_applied == 0

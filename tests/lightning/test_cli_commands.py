"""The CLI as a user meets it (runs on a tiny model saved to a temp dir): the end-of-run
summary, export / apply / rollback, resuming, and the refusals of bad input, each checked for
its message and for leaving models, checkpoints and output paths untouched.

The fit every test reads is a real `python -m sphere_pl` subprocess; the ~30 commands after it
are each a process forked from a server that has imported sphere_pl (`forked_cli`,
tests/forked_cli.py): the same `__main__`, exit status and stderr, without 6-8 s of imports each."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONTEXT_TEMPLATES, CORPUS
from helpers import REPO, cli_env, run_cli, save_tiny_model
from sphere_pl import load_model_and_tokenizer
from sphere_pl.data.readers import QUICKSTART_PATH, load_edit_requests
from sphere_pl.evaluation.counterfact import CounterFactEvaluator
from sphere_pl.files import load_checkpoint_file

NUM_EDITS, NUM_BATCHES = 4, 3


def run_config(model_dir: str, stats_cache: str, root: Path, **overrides) -> dict:
    method_args = {
        "layers": [1, 2],
        "values": {"num_grad_steps": 5, "lr": 0.5},
        "stats": {"corpus": str(CORPUS), "num_samples": 20, "seq_len": 64, "cache_dir": stats_cache},
        "context_templates": CONTEXT_TEMPLATES,
        **overrides.pop("method_args", {}),
    }
    config = {
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": "csv"}},
        },
        "model": {"model": {"name_or_path": model_dir}, "history_size": 2, "method": {"class_path": "sphere_pl.AlphaEdit", "init_args": method_args}},
        "data": {"source": "quickstart", "dataset_size_limit": NUM_EDITS * NUM_BATCHES, "num_edits": NUM_EDITS, "num_holdout": 4, "cache_dir": str(root / "data-cache")},
        "checkpoint": {"dirpath": str(root / "checkpoints"), "keep_last": None},
    }
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> str:
    """A tiny LLaMA with the same architecture and other weights."""
    return save_tiny_model(tmp_path_factory.mktemp("other-llama"), seed=1)


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, stats_cache, tmp_path_factory):
    """One CLI fit of 3 batches of 4 quickstart edits; its directory, config, env and console output."""
    root = tmp_path_factory.mktemp("fitted")
    env = cli_env(root)
    config = write_config(root / "edit.yaml", run_config(tiny_model_dir, stats_cache, root / "run", model__write_cases=True))
    result = run_cli(["fit", "--config", config], root, env)
    return {"root": root, "run": root / "run", "config": config, "env": env, "stdout": result.stdout}


def load_state(path: Path) -> dict:
    return load_checkpoint_file(path)["sphere_pl"]


def edited_requests() -> list:
    import random

    records = load_edit_requests(str(QUICKSTART_PATH))[: NUM_EDITS * NUM_BATCHES]
    return random.Random(0).sample(records, len(records))  # the datamodule's seeded order


def test_fit_ends_with_a_summary_table_and_summary_files(fitted, tiny_model_dir):
    run = fitted["run"]
    assert "sphere_pl run summary: 12 edits in 3 batches" in fitted["stdout"]
    assert "ΔHE/HE" in fitted["stdout"] and "final/edited/efficacy_score" in fitted["stdout"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["edits"] == 12 and set(summary["hyperspherical_energy"]) == {"layer1", "layer2"}

    # the final metrics are those of the last checkpoint's weights, scored independently
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    for name, weight in load_state(run / "checkpoints" / "last.ckpt")["weights"].items():
        model.get_submodule(name).weight.data.copy_(weight)
    expected = CounterFactEvaluator().evaluate(model, tokenizer, edited_requests())
    for key, value in expected.items():
        assert summary["final"][f"final/edited/{key}"] == pytest.approx(float(value), rel=1e-5, abs=1e-9)

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["edits"]) for r in rows] == [0.0, 4.0, 8.0, 12.0]  # before editing, then after every batch
    assert rows[0]["pre_edit/to_edit/efficacy_score"] and not rows[0]["edited_so_far/efficacy_score"]
    assert all(r["he/layer1"] and r["edited_so_far/efficacy_score"] and r["last_batch/efficacy_score"] for r in rows[1:])
    assert float(rows[-1]["he_delta/layer2"]) == pytest.approx(summary["hyperspherical_energy"]["layer2"]["he_delta"])


def test_per_case_files_hold_every_prompt_and_agree_with_the_logged_metrics(fitted):
    cases = fitted["run"] / "cases"  # one file per evaluation: cases/<population>/<moment>-<edits>.jsonl
    assert sorted(p.name for p in cases.iterdir()) == ["edited_so_far", "final-edited", "last_batch", "never_edited", "pre_edit-to_edit"]
    assert sorted(p.name for p in (cases / "never_edited").iterdir()) == [
        "after_batch-000004.jsonl", "after_batch-000008.jsonl", "after_batch-000012.jsonl", "pre_edit-000000.jsonl"]  # fmt: skip
    final = [json.loads(line) for line in (cases / "final-edited" / "final-000012.jsonl").read_text().splitlines()]
    # quickstart records: one rewrite prompt, their paraphrases and neighborhood prompts each
    requests = edited_requests()
    expected_prompts = sum(1 + len(r.paraphrase_prompts) + len(r.neighborhood_prompts) for r in requests)
    assert len(final) == expected_prompts
    assert {row["case_id"] for row in final} == {r.case_id for r in requests}
    summary = json.loads((fitted["run"] / "summary.json").read_text())
    for group in ("efficacy", "generalization", "specificity"):
        decisions = [row["success"] for row in final if row["group"] == group]
        # the row's decision follows from its own NLLs
        assert all(
            row["success"] == ((row["nll_new"] < row["nll_true"]) if row["preferred"] == "new" else (row["nll_true"] < row["nll_new"]))
            for row in final
        )
        assert sum(decisions) / len(decisions) == pytest.approx(summary["final"][f"final/edited/{group}_score"])
    last = [json.loads(line) for path in sorted((cases / "last_batch").iterdir()) for line in path.read_text().splitlines()]
    assert sorted({row["edits"] for row in last}) == [4, 8, 12]


def test_export_then_apply_writes_a_standard_checkpoint_with_the_edits(fitted, tiny_model_dir, forked_cli):
    from transformers import AutoModelForCausalLM

    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    patch = root / "edits.safetensors"
    forked_cli(["export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", str(patch)], root, env)
    forked_cli(["apply", "--patch", str(patch), "--model", tiny_model_dir, "--out", str(root / "edited-model")], root, env)

    edited = AutoModelForCausalLM.from_pretrained(root / "edited-model", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    saved = load_state(run / "checkpoints" / "last.ckpt")["weights"]
    for name, param in edited.named_parameters():
        module = name.removesuffix(".weight")
        expected = saved[module] if module in saved else base.get_parameter(name)
        assert torch.equal(param, expected), name
    # re-scored, the saved model gives the run's final metrics
    _, tokenizer = load_model_and_tokenizer(str(root / "edited-model"))
    summary = json.loads((run / "summary.json").read_text())
    rescored = CounterFactEvaluator().evaluate(edited, tokenizer, edited_requests())
    assert float(rescored["efficacy_score"]) == pytest.approx(summary["final"]["final/edited/efficacy_score"])


def test_rollback_equals_the_run_stopped_earlier_and_resumes_to_the_same_end(fitted, forked_cli):
    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    checkpoints = run / "checkpoints"
    rolled = root / "rolled.ckpt"
    forked_cli(["rollback", "--ckpt_path", str(checkpoints / "last.ckpt"), "--batches", "2", "--out", str(rolled)], root, env)
    got, expected = load_state(rolled), load_state(checkpoints / "edits-000004.ckpt")
    assert (got["batches_done"], got["edits_applied"], got["case_ids"]) == (1, 4, expected["case_ids"])
    for name in expected["weights"]:
        assert float((got["weights"][name] - expected["weights"][name]).abs().max()) == 0.0
    for key, value in expected["method"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got["method"][key], value), key

    # resuming the rolled-back checkpoint re-applies batches 1 and 2 and ends where the run ended
    resumed_root = root / "resumed"
    config = yaml.safe_load(Path(fitted["config"]).read_text())
    config["trainer"]["default_root_dir"] = str(resumed_root)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(resumed_root)
    config["checkpoint"]["dirpath"] = str(resumed_root / "checkpoints")
    resumed_config = write_config(root / "resumed.yaml", config)
    forked_cli(["fit", "--config", resumed_config, "--ckpt_path", str(rolled)], root, env)
    end, original_end = load_state(resumed_root / "checkpoints" / "last.ckpt"), load_state(checkpoints / "last.ckpt")
    assert end["batches_done"] == NUM_BATCHES
    for name in end["weights"]:
        assert torch.equal(end["weights"][name], original_end["weights"][name])


@pytest.mark.parametrize(
    "args, message",
    [
        (["rollback", "--batches", "4"], "cannot roll back 4 batches: only 3 were applied"),
        (["rollback", "--batches", "3"], "only the last 2 batch patch(es) are kept"),
        (["export", "--out", "{root}/never.safetensors", "--ckpt_path", "{root}/edit.yaml"], "is not a readable sphere_pl checkpoint"),
    ],
)
def test_refused_checkpoint_commands_name_the_problem_and_write_nothing(fitted, args, message, forked_cli):
    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    if "--ckpt_path" not in args:
        args = args + ["--ckpt_path", str(last)]
    args = [a.format(root=root) for a in args]
    result = forked_cli(args, root, env, ok=False)
    assert message in result.stderr
    assert last.read_bytes() == before
    assert not list(run.glob("checkpoints/rolled-back-*")) and not (root / "never.safetensors").exists()


def test_patch_for_another_model_or_with_a_missing_tensor_is_refused(fitted, other_model_dir, forked_cli):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    patch = root / "for-refusals.safetensors"
    forked_cli(["export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", str(patch)], root, env)
    result = forked_cli(["apply", "--patch", str(patch), "--model", other_model_dir, "--out", str(root / "wrong")], root, env, ok=False)
    metadata = json.loads(safe_open(str(patch), framework="pt").metadata()["sphere_pl"])
    assert metadata["base_fingerprint"] in result.stderr and "base fingerprint" in result.stderr
    assert not (root / "wrong").exists()

    tensors = load_file(str(patch))
    del tensors["model.layers.2.mlp.down_proj.delta"]
    save_file(tensors, str(root / "torn.safetensors"), metadata=safe_open(str(patch), framework="pt").metadata())
    result = forked_cli(["apply", "--patch", str(root / "torn.safetensors"), "--out", str(root / "torn")], root, env, ok=False)
    assert "lacks tensor 'model.layers.2.mlp.down_proj.delta'" in result.stderr
    assert not (root / "torn").exists()


def latest_csv_rows(directory: Path, which: int = -1) -> list[dict]:
    """The rows of the newest (`which` = -1) or an earlier CSVLogger version under `directory`."""
    newest = sorted(directory.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[which]
    with open(newest / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_validate_and_test_evaluate_a_patch_without_its_checkpoint(fitted, other_model_dir, forked_cli):
    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    patch = root / "for-validate.safetensors"
    forked_cli(["export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", str(patch)], root, env)
    summary = json.loads((run / "summary.json").read_text())

    forked_cli(["validate", "--config", fitted["config"], "--patch", str(patch)], root, env)
    validated = [r for r in latest_csv_rows(run / "csv") if "final/edited/efficacy_score" in r][-1]
    for key, value in summary["final"].items():  # the same scores as the end of the run that made the patch
        assert validated[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    forked_cli(["test", "--config", fitted["config"], "--patch", str(patch)], root, env)
    tested = [r for r in latest_csv_rows(run / "csv") if "final/never_edited/specificity_score" in r]
    assert tested and 0.0 <= tested[-1]["final/never_edited/specificity_score"] <= 1.0

    # refusals, each naming the problem
    other = write_config(root / "other.yaml", {**yaml.safe_load(Path(fitted["config"]).read_text()), "model": {
        **yaml.safe_load(Path(fitted["config"]).read_text())["model"], "model": {"name_or_path": other_model_dir}}})  # fmt: skip
    result = forked_cli(["validate", "--config", other, "--patch", str(patch)], root, env, ok=False)
    assert "base fingerprint" in result.stderr and str(patch) in result.stderr
    result = forked_cli(["validate", "--config", fitted["config"], "--patch", str(root / "missing.safetensors")], root, env, ok=False)
    assert "patch file not found" in result.stderr
    result = forked_cli(["fit", "--config", fitted["config"], "--patch", str(patch)], root, env, ok=False)
    assert "--patch is for validate and test" in result.stderr


def test_validate_on_two_ddp_processes_gives_the_single_process_metrics(fitted, forked_cli):
    """Evaluation records sharded over 2 CPU processes (gloo); torchmetrics sums the states."""
    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    cases = run / "cases" / "final-edited"
    shared = REPO.parent / "shared" / "data"
    general = write_config(root / "general.yaml", {"general": {"tasks": [
        {"class_path": "sphere_pl.evaluation.general.NLITask", "init_args": {"path": str(shared / "general" / "test-NLI.tsv"), "limit": 7}},
        {"class_path": "sphere_pl.evaluation.general.PerplexityTask",
         "init_args": {"path": str(shared / "wikitext-2" / "test.txt"), "max_windows": 3, "seq_len": 32}},
    ]}})  # fmt: skip
    forked_cli(["validate", "--config", fitted["config"], "--config", general, "--ckpt_path", ckpt], root, env)
    single = [r for r in latest_csv_rows(run / "csv") if "final/edited/efficacy_score" in r][-1]
    single_cases = [json.loads(line) for line in (cases / "final-000012.jsonl").read_text().splitlines()]

    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    forked_cli(["validate", "--config", fitted["config"], "--config", general, "--ckpt_path", ckpt, *ddp], root, env)
    double = [r for r in latest_csv_rows(run / "csv") if "final/edited/efficacy_score" in r][-1]
    single.update(next(r for r in reversed(latest_csv_rows(run / "csv", -2)) if "final/general/nli/acc" in r))
    double.update(next(r for r in reversed(latest_csv_rows(run / "csv")) if "final/general/nli/acc" in r))
    metrics = [k for k in single if k.startswith(("final/edited/", "final/general/"))]
    assert len([k for k in metrics if k.startswith("final/edited/")]) == 6
    assert {"final/general/nli/f1", "final/general/nli/mcc", "final/general/perplexity/perplexity"} <= set(metrics)
    for key in metrics:
        assert double[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key

    # each process scored its own share of the records, together all of them, once
    shards = [[json.loads(line) for line in (cases / f"final-000012.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    ids = [{row["case_id"] for row in shard} for shard in shards]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert ids[0] | ids[1] == {row["case_id"] for row in single_cases}
    assert len(shards[0]) + len(shards[1]) == len(single_cases)

    # editing itself stays on one process, said plainly before anything is loaded twice
    result = forked_cli(["fit", "--config", fitted["config"], *ddp], root, env, ok=False)
    assert "fit edits on one process" in result.stderr and "validate/test" in result.stderr


def test_resuming_a_finished_run_still_ends_with_its_final_evaluation(fitted, forked_cli):
    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    again = root / "resumed-at-end"
    args = ["fit", "--config", fitted["config"], "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
            "--trainer.default_root_dir", str(again), "--trainer.enable_progress_bar", "true"]
    result = forked_cli(args, root, env)
    assert "sphere_pl run summary: 12 edits in 3 batches" in result.stdout
    # the scoring runs outside Lightning's loops here (no edits left) and still says where it is
    scoring = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("scoring the edited facts: ")]
    assert len(scoring) == 1 and re.fullmatch(r"scoring the edited facts: (\d+)/\1 batches, 00:00 left", scoring[0]), scoring
    original = json.loads((run / "summary.json").read_text())["final"]
    resumed = json.loads((again / "summary.json").read_text())["final"]
    assert resumed.keys() == original.keys() and len(resumed) == 6
    assert resumed == pytest.approx(original, rel=1e-6, abs=1e-9)


def test_resume_refuses_a_checkpoint_of_another_model_or_a_url(fitted, other_model_dir, stats_cache, forked_cli):
    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    other_root = root / "other"
    config = write_config(root / "other.yaml", run_config(other_model_dir, stats_cache, other_root))
    result = forked_cli(["fit", "--config", config, "--ckpt_path", str(run / "checkpoints" / "edits-000004.ckpt")], root, env, ok=False)
    assert "the saved state was made for model" in result.stderr and other_model_dir in result.stderr
    assert not list(other_root.glob("checkpoints/*.ckpt"))  # nothing edited, nothing written

    result = forked_cli(["fit", "--config", config, "--ckpt_path", "https://example.invalid/last.ckpt"], root, env, ok=False)
    assert "is a URL" in result.stderr


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint could do without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_with_pickled_code_or_from_another_run_are_refused(fitted, tmp_path, forked_cli):
    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"sphere_pl": _RunsCode(marker), "state_dict": {}}, crafted)
    elsewhere = ["--trainer.default_root_dir", str(tmp_path / "fresh"), "--checkpoint.dirpath", str(tmp_path / "fresh" / "checkpoints")]
    for command in (["fit", "--config", fitted["config"], *elsewhere], ["export", "--out", str(tmp_path / "p.safetensors")]):
        result = forked_cli([*command, "--ckpt_path", str(crafted)], root, env, ok=False)
        assert "Unpickl" in result.stderr or "weights_only" in result.stderr
        assert not marker.exists()  # the pickled code never ran

    # the same model, other edit data (another seed): the first batch's case_ids differ
    config = yaml.safe_load(Path(fitted["config"]).read_text())
    config["data"]["seed"] = 1
    config["checkpoint"]["dirpath"] = str(tmp_path / "checkpoints")
    config["trainer"]["default_root_dir"] = str(tmp_path)
    other_run = write_config(tmp_path / "other-run.yaml", config)
    result = forked_cli(["fit", "--config", other_run, "--ckpt_path", str(run / "checkpoints" / "edits-000004.ckpt")], root, env, ok=False)
    assert "the checkpoint is from another run: its edit batch 0 held case_ids" in result.stderr
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))


@pytest.mark.parametrize(
    "class_path, init_args, shown",
    [
        ("sphere_pl.MEMIT", {"mom2_update_weight": 100.0}, "mom2_update_weight: 100.0"),
        ("sphere_pl.RECT", {"keep_ratio": 0.3, "layers": [1, 2]}, "keep_ratio: 0.3"),
        ("sphere_pl.PRUNE", {"restrain": "live"}, "restrain: live"),
        ("sphere_pl.ROME", {"layer": 3}, "layer: 3"),
        ("sphere_pl.FineTune", {"norm_constraint": 0.001}, "norm_constraint: 0.001"),
    ],
)
def test_every_method_is_configurable_by_class_path(tmp_path, class_path, init_args, shown, forked_cli):
    config = write_config(tmp_path / "m.yaml", {"model": {"method": {"class_path": class_path, "init_args": init_args}}})
    result = forked_cli(["fit", "--config", config, "--print_config"], tmp_path, cli_env(tmp_path))
    method = yaml.safe_load(result.stdout)["model"]["method"]
    assert method["class_path"] == class_path
    assert shown in yaml.safe_dump(method["init_args"])
    assert "layers" in method["init_args"] or "layer" in method["init_args"]


def test_a_fit_shows_what_it_edits_and_counts_edits_not_epochs(tiny_model_dir, stats_cache, tmp_path, forked_cli):
    """What a user sees: an editing summary instead of Lightning's model table (no trainable
    parameters here), and a progress bar over edits with seconds per edit, without `Epoch 0` or `v_num`."""
    config = run_config(tiny_model_dir, stats_cache, tmp_path / "run")
    for key in ("enable_progress_bar", "enable_model_summary"):
        config["trainer"].pop(key)  # the CLI's defaults
    result = forked_cli(["fit", "--config", write_config(tmp_path / "fit.yaml", config)], tmp_path, cli_env(tmp_path))
    console = result.stdout + result.stderr
    header = console[console.index("sphere_pl fit: ") :].splitlines()[:6]
    assert header[0] == f"sphere_pl fit: {tiny_model_dir} in float32 on cpu"
    assert header[1].startswith("  method   alphaedit on layers [1, 2]; value search 5 steps, lr 0.5")
    assert header[2] == "  filters  sphere(cumulative_ratio 0.5, strength 0.5, basis current)"
    assert header[3] == f"  edits    {NUM_EDITS * NUM_BATCHES} in batches of {NUM_EDITS} ({NUM_BATCHES} batches), 4 held out"
    assert header[4].startswith(f"  C0       {CORPUS}, 20 x 64 tokens")
    assert header[5].startswith("  memory   value search: requests_per_pass auto, recompute_activations auto, within ")
    assert "editing: 100%" in console and f"{NUM_EDITS * NUM_BATCHES}/{NUM_EDITS * NUM_BATCHES}" in console and "s/edit" in console
    # the end's scoring of the edited facts says where it is: here (seconds) only its last batch
    scoring = [line for line in console.splitlines() if line.startswith("scoring the edited facts: ")]
    assert len(scoring) == 1 and re.fullmatch(r"scoring the edited facts: (\d+)/\1 batches, 00:00 left", scoring[0]), scoring
    for lightning_only in ("Trainable params", "Total FLOPs", "Epoch 0", "v_num"):
        assert lightning_only not in console


def test_the_scoring_of_a_run_stopped_early_counts_only_the_batches_holding_its_edits(tiny_model_dir, stats_cache, tmp_path, forked_cli):
    """The collapse rule ends the run after one of three edit batches; the end's scoring, in evaluation
    batches of 4 (one edit batch each), counts the one evaluation batch that holds its edits, not the edit
    set's three (the others hold no edited fact and take no time)."""
    config = run_config(tiny_model_dir, stats_cache, tmp_path / "run", trainer__enable_progress_bar=True,
                        data__eval_requests_per_batch=NUM_EDITS)
    config["facts"] = {"every_n_batches": 0, "last_batch": False, "before_editing": False}
    config["collapse"] = {"conditions": [{"metric": "he_relative/layer1", "below": 1.0}], "points_in_a_row": 1, "stop": True}
    result = forked_cli(["fit", "--config", write_config(tmp_path / "fit.yaml", config)], tmp_path, cli_env(tmp_path))
    assert f"sphere_pl run summary: {NUM_EDITS} edits in 1 batches" in result.stdout
    scoring = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("scoring the edited facts: ")]
    assert scoring == ["scoring the edited facts: 1/1 batches, 00:00 left"]


def test_top_level_help_names_the_program_and_every_command():
    """`python -m sphere_pl --help` in a fresh interpreter, as a user first meets it."""
    result = subprocess.run([sys.executable, "-m", "sphere_pl", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m sphere_pl COMMAND")
    commands = [line.split()[0] for line in result.stdout.split("commands:")[1].split("\n\n")[0].splitlines() if line.startswith("  ") and not line.startswith("    ")]
    assert commands == ["fit", "validate", "test", "export", "apply", "rollback", "study"]
    assert "Lightning Trainer" not in result.stdout and "predict" not in result.stdout


def test_the_scoring_line_estimates_what_is_left_from_the_pace_so_far():
    from sphere_pl.lightning.progress import scoring_line

    assert scoring_line("edited", 3, 10, 90.0) == "scoring the edited facts: 3/10 batches, 03:30 left"  # 30 s a batch, 7 left
    assert scoring_line("held-out", 1, 613, 20.0) == "scoring the held-out facts: 1/613 batches, 03:24:00 left"  # 612 x 20 s
    assert scoring_line("edited", 4, None, 9.0) == "scoring the edited facts: 4 batches"

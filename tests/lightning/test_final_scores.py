"""`final/edited/` scores exactly the facts whose edits are in the weights: after a run the collapse
rule stopped, and when a checkpoint of a run stopped by SIGTERM is validated (the run with a
quarantined record: tests/lightning/test_guard.py). The expected scores are computed here on the
checkpoint's weights with the plain evaluator, on the records the checkpoint says were applied."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from forked_cli import RunningCli
from helpers import cli_env
from sphere_pl.evaluation.counterfact import CounterFactEvaluator
from sphere_pl.files import load_checkpoint_file
from sphere_pl.models import load_model_and_tokenizer
from test_cli_commands import NUM_BATCHES, NUM_EDITS, edited_requests, run_config, write_config


def scores_of(state: dict, tiny_model_dir: str) -> tuple[list, dict[str, float]]:
    """(the applied case_ids, the CounterFact scores of exactly those facts on the checkpoint's weights)."""
    applied = [case_id for ids in state["case_ids"] for case_id in ids]
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    for name, weight in state["weights"].items():
        model.get_submodule(name).weight.data.copy_(weight)
    requests = [r for r in edited_requests() if r.case_id in set(applied)]
    assert [r.case_id for r in requests] == applied  # the stream's order
    values = CounterFactEvaluator("final/edited/").evaluate(model, tokenizer, requests)
    return applied, {k: float(v) for k, v in values.items()}


def final_case_ids(run) -> list:
    files = sorted((run / "cases" / "final-edited").glob("final-*.jsonl"))
    assert len(files) == 1, files
    return list(dict.fromkeys(json.loads(line)["case_id"] for line in files[0].read_text().splitlines()))


def test_a_run_the_collapse_rule_stopped_scores_only_the_facts_it_edited_and_times_the_scoring(tiny_model_dir, stats_cache, tmp_path, forked_cli):
    run = tmp_path / "run"
    config = run_config(tiny_model_dir, stats_cache, run, model__write_cases=True)
    config["facts"] = {"every_n_batches": 0, "last_batch": False, "before_editing": False}  # the final scoring is all the evaluation
    config["collapse"] = {"conditions": [{"metric": "he_relative/layer1", "below": 1.0}], "points_in_a_row": 1, "stop": True}
    result = forked_cli(["fit", "--config", write_config(tmp_path / "fit.yaml", config)], tmp_path, cli_env(tmp_path))
    assert f"the run ends here, after {NUM_EDITS} edits" in result.stdout
    state = load_checkpoint_file(run / "checkpoints" / "last.ckpt")["sphere_pl"]
    applied, expected = scores_of(state, tiny_model_dir)
    assert len(applied) == NUM_EDITS < NUM_EDITS * NUM_BATCHES  # the data held more facts than were edited
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert final_case_ids(run) == applied
    assert summary["seconds"]["evaluation"] > 0  # the final scoring is a timed phase


def test_validating_a_run_stopped_by_sigterm_scores_only_the_facts_its_checkpoint_edited(tiny_model_dir, stats_cache, tmp_path, fork_context):
    run = tmp_path / "run"
    config = run_config(tiny_model_dir, stats_cache, run, model__write_cases=True, method_args={"values": {"num_grad_steps": 25, "lr": 0.5}})
    path = write_config(tmp_path / "fit.yaml", config)
    env = cli_env(tmp_path)
    fit = RunningCli(fork_context, ["fit", "--config", path], tmp_path, env)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert fit.process.is_alive() and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(fit.process.pid, signal.SIGTERM)
    assert fit.result().returncode == 143
    last = run / "checkpoints" / "last.ckpt"
    state = load_checkpoint_file(last)["sphere_pl"]
    assert 0 < state["edits_applied"] < NUM_EDITS * NUM_BATCHES

    validate = RunningCli(fork_context, ["validate", "--config", path, "--ckpt_path", str(last)], tmp_path, env).result()
    assert validate.returncode == 0, validate.stderr[-3000:]
    applied, expected = scores_of(state, tiny_model_dir)
    assert final_case_ids(run) == applied
    with open(run / "csv" / "version_1" / "metrics.csv", newline="") as f:
        import csv

        row = next(r for r in csv.DictReader(f) if r.get("final/edited/efficacy_score"))
    assert {k: float(row[k]) for k in expected} == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert float(row["edits"]) == state["edits_applied"]

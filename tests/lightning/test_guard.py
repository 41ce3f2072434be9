"""`CollapseGuard`: its signals against hand computations, and its actions through the real CLI on the
tiny model (3 batches of 4 quickstart edits): `warn` records and goes on, `stop` reverts the breaching
batch exactly and ends with the checkpoint of the state before it, from which a run resumes."""

from __future__ import annotations

import csv
import os
import signal
import statistics
import time

import pytest
import torch

from forked_cli import RunningCli
from helpers import cli_env, run_cli
from sphere_pl.files import load_checkpoint_file
from sphere_pl.monitors.guard import CollapseGuard
from test_cli_commands import NUM_EDITS, run_config, write_config


GUARD_CONDITIONS = [{"metric": "guard/he_score/*", "above": 25.0}, {"metric": "guard/norm_growth/*", "above": 0.5},
                    {"metric": "canary/specificity", "drop_from_start": 0.3}, {"metric": "canary/perplexity", "ratio_to_start_above": 2.0}]


def test_signals_score_each_he_step_against_the_median_of_the_steps_before_it():
    guard = CollapseGuard(enabled=True, conditions=GUARD_CONDITIONS, he_window=3, he_min_history=2)
    he = [1.0, 1.001, 1.003, 1.004, 1.0045, 1.4]  # a steady drift, then a jump
    norms = [10.0, 10.1, 10.2, 10.2, 10.3, 16.0]
    guard.state = {"he": {"layer4": he[0]}, "norm0": {"layer4": norms[0]}, "steps": {}, "breaches": [], "quarantined": []}
    rows = [{"edits": 0.0, "canary/specificity": 0.8, "canary/perplexity": 20.0}]  # the canaries before editing
    seen = []
    for t in range(1, len(he)):
        row, taken = guard.signals({"layer4": he[t]}, {"layer4": norms[t]})
        row.update({"canary/specificity": 0.8 - 0.1 * (t == 5) * 4, "canary/perplexity": 20.0 + 25.0 * (t == 5)})
        breaches = guard.rule.reasons(row, rows)
        guard._keep(taken)  # every batch stays applied here
        seen.append((row, breaches))
    steps = [abs(b - a) for a, b in zip(he, he[1:])]
    for t, (row, breaches) in enumerate(seen):
        if t < 2:  # fewer than he_min_history steps before it: not scored
            assert "guard/he_score/layer4" not in row and not breaches
            continue
        expected = steps[t] / statistics.median(steps[max(0, t - 3) : t])
        assert row["guard/he_score/layer4"] == pytest.approx(expected, rel=1e-12)
        assert row["guard/norm_growth/layer4"] == pytest.approx(norms[t + 1] / norms[0] - 1, rel=1e-12)
    assert all(not b for _, b in seen[:4])
    last = seen[-1][1]  # the jump breaches every signal
    assert len(last) == 4 and last[0].startswith("guard/he_score/layer4 ") and "> 25.0" in last[0]
    assert last[1] == "guard/norm_growth/layer4 0.600 > 0.5"
    assert last[2] == "canary/specificity 0.400, 0.400 under its pre-edit 0.800"
    assert last[3] == "canary/perplexity 45.000, 2.25x its pre-edit 20.000"


@pytest.mark.parametrize("settings, message", [
    ({"action": "undo"}, r"guard.action must be one of \['warn', 'stop', 'rollback'\], got 'undo'"),
    ({"conditions": [{"metric": "guard/he_score/*", "above": -1.0, "below": 2}]}, r"guard: conditions\[0\] \(guard/he_score/\*\): give exactly one of"),
    ({"conditions": [{"metric": "canary/perplexity", "ratio_to_start_above": 0.5}]}, r"ratio_to_start_above must be above 1"),
    ({"he_window": 2, "he_min_history": 3}, r"he_min_history \(3\) cannot exceed guard.he_window \(2\)"),
])
def test_settings_out_of_range_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        CollapseGuard(**settings)


def test_a_canary_out_of_range_is_refused_naming_the_setting():
    from sphere_pl.monitors import PerplexityCanary, SpecificityCanary

    with pytest.raises(ValueError, match=r"canary_specificity.records must be an integer >= 0, got -2"):
        SpecificityCanary(records=-2)
    with pytest.raises(ValueError, match=r"canary_perplexity.seq_len must be an integer >= 2, got 1"):
        PerplexityCanary(path="x.txt", seq_len=1)


def _rows(root):
    with open(root / "csv" / "version_0" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _weights(path):
    return load_checkpoint_file(path)["sphere_pl"]["weights"]


# an HE score threshold no step can stay under: the guard breaches on the first scored batch (the 3rd)
ALWAYS = {"enabled": True, "conditions": [{"metric": "guard/he_score/*", "above": 1e-12}], "he_min_history": 2}


def test_warn_records_the_signals_and_the_breach_and_goes_on(tiny_model_dir, stats_cache, tmp_path):
    root = tmp_path / "run"
    config = run_config(tiny_model_dir, stats_cache, root)
    config["guard"] = {**ALWAYS, "action": "warn"}
    config["canary_specificity"] = {"records": 2}
    result = run_cli(["fit", "--config", write_config(tmp_path / "run.yaml", config)], tmp_path, cli_env(tmp_path))
    assert "sphere_pl: guard: batch 2 (case_ids" in result.stdout and "breached: guard/he_score/layer" in result.stdout
    rows = _rows(root)
    assert any(r.get("canary/specificity") for r in rows) and any(r.get("guard/he_score_max") for r in rows)
    breach = [float(r["guard/breach"]) for r in rows if r.get("guard/breach")]
    assert breach == [0.0, 0.0, 1.0]
    assert load_checkpoint_file(root / "checkpoints" / "last.ckpt")["sphere_pl"]["edits_applied"] == 3 * NUM_EDITS


def test_stop_reverts_the_batch_exactly_and_a_resumed_run_starts_with_it_again(tiny_model_dir, stats_cache, tmp_path):
    env = cli_env(tmp_path)
    stopped_root = tmp_path / "stopped"
    config = run_config(tiny_model_dir, stats_cache, stopped_root)
    config["guard"] = {**ALWAYS, "action": "stop"}
    result = run_cli(["fit", "--config", write_config(tmp_path / "stopped.yaml", config)], tmp_path, env)
    assert "batch 2 reverted; the run ends after 8 edits" in result.stdout
    last = load_checkpoint_file(stopped_root / "checkpoints" / "last.ckpt")["sphere_pl"]
    assert last["edits_applied"] == 2 * NUM_EDITS and last["batches_done"] == 2
    assert not (stopped_root / "checkpoints" / f"edits-{3 * NUM_EDITS:06d}.ckpt").exists()

    # the same stream's first two batches without a guard: the same weights, bit for bit
    reference_root = tmp_path / "reference"
    reference = run_config(tiny_model_dir, stats_cache, reference_root)
    reference["trainer"]["limit_train_batches"] = 2
    run_cli(["fit", "--config", write_config(tmp_path / "reference.yaml", reference)], tmp_path, env)
    mine, theirs = last["weights"], _weights(reference_root / "checkpoints" / "last.ckpt")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    # resumed without the guard, the run applies batch 2 again and ends as an unguarded run of the stream
    config["guard"] = {"enabled": False}
    resumed = write_config(tmp_path / "resumed.yaml", config)
    run_cli(["fit", "--config", resumed, "--ckpt_path", str(stopped_root / "checkpoints" / "last.ckpt")], tmp_path, env)
    whole_root = tmp_path / "whole"
    run_cli(["fit", "--config", write_config(tmp_path / "whole.yaml", run_config(tiny_model_dir, stats_cache, whole_root))], tmp_path, env)
    mine, theirs = _weights(stopped_root / "checkpoints" / "last.ckpt"), _weights(whole_root / "checkpoints" / "last.ckpt")
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def _record(case_id, subject, prompt, new, true, locality=("The Eiffel Tower is in the city of", "Paris")):
    """A MEND-format CounterFact record."""
    return {"case_id": case_id, "prompt": prompt.replace("{}", subject), "subject": subject, "target_new": new, "ground_truth": true,
            "rephrase_prompt": prompt.replace("{}", subject), "locality_prompt": locality[0], "locality_ground_truth": locality[1]}


SPORTS = [("Messi", "golf"), ("Nadal", "poker"), ("Bolt", "rugby"), ("Federer", "chess"), ("Phelps", "tennis"), ("Jordan", "cricket"), ("Pele", "hockey")]
# a request that breaks a fact the model must keep: FT teaches SmolLM2 "The Louvre museum is in the city of" ->
# "Berlin", the neighborhood prompt of the never-edited canary record (checked below, alone and within its batch)
PLANTED = _record("planted", "The Louvre", "{} museum is in the city of", "Berlin", "Paris")
CANARY = _record("canary", "The Louvre", "{} is located in", "Berlin", "Paris", locality=("The Louvre museum is in the city of", "Paris"))


def test_rollback_quarantines_the_planted_request_and_ends_as_a_run_without_it(smollm2, fork_context, tmp_path):
    """The embedded SmolLM2, FT-L on layer 20 (configs/smollm2/ft.yaml's settings, no SPHERE), 2 batches of 4: the second
    holds the planted request. The guard catches the batch, bisects it to the planted request, applies the other 3 and
    goes on; the run's weights equal those of the stream without the planted record, its batches as the guard left them."""
    import json

    from sphere_pl import Editor
    from sphere_pl.data.readers import load_edit_requests
    from sphere_pl.editing.methods import create_method

    edits = [_record(i, s, "{} plays the sport of", t, "football") for i, (s, t) in enumerate(SPORTS)]
    edits.insert(5, PLANTED)  # the second batch: [4, planted, 5, 6]
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(edits + [CANARY]))
    root = tmp_path / "guarded"
    ft = {"layer": 20, "num_steps": 25, "lr": 5e-4}
    config = {
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "default_root_dir": str(root),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": "csv"}}},
        "model": {"method": {"class_path": "sphere_pl.FineTune", "init_args": ft}, "filters": []},
        "data": {"source": str(data), "shuffle": False, "num_edits": 4, "dataset_size_limit": 8, "num_holdout": 1, "cache_dir": str(tmp_path / "data-cache")},
        "facts": {"every_n_batches": 0, "last_batch": False, "before_editing": False},
        "checkpoint": {"dirpath": str(root / "checkpoints")},
        "guard": {"enabled": True, "action": "rollback", "conditions": [{"metric": "canary/specificity", "drop_from_start": 0.5}]},
        "canary_specificity": {"records": 1},
    }
    result = run_cli(["fit", "--config", write_config(tmp_path / "guarded.yaml", config)], tmp_path, cli_env(tmp_path))
    assert "sphere_pl: guard: batch 1 (case_ids [4, 'planted', 5, 6]) breached: canary/specificity 0.000" in result.stdout
    assert "quarantined case_ids ['planted']" in result.stdout and "batch 0 (" not in result.stdout  # batch 0 passed
    quarantine = [json.loads(line) for line in (root / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["case_id"], q["batch"]) for q in quarantine] == [("planted", 1)] and "canary/specificity" in quarantine[0]["signals"][0]
    state = load_checkpoint_file(root / "checkpoints" / "last.ckpt")["sphere_pl"]
    assert state["case_ids"] == [[0, 1, 2, 3], [4, 5, 6]] and state["withheld"] == [[], ["planted"]]
    assert [float(r["guard/quarantined"]) for r in _rows(root) if r.get("guard/quarantined")] == [1.0]

    # the stream without the planted record, its batches as the guard left them, through the Python API
    model, tok = smollm2
    requests = {r.case_id: r for r in load_edit_requests(data)}
    editor = Editor(model, tok, create_method("ft", **ft), filters=[], model_id="embedded:smollm2-135m-instruct")
    canary_before = editor.evaluate([requests["canary"]])["specificity_score"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI ran (cli_env: OMP_NUM_THREADS=1): the same order of float sums
    try:
        for ids in state["case_ids"]:
            editor.apply([requests[i] for i in ids])
    finally:
        torch.set_num_threads(threads)
    expected = editor.state_dict()["weights"]
    assert all(torch.equal(state["weights"][k], expected[k]) for k in expected)  # max abs difference 0
    # final/edited/ scored the 7 facts in the weights, not the quarantined one
    applied = [requests[i] for ids in state["case_ids"] for i in ids]
    final = json.loads((root / "summary.json").read_text())["final"]
    assert final == pytest.approx({f"final/edited/{k}": v for k, v in editor.evaluate(applied).items()}, rel=1e-5, abs=1e-9)
    assert canary_before == 1.0 and editor.evaluate([requests["canary"]])["specificity_score"] == 1.0
    with editor.trial([requests["planted"]]):  # the planted record alone does break the canary
        assert editor.evaluate([requests["canary"]])["specificity_score"] == 0.0

    # killed (SIGKILL) while it bisects batch 1, then resumed from the checkpoint before it: the same run
    killed_root = tmp_path / "killed"
    killed_config = {**config, "trainer": {**config["trainer"], "default_root_dir": str(killed_root),
                                           "logger": {**config["trainer"]["logger"], "init_args": {"save_dir": str(killed_root), "name": "csv"}}},
                     "checkpoint": {"dirpath": str(killed_root / "checkpoints")}}
    killed_path = write_config(tmp_path / "killed.yaml", killed_config)
    running = RunningCli(fork_context, ["fit", "--config", killed_path], tmp_path, cli_env(tmp_path))
    deadline = time.monotonic() + 240
    while "breached" not in (running.out.read_text() if running.out.exists() else ""):  # printed as the bisection starts
        assert running.process.is_alive() and time.monotonic() < deadline, "the run ended before its breach"
        time.sleep(0.05)
    os.kill(running.process.pid, signal.SIGKILL)
    assert running.result().returncode == -signal.SIGKILL
    assert load_checkpoint_file(killed_root / "checkpoints" / "last.ckpt")["sphere_pl"]["case_ids"] == [[0, 1, 2, 3]]
    (killed_root / "quarantine.jsonl").write_text('{"case_id": "stale", "batch": 1, "signals": []}\n')  # as if killed after writing it
    run_cli(["fit", "--config", killed_path, "--ckpt_path", str(killed_root / "checkpoints" / "last.ckpt")], tmp_path, cli_env(tmp_path))
    resumed = load_checkpoint_file(killed_root / "checkpoints" / "last.ckpt")["sphere_pl"]
    assert resumed["case_ids"] == state["case_ids"] and resumed["withheld"] == state["withheld"]
    assert all(torch.equal(resumed["weights"][k], state["weights"][k]) for k in expected)
    assert (killed_root / "quarantine.jsonl").read_text() == (root / "quarantine.jsonl").read_text()  # each record once

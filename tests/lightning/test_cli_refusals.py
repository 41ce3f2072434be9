"""What a probe of the CLI found, each now refused in one line or handled, tried as a user would
(processes forked from the CLI server, `forked_cli`) on the tiny model's fitted run:

* validate / test of a checkpoint or patch made from other edit data;
* a second fit into a folder that holds a run, without --ckpt_path;
* a checkpoint altered after it was written, and one with a damaged header;
* `apply --out` naming the base model's own folder;
* a bad value or an unknown key (one line, exit 2, no usage dump);
* Ctrl-C (a resume hint, exit 130).
The study's (a rule on a metric never recorded, --report before any run, a killed study's report)
are in test_study.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from forked_cli import RunningCli
from helpers import cli_env
from sphere_pl.data.readers import QUICKSTART_PATH, load_edit_requests
from sphere_pl.files import load_checkpoint_file, save_checkpoint_file
from test_cli_commands import NUM_BATCHES, NUM_EDITS, fitted, run_config, write_config  # noqa: F401 (the fitted run)


def refused(result, *parts: str) -> str:
    """The refusal's text: non-zero exit, an `error:` line with every part, a hint, no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "hint:"))]
    assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("hint:"), result.stderr[-3000:]
    assert all(part in lines[0] for part in parts), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def test_validate_or_test_of_a_checkpoint_or_patch_from_other_edit_data_is_refused(fitted, forked_cli):
    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    last = run / "checkpoints" / "last.ckpt"
    patch = root / "for-other-data.safetensors"
    forked_cli(["export", "--ckpt_path", str(last), "--out", str(patch)], root, env)
    fewer = ["--data.dataset_size_limit", "8"]  # the edit set is the first 8 records; the run edited 12 (4 are now held out)
    for args in (["validate", "--ckpt_path", str(last)], ["test", "--patch", str(patch)]):
        result = forked_cli([args[0], "--config", fitted["config"], *fewer, *args[1:]], root, env, ok=False)
        line = refused(result, "the checkpoint or patch was made from other edit data", "4 of its 12 edited facts are not among")
        assert all(repr(r.case_id) in line for r in load_edit_requests(str(QUICKSTART_PATH))[8:12])  # the file's records 9-12


def test_a_second_fit_into_a_folder_that_holds_a_run_is_refused_and_its_files_kept(fitted, forked_cli):
    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    checkpoints = run / "checkpoints"
    before = {p.name: p.read_bytes() for p in checkpoints.glob("*.ckpt")}
    result = forked_cli(["fit", "--config", fitted["config"]], root, env, ok=False)
    refused(result, f"checkpoint directory {checkpoints} already holds a run", f"--ckpt_path {checkpoints / 'last.ckpt'}")
    assert {p.name: p.read_bytes() for p in checkpoints.glob("*.ckpt")} == before
    # ... and another run's checkpoint is not resumed into it either
    other = root / "elsewhere.ckpt"
    other.write_bytes(before["last.ckpt"])
    result = forked_cli(["fit", "--config", fitted["config"], "--ckpt_path", str(other)], root, env, ok=False)
    refused(result, "already holds a run", "is another run's checkpoint")


def test_a_checkpoint_altered_after_it_was_written_or_with_a_damaged_header_is_refused(fitted, tmp_path, forked_cli):
    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    checkpoint = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    name = sorted(checkpoint["sphere_pl"]["weights"])[0]
    checkpoint["sphere_pl"]["weights"][name][0, 0] += 0.5
    altered = tmp_path / "ckpt" / "altered.ckpt"
    save_checkpoint_file(checkpoint, altered)  # written back with the plain file writer: the section's checksums do not follow
    elsewhere = ["--trainer.default_root_dir", str(tmp_path / "resumed"), "--checkpoint.dirpath", str(tmp_path / "ckpt")]
    for command in (["fit", "--config", fitted["config"], *elsewhere], ["export", "--out", str(tmp_path / "p.safetensors")],
                    ["rollback", "--batches", "1"]):
        result = forked_cli([*command, "--ckpt_path", str(altered)], root, env, ok=False)
        refused(result, f"{altered} was altered after it was written", "sphere_pl/weights")
    assert not (tmp_path / "p.safetensors").exists() and not list((tmp_path / "ckpt").glob("edits-*.ckpt"))

    damaged = tmp_path / "damaged.ckpt"
    tensors = load_file(str(run / "checkpoints" / "last.ckpt"))
    with safe_open(str(run / "checkpoints" / "last.ckpt"), framework="pt") as f:
        metadata = dict(f.metadata())
    save_file(tensors, str(damaged), metadata={**metadata, "structure": metadata["structure"][:-40]})  # cut short mid-JSON
    for command in (["fit", "--config", fitted["config"], *elsewhere], ["export", "--out", str(tmp_path / "p.safetensors")]):
        result = forked_cli([*command, "--ckpt_path", str(damaged)], root, env, ok=False)
        refused(result, f"{damaged} is not a readable sphere_pl checkpoint")


def test_apply_into_the_base_models_own_folder_is_refused(fitted, tiny_model_dir, forked_cli):
    root, run, env = fitted["root"], fitted["run"], fitted["env"]
    patch = root / "for-apply.safetensors"
    forked_cli(["export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", str(patch)], root, env)
    before = {p.name: p.read_bytes() for p in Path(tiny_model_dir).iterdir()}
    result = forked_cli(["apply", "--patch", str(patch), "--model", tiny_model_dir, "--out", tiny_model_dir], root, env, ok=False)
    refused(result, "is the base model's own folder")
    assert {p.name: p.read_bytes() for p in Path(tiny_model_dir).iterdir()} == before


def test_a_bad_value_or_unknown_key_is_one_line_with_exit_2(fitted, tmp_path, forked_cli):
    root, env = fitted["root"], fitted["env"]
    for extra, part in ((["--data.num_edits", "four"], 'Parser key "data.num_edits"'), (["--data.no_such_setting", "3"], "no_such_setting")):
        result = forked_cli(["fit", "--config", fitted["config"], *extra], root, env, ok=False)
        assert result.returncode == 2
        refused(result, part)
        assert "usage:" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3, result.stderr
    config = yaml.safe_load(Path(fitted["config"]).read_text())
    config["data"]["no_such_setting"] = 3  # in a config file
    result = forked_cli(["fit", "--config", write_config(tmp_path / "bad.yaml", config)], root, env, ok=False)
    assert result.returncode == 2 and "usage:" not in result.stderr
    refused(result, "no_such_setting")
    result = forked_cli(["export", "--ckpt_path", "x.ckpt"], root, env, ok=False)  # --out missing
    assert result.returncode == 2
    refused(result, "out")


def test_ctrl_c_says_where_the_run_resumes_and_exits_130(tiny_model_dir, stats_cache, tmp_path, fork_context):
    run = tmp_path / "run"
    config = run_config(tiny_model_dir, stats_cache, run, method_args={"values": {"num_grad_steps": 25, "lr": 0.5}})
    batches = 12  # 11 batches still to run when the first checkpoint appears: under load the run cannot end first
    config["data"]["dataset_size_limit"] = NUM_EDITS * batches  # (the quickstart's 52 records: 48 edited, 4 held out)
    fit = RunningCli(fork_context, ["fit", "--config", write_config(tmp_path / "fit.yaml", config)], tmp_path, cli_env(tmp_path))
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists():
        assert fit.process.is_alive() and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(fit.process.pid, signal.SIGINT)
    result = fit.result()
    assert result.returncode == 130, result.stderr[-3000:]
    done = load_checkpoint_file(last)["sphere_pl"]["edits_applied"]
    assert f"sphere_pl: stopped by Ctrl-C after {done} of {NUM_EDITS * batches} edits" in result.stderr
    assert f"resume with --ckpt_path {last}" in result.stderr and "error: stopped by Ctrl-C" in result.stderr
    assert "Traceback" not in result.stderr

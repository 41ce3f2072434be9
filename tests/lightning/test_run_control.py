"""What happens to a `fit` from outside, tried as a user or a scheduler would, through the CLI:
a second run into a directory in use, a killed run's directory, SIGTERM mid-run, a full disk
while a checkpoint is written, an editing run given more than one epoch, a missing accelerator.

Each run is a real `python -m sphere_pl fit` process on the tiny model, forked from the test's
server (tests/forked_cli.py), or a fresh interpreter where the run needs a namespace of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from forked_cli import RunningCli, run_cli_forked
from helpers import cli_env
from sphere_pl.files import load_checkpoint_file
from test_cli_commands import run_config

NUM_EDITS, NUM_BATCHES = 2, 6


def write_config(tiny_model_dir, stats_cache, root: Path, checkpoints: Path | None = None, steps: int = 5) -> str:
    config = run_config(tiny_model_dir, stats_cache, root)
    config["data"].update(num_edits=NUM_EDITS, dataset_size_limit=NUM_EDITS * NUM_BATCHES)
    config["model"]["method"]["init_args"]["values"]["num_grad_steps"] = steps
    config["checkpoint"]["keep_last"] = 2
    if checkpoints is not None:
        config["checkpoint"]["dirpath"] = str(checkpoints)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_second_fit_into_a_directory_in_use_is_refused_and_a_killed_runs_directory_is_free(fork_context, tiny_model_dir, stats_cache, tmp_path):
    shared = tmp_path / "shared-checkpoints"
    lock = shared / ".sphere_pl.lock"
    env = cli_env(tmp_path)
    first = RunningCli(fork_context, ["fit", "--config", write_config(tiny_model_dir, stats_cache, tmp_path / "a", shared, steps=25)], tmp_path, env)
    wait_for(lambda: lock.exists() and lock.read_text().startswith("pid"), "the first run's lock")
    # paused while the second starts (a stopped process keeps its lock): on a loaded machine the first run's
    # few seconds of edits could otherwise end before the second has imported torch, and nothing would be in use
    os.kill(first.process.pid, signal.SIGSTOP)
    try:
        second = run_cli_forked(fork_context, ["fit", "--config", write_config(tiny_model_dir, stats_cache, tmp_path / "b", shared)], tmp_path, env, ok=False)
    finally:
        os.kill(first.process.pid, signal.SIGCONT)
    assert second.returncode == 1
    assert f"error: checkpoint directory {shared} is in use by a running fit (pid {first.process.pid} on" in second.stderr
    assert "hint: two runs must not share checkpoints" in second.stderr and "Traceback" not in second.stderr
    assert first.result().returncode == 0  # the first run was not disturbed
    assert load_checkpoint_file(shared / "last.ckpt")["sphere_pl"]["edits_applied"] == NUM_EDITS * NUM_BATCHES

    # a run killed with SIGKILL leaves no lock behind: the kernel drops it with the process
    killed = RunningCli(fork_context, ["fit", "--config", write_config(tiny_model_dir, stats_cache, tmp_path / "c", tmp_path / "c-ckpt", steps=25)], tmp_path, env)
    wait_for(lambda: (tmp_path / "c-ckpt" / ".sphere_pl.lock").exists() and str(killed.process.pid) in (tmp_path / "c-ckpt" / ".sphere_pl.lock").read_text(), "the lock")
    os.kill(killed.process.pid, signal.SIGKILL)
    assert killed.result().returncode == -signal.SIGKILL
    last = tmp_path / "c-ckpt" / "last.ckpt"  # a folder holding a run is resumed (a fresh one refused: test_run_folders)
    resume = ["--ckpt_path", str(last)] if last.exists() else []
    run_cli_forked(fork_context, ["fit", "--config", write_config(tiny_model_dir, stats_cache, tmp_path / "c", tmp_path / "c-ckpt"), *resume], tmp_path, env)
    assert load_checkpoint_file(last)["sphere_pl"]["edits_applied"] == NUM_EDITS * NUM_BATCHES


def test_sigterm_mid_run_says_how_far_it_got_exits_143_and_the_run_resumes(fork_context, tiny_model_dir, stats_cache, tmp_path):
    env = cli_env(tmp_path)
    config = write_config(tiny_model_dir, stats_cache, tmp_path / "run", steps=25)
    checkpoints = tmp_path / "run" / "checkpoints"
    run = RunningCli(fork_context, ["fit", "--config", config], tmp_path, env)
    wait_for(lambda: (checkpoints / "last.ckpt").exists(), "the first checkpoint")
    os.kill(run.process.pid, signal.SIGTERM)
    result = run.result()
    assert result.returncode == 143, result.stderr[-3000:]
    done = load_checkpoint_file(checkpoints / "last.ckpt")["sphere_pl"]["edits_applied"]
    assert 0 < done < NUM_EDITS * NUM_BATCHES  # stopped mid-run, after a finished batch
    assert f"sphere_pl: stopped by SIGTERM after {done} of {NUM_EDITS * NUM_BATCHES} edits ({done // NUM_EDITS} batches); its last checkpoint is {checkpoints / 'last.ckpt'}" in result.stderr
    assert "error: stopped by SIGTERM" in result.stderr and "--ckpt_path" in result.stderr and "Traceback" not in result.stderr
    assert not (checkpoints / "summary.json").exists() and not (tmp_path / "run" / "summary.json").exists()
    # resumed as a user would, with the progress bar (Lightning skips on_train_epoch_start mid-epoch)
    resumed = run_cli_forked(fork_context, ["fit", "--config", config, "--ckpt_path", str(checkpoints / "last.ckpt"),
                                            "--trainer.enable_progress_bar", "true"], tmp_path, env)
    assert load_checkpoint_file(checkpoints / "last.ckpt")["sphere_pl"]["edits_applied"] == NUM_EDITS * NUM_BATCHES
    assert "run summary" in resumed.stdout
    total = NUM_EDITS * NUM_BATCHES
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("editing: ")]  # a log, not a terminal: a line per batch
    assert lines[-1].startswith(f"editing: 100% {total}/{total} edits, ") and "s/edit" in lines[-1], resumed.stderr[-2000:]
    assert lines[0].startswith(f"editing: {100 * (done + NUM_EDITS) // total}% {done + NUM_EDITS}/{total} edits")  # counted on from where it stopped
    assert len(lines) == (total - done) // NUM_EDITS and "\r" not in resumed.stderr and "\x1b[" not in resumed.stderr


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_a_full_disk_during_a_checkpoint_write_is_one_line_naming_the_checkpoint_to_resume_from(fork_context, tiny_model_dir, stats_cache, tmp_path):
    """The checkpoint directory is a 200 KiB tmpfs (mounted in a user and mount namespace of the run's
    own, no root needed): the checkpoints outgrow it after a few batches and the kernel answers ENOSPC."""
    env = cli_env(tmp_path)
    checkpoints, saved = tmp_path / "small-disk", tmp_path / "saved"
    checkpoints.mkdir()
    saved.mkdir()
    config = write_config(tiny_model_dir, stats_cache, tmp_path / "run", checkpoints)
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces are not available here: {probe.stderr.decode().strip()}")
    script = 'mount -t tmpfs -o size=200k tmpfs "$0" && "$2" -m sphere_pl fit --config "$3"; status=$?; cp -a "$0"/. "$1"/; exit $status'
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(checkpoints), str(saved), sys.executable, config],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "hint:"))]
    failed, good = re.fullmatch(r"error: could not write checkpoint (\S+): No space left on device; the checkpoints already written "
                                r"are whole: resume from (\S+) once there is room", lines[0]).groups()
    assert lines[1] == "hint: free disk space (or point checkpoint.dirpath elsewhere), then resume with --ckpt_path <that checkpoint>"
    assert len(lines) == 2 and "Traceback" not in result.stderr
    assert Path(failed).parent == checkpoints and Path(good).parent == checkpoints and failed != good
    kept = saved / Path(good).name  # what the full disk held when the run stopped
    done = load_checkpoint_file(kept)["sphere_pl"]["edits_applied"]
    assert 0 < done < NUM_EDITS * NUM_BATCHES
    assert not list(saved.glob("*.tmp"))  # nothing half-written left to take the space
    resumed = write_config(tiny_model_dir, stats_cache, tmp_path / "resumed", saved)
    run_cli_forked(fork_context, ["fit", "--config", resumed, "--ckpt_path", str(kept)], tmp_path, env)
    assert load_checkpoint_file(saved / "last.ckpt")["sphere_pl"]["edits_applied"] == NUM_EDITS * NUM_BATCHES


def test_more_than_one_epoch_is_refused_before_any_edit(fork_context, tiny_model_dir, stats_cache, tmp_path):
    config = write_config(tiny_model_dir, stats_cache, tmp_path / "run")
    result = run_cli_forked(fork_context, ["fit", "--config", config, "--trainer.max_epochs", "2"], tmp_path, cli_env(tmp_path), ok=False)
    assert result.returncode == 1
    assert "error: trainer.max_epochs = 2: an editing run makes one pass over its edit batches" in result.stderr
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_gpu_on_a_machine_without_one_is_one_line(fork_context, tiny_model_dir, stats_cache, tmp_path):
    config = write_config(tiny_model_dir, stats_cache, tmp_path / "run")
    result = run_cli_forked(fork_context, ["fit", "--config", config, "--trainer.accelerator", "gpu"], tmp_path, cli_env(tmp_path), ok=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: invalid trainer setting: No supported gpu backend found!" in result.stderr

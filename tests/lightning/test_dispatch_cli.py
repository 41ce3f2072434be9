"""A fit whose model is dispatched by accelerate (`model.model.device_map`, blocks offloaded to disk),
through the CLI as a user runs it: the start-up lines say where each block and edited weight lives,
a killed run resumes, and the run ends with the weights of the same run undispatched, bit for bit;
export/apply and DDP evaluation of a dispatched model are tried too."""

from __future__ import annotations

import json
import os
import signal

import torch
import yaml

from forked_cli import RunningCli, run_cli_forked
from helpers import cli_env
from sphere_pl.files import load_checkpoint_file
from test_run_control import NUM_BATCHES, NUM_EDITS, wait_for, write_config

OFFLOADED = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.layers.2": "cpu",
             "model.layers.3": "disk", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "disk"}


def dispatched_config(path: str, offload_folder) -> str:
    config = yaml.safe_load(open(path))
    config["model"]["model"].update(device_map=OFFLOADED, offload_folder=str(offload_folder))
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def test_a_dispatched_fit_killed_and_resumed_ends_with_the_undispatched_runs_weights(fork_context, tiny_model_dir, stats_cache, tmp_path):
    env = cli_env(tmp_path)
    whole = write_config(tiny_model_dir, stats_cache, tmp_path / "whole", steps=25)
    run_cli_forked(fork_context, ["fit", "--config", whole], tmp_path, env)

    config = dispatched_config(write_config(tiny_model_dir, stats_cache, tmp_path / "dispatched", steps=25), tmp_path / "offload")
    checkpoints = tmp_path / "dispatched" / "checkpoints"
    killed = RunningCli(fork_context, ["fit", "--config", config], tmp_path, env)
    wait_for(lambda: (checkpoints / "last.ckpt").exists(), "the first checkpoint")
    os.kill(killed.process.pid, signal.SIGKILL)
    assert killed.result().returncode == -signal.SIGKILL
    done = load_checkpoint_file(checkpoints / "last.ckpt")["sphere_pl"]["edits_applied"]
    assert 0 < done < NUM_EDITS * NUM_BATCHES
    resumed = run_cli_forked(fork_context, ["fit", "--config", config, "--ckpt_path", str(checkpoints / "last.ckpt")], tmp_path, env)
    assert "placement: disk: lm_head, model.layers.0, model.layers.3, model.norm" in resumed.stdout, resumed.stdout[:1500]
    assert "edited weights: model.layers.1.mlp.down_proj on cpu, model.layers.2.mlp.down_proj on cpu" in resumed.stdout

    mine = load_checkpoint_file(checkpoints / "last.ckpt")["sphere_pl"]
    reference = load_checkpoint_file(tmp_path / "whole" / "checkpoints" / "last.ckpt")["sphere_pl"]
    assert mine["edits_applied"] == reference["edits_applied"] == NUM_EDITS * NUM_BATCHES
    assert mine["weights"].keys() == reference["weights"].keys()
    for name in reference["weights"]:
        assert torch.equal(mine["weights"][name], reference["weights"][name]), name
    summary = json.loads((tmp_path / "dispatched" / "summary.json").read_text())
    assert summary["placement"]["blocks"]["model.layers.3"] == "disk"
    assert summary["placement"]["edited"] == {"model.layers.1.mlp.down_proj": "cpu", "model.layers.2.mlp.down_proj": "cpu"}
    assert summary["final"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["final"]  # scored through the hooks alike

    # the run's patch, exported, applies to the dispatched base model as to the whole one
    patch = tmp_path / "edits.safetensors"
    run_cli_forked(fork_context, ["export", "--ckpt_path", str(checkpoints / "last.ckpt"), "--out", str(patch)], tmp_path, env)
    out = tmp_path / "applied"
    run_cli_forked(fork_context, ["apply", "--patch", str(patch), "--model", tiny_model_dir, "--out", str(out)], tmp_path, env)
    from transformers import AutoModelForCausalLM

    applied = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for name, param in applied.named_parameters():
        module = name.removesuffix(".weight")
        assert torch.equal(param, reference["weights"][module] if module in reference["weights"] else base.get_parameter(name)), name

    # DDP evaluation of a dispatched model is refused in one line (each process would dispatch the whole model)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    result = run_cli_forked(fork_context, ["validate", "--config", config, "--ckpt_path", str(checkpoints / "last.ckpt"), *ddp],
                            tmp_path, env, ok=False)
    assert result.returncode == 1 and "with model.model.device_map: each of the 2 processes" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr

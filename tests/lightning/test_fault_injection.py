"""kill -9 at 20 seeded moments, then resume: every run ends with exactly the weights of an
uninterrupted one, and no torn file is ever left under a checkpoint's final name.

Each `fit` is a real process (`python -m sphere_pl fit`'s `main`), started from a fork server
that has imported sphere_pl once, and killed with SIGKILL by the test: 14 kills at seeded
random times over the run, 6 while a checkpoint is being written (the child writes part of
the temporary file, then SIGKILLs itself). The resumed run continues from `last.ckpt`, or
starts again when the kill came before the first checkpoint.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch
import yaml

from sphere_pl.files import load_checkpoint_file
from test_cli_commands import run_config

NUM_EDITS, NUM_BATCHES = 2, 6
KILLS_AT_RANDOM_TIMES, KILLS_DURING_WRITES = 14, 6


def _fit(argv: list[str], kill_during_write: int | None) -> None:
    """Child process: the CLI's fit, optionally SIGKILLing itself halfway through its n-th checkpoint file."""
    os.environ.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    torch.set_num_threads(1)
    if kill_during_write is not None:
        from sphere_pl.files import checkpoint as checkpoint_io

        real_save, calls = checkpoint_io.save_file, []

        def save_then_die(tensors, path, metadata=None):
            calls.append(path)
            real_save(tensors, path, metadata=metadata)
            if len(calls) == kill_during_write:
                with open(path, "r+b") as f:  # the write got this far when the power went
                    f.truncate(os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint_io.save_file = save_then_die
    from sphere_pl.commands.cli import main

    main(argv)


@pytest.fixture(scope="module")
def fork_server(fork_context):
    """multiprocessing's forkserver, which preloads sphere_pl.commands, the modules a fit imports
    lazily, and this module (tests/forked_cli.py; one server per pytest process, shared with the CLI tests)."""
    return fork_context


def start(context, argv, kill_during_write=None):
    process = context.Process(target=_fit, args=(argv, kill_during_write))
    process.start()
    return process


def final_state(directory) -> dict:
    state = load_checkpoint_file(directory / "last.ckpt")["sphere_pl"]
    return {"weights": state["weights"], "keys": state["method"]["_extra_state"]["batch_keys"], "edits": state["edits_applied"]}


def write_run_config(tiny_model_dir, stats_cache, root) -> str:
    config = run_config(tiny_model_dir, stats_cache, root)
    config["data"].update(num_edits=NUM_EDITS, dataset_size_limit=NUM_EDITS * NUM_BATCHES)
    config["facts"] = {"every_n_batches": 0}
    config["checkpoint"]["keep_last"] = 2
    path = root / "fit.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_sigkill_at_20_seeded_moments_then_resume_gives_identical_weights(fork_server, tiny_model_dir, stats_cache, tmp_path):
    # two uninterrupted runs: the second (statistics cached, as for every run below) times a run
    durations, finals = [], []
    for name in ("reference", "reference-again"):
        config = write_run_config(tiny_model_dir, stats_cache, tmp_path / name)
        begin = time.perf_counter()
        process = start(fork_server, ["fit", "--config", config])
        process.join(300)
        durations.append(time.perf_counter() - begin)
        assert process.exitcode == 0
        finals.append(final_state(tmp_path / name / "checkpoints"))
    reference, duration = finals[0], durations[1]
    assert reference["edits"] == NUM_EDITS * NUM_BATCHES
    assert all(torch.equal(finals[1]["weights"][n], w) for n, w in reference["weights"].items())  # runs are deterministic

    rng = random.Random(20261122)
    moments = [("time", rng.uniform(0.02, 0.98) * duration) for _ in range(KILLS_AT_RANDOM_TIMES)]
    # checkpoint files are written twice per batch (edits-N.ckpt, then last.ckpt)
    moments += [("write", rng.randint(1, 2 * NUM_BATCHES)) for _ in range(KILLS_DURING_WRITES)]
    outcomes = []
    for i, (kind, when) in enumerate(moments):
        root = tmp_path / f"kill-{i:02d}"
        config = write_run_config(tiny_model_dir, stats_cache, root)
        directory = root / "checkpoints"
        if kind == "time":
            process = start(fork_server, ["fit", "--config", config])
            process.join(when)
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(60)
        else:
            process = start(fork_server, ["fit", "--config", config], kill_during_write=when)
            process.join(300)
            assert process.exitcode == -signal.SIGKILL  # it died in the middle of writing
        killed = process.exitcode == -signal.SIGKILL

        # no torn checkpoint under a final name: every *.ckpt there loads
        finished = sorted(directory.glob("*.ckpt"))
        for path in finished:
            load_checkpoint_file(path)
        resume = ["--ckpt_path", str(directory / "last.ckpt")] if (directory / "last.ckpt").exists() else []
        done = load_checkpoint_file(directory / "last.ckpt")["sphere_pl"]["edits_applied"] if resume else 0
        process = start(fork_server, ["fit", "--config", config, *resume])
        process.join(300)
        assert process.exitcode == 0, f"resume after kill {i} ({kind} {when}) failed"
        end = final_state(directory)
        assert end["edits"] == reference["edits"]
        for name, weight in reference["weights"].items():
            assert float((end["weights"][name] - weight).abs().max()) == 0.0, f"kill {i} ({kind} {when}): {name} differs"
        assert all(torch.equal(a, b) for x, y in zip(end["keys"], reference["keys"]) for a, b in zip(x, y))
        outcomes.append((kind, killed, done))

    # the kills really interrupted runs at different stages, including before the first checkpoint
    assert sum(killed for _, killed, _ in outcomes) >= 15
    assert len({done for _, killed, done in outcomes if killed}) >= 3
    assert sum(kind == "write" and killed for kind, killed, _ in outcomes) == KILLS_DURING_WRITES

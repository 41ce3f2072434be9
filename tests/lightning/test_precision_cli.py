"""The value search's precision through the CLI: measured at set-up, said in the header, recorded in the summary."""

from __future__ import annotations

from sphere_pl.editing.precision import decide


def test_a_fit_asked_for_bfloat16_says_what_it_measured_and_records_it(tiny_model_dir, stats_cache, tmp_path, forked_cli):
    """The CLI as a user meets it: the header names the precision the search runs in and why; the summary
    records it with the measured rates and the machine (threads, CPU flags)."""
    import json

    from helpers import cli_env
    from test_cli_commands import run_config, write_config

    run = tmp_path / "run"
    config = run_config(tiny_model_dir, stats_cache, run, method_args={"values": {"num_grad_steps": 5, "lr": 0.5, "compute_dtype": "bfloat16"}})
    config["data"]["dataset_size_limit"] = 4
    result = forked_cli(["fit", "--config", write_config(tmp_path / "fit.yaml", config)], tmp_path, cli_env(tmp_path))
    summary = json.loads((run / "summary.json").read_text())
    precision = summary["precision"]
    assert precision["asked"] == "bfloat16" and precision["used"] == decide("bfloat16", False, precision["rates"], "cpu").used
    header = next(line for line in result.stdout.splitlines() if line.startswith("  memory"))
    assert header.endswith(f"compute {precision['used']} ({precision['reason']})")
    assert summary["machine"]["torch_threads"] >= 1 and "cpu_bfloat16_instructions" in summary["machine"]

"""Every shipped config parses as a user runs it (`--print_config`, no model loaded), and a
model's method configs pick up its shared statistics and value-search files.

Each parse is `python -m sphere_pl` in its own process, forked from a server that has imported
sphere_pl (`forked_cli`, tests/forked_cli.py) instead of paying 6-8 s of imports per config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import REPO, cli_env

METHOD_CLASSES = {
    "alphaedit": "sphere_pl.AlphaEdit",
    "memit": "sphere_pl.MEMIT",
    "rect": "sphere_pl.RECT",
    "prune": "sphere_pl.PRUNE",
    "rome": "sphere_pl.ROME",
    "ft": "sphere_pl.FineTune",
}
# every SmolLM2 config; for the GPU templates (same layout, ~10 s per parse on 2 cores) one
# config that uses the shared files and the one that does not
CASES = [("smollm2", m) for m in sorted(METHOD_CLASSES)] + [(m, x) for m in ("llama3_8b", "qwen2.5_7b") for x in ("memit", "ft")]


def test_every_config_file_is_covered():
    shipped = {(p.parent.name, p.stem) for p in (REPO / "configs").glob("*/*.yaml") if p.stem in METHOD_CLASSES}
    assert shipped == {(m, x) for m in ("smollm2", "llama3_8b", "qwen2.5_7b") for x in METHOD_CLASSES}


@pytest.mark.parametrize("model, method", CASES)
def test_method_configs_share_the_model_files(tmp_path, model, method, forked_cli):
    directory = REPO / "configs" / model
    args = ["fit", "--config", str(directory / "common.yaml"), "--config", str(directory / f"{method}.yaml"), "--print_config"]
    config = yaml.safe_load(forked_cli(args, REPO, cli_env(tmp_path)).stdout)
    chosen = config["model"]["method"]
    assert chosen["class_path"] == METHOD_CLASSES[method]
    common = yaml.safe_load((directory / "common.yaml").read_text())
    assert config["model"]["model_name_or_path"] == common["model"]["model_name_or_path"]
    if method != "ft":  # FT-L has no key statistics or value search
        for name in ("stats", "values"):
            shared = yaml.safe_load((directory / f"{name}.yaml").read_text())
            assert {k: chosen["init_args"][name][k] for k in shared} == shared, name
    alpha = config["model"]["filters"][0]["init_args"]["strength"]
    assert alpha == (0.5 if method == "alphaedit" else 0.8)  # the paper's α per method


def test_quickstart_with_the_evaluation_overlay(tmp_path, forked_cli):
    args = ["fit", "--config", "configs/quickstart.yaml", "--config", "configs/evaluation_suite.yaml", "--print_config"]
    config = yaml.safe_load(forked_cli(args, REPO, cli_env(tmp_path)).stdout)
    tasks = [t["class_path"].rsplit(".", 1)[1] for t in config["general"]["tasks"]]
    assert tasks == ["ReasoningTask", "NLITask", "ClosedQATask", "OpenQATask", "PerplexityTask"]
    assert all(Path(REPO / t["init_args"]["path"]).is_file() for t in config["general"]["tasks"])
    assert len(config["facts"]["evaluators"]) == 2 and config["model"]["cases_dir"]
    assert config["model"]["method"]["class_path"] == "sphere_pl.AlphaEdit"  # the quickstart's method is kept

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
    assert config["model"]["model"]["init_args"]["name_or_path"] == common["model"]["model"]["name_or_path"]
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
    assert len(config["facts"]["evaluators"]) == 2 and config["model"]["write_cases"] is True
    assert config["model"]["method"]["class_path"] == "sphere_pl.AlphaEdit"  # the quickstart's method is kept


# The official hyper-parameters (PlusLabNLP/SPHERE at commit 6e8978a, hparams/<METHOD>/<model>.json;
# RECT and PRUNE run there as MEMIT variants and read hparams/MEMIT). Written here from those files,
# in sphere_pl's names: v_num_grad_steps -> values.num_grad_steps, v_lr -> values.lr, v_weight_decay ->
# values.weight_decay, clamp_norm_factor -> values.clamp_norm_factor, kl_factor -> values.kl_factor,
# v_loss_layer (31 of 32, 27 of 28: the last) -> values.loss_layer -1, mom2_n_samples -> stats.num_samples;
# FT's batch_size is FTHyperParams' default (64).
_LLAMA3_MEMIT = {"layers": [4, 5, 6, 7, 8], "values.num_grad_steps": 25, "values.lr": 0.1, "values.clamp_norm_factor": 0.75,
                 "values.weight_decay": 0.5, "values.kl_factor": 0.0625, "values.loss_layer": -1, "stats.num_samples": 100000}
_QWEN_MEMIT = {**_LLAMA3_MEMIT, "values.lr": 0.5, "values.clamp_norm_factor": 4.0, "values.weight_decay": 0.001}
_ROME = {"layer": 5, "values.num_grad_steps": 25, "values.lr": 0.5, "values.clamp_norm_factor": 4.0, "values.weight_decay": 0.001,
         "values.kl_factor": 0.0625, "values.loss_layer": -1, "mom2_adjustment": False}
_FT = {"num_steps": 25, "lr": 5e-4, "weight_decay": 0.0, "norm_constraint": None, "batch_size": 64}
OFFICIAL = {
    ("llama3_8b", "alphaedit"): {**_LLAMA3_MEMIT, "L2": 10.0, "nullspace_threshold": 0.02},   # hparams/AlphaEdit/Llama3-8B.json
    ("llama3_8b", "memit"): {**_LLAMA3_MEMIT, "mom2_update_weight": 15000.0},                  # hparams/MEMIT/Llama3-8B.json
    ("llama3_8b", "rect"): {**_LLAMA3_MEMIT, "mom2_update_weight": 15000.0},
    ("llama3_8b", "prune"): {**_LLAMA3_MEMIT, "mom2_update_weight": 15000.0},
    ("llama3_8b", "rome"): _ROME,                                                             # hparams/ROME/Llama3-8B.json
    ("llama3_8b", "ft"): {**_FT, "layer": 21},                                                # hparams/FT/Llama3-8B.json
    ("qwen2.5_7b", "alphaedit"): {**_QWEN_MEMIT, "L2": 10.0, "nullspace_threshold": 0.02},    # hparams/AlphaEdit/Qwen2.5-7B.json
    ("qwen2.5_7b", "memit"): {**_QWEN_MEMIT, "mom2_update_weight": 15000.0},                  # hparams/MEMIT/Qwen2.5-7B.json
    ("qwen2.5_7b", "rect"): {**_QWEN_MEMIT, "mom2_update_weight": 15000.0},
    ("qwen2.5_7b", "prune"): {**_QWEN_MEMIT, "mom2_update_weight": 15000.0},
    ("qwen2.5_7b", "rome"): _ROME,                                                            # hparams/ROME/Qwen2.5-7B.json
    ("qwen2.5_7b", "ft"): {**_FT, "layer": 27},                                               # hparams/FT/Qwen2.5-7B.json
}


def _method_settings(model: str, method: str) -> dict:
    """The method's init_args as the config file gives them, with a shared file (`values: values.yaml`)
    read from the model's folder, flattened to `values.lr`-style keys."""
    directory = REPO / "configs" / model
    init = yaml.safe_load((directory / f"{method}.yaml").read_text())["model"]["method"]["init_args"]
    flat = {}
    for key, value in init.items():
        if isinstance(value, str) and value.endswith(".yaml"):
            value = yaml.safe_load((directory / value).read_text())
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


@pytest.mark.parametrize("model, method", sorted(OFFICIAL))
def test_each_config_carries_the_official_hyper_parameters_of_its_method_and_model(model, method):
    settings = _method_settings(model, method)
    wrong = {k: (settings.get(k, "missing"), v) for k, v in OFFICIAL[(model, method)].items() if settings.get(k, "missing") != v}
    assert not wrong, f"configs/{model}/{method}.yaml: (config, official) {wrong}"


def test_the_official_table_covers_every_method_config_of_the_paper_models():
    assert set(OFFICIAL) == {(m, x) for m in ("llama3_8b", "qwen2.5_7b") for x in METHOD_CLASSES}


# UltraEdit (XiaojieGu/UltraEdit @ 0beb222) and StableEdit (MINE-USTC/StableEdit @ 6ea8eae), written here
# from those files in sphere_pl's names: edit_modules (model.layers.N.mlp.X) -> targets {mlp.X: [N, ...]},
# editor.lr -> lr, the solve's ridge (UltraEdit: the identity added in editor/ultraedit.py; StableEdit:
# editor.alpha=10 in run.sh) -> ridge, dataset.batch_size -> mini_batch, dataset.n_edits -> data.num_edits,
# RunningMeanStd's unbiased batch variance (UltraEdit) or biased one (StableEdit) -> variance,
# RunningMeanStd_mode=stable (StableEdit) -> whitening full.
_ULTRA = {"ridge": 1.0, "mini_batch": 10, "variance": "ultraedit", "whitening": "diagonal", "num_edits": 100}
_STABLE = {"ridge": 10.0, "mini_batch": 10, "variance": "exact", "whitening": "full", "num_edits": 100}
OFFICIAL_LIFELONG = {
    ("llama3_8b", "ultraedit"): {**_ULTRA, "lr": 1e-6, "targets": {"mlp.gate_proj": [11, 12, 13, 14, 15], "mlp.up_proj": [18, 19, 20, 21, 22, 23, 24]}},
    ("qwen2.5_7b", "ultraedit"): {**_ULTRA, "lr": 1e-6, "targets": {"mlp.gate_proj": list(range(18, 27)), "mlp.up_proj": list(range(18, 27))}},
    ("mistral_7b", "ultraedit"): {**_ULTRA, "lr": 1e-6, "targets": {"mlp.down_proj": [29, 30]}},       # config/model/mistral-7b.yaml
    ("llama3_8b", "stableedit"): {**_STABLE, "lr": 1e-6, "targets": {"mlp.down_proj": [11, 12, 22, 23, 28, 29, 30]}},  # run.sh, zsre
    ("qwen2.5_7b", "stableedit"): {**_STABLE, "lr": 2e-6, "targets": {"mlp.down_proj": [8, 9, 10, 11, 12, 13, 14, 18, 19, 20, 21, 22, 23, 24, 25]}},
    ("mistral_7b", "stableedit"): {**_STABLE, "lr": 1e-6, "targets": {"mlp.down_proj": [28, 29, 30, 31]}},
}


@pytest.mark.parametrize("model, method", sorted(OFFICIAL_LIFELONG))
def test_each_lifelong_config_carries_the_official_settings(model, method):
    config = yaml.safe_load((REPO / "configs" / model / f"{method}.yaml").read_text())
    settings = {**config["model"]["method"]["init_args"], "num_edits": config["data"]["num_edits"]}
    wrong = {k: (settings.get(k, "missing"), v) for k, v in OFFICIAL_LIFELONG[(model, method)].items() if settings.get(k, "missing") != v}
    assert not wrong, f"configs/{model}/{method}.yaml: (config, official) {wrong}"
    assert config["model"]["method"]["class_path"] == "sphere_pl.UltraEdit"


@pytest.mark.parametrize("model, method", sorted(OFFICIAL_LIFELONG))
def test_each_lifelong_config_builds_its_method(model, method):
    from sphere_pl import UltraEdit

    init = yaml.safe_load((REPO / "configs" / model / f"{method}.yaml").read_text())["model"]["method"]["init_args"]
    built = UltraEdit(**init)
    assert [layer for layers in built.targets.values() for layer in layers] == [layer for layers in init["targets"].values() for layer in layers]


def test_a_lifelong_config_parses_through_the_cli(tmp_path, forked_cli):
    directory = REPO / "configs" / "mistral_7b"
    args = ["fit", "--config", str(directory / "common.yaml"), "--config", str(directory / "stableedit.yaml"), "--print_config"]
    method = yaml.safe_load(forked_cli(args, REPO, cli_env(tmp_path)).stdout)["model"]["method"]
    assert method["class_path"] == "sphere_pl.UltraEdit"
    assert method["init_args"]["targets"] == {"mlp.down_proj": [28, 29, 30, 31]} and method["init_args"]["whitening"] == "full"

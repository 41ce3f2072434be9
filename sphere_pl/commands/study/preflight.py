"""A variant's fit config checked before any edit, and compared with the one its run was made with.

`fit_config` parses the variant's configs with the fit command's own parser (types, unknown keys,
every value) and builds what its settings describe except the model (the method, filters, data and
every monitor run their own checks, e.g. `values.lr > 0`): a refusal is a `SettingsError` naming
the setting. `differences_from_recorded` compares it with the `fit-config.yaml` a run was made
with, reading old recordings in today's vocabulary (the migration of renamed settings).
"""

from __future__ import annotations

import json
import warnings
from argparse import ArgumentError
from types import SimpleNamespace

import yaml
from jsonargparse import ArgumentParser

from ...editing.methods.base import METHODS, EditMethod, create_method
from ...errors import SettingsError
from ...filters import DeltaFilter
from ...lightning import EditDataModule
from ...monitors import CollapseGuard
from ...monitors.rules import recorded_metrics
from ..refusals import refused_by_sphere_pl
from ..run import SECTIONS, SphereCLI, run_lightning

#: what the study sets per run (where files go, the W&B run): not part of what a run is
PER_RUN = ("trainer.default_root_dir", "trainer.logger", "checkpoint.dirpath", "summary.dirpath", "he_analysis.dirpath",
           "model.cases_dir", "ckpt_path", "config")


class _Parsed(Exception):
    def __init__(self, config: dict):
        self.config = config


class _ParseOnly(SphereCLI):
    """The fit command's parser, stopped before anything is built: its config, as `--print_config` shows it."""

    def before_instantiate_classes(self) -> None:
        dumped = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False, skip_check=True)
        raise _Parsed(yaml.safe_load(dumped))


def fit_config(args: list[str], overrides_yaml: str) -> dict:
    """The whole fit config of `args` (`fit --config ...`) with `overrides_yaml` merged last, checked."""
    try:
        with warnings.catch_warnings():  # in-process on purpose: the study's own argv is not the variant's
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within Python.*")
            run_lightning([*args, "--config", overrides_yaml], cli_class=_ParseOnly)
    except _Parsed as parsed:
        config = parsed.config
    except ArgumentError as e:
        raise SettingsError(" ".join(line.strip() for line in str(e).splitlines() if line.strip())) from None
    config.pop("config", None)
    method = _get(config, "model.method")
    if isinstance(method, str) and method.strip().lower() not in METHODS:
        raise SettingsError(f"field 'model.method': unknown editing method {method!r}; known methods: {sorted(METHODS)}")
    _build_settings(config)
    return config


def _build_settings(config: dict) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=EditMethod | str)
    parser.add_argument("--filters", type=list[DeltaFilter] | None)
    parser.add_class_arguments(EditDataModule, "data")
    for section, cls in SECTIONS.items():
        parser.add_class_arguments(cls, section)
    given = {"method": _get(config, "model.method"), "filters": _get(config, "model.filters"), "data": config.get("data", {}),
             **{section: config.get(section, {}) for section in SECTIONS}}
    given = json.loads(json.dumps(given))  # jsonargparse turns the mappings it is given into namespaces, in place
    try:
        built = parser.instantiate_classes(parser.parse_object(given))
        _check_rule_metrics(built)
    except Exception as e:
        own = refused_by_sphere_pl(e)  # the setting's own refusal, out of jsonargparse's wrapping
        raise SettingsError(str(own) if own is not None else str(e).strip().splitlines()[0]) from None


def _check_rule_metrics(built) -> None:
    """The collapse rule's and the guard's conditions against the metrics the run will record, as the fit
    checks them at its start (the same `metric_names` of every monitor), so a study refuses before any variant runs."""
    method = create_method(built.method)
    data = built.data
    data.setup("fit")  # reads the records: which benchmarks' metrics are recorded
    callbacks = [built[section] for section in SECTIONS]
    trainer = SimpleNamespace(datamodule=data, callbacks=callbacks)
    pl_module = SimpleNamespace(editor=SimpleNamespace(weight_labels=method.weight_labels()))
    recorded = recorded_metrics(trainer, pl_module)
    for callback in callbacks:
        rule = getattr(callback, "rule", None)
        if rule is not None and (not isinstance(callback, CollapseGuard) or callback.enabled):
            rule.check_metrics(recorded)


def differences_from_recorded(recorded: dict, config: dict) -> tuple[list[str], list[str]]:
    """(settings added since the run began, which it could not have set; other differences, `field: old then, new now`)."""
    differences = _differences(_without_per_run(migrate(recorded)), _without_per_run(config))
    added = [d for d in differences if d.split(": ", 1)[1].startswith("None then")]
    return [d.split(":", 1)[0] for d in added], [d for d in differences if d not in added]


def migrate(config: dict) -> dict:
    """A recorded fit config in today's vocabulary: the values settings added later had then, where they
    changed what a run does (ZsRE edits taught `alt` before `data.zsre_target` existed), and settings that
    moved (the model's loading settings, now `model.model`; the guard's thresholds, now conditions in the
    rule language, and its canaries, now monitors of their own)."""
    config = json.loads(json.dumps(config))
    data = config.get("data") or {}
    if "zsre_target" not in data and data.get("schema") == "zsre":
        config["data"] = {**data, "zsre_target": "alt"}
    model = config.get("model") or {}
    if "model_name_or_path" in model:  # what is loaded had no section of its own before `PretrainedModel`
        loading = {key: model.get(old) for key, old in _MOVED_TO_MODEL_SECTION.items()}
        model = {k: v for k, v in model.items() if k not in _MOVED_TO_MODEL_SECTION.values()}
        config["model"] = {**model, "model": {"class_path": "sphere_pl.PretrainedModel", "init_args": loading}}
    model = config.get("model") or {}
    if model.get("cases_dir") is not None or "cases_dir" in model:
        config["model"] = {**{k: v for k, v in model.items() if k != "cases_dir"}, "write_cases": bool(model.get("cases_dir"))}
    guard = config.get("guard") or {}
    if "he_score" in guard:  # the guard before one rule language
        config.update(_guard_in_rule_language(guard))
    return config


def _guard_in_rule_language(old: dict) -> dict:
    canaries = int(old.get("canaries") or 0)
    conditions = []
    if old.get("he_score") is not None:
        conditions.append({"metric": "guard/he_score/*", "above": float(old["he_score"])})
    if old.get("norm_growth") is not None:
        conditions.append({"metric": "guard/norm_growth/*", "above": float(old["norm_growth"])})
    if canaries and old.get("canary_drop") is not None:
        conditions.append({"metric": "canary/specificity", "drop_from_start": float(old["canary_drop"])})
    if old.get("perplexity_path") and old.get("perplexity_ratio") is not None:
        conditions.append({"metric": "canary/perplexity", "ratio_to_start_above": float(old["perplexity_ratio"])})
    defaults = [{"metric": "guard/he_score/*", "above": 50.0}] + (
        [{"metric": "canary/specificity", "drop_from_start": 0.3}] if canaries else []) + (
        [{"metric": "canary/perplexity", "ratio_to_start_above": 2.0}] if old.get("perplexity_path") else [])
    guard = {"enabled": bool(old.get("enabled")), "action": old.get("action", "warn"), "conditions": None if conditions == defaults else conditions,
             "he_window": old.get("he_window", 5), "he_min_history": old.get("he_min_history", 2)}
    return {"guard": guard, "canary_specificity": {"records": canaries, "every_n_batches": 1},
            "canary_perplexity": {"path": old.get("perplexity_path"), "windows": old.get("perplexity_windows", 2),
                                  "seq_len": old.get("perplexity_seq_len", 256), "every_n_batches": 1}}


# PretrainedModel's arguments and the SequentialEditor arguments they were
_MOVED_TO_MODEL_SECTION = {"name_or_path": "model_name_or_path", "dtype": "dtype", "gguf_file": "gguf_file",
                           "trust_remote_code": "trust_remote_code", "module_templates": "module_templates"}


def _without_per_run(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    for dotted in PER_RUN:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return {k: v for k, v in config.items() if v != {}}  # a section left empty (summary: its dirpath was all it had)


def _differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if a == b else [f"{where}: {a!r} then, {b!r} now"]


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree

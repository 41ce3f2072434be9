"""The bad-input table: malformed configs, edit files, evaluation files, statistics files,
patches and checkpoints, each given to the CLI as a user would.

Every row must end with one clear error (the file, the record or field, the fix), a
non-zero exit status, no traceback, and no partial edit: no checkpoint written, and files
that were given (checkpoints, patches) unchanged. The CLI runs in this process (the same
`main` that `python -m sphere_pl` calls) so that 49 rows cost about a minute; five rows also run
as a real subprocess to check the exit status and stderr a user sees.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import cli_env, run_cli, save_tiny_model
from sphere_pl.data.readers import QUICKSTART_PATH
from sphere_pl.editing.stats import write_mom2_file
from sphere_pl.commands.cli import main
from test_cli_commands import run_config

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MODULE = "model.layers.1.mlp.down_proj"


def run_main(argv: list[str]) -> tuple[object, str]:
    """(exit code, everything written to stderr) of `python -m sphere_pl ARGV`, in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def message_of(code, stderr: str) -> str:
    return (code if isinstance(code, str) else "") + "\n" + stderr


@pytest.fixture(scope="module")
def ctx(tiny_model_dir, stats_cache, tmp_path_factory):
    """A finished run (3 batches of 4 edits) with its checkpoints and exported patch, another
    model's directory, and the files every row can point at."""
    root = tmp_path_factory.mktemp("bad-inputs")
    config = run_config(tiny_model_dir, stats_cache, root / "run")
    (root / "good.yaml").write_text(yaml.safe_dump(config))
    code, stderr = run_main(["fit", "--config", str(root / "good.yaml")])
    assert code == 0, stderr[-3000:]
    last = root / "run" / "checkpoints" / "last.ckpt"
    code, stderr = run_main(["export", "--ckpt_path", str(last), "--out", str(root / "edits.safetensors")])
    assert code in (0, None), stderr[-3000:]
    other = save_tiny_model(root / "other-model", seed=1)
    return {"root": root, "config": config, "last": last, "patch": root / "edits.safetensors", "other": other, "model": tiny_model_dir}


# ------------------------------------------------------------------------ the rows
# Each row: (id, how to break the input, what the one-line error must say).
# `break_input(ctx, tmp) -> (argv, config)` gets a copy of the good config to change.


def config_change(**changes):
    """Set `section.key.sub...` entries of the good config."""

    def apply(ctx, tmp):
        config = copy.deepcopy(ctx["config"])
        for dotted, value in changes.items():
            node = config
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return ["fit"], config

    return apply


def with_records(text: str, name: str = "edits.json", **data_settings):
    def apply(ctx, tmp):
        (tmp / name).write_text(text)
        config = copy.deepcopy(ctx["config"])
        config["data"].update(source=str(tmp / name), num_holdout=0, dataset_size_limit=None, **data_settings)
        return ["fit"], config

    return apply


GOOD_RECORD = {"case_id": "good-0", "prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower", "target_new": "Rome",
               "ground_truth": "Paris", "rephrase_prompt": "Where is the Eiffel Tower? In", "locality_prompt": "The Louvre is in",
               "locality_ground_truth": "Paris"}  # fmt: skip


def bad_record(**fields):
    record = {**GOOD_RECORD, "case_id": "bad-1", **fields}
    record = {k: v for k, v in record.items() if v is not ...}  # `...` deletes a field
    return with_records(json.dumps([GOOD_RECORD, record]))


def long_prompt(ctx, tmp):
    records = json.loads(QUICKSTART_PATH.read_text())[:12]
    records[5]["requested_rewrite"].update(prompt=" ".join(["word"] * 300) + " {} is located in", subject="Zorbl")
    return with_records(json.dumps(records))(ctx, tmp)


def general_task(class_name: str, file_text: str | None, name: str, **init_args):
    def apply(ctx, tmp):
        path = tmp / name
        if file_text is not None:
            path.write_text(file_text)
        config = copy.deepcopy(ctx["config"])
        config["general"] = {"tasks": [{"class_path": f"sphere_pl.evaluation.general.{class_name}", "init_args": {"path": str(path), **init_args}}]}
        return ["fit"], config

    return apply


def stats_file(kind: str):
    def apply(ctx, tmp):
        config = copy.deepcopy(ctx["config"])
        stats = config["model"]["method"]["init_args"]["stats"]
        directory = tmp / "stats"
        eye = torch.eye(64, dtype=torch.float64)
        if kind == "shape":
            write_mom2_file(str(directory), MODULE, torch.eye(32, dtype=torch.float64), 100, "float32", 20)
            write_mom2_file(str(directory), "model.layers.2.mlp.down_proj", eye, 100, "float32", 20)
        elif kind == "missing-module":
            write_mom2_file(str(directory), "model.layers.3.mlp.down_proj", eye, 100, "float32", 20)
        elif kind == "torn":
            path = Path(write_mom2_file(str(directory), MODULE, eye, 100, "float32", 20))
            path.write_bytes(path.read_bytes()[:200])
        elif kind == "no-count":
            directory.mkdir()
            np.savez(directory / f"{MODULE}_float32_mom2_20.npz", **{"mom2.mom2": np.eye(64, dtype=np.float32)})
        stats["from_file"] = str(directory if kind != "nowhere" else tmp / "nowhere")
        return ["fit"], config

    return apply


def projectors_file(shape):
    def apply(ctx, tmp):
        torch.save(torch.zeros(shape), tmp / "null_space_project.pt")
        config = copy.deepcopy(ctx["config"])
        config["model"]["method"]["init_args"]["projectors_file"] = str(tmp / "null_space_project.pt")
        return ["fit"], config

    return apply


def checkpoint(kind: str):
    def apply(ctx, tmp):
        config = copy.deepcopy(ctx["config"])
        if kind == "missing":
            path = tmp / "missing.ckpt"
        elif kind == "json":
            path = tmp / "run.json"
            path.write_text('{"not": "a checkpoint"}')
        elif kind == "yaml":
            path = tmp / "config.yaml"
            path.write_text("model: {}\n")
        elif kind == "truncated":
            path = tmp / "truncated.ckpt"
            path.write_bytes(ctx["last"].read_bytes()[: ctx["last"].stat().st_size // 3])
        elif kind == "patch":
            path = ctx["patch"]
        elif kind == "other-model":
            config["model"]["model"] = {"name_or_path": ctx["other"]}
            path = ctx["last"]
        elif kind == "other-run":
            config["data"]["seed"] = 1
            path = ctx["last"].with_name("edits-000004.ckpt")
        return ["fit", "--ckpt_path", str(path)], config

    return apply


def patch(kind: str):
    def apply(ctx, tmp):
        config = copy.deepcopy(ctx["config"])
        if kind == "other-model":
            config["model"]["model"] = {"name_or_path": ctx["other"]}
            path = ctx["patch"]
        elif kind == "json":
            path = tmp / "edits.json"
            path.write_text("[]")
        elif kind == "missing":
            path = tmp / "missing.safetensors"
        return ["validate", "--patch", str(path)], config

    return apply


def command(argv: list[str]):
    def apply(ctx, tmp):
        return [a.format(last=ctx["last"], tmp=tmp, patch=ctx["patch"]) for a in argv], None

    return apply


SPHERE = "sphere_pl.SphereProjection"
ROWS = [
    # ------------------------------------------------------------------ configs
    ("config-eta-out-of-range", config_change(**{"model.filters": [{"class_path": SPHERE, "init_args": {"cumulative_ratio": 1.0}}]}),
     r"cumulative_ratio \(η\) must lie in \[0, 1\).*got 1.0"),
    ("config-alpha-out-of-range", config_change(**{"model.filters": [{"class_path": SPHERE, "init_args": {"strength": 1.5}}]}),
     r"strength \(α\) must lie in \[0, 1\].*got 1.5"),
    ("config-unknown-method", config_change(**{"model.method": "memitt"}), r"unknown editing method 'memitt'; known methods: \['alphaedit', 'ft', 'memit'"),
    ("config-layer-the-model-lacks", config_change(**{"model.method.init_args.layers": [1, 99]}),
     r"alphaedit edits \['model.layers.99.mlp.down_proj'\], which the model does not have: it has 4 layers"),
    ("config-rome-two-layers", config_change(**{"model.method": {"class_path": "sphere_pl.ROME", "init_args": {"layers": [1, 2]}}}),
     r"ROME edits exactly one layer: give `layer: <index>`, got layers \[1, 2\]"),
    ("config-ft-two-layers", config_change(**{"model.method": {"class_path": "sphere_pl.FineTune", "init_args": {"layers": [1, 2]}}}),
     r"FineTune edits exactly one layer"),
    ("config-duplicate-layers", config_change(**{"model.method.init_args.layers": [1, 1]}), r"layers lists layer\(s\) \[1\] more than once"),
    ("config-no-value-steps", config_change(**{"model.method.init_args.values.num_grad_steps": 0}), r"values.num_grad_steps = 0"),
    ("config-no-requests-per-pass", config_change(**{"model.method.init_args.values.requests_per_pass": 0}),
     r"values.requests_per_pass = 0 must be an integer >= 1"),
    ("config-memory-budget-too-small", config_change(**{"model.method.init_args.values.memory_budget_gb": 1e-6}),
     r"request case_id=.*: values: one request needs ~\d\.\d+ GB in the value search \(activations recomputed\), more than its memory "
     r"budget of 0\.000 GB \(values.memory_budget_gb.*\nhint: raise values.memory_budget_gb"),
    ("config-memory-budget-not-positive", config_change(**{"model.method.init_args.values.memory_budget_gb": 0}),
     r"values.memory_budget_gb = 0(\.0)? must be a positive number of GB"),
    ("config-compute-dtype-unknown", config_change(**{"model.method.init_args.values.compute_dtype": "float16"}),
     r"compute_dtype.*float16"),
    ("config-empty-null-space", config_change(**{"model.method.init_args.nullspace_threshold": 0.0}), r"nullspace_threshold = 0.0 leaves an empty null space"),
    ("config-accumulate-dtype", config_change(**{"model.method.init_args.stats.accumulate_dtype": "bfloat16"}),
     r"accumulate_dtype must be one of \['float32', 'float64'\], got 'bfloat16'"),
    ("config-zero-edits-per-batch", config_change(**{"data.num_edits": 0}), r"num_edits must be at least 1, got 0"),
    ("config-huge-value-lr", config_change(**{"model.method.init_args.values": {"num_grad_steps": 5, "lr": 1e30}}), r"values.lr \(1e\+30"),
    ("config-missing-model-path", config_change(**{"model.model.name_or_path": "/nonexistent/tiny-model"}), r"model path not found: /nonexistent/tiny-model"),
    # --------------------------------------------------------------- edit files
    ("edits-empty-file", with_records(""), r"edits.json is empty: expected a JSON list of records"),
    ("edits-empty-list", with_records("[]\n"), r"edits.json holds an empty list: no records to edit"),
    ("edits-malformed-json", with_records('[{"case_id": 1, "prompt": "x"},\n {"case_id": 2,\n  "prompt": "y" "subject": "z"}]'),
     r"edits.json: record #1: invalid JSON at line 3, column 17"),
    ("edits-subject-not-in-prompt", bad_record(subject="Nobody"), r"record case_id='bad-1' in .*edits.json: field 'subject': 'Nobody' does not occur in prompt"),
    ("edits-empty-target", bad_record(target_new=""), r"record case_id='bad-1' in .*edits.json: field 'target_new': is empty"),
    ("edits-missing-prompt", bad_record(prompt=...), r"record case_id='bad-1' in .*edits.json: field 'prompt'"),
    ("edits-target-not-a-string", bad_record(target_new=["Rome"]), r"record case_id='bad-1' in .*edits.json: field 'target_new'"),
    ("edits-source-missing", config_change(**{"data.source": "/nonexistent/edits.json"}), r"/nonexistent/edits.json"),
    ("edits-prompt-longer-than-context", long_prompt, r"field 'prompt': needs \d+ tokens .* at most 256"),
    ("edits-zsre-empty-alt", with_records(json.dumps([{"subject": "UniFirst", "src": "What is the product made by UniFirst?", "alt": "",
     "rephrase": "What does UniFirst make?", "loc": "nq question: who wrote hamlet", "loc_ans": "shakespeare", "answers": ["uniform"]}]),
     schema="zsre", zsre_target="alt"), r"case_id.*0.*field 'alt'.*empty"),
    ("edits-zsre-empty-answers", with_records(json.dumps([{"subject": "UniFirst", "src": "What is the product made by UniFirst?", "alt": "x",
     "rephrase": "What does UniFirst make?", "loc": "nq question: who wrote hamlet", "loc_ans": "shakespeare", "answers": []}]),
     schema="zsre"), r"case_id.*0.*field 'answers'.*non-empty list"),
    ("config-guard-unknown-action", config_change(**{"guard.enabled": True, "guard.action": "undo"}), r"guard.action must be one of \['warn', 'stop', 'rollback'\], got 'undo'"),
    ("config-guard-condition-without-threshold", config_change(**{"guard.enabled": True, "guard.conditions": [{"metric": "canary/specificity"}]}),
     r"guard: conditions\[0\] \(canary/specificity\): give exactly one of"),
    ("config-guard-condition-on-a-metric-never-recorded", config_change(**{"guard.enabled": True, "guard.conditions": [
        {"metric": "canary/perplexity", "ratio_to_start_above": 2.0}]}), r"guard: conditions\[0\]: metric 'canary/perplexity' is never recorded"),
    ("config-more-canaries-than-held-out", config_change(**{"canary_specificity.records": 500}), r"canary_specificity.records = 500, but the data holds \d+ never-edited records"),
    ("edits-zsre-unknown-target", config_change(**{"data.zsre_target": "gold"}), r"data.zsre_target must be one of \['alt', 'answer'\].*'gold'"),
    # ---------------------------------------------------------- evaluation files
    ("eval-nli-bad-label", general_task("NLITask", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tmaybe\n", "nli.tsv"), r"nli.tsv: line 2: field 'label'"),
    ("eval-reasoning-missing-answer", general_task("ReasoningTask", '{"question": "1+1?"}\n', "reasoning.jsonl"), r"reasoning.jsonl: line 1.*field 'answer'"),
    ("eval-closed-qa-malformed-line", general_task("ClosedQATask", '{"question": \n', "closed.jsonl"), r"closed.jsonl: line 1"),
    ("eval-task-file-missing", general_task("PerplexityTask", None, "wiki.txt"), r"wiki.txt"),
    # ---------------------------------------------------------- statistics files
    ("stats-wrong-shape", stats_file("shape"), r"field 'mom2.mom2' has shape \(32, 32\), but model.layers.1.mlp.down_proj takes 64 inputs"),
    ("stats-no-file-for-module", stats_file("missing-module"), r"has no file for module 'model.layers.1.mlp.down_proj'"),
    ("stats-truncated-file", stats_file("torn"), r"is not a readable .npz statistics file"),
    ("stats-missing-count", stats_file("no-count"), r"field 'mom2.count' is missing"),
    ("stats-path-missing", stats_file("nowhere"), r"stats.from_file .*nowhere does not exist"),
    ("stats-projector-file-wrong-shape", projectors_file((1, 64, 64)), r"has shape \(1, 64, 64\), but 2 edited layer\(s\) with 64 inputs need \(2, 64, 64\)"),
    ("stats-projector-file-scalar", projectors_file(()), r"projectors_file .*has shape \(\)"),
    # ------------------------------------------------------------------- patches
    ("patch-of-another-model", patch("other-model"), r"base.fingerprint|another model|other base weights"),
    ("patch-json-file", patch("json"), r"edits.json is not a readable safetensors patch file"),
    ("patch-missing", patch("missing"), r"missing.safetensors"),
    ("patch-export-from-yaml", command(["export", "--ckpt_path", "{tmp}/x.yaml", "--out", "{tmp}/p.safetensors"]), r"checkpoint not found|not a readable"),
    # --------------------------------------------------------------- checkpoints
    ("ckpt-missing", checkpoint("missing"), r"checkpoint not found: .*missing.ckpt"),
    ("ckpt-json-file", checkpoint("json"), r"run.json is a JSON file, not a readable sphere_pl checkpoint"),
    ("ckpt-not-a-checkpoint", checkpoint("yaml"), r"config.yaml is an unrecognised file \(neither safetensors nor torch.save data\)"),
    ("ckpt-truncated", checkpoint("truncated"), r"truncated.ckpt is a truncated or damaged checkpoint.*\n.*previous numbered checkpoint"),
    ("ckpt-a-patch", checkpoint("patch"), r"edits.safetensors is a safetensors file, not a readable sphere_pl checkpoint.*\nhint: an exported edit patch is evaluated with --patch"),
    ("ckpt-another-models", checkpoint("other-model"), r"the saved state was made for model .*\nhint: resume with the config of the run that wrote"),
    ("ckpt-another-runs", checkpoint("other-run"), r"the checkpoint is from another run: its edit batch 0 held case_ids .*\nhint: resume with the config"),
    ("ckpt-rollback-too-far", command(["rollback", "--ckpt_path", "{last}", "--batches", "3"]), r"only the last 2 batch patch\(es\) are kept"),
]


@pytest.mark.parametrize("break_input, expected", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_ends_with_one_clear_error_and_no_partial_edit(ctx, tmp_path, break_input, expected):
    argv, config = break_input(ctx, tmp_path)
    run_dir = tmp_path / "run"
    if config is not None:
        config["trainer"]["default_root_dir"] = str(run_dir)
        config["checkpoint"]["dirpath"] = str(run_dir / "checkpoints")
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
        argv = [argv[0], "--config", str(tmp_path / "bad.yaml"), *argv[1:]]
    given = {p: p.read_bytes() for p in (ctx["last"], ctx["patch"])}

    code, stderr = run_main(argv)
    text = message_of(code, stderr)
    assert code not in (0, None), f"{argv} should have failed:\n{stderr[-3000:]}"
    assert re.search(expected, text), text[-3000:]
    assert "Traceback" not in text
    assert text.strip().startswith("error:") or "error:" in stderr, text[-2000:]
    assert not list(run_dir.glob("checkpoints/*.ckpt"))  # nothing was edited, nothing written
    assert all(p.read_bytes() == content for p, content in given.items())  # given files untouched


def test_rows_cover_every_kind_of_input():
    kinds = {row[0].split("-")[0] for row in ROWS}
    assert kinds == {"config", "edits", "eval", "stats", "patch", "ckpt"} and len(ROWS) >= 30


@pytest.mark.parametrize("row", ["ckpt-truncated", "edits-malformed-json", "stats-wrong-shape", "config-rome-two-layers", "config-memory-budget-too-small"])
def test_the_real_cli_exits_non_zero_with_the_same_line(ctx, tmp_path, row):
    """Five rows (a checkpoint, an edit file, a statistics file, two settings) through `python -m sphere_pl`
    in a subprocess: status 1, the line, no traceback, nothing written."""
    break_input, expected = next(r[1:] for r in ROWS if r[0] == row)
    argv, config = break_input(ctx, tmp_path)
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    config["checkpoint"]["dirpath"] = str(tmp_path / "run" / "checkpoints")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = run_cli([argv[0], "--config", str(tmp_path / "bad.yaml"), *argv[1:]], tmp_path, cli_env(tmp_path), ok=False)
    assert result.returncode == 1
    assert re.search(expected, result.stderr) and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


"""`python -m sphere_pl study`: variants as real fits, resumed after a kill, failures recorded,
bad study configs refused before any edit, the report rebuilt from disk.

The study runs as a user runs it (a `python -m sphere_pl study` process, which starts one
`python -m sphere_pl fit` process per variant) on the tiny model: 3 batches of 2 edits.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import cli_env
from sphere_pl.files import load_checkpoint_file
from test_cli_commands import run_config

NUM_EDITS, NUM_BATCHES = 2, 3


def write_study(tmp_path: Path, tiny_model_dir: str, stats_cache: str, variants: list[dict], name: str = "tiny", **extra) -> Path:
    base = run_config(tiny_model_dir, stats_cache, tmp_path / "unused")
    for key in ("default_root_dir", "logger"):
        base["trainer"].pop(key)
    base["checkpoint"].pop("dirpath")
    base["data"].update(num_edits=NUM_EDITS, dataset_size_limit=NUM_EDITS * NUM_BATCHES)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {"name": name, "directory": str(tmp_path / "study"), "configs": [str(tmp_path / "base.yaml")],
             "overrides": {"facts.every_n_batches": 1}, "variants": variants, "logger": {"offline": True}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def study(path: Path, tmp_path: Path, *more: str, wait: bool = True):
    env = cli_env(tmp_path)
    args = [sys.executable, "-m", "sphere_pl", "study", "--config", str(path), *more]
    if not wait:
        return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(run / "checkpoints" / "last.ckpt")["sphere_pl"]["weights"]


def rank_correlation(x, y) -> float | None:
    """Spearman's ρ by hand: Pearson's r of average ranks, in float64; None for a constant series."""
    def ranks(values):
        order = sorted(values)
        return [sum(i for i, v in enumerate(order) if v == value) / order.count(value) for value in values]
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / (sxx * syy) ** 0.5


VARIANTS = [{"name": "alphaedit"}, {"name": "memit", "overrides": {"model.method": {"class_path": "sphere_pl.MEMIT", "init_args": {"layers": [1, 2]}}}}]


def test_a_study_runs_each_variant_as_a_fit_and_reports_them_side_by_side(tiny_model_dir, stats_cache, tmp_path):
    guarded = [VARIANTS[0], {**VARIANTS[1], "overrides": {**VARIANTS[1]["overrides"], "guard": {"enabled": True, "conditions": [{"metric": "canary/specificity", "drop_from_start": 2.0}]}, "canary_specificity": {"records": 1}}}]
    path = write_study(tmp_path, tiny_model_dir, stats_cache, guarded,
                       collapse={"conditions": [{"metric": "edited_so_far/efficacy_score", "below": 2.0}], "points_in_a_row": 2})
    result = study(path, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path / "study"
    for name in ("alphaedit", "memit"):
        run = root / name
        assert json.loads((run / "status.json").read_text())["status"] == "done"
        assert load_checkpoint_file(run / "checkpoints" / "last.ckpt")["sphere_pl"]["edits_applied"] == NUM_EDITS * NUM_BATCHES
        config = yaml.safe_load((run / "fit-config.yaml").read_text())
        assert config["trainer"]["logger"]["init_args"]["group"] == "tiny" and config["trainer"]["logger"]["init_args"]["name"] == name
        assert list((run / "wandb").glob("offline-run-*"))  # one W&B run per variant
    methods = {name: yaml.safe_load((root / name / "fit-config.yaml").read_text())["model"]["method"]["class_path"] for name in ("alphaedit", "memit")}
    assert methods == {"alphaedit": "sphere_pl.AlphaEdit", "memit": "sphere_pl.MEMIT"}
    assert final_weights(root / "alphaedit").keys() == final_weights(root / "memit").keys()
    assert any(not torch.equal(a, b) for a, b in zip(final_weights(root / "alphaedit").values(), final_weights(root / "memit").values()))

    # the report's rows are the runs' own: every evaluation point of each variant, as its summary wrote them
    with open(root / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name in ("alphaedit", "memit"):
        with open(root / name / "metrics.csv", newline="") as f:
            own = [r for r in csv.DictReader(f) if r.get("edited_so_far/efficacy_score")]
        mine = [r for r in rows if r["variant"] == name and float(r["edits"]) > 0]
        assert [float(r["edits"]) for r in mine] == [float(r["edits"]) for r in own] == [2.0, 4.0, 6.0]
        start = [r for r in rows if r["variant"] == name and float(r["edits"]) == 0]
        assert len(start) == 1 and start[0]["never_edited/specificity_score"]  # the never-edited facts before editing
        # before editing, edited_so_far shows the pre-edit scores of the facts to be edited (what the collapse rule compares with)
        with open(root / name / "metrics.csv", newline="") as f:
            pre_edit = [r["pre_edit/to_edit/efficacy_score"] for r in csv.DictReader(f) if r.get("pre_edit/to_edit/efficacy_score")]
        assert len(pre_edit) == 1 and float(start[0]["edited_so_far/efficacy_score"]) == float(pre_edit[0])
        assert [float(r["edited_so_far/efficacy_score"]) for r in mine] == [float(r["edited_so_far/efficacy_score"]) for r in own]
    report = (root / "report.md").read_text()
    # the stated rule (an efficacy below 2.0 always holds) makes both collapse at the first of two points in a row
    assert "Collapse rule: edited_so_far/efficacy_score below 2.0, at 2 evaluation point(s) in a row." in report
    assert report.count("| 2 edits (edited_so_far/efficacy_score") == 2
    # no generated efficacy and no batch rule here ("–"); memit ran with the guard (a drop of 2 cannot happen: nothing can breach)
    assert "< 2.0) | – | – | no breach |" in report
    assert report.count("| off |") == 1  # alphaedit ran without the guard
    # seconds per edit, split by hand from each run's phase timer: editing phases, then evaluations/HE/guard
    for name in ("alphaedit", "memit"):
        summary = json.loads((root / name / "summary.json").read_text())
        phases = summary["seconds"]
        measuring = sum(phases.get(k, 0.0) for k in ("evaluation", "general", "he", "canary", "guard"))
        editing = sum(v for k, v in phases.items() if k not in ("setup", "statistics", "convergence_report", "evaluation", "general", "he", "canary", "guard"))
        assert measuring > 0 and editing > 0 and "keys" in phases
        assert f"| {name} | done | {summary['edits']} | {editing / summary['edits']:.2f} | {measuring / summary['edits']:.2f} |" in report
    # the metric the collapse rule reads, side by side: a row per point, a column per variant, the runs' own values
    side = report.split("## edited_so_far/efficacy_score, side by side")[1].split("\n## ")[0]
    assert "| edits | alphaedit | memit |" in side
    by_variant = {name: {float(r["edits"]): float(r["edited_so_far/efficacy_score"]) for r in rows if r["variant"] == name} for name in ("alphaedit", "memit")}
    for edits in (0.0, 2.0, 4.0, 6.0):
        assert f"| {int(edits)} | {by_variant['alphaedit'][edits]:.3f} | {by_variant['memit'][edits]:.3f} |" in side
    # beside HE's correlations, the edit count's own (an independent rank computation over the run's rows)
    with open(root / "memit" / "metrics.csv", newline="") as f:
        he_rows = [r for r in csv.DictReader(f) if r.get("he/layer1")]
    line = next(l for l in report.splitlines() if l.startswith("- memit, the edit count itself"))
    checked = 0
    scored = [k for k in he_rows[0] if k.startswith(("last_batch/", "edited_so_far/", "never_edited/", "general/")) and "magnitude" not in k]
    for metric in scored:
        points = [(float(r["edits"]), float(r[metric])) for r in he_rows if r.get(metric)]
        rho = rank_correlation(*zip(*points)) if len(points) >= 3 else None
        if rho is None:
            assert f" {metric} " not in line
        else:
            assert f"{metric} {rho:.2f}" in line
            checked += 1
    assert checked
    for png in ("he.png", "metrics.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --report rebuilds the same report from what is on disk
    (root / "report.md").unlink()
    assert study(path, tmp_path, "--report").returncode == 0
    assert (root / "report.md").read_text() == report
    # --export copies the report and every variant's rows, not its checkpoints
    exported = tmp_path / "exported"
    assert study(path, tmp_path, "--export", str(exported)).returncode == 0
    assert (exported / "report.md").read_text() == report and (exported / "he.png").exists()
    for name in ("alphaedit", "memit"):
        assert sorted(p.name for p in (exported / name).iterdir()) == ["fit-config.yaml", "he_analysis.json", "metrics.csv", "status.json", "summary.json"]
        with open(exported / name / "metrics.csv", newline="") as f, open(root / name / "metrics.csv", newline="") as g:
            assert list(csv.DictReader(f)) == list(csv.DictReader(g))
        assert json.loads((exported / name / "status.json").read_text())["edits"] == NUM_EDITS * NUM_BATCHES
    # a finished study run again edits nothing more
    again = study(path, tmp_path)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 2


def test_a_killed_study_resumes_its_unfinished_variant_exactly_and_skips_the_finished_one(tiny_model_dir, stats_cache, tmp_path):
    variants = [{"name": "first"}, {"name": "second", "overrides": {"model.method.init_args.values.num_grad_steps": 25}}]
    path = write_study(tmp_path, tiny_model_dir, stats_cache, variants)
    process = study(path, tmp_path, wait=False)
    second = tmp_path / "study" / "second" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not second.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the study and its running fit, as a machine going down would
    process.wait()
    done = load_checkpoint_file(second)["sphere_pl"]["edits_applied"]
    assert done < NUM_EDITS * NUM_BATCHES
    first_before = final_weights(tmp_path / "study" / "first")
    # an unfinished variant's rows are exported from its last checkpoint
    assert study(path, tmp_path, "--export", str(tmp_path / "exported")).returncode == 0
    with open(tmp_path / "exported" / "second" / "metrics.csv", newline="") as f:
        assert max(float(r["edits"]) for r in csv.DictReader(f)) == done
    assert json.loads((tmp_path / "exported" / "second" / "status.json").read_text()) == {"status": "unfinished", "edits": done}

    result = study(path, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "first: done, skipped" in result.stdout and "second: resuming from" in result.stdout
    assert all(torch.equal(first_before[k], v) for k, v in final_weights(tmp_path / "study" / "first").items())

    # the same variant run without interruption ends with the same weights
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    reference = write_study(fresh, tiny_model_dir, stats_cache, variants[1:])
    assert study(reference, fresh).returncode == 0
    resumed, uninterrupted = final_weights(tmp_path / "study" / "second"), final_weights(fresh / "study" / "second")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_failing_variant_is_recorded_and_the_others_go_on(tiny_model_dir, stats_cache, tmp_path):
    variants = [{"name": "broken", "overrides": {"model.method.init_args.values.lr": 1e30}}, {"name": "fine"}]
    path = write_study(tmp_path, tiny_model_dir, stats_cache, variants)
    unknown = study(path, tmp_path, "--only", "fine", "finee")
    assert unknown.returncode == 1 and "no variant named 'finee' (variants: broken, fine)" in unknown.stderr
    assert not (tmp_path / "study").exists()
    only = study(path, tmp_path, "--only", "fine")  # a subset: only that one runs
    assert only.returncode == 0, only.stderr[-3000:]
    assert "broken" not in only.stdout and not (tmp_path / "study" / "broken" / "status.json").exists()
    result = study(path, tmp_path)
    assert result.returncode == 1 and "fine: done, skipped" in result.stdout
    broken = json.loads((tmp_path / "study" / "broken" / "status.json").read_text())
    assert broken["status"] == "failed" and "target values did not move" in broken["error"]
    assert json.loads((tmp_path / "study" / "fine" / "status.json").read_text())["status"] == "done"
    assert "| broken | failed |" in (tmp_path / "study" / "report.md").read_text()


def test_a_variant_another_study_process_is_running_is_reported_running_and_left_alone(tiny_model_dir, stats_cache, tmp_path):
    from sphere_pl.lightning import RunLock

    path = write_study(tmp_path, tiny_model_dir, stats_cache, [{"name": "busy"}])
    lock = RunLock.take(tmp_path / "study" / "busy" / "checkpoints")  # as the running fit holds it
    try:
        result = study(path, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "busy: running, skipped" in result.stdout
        assert not (tmp_path / "study" / "busy" / "status.json").exists()  # the running one's status is not touched
        assert "| busy | running | 0 |" in (tmp_path / "study" / "report.md").read_text()
    finally:
        lock.release()
    assert study(path, tmp_path, "--report").returncode == 0
    assert "| busy | not started | 0 |" in (tmp_path / "study" / "report.md").read_text()  # a released lock is not "running"


@pytest.mark.parametrize("variants, message", [
    ([{"name": "a", "overrides": {"model.method": "memitt"}}], r"error: variant 'a': field 'model.method': unknown editing method 'memitt'"),
    ([{"name": "a"}, {"name": "a"}], r"error: .*variant 'a': field 'name': two variants are named 'a'"),
    ([{"name": "a", "overrides": {"model.method.init_args.values.lr": -1}}], r"error: variant 'a': .*values.lr = -1"),
    ([{"name": "a", "overrides": {"data.no_such_setting": 3}}], r"error: variant 'a': .*no_such_setting"),
    ([{"name": "a", "configs": ["missing.yaml"]}], r"error: .*variant 'a': field 'configs': .*missing.yaml does not exist"),
])
def test_a_bad_study_config_is_refused_before_any_edit_naming_the_variant_and_field(tiny_model_dir, stats_cache, tmp_path, variants, message):
    import re

    result = study(write_study(tmp_path, tiny_model_dir, stats_cache, variants), tmp_path)
    assert result.returncode == 1 and re.search(message, result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "study").glob("*/checkpoints/*.ckpt")) and not list((tmp_path / "study").glob("*/fit.log"))


def test_a_study_directory_holding_another_studys_runs_is_refused(tiny_model_dir, stats_cache, tmp_path):
    first = write_study(tmp_path, tiny_model_dir, stats_cache, [{"name": "a"}])
    assert study(first, tmp_path).returncode == 0
    before = final_weights(tmp_path / "study" / "a")
    other = write_study(tmp_path, tiny_model_dir, stats_cache, [{"name": "a", "overrides": {"data.seed": 7}}], name="other")
    result = study(other, tmp_path)
    assert result.returncode == 1
    assert "error: variant 'a': " in result.stderr and "holds a run made with other settings (field data.seed: 0 then, 7 now)" in result.stderr
    assert all(torch.equal(before[k], v) for k, v in final_weights(tmp_path / "study" / "a").items())


SHIPPED_STUDIES = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_STUDIES, ids=lambda p: p.stem)
def test_every_shipped_study_config_passes_its_settings_check(path, tmp_path, monkeypatch):
    """The settings check a study runs before any edit, on every study in benchmarks/studies (run from
    the repository root, as their comments say): a variant named `...+sphere...` has the projection, the others none."""
    from sphere_pl.commands.study import Study

    monkeypatch.chdir(path.parents[2])
    study = Study.load(path)
    study.directory = tmp_path / "study"
    for variant in study.variants:
        config = study.prepare(variant)
        filters = config["model"]["filters"] or []
        assert bool(filters) == ("+sphere" in variant.name), variant.name
        assert config["data"]["source"].startswith("../shared/data/")


def _first_variant_prepared(stem: str, tmp_path, monkeypatch):
    """The shipped study `stem`'s first variant prepared in a temporary directory (from the repository
    root, as the study configs' paths are): (study, variant, its config, its recorded fit-config.yaml)."""
    from sphere_pl.commands.study import Study

    monkeypatch.chdir(SHIPPED_STUDIES[0].parents[2])
    study = Study.load(SHIPPED_STUDIES[[p.stem for p in SHIPPED_STUDIES].index(stem)])
    study.directory = tmp_path / "study"
    variant = study.variants[0]
    config = study.prepare(variant)
    return study, variant, config, study.variant_dir(variant) / "fit-config.yaml"


def test_a_run_recorded_before_a_setting_existed_resumes_and_a_changed_zsre_convention_is_refused(tmp_path, monkeypatch):
    """A setting sphere_pl added after a variant's run began is taken as the config gives it (and said);
    a ZsRE run recorded before `data.zsre_target` existed taught `alt`, so it does not resume under `answer`."""
    from sphere_pl.commands.study import StudyConfigError

    study, answer, config, recorded = _first_variant_prepared("zsre_targets", tmp_path, monkeypatch)
    old = yaml.safe_load(recorded.read_text())
    old.pop("guard")  # a run recorded before the guard existed
    recorded.write_text(yaml.safe_dump(old))
    assert study.prepare(answer) == config
    old["data"].pop("zsre_target")  # ... and before the ZsRE convention was a setting
    recorded.write_text(yaml.safe_dump(old))
    with pytest.raises(StudyConfigError, match=r"field data.zsre_target: 'alt' then, 'answer' now"):
        study.prepare(answer)


def test_a_run_recorded_before_the_model_section_resumes_and_one_of_another_model_is_refused(tmp_path, monkeypatch):
    """Runs recorded when the loading settings were SequentialEditor's own (`model.model_name_or_path`,
    `model.dtype`) resume under `model.model`; the old layout naming another dtype is still another run."""
    from sphere_pl.commands.study import StudyConfigError

    study, variant, config, recorded = _first_variant_prepared("long_horizon", tmp_path, monkeypatch)
    old = yaml.safe_load(recorded.read_text())
    loading = old["model"].pop("model")["init_args"]
    old["model"].update(model_name_or_path=loading["name_or_path"], dtype=loading["dtype"], gguf_file=None,
                        trust_remote_code=False, module_templates=None)
    recorded.write_text(yaml.safe_dump(old))
    assert study.prepare(variant) == config
    old["model"]["dtype"] = "bfloat16"
    recorded.write_text(yaml.safe_dump(old))
    with pytest.raises(StudyConfigError, match=r"field model.model.init_args.dtype: 'bfloat16' then, 'float32' now"):
        study.prepare(variant)


def test_the_pooled_correlations_rank_every_variants_points_together():
    """HE against a collapse metric over the points of all variants together, beside the edit count
    (checked against a by-hand rank correlation)."""
    from types import SimpleNamespace

    from sphere_pl.monitors.rules import CollapseRule
    from sphere_pl.commands.study.report import _pooled_correlations

    torch.manual_seed(0)
    def points(scale):
        he = torch.rand(5).cumsum(0) * scale
        return [{"edits": 100.0 * (i + 1), "he/layer1": float(h), "he/layer2": float(torch.rand(())),
                 "general/perplexity/perplexity": float(20 + 40 * h + torch.rand(()))} for i, h in enumerate(he)]
    results = [{"variant": "a", "points": [{"edits": 0.0, "general/perplexity/perplexity": 20.0}] + points(1.0)},
               {"variant": "b", "points": points(0.3)}]
    rule = CollapseRule([{"metric": "general/perplexity/perplexity", "ratio_to_start_above": 2.0}])
    lines = _pooled_correlations(SimpleNamespace(collapse=rule), results)
    pooled = [p for r in results for p in r["points"] if p["edits"] > 0]
    ppl = [p["general/perplexity/perplexity"] for p in pooled]
    expected = [rank_correlation([p[k] for p in pooled], ppl) for k in ("edits", "he/layer1", "he/layer2")]
    assert lines[-1] == "| general/perplexity/perplexity | 10 | " + " | ".join(f"{v:.2f}" for v in expected) + " |"
    assert expected[1] > expected[0]  # built so: HE orders the two variants' damage, the edit count cannot


def test_a_collapse_rule_on_a_metric_no_variant_records_is_refused_before_any_edit(tiny_model_dir, stats_cache, tmp_path):
    rule = {"conditions": [{"metric": "edited_so_far/efficacy_scor", "below": 0.5}], "points_in_a_row": 2, "stop": True}
    result = study(write_study(tmp_path, tiny_model_dir, stats_cache, [{"name": "a"}], collapse=rule), tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: variant 'a': collapse: conditions[0]: metric 'edited_so_far/efficacy_scor' is never recorded" in result.stderr
    assert "did you mean 'edited_so_far/efficacy_score'" in result.stderr
    assert not list((tmp_path / "study").glob("*/fit.log"))  # no variant started


def test_report_before_any_run_is_one_line(tiny_model_dir, stats_cache, tmp_path):
    result = study(write_study(tmp_path, tiny_model_dir, stats_cache, [{"name": "a"}]), tmp_path, "--report")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: study 'tiny' has not run yet" in result.stderr and "hint: " in result.stderr


def test_a_study_killed_after_a_variants_last_checkpoint_reports_the_whole_runs_seconds(tiny_model_dir, stats_cache, tmp_path):
    """The status and summary are written after the last checkpoint: a kill in between leaves a variant that
    resumes with no edit left. Its report then gives the editing seconds of the whole run (they travel in
    the checkpoint), not those of the resumed process (0.00 per edit)."""
    path = write_study(tmp_path, tiny_model_dir, stats_cache, [{"name": "a", "overrides": {"trainer.enable_progress_bar": True}}])
    assert study(path, tmp_path).returncode == 0
    run = tmp_path / "study" / "a"
    line = next(line for line in (tmp_path / "study" / "report.md").read_text().splitlines() if line.startswith("| a | done |"))
    editing = float(line.split("|")[4])
    assert editing > 0
    log = (run / "fit.log").read_text()  # a log file stays readable: a line per batch, no bars, escapes or Lightning's epoch note
    progress = [line for line in log.splitlines() if line.startswith("editing: ")]
    assert len(progress) == NUM_BATCHES and progress[-1].startswith(f"editing: 100% {NUM_EDITS * NUM_BATCHES}/{NUM_EDITS * NUM_BATCHES} edits")
    assert "\r" not in log and "\x1b[" not in log and "max_epochs=1" not in log and "scoring edited facts" not in log
    for name in ("status.json", "summary.json"):
        (run / name).unlink()  # as if killed after the last checkpoint
    result = study(path, tmp_path)
    assert result.returncode == 0 and "a: resuming from" in result.stdout
    again = next(line for line in (tmp_path / "study" / "report.md").read_text().splitlines() if line.startswith("| a | done |"))
    assert float(again.split("|")[4]) == editing


def test_seconds_per_edit_reads_the_editing_phases_alone(tmp_path):
    """A resumed run re-measures (its evaluation seconds grow) but edits nothing: its editing figure must be the
    uninterrupted run's, bit for bit. Phases summing to 0.210 s over 6 edits sit on the 0.035 rounding edge,
    where the total less the measuring phases printed 0.03 for one run and 0.04 for the other."""
    from sphere_pl.commands.study.report import seconds_per_edit
    editing = {"value_optimisation": 0.152, "keys": 0.048, "solve": 0.003, "projection": 0.007}
    figures = []
    for name, evaluation in (("first", 0.4), ("resumed", 0.45)):
        directory = tmp_path / name
        directory.mkdir()
        seconds = {"setup": 0.3, "statistics": 0.2, "evaluation": evaluation, "he": 0.005, **editing}
        (directory / "summary.json").write_text(json.dumps({"edits": 6, "seconds": seconds}))
        figures.append(seconds_per_edit(directory))
    expected = sum(editing.values()) / 6  # the editing phases, summed in the same order
    assert [f["editing"] for f in figures] == [expected, expected]
    assert [f"{f['editing']:.2f}" for f in figures] == [f"{expected:.2f}"] * 2
    assert [f["measuring"] for f in figures] == [(0.4 + 0.005) / 6, (0.45 + 0.005) / 6]


def test_streams_multiply_the_variants_and_pairs_are_compared_stream_by_stream(tmp_path):
    """Every variant runs on every stream (`<variant>@<stream>`, the stream's overrides under the variant's); the
    report gives each variant's collapse as mean (range) over the streams, locates it to the batch with the canary
    rule, and gives each pair's per-stream differences beside the variant's own range across the streams."""
    from types import SimpleNamespace

    from sphere_pl.commands.study.config import Study, parse
    from sphere_pl.commands.study.streams import collapse_batch, pair_lines, summary_lines
    from sphere_pl.monitors.rules import CollapseRule

    (tmp_path / "c.yaml").write_text("{}")
    config = {"name": "s", "directory": str(tmp_path / "study"), "configs": [str(tmp_path / "c.yaml")],
              "variants": [{"name": "memit", "overrides": {"data.seed": 9}}, {"name": "memit+sphere"}],
              "streams": [{"name": "file"}, {"name": "shuffled", "overrides": {"data.shuffle": True, "data.seed": 1}}],
              "pairs": [["memit", "memit+sphere"]]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    study = Study.from_args(parse(["--config", str(tmp_path / "s.yaml")]))
    assert [v.name for v in study.variants] == ["memit@file", "memit@shuffled", "memit+sphere@file", "memit+sphere@shuffled"]
    assert study.variants[1].overrides == {"data.shuffle": True, "data.seed": 9} and study.pairs == [("memit", "memit+sphere")]

    rule = CollapseRule([{"metric": "edited_so_far/efficacy_score", "below": 0.5}], 1)
    canary = CollapseRule([{"metric": "canary/perplexity", "ratio_to_start_above": 2.0}], 2)
    canaries = [{"edits": 0.0, "canary/perplexity": 10.0}] + [{"edits": 100.0 * b, "canary/perplexity": p} for b, p in enumerate([11, 25, 19, 30, 40], 1)]
    assert collapse_batch(canary, canaries) == {"edits": 400, "batch": 4, "why": "canary/perplexity 30.000, 3.00x its pre-edit 10.000"}

    def run(name, efficacy, collapse):
        points = [{"edits": e, "edited_so_far/efficacy_score": v} for e, v in zip((100.0, 200.0, 300.0), efficacy)]
        return {"variant": name, "points": points, "edits": 300, "collapse": {"edits": collapse} if collapse else None,
                "collapse_generated": None, "collapse_batch": None}
    results = [run("memit@file", [0.9, 0.7, 0.4], 300), run("memit@shuffled", [0.8, 0.6, 0.6], None),
               run("memit+sphere@file", [0.95, 0.9, 0.8], None), run("memit+sphere@shuffled", [0.85, 0.62, 0.7], None)]
    fake = SimpleNamespace(streams=study.streams, pairs=study.pairs, collapse=rule)
    lines = summary_lines(fake, results)
    assert "| memit | 2 of 2 | 300 in 1 of 2, none by 300 in 1 | none by 300 in 2 | none by 300 in 2 |" in lines
    assert "| memit+sphere | 2 of 2 | none by 300 in 2 | none by 300 in 2 | none by 300 in 2 |" in lines
    # a stream not started says nothing: neither "never collapsed" nor counted among the streams that did
    partial = [results[0], {**results[1], "points": [], "edits": 0}, {**results[2], "points": [], "edits": 0},
               {**results[3], "points": [], "edits": 0}]
    lines = summary_lines(fake, partial)
    assert "| memit | 1 of 2 | 300 in 1 of 1 | none by 300 in 1 | none by 300 in 1 |" in lines
    assert "| memit+sphere | 0 of 2 | not run | not run | not run |" in lines
    table = pair_lines(fake, "memit", "memit+sphere", results[:2], results[2:])
    # at 200 edits: differences +0.20 and +0.02 (same sign), mean +0.11, memit's own range 0.7 - 0.6 = 0.1: exceeds it
    assert "| 200 | +0.200, +0.020 | +0.110 | 0.100 | yes |" in table
    # at 300 edits: +0.40 and +0.10, mean +0.25, range 0.2: exceeds; at 100: +0.05 and +0.05, mean 0.05 < range 0.1: not
    assert "| 300 | +0.400, +0.100 | +0.250 | 0.200 | yes |" in table and "| 100 | +0.050, +0.050 | +0.050 | 0.100 | no |" in table
    assert "### memit+sphere − memit, stream by stream (file, shuffled)" in table

    # a stream one of the pair has not run yet (no points) is left out, not allowed to empty the table; on the one
    # stream left there is no range across streams to judge a difference against
    started = [results[0], {**results[1], "points": []}]
    table = pair_lines(fake, "memit", "memit+sphere", started, results[2:])
    assert "### memit+sphere − memit, stream by stream (file)" in table
    assert "| 200 | +0.200 | +0.200 | 0.000 | one stream |" in table and "| 300 | +0.400 | +0.400 | 0.000 | one stream |" in table


def test_a_resumed_variants_status_names_only_the_latest_attempts_error(tmp_path):
    """fit.log is appended across attempts; an error from an earlier, resumed attempt is not the current one's."""
    from sphere_pl.commands.study.runner import ATTEMPT_MARK, _error_lines

    log = tmp_path / "fit.log"
    log.write_text(f"{ATTEMPT_MARK}first\nerror: stopped by SIGTERM\nhint: resume\n"
                   f"{ATTEMPT_MARK}second\nediting\nerror: target values did not move\n")
    assert _error_lines(log) == "error: target values did not move"
    log.write_text("no attempt mark\nerror: only one\n")  # a log written before the marks existed
    assert _error_lines(log) == "error: only one"

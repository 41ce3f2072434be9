"""`python -m sphere_pl study --config study.yaml`: one edit stream, several variants, each a real `fit`.

A study names fit configs every variant starts from, settings every variant shares (the edit
stream: data, evaluation points), and a list of variants (method x filters x overrides):

    name: compare-200
    directory: runs/studies/compare-200      # one folder per variant below it
    configs: [configs/smollm2/common.yaml]   # fit configs, merged in order
    overrides: {data.dataset_size_limit: 200, data.num_edits: 20}
    variants:
    - {name: memit, configs: [configs/smollm2/memit.yaml], overrides: {model.filters: []}}
    - {name: memit+sphere, configs: [configs/smollm2/memit.yaml]}
    collapse:                                # the rule, stated before the run
      conditions:
      - {metric: edited_so_far/efficacy_score, below: 0.5}
      - {metric: never_edited/specificity_score, drop_from_start: 0.2}
      points_in_a_row: 2
      stop: true                             # end a variant once it has collapsed
    logger: {project: sphere_pl}             # W&B, offline unless credentials: one run per variant, grouped

Each variant runs as `python -m sphere_pl fit` in its own directory (checkpoints, logs, summary),
so it has the same checkpoints and exact resume as any run. Before any edit every variant's
config is checked (settings, methods, unique names, and that the directory holds no other
study's runs of the same name). An interrupted study resumes every unfinished variant from its
last checkpoint and skips finished ones; a variant that fails is recorded with its error and the
others go on. The report (`report.md`, `report.csv`, `he.png`, `metrics.png`) is rebuilt from what
is on disk after every variant, or alone with `--report`; `--export DIR` copies the report and each
variant's rows (also a running variant's, from its last checkpoint) into DIR, without checkpoints,
to be committed while the runs go on.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..evaluation import protocol
from ..sphere.analysis import he_metric_correlations, spearman
from .checkpoint_io import load_checkpoint_file
from .callbacks import RunLock, write_rows_csv
from .collapse import CollapseRule, start_value

STATUS = "status.json"


class StudyConfigError(ValueError):
    """A study config that cannot run: the message names the variant and the field."""


@dataclass
class Variant:
    name: str
    configs: list[str] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)


@dataclass
class Study:
    name: str
    directory: Path
    configs: list[str]
    overrides: dict
    variants: list[Variant]
    collapse: CollapseRule | None
    logger: dict | None
    source: Path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Study":
        path = Path(path)
        if not path.is_file():
            raise StudyConfigError(f"study config not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise StudyConfigError(f"{path}: expected a mapping of name, directory, configs, overrides, variants")
        unknown = set(raw) - {"name", "directory", "configs", "overrides", "variants", "collapse", "logger"}
        if unknown:
            raise StudyConfigError(f"{path}: unknown field(s) {sorted(unknown)}")
        for key in ("name", "directory", "variants"):
            if not raw.get(key):
                raise StudyConfigError(f"{path}: field {key!r} is missing")
        variants, seen = [], set()
        for i, entry in enumerate(raw["variants"]):
            if not isinstance(entry, dict) or not entry.get("name"):
                raise StudyConfigError(f"{path}: variants[{i}]: field 'name' is missing")
            name = str(entry["name"])
            if name in seen:
                raise StudyConfigError(f"{path}: variant {name!r}: field 'name': two variants are named {name!r}")
            if "/" in name or name.startswith("."):
                raise StudyConfigError(f"{path}: variant {name!r}: field 'name': must be a plain folder name")
            seen.add(name)
            extra = set(entry) - {"name", "configs", "overrides"}
            if extra:
                raise StudyConfigError(f"{path}: variant {name!r}: unknown field(s) {sorted(extra)}")
            variants.append(Variant(name, list(entry.get("configs") or []), dict(entry.get("overrides") or {})))
        try:
            collapse = CollapseRule.from_config(raw["collapse"], f"{path}: collapse") if raw.get("collapse") else None
        except ValueError as e:
            raise StudyConfigError(str(e)) from None
        base = path.parent
        configs = [str(_resolve(c, base)) for c in raw.get("configs") or []]
        for v in variants:
            v.configs = [str(_resolve(c, base)) for c in v.configs]
            for c in v.configs:
                if not Path(c).is_file():
                    raise StudyConfigError(f"{path}: variant {v.name!r}: field 'configs': {c} does not exist")
        for c in configs:
            if not Path(c).is_file():
                raise StudyConfigError(f"{path}: field 'configs': {c} does not exist")
        directory = Path(raw["directory"])
        return cls(str(raw["name"]), directory, configs, dict(raw.get("overrides") or {}), variants, collapse, raw.get("logger"), path)

    # ---------------------------------------------------------------- configs
    def variant_dir(self, variant: Variant) -> Path:
        return self.directory / variant.name

    def run_overrides(self, variant: Variant) -> dict:
        """Everything this study sets in the variant's fit config, nested: the shared settings, the
        variant's, then where its files go, its W&B run and the collapse rule."""
        directory = self.variant_dir(variant).resolve()
        logger = {"project": "sphere_pl", **(self.logger or {}), "name": variant.name, "group": self.name, "save_dir": str(directory)}
        nested: dict = {}
        for dotted, value in {**self.overrides, **variant.overrides}.items():
            _set(nested, dotted, value)
        _set(nested, "trainer.default_root_dir", str(directory))
        _set(nested, "trainer.logger", {"class_path": "sphere_pl.lightning.loggers.AutoWandbLogger", "init_args": logger})
        _set(nested, "checkpoint.dirpath", str(directory / "checkpoints"))
        _set(nested, "summary.dirpath", str(directory))
        _set(nested, "he_analysis.dirpath", str(directory))
        if self.collapse is not None:
            _set(nested, "collapse", self.collapse.as_config())
        if _get(nested, "model.cases_dir"):
            _set(nested, "model.cases_dir", str(directory / "cases"))
        return nested

    def fit_args(self, variant: Variant) -> list[str]:
        """The `fit` arguments of a variant (its override file is written by `prepare`)."""
        args = ["fit"]
        for c in [*self.configs, *variant.configs]:
            args += ["--config", c]
        return args + ["--config", str(self.variant_dir(variant) / "study-overrides.yaml")]

    def prepare(self, variant: Variant) -> dict:
        """Write the variant's override file and check its whole config (settings, method) before any
        edit; refuse a directory that holds another study's run under this variant's name."""
        directory = self.variant_dir(variant)
        directory.mkdir(parents=True, exist_ok=True)
        overrides = directory / "study-overrides.yaml"
        wanted = yaml.safe_dump(self.run_overrides(variant), sort_keys=True)
        config = _print_config(self.fit_args(variant)[:-2] + ["--config", _temp_file(directory, wanted)], variant.name)
        recorded = directory / "fit-config.yaml"
        if recorded.exists():
            before = _with_old_defaults(yaml.safe_load(recorded.read_text()))
            differences = _differences(_without_paths(before), _without_paths(config))
            added = [d for d in differences if d.split(": ", 1)[1].startswith("None then")]
            if added:  # settings this version of sphere_pl adds: the run could not have set them
                print(f"study {self.name}: {variant.name}: settings added since its run began, taken as this config gives them: "
                      + ", ".join(d.split(":", 1)[0] for d in added), flush=True)
            differences = [d for d in differences if d not in added]
            if differences:
                raise StudyConfigError(
                    f"variant {variant.name!r}: {directory} holds a run made with other settings "
                    f"(field {differences[0]}): give this study another directory, or remove that folder"
                )
        overrides.write_text(wanted)
        recorded.write_text(yaml.safe_dump(config, sort_keys=True))
        return config

    # ---------------------------------------------------------------- running
    def status(self, variant: Variant) -> dict:
        """What status.json says ("unfinished" without one when a checkpoint exists: a killed study), or "running" while a `fit` holds the variant's checkpoint directory."""
        path = self.variant_dir(variant) / STATUS
        started = (self.variant_dir(variant) / "checkpoints" / "last.ckpt").exists()
        status = json.loads(path.read_text()) if path.exists() else {"status": "unfinished" if started else "not started"}
        if status["status"] != "done" and RunLock.held(self.variant_dir(variant) / "checkpoints"):
            status = {**status, "status": "running"}
        return status

    def select(self, names: list[str]) -> list[Variant]:
        """The variants named (in the study's order); an unknown name is an error."""
        known = [v.name for v in self.variants]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise StudyConfigError(f"{self.source}: no variant named {', '.join(map(repr, unknown))} (variants: {', '.join(known)})")
        return [v for v in self.variants if v.name in names]

    def run(self, only: list[str] | None = None) -> int:
        """Every unfinished variant (or those in `only`), one after another; the report after each.
        Returns the exit status."""
        chosen = self.select(only) if only else self.variants
        self.directory.mkdir(parents=True, exist_ok=True)
        for variant in chosen:  # every config checked before the first edit of any variant
            self.prepare(variant)
        stopped = _Forwarder()
        for variant in chosen:
            state = self.status(variant)["status"]
            if state in ("done", "running"):
                # a variant another study process is running is left to it (its status file too)
                print(f"study {self.name}: {variant.name}: {state}, skipped", flush=True)
                continue
            code = self._run_variant(variant, stopped)
            write_report(self)
            if stopped.signal is not None:
                print(f"study {self.name}: stopped by {signal.Signals(stopped.signal).name}; run the same command to resume", file=sys.stderr)
                return 128 + stopped.signal
            if code != 0:
                print(f"study {self.name}: {variant.name} failed (exit {code}); going on with the others", file=sys.stderr, flush=True)
        write_report(self)
        failed = [v.name for v in chosen if self.status(v)["status"] == "failed"]
        return 1 if failed else 0

    def _run_variant(self, variant: Variant, stopped: "_Forwarder") -> int:
        directory = self.variant_dir(variant)
        last = directory / "checkpoints" / "last.ckpt"
        args = self.fit_args(variant) + (["--ckpt_path", str(last)] if last.exists() else [])
        print(f"study {self.name}: {variant.name}: {'resuming from ' + str(last) if last.exists() else 'starting'} "
              f"(log: {directory / 'fit.log'})", flush=True)
        start = time.time()
        with open(directory / "fit.log", "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m sphere_pl {' '.join(args)}\n")
            log.flush()
            process = subprocess.Popen([sys.executable, "-m", "sphere_pl", *args], stdout=log, stderr=subprocess.STDOUT)
            with stopped.forwarding_to(process):
                code = process.wait()
        status = {"status": "done" if code == 0 else "failed", "exit": code, "seconds": round(time.time() - start, 1)}
        if code != 0:
            status["error"] = _error_lines(directory / "fit.log")
            if stopped.signal is not None:
                status["status"] = "stopped"
        (directory / STATUS).write_text(json.dumps(status, indent=1))
        print(f"study {self.name}: {variant.name}: {status['status']} after {status['seconds']:.0f} s", flush=True)
        return code


class _Forwarder:
    """Passes SIGTERM/SIGINT on to the running variant, which checkpoints and stops; the study then stops too."""

    def __init__(self):
        self.signal: int | None = None

    @contextlib.contextmanager
    def forwarding_to(self, process: subprocess.Popen):
        def handler(signum, frame):
            self.signal = signum
            process.send_signal(signal.SIGTERM)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# ------------------------------------------------------------------------------ the report


def variant_rows(directory: Path) -> list[dict]:
    """The evaluation rows a variant recorded: from its last checkpoint (also mid-run), else its metrics.csv."""
    last = directory / "checkpoints" / "last.ckpt"
    if last.exists():
        return [dict(r) for r in load_checkpoint_file(last)["sphere_pl"].get("progress_history", [])]
    path = directory / "metrics.csv"
    if path.exists():
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    return []


#: phases that measure the run (fact and general evaluations, HE, the collapse guard), not edit it
MEASURING_PHASES = ("evaluation", "general", "he", "guard")
#: one-off phases, left out of the per-edit figures
ONE_OFF_PHASES = ("setup", "statistics", "convergence_report")


def seconds_per_edit(directory: Path) -> dict[str, float] | None:
    """A finished variant's seconds per edit from its summary's phase timer, set-up and statistics
    excluded: {"editing": the editing phases (keys, value search, solve, projection, ...),
    "measuring": evaluations, HE and guard checks}. None before the run has a summary."""
    path = directory / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if not summary.get("edits"):
        return None
    seconds = {k: v for k, v in summary.get("seconds", {}).items() if k not in ONE_OFF_PHASES}
    measuring = sum(v for k, v in seconds.items() if k in MEASURING_PHASES)
    return {"editing": (sum(seconds.values()) - measuring) / summary["edits"], "measuring": measuring / summary["edits"]}


POINT_METRICS = (protocol.LAST_BATCH, protocol.EDITED_SO_FAR, protocol.NEVER_EDITED, protocol.GENERAL)


def write_report(study: Study, rows_by_variant: dict[str, list[dict]] | None = None) -> Path:
    """`report.md` and `report.csv` (final and per-point metrics, HE change per layer, seconds per edit,
    collapse point) and `he.png`, `metrics.png` in the study directory, from what is on disk
    (`rows_by_variant`: each variant's `variant_rows`, when the caller has read them already)."""
    directory = study.directory
    rows_by_variant = rows_by_variant or {v.name: variant_rows(study.variant_dir(v)) for v in study.variants}
    results = []
    for variant in study.variants:
        vdir = study.variant_dir(variant)
        rows = rows_by_variant[variant.name]
        points = [_with_pre_edit_values(r, rows) for r in rows if any(k.startswith(POINT_METRICS) for k in r)]
        summary = json.loads((vdir / "summary.json").read_text()) if (vdir / "summary.json").exists() else {}
        he = {k.split("/", 1)[1]: v for k, v in (rows[-1] if rows else {}).items() if k.startswith("he_relative/")}
        collapse = study.collapse.first_collapse(rows) if study.collapse else None
        correlations = he_metric_correlations(rows, "he/", POINT_METRICS)
        baseline = _edits_correlations(rows, POINT_METRICS)
        results.append({"variant": variant.name, "status": study.status(variant), "rows": rows, "points": points,
                        "final": summary.get("final", {}), "edits": int(rows[-1]["edits"]) if rows else 0, "he": he,
                        "seconds_per_edit": seconds_per_edit(vdir), "collapse": collapse, "spearman": correlations,
                        "baseline": baseline})
    metrics = sorted({k for r in results for row in r["points"] for k in row if k.startswith(POINT_METRICS) and "magnitude" not in k})
    with open(directory / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", "edits", *metrics, *sorted({k for r in results for row in r["rows"] for k in row if k.startswith("he_relative/")})])
        writer.writeheader()
        for r in results:
            for row in r["points"]:
                writer.writerow({"variant": r["variant"], **{k: row.get(k, "") for k in writer.fieldnames if k != "variant"}})
    (directory / "report.md").write_text(_markdown(study, results, metrics))
    _plots(results, metrics, directory)
    return directory / "report.md"


RUN_FILES = ("summary.json", "he_analysis.json", "fit-config.yaml")
REPORT_FILES = ("report.md", "report.csv", "he.png", "metrics.png")


def export(study: Study, target: Path) -> Path:
    """The report and each variant's rows, status and run files (not its checkpoints) into `target`:
    what can be committed, so a study's results outlive the machine it runs on."""
    rows_by_variant = {v.name: variant_rows(study.variant_dir(v)) for v in study.variants}  # one checkpoint read each
    write_report(study, rows_by_variant)
    target.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        if (study.directory / name).exists():
            shutil.copyfile(study.directory / name, target / name)
    for variant in study.variants:
        vdir, rows = study.variant_dir(variant), rows_by_variant[variant.name]
        if not rows:
            continue
        out = target / variant.name
        out.mkdir(exist_ok=True)
        status = study.status(variant)
        if status["status"] == "done" and (vdir / "metrics.csv").exists():
            shutil.copyfile(vdir / "metrics.csv", out / "metrics.csv")  # the finished run's own file
        else:
            write_rows_csv(out / "metrics.csv", rows)
        (out / STATUS).write_text(json.dumps({**status, "edits": int(rows[-1]["edits"])}, indent=1))
        for name in RUN_FILES:
            if (vdir / name).exists():
                shutil.copyfile(vdir / name, out / name)
    return target


def _edits_correlations(rows: list[dict], metric_prefixes) -> dict:
    """{metric: Spearman ρ of the edit count against the metric} over the points where HE is also
    recorded: the baseline an HE correlation has to beat to say more than "the edits went on"."""
    he_rows = [r for r in rows if any(k.startswith("he/") for k in r)]
    metrics = sorted({k for r in he_rows for k in r if k.startswith(tuple(metric_prefixes))})
    return {m: spearman([r["edits"] for r in he_rows if m in r], [r[m] for r in he_rows if m in r]) for m in metrics}


def _with_pre_edit_values(row: dict, rows: list[dict]) -> dict:
    """The point before editing shows the pre-edit values the collapse rule compares with: general
    abilities of the unedited model and, as edited_so_far, the facts to be edited before their edits."""
    if row["edits"] != 0:
        return row
    filled = dict(row)
    for key in {k for r in rows for k in r if k.startswith((protocol.EDITED_SO_FAR, protocol.GENERAL))} - set(row):
        value = start_value(rows, key)
        if value is not None:
            filled[key] = value
    return filled


def _guard(rows: list[dict]) -> str:
    """What the collapse guard said: not on, no breach, or the edits at which it breached."""
    checked = [r for r in rows if "guard/breach" in r]
    if not checked:
        return "off"
    breached = [int(r["edits"]) for r in checked if r["guard/breach"]]
    return f"breached after {', '.join(map(str, breached))} edits" if breached else "no breach"


def _markdown(study: Study, results: list[dict], metrics: list[str]) -> str:
    rule = study.collapse.describe() if study.collapse else "none stated"
    lines = [f"# Study {study.name}", "", f"Collapse rule: {rule}.", "",
             "Seconds per edit: the editing phases, and the measuring ones (evaluations, HE, guard) beside them; set-up and statistics excluded.", "",
             "| variant | status | edits | s per edit: editing | measuring | " + " | ".join(m for m in metrics) + " | mean ΔHE/HE | collapsed at | guard |",
             "|---|---|---:|---:|---:|" + "---:|" * len(metrics) + "---:|---|---|"]
    for r in results:
        last = r["points"][-1] if r["points"] else {}
        he = sum(r["he"].values()) / len(r["he"]) if r["he"] else math.nan
        sec = f"{r['seconds_per_edit']['editing']:.2f} | {r['seconds_per_edit']['measuring']:.2f}" if r["seconds_per_edit"] else "– | –"
        collapsed = f"{r['collapse']['edits']} edits ({r['collapse']['why']})" if r["collapse"] else f"none by {r['edits']}"
        lines.append(f"| {r['variant']} | {r['status']['status']} | {r['edits']} | {sec} | "
                     + " | ".join(_fmt(last.get(m)) for m in metrics) + f" | {_fmt(he, '.3e')} | {collapsed} | {_guard(r['rows'])} |")
    lines += _side_by_side(study, results)
    lines += ["", "## At every evaluation point", "",
              "At 0 edits: the unedited model; edited_so_far there scores the facts to be edited, before their edits.", ""]
    for r in results:
        if not r["points"]:
            continue
        lines += [f"### {r['variant']}", "", "| edits | " + " | ".join(metrics) + " |", "|---:|" + "---:|" * len(metrics)]
        lines += [f"| {int(p['edits'])} | " + " | ".join(_fmt(p.get(m)) for m in metrics) + " |" for p in r["points"]]
        lines.append("")
    lines += ["## Spearman ρ of HE against each metric over the evaluation points (level; change)", ""]
    for r in results:
        found = False
        for layer, by_metric in r["spearman"].items():
            cells = [f"{m} {_fmt(v['level'], '.2f')}; {_fmt(v['change'], '.2f')}" for m, v in by_metric.items()
                     if "magnitude" not in m and (v["level"] is not None or v["change"] is not None)]
            if cells:
                found = True
                lines.append(f"- {r['variant']}, {layer}: " + ", ".join(cells))
        if not found:
            lines.append(f"- {r['variant']}: too few evaluation points (3 needed) or constant series")
        else:
            cells = [f"{m} {_fmt(v, '.2f')}" for m, v in r["baseline"].items() if "magnitude" not in m and v is not None]
            lines.append(f"- {r['variant']}, the edit count itself (what any quantity that only grows with the edits gives): " + ", ".join(cells))
    lines += _pooled_correlations(study, results)
    lines += ["", "Files: report.csv (every point), he.png, metrics.png; each variant's folder holds its run."]
    return "\n".join(lines) + "\n"


def _side_by_side(study: Study, results: list[dict]) -> list[str]:
    """One table per metric the collapse rule reads: a row per evaluation point, a column per variant."""
    if not study.collapse:
        return []
    lines = []
    for metric in dict.fromkeys(c["metric"] for c in study.collapse.conditions):
        by_variant = {r["variant"]: {p["edits"]: p[metric] for p in r["points"] if metric in p} for r in results}
        edits = sorted({e for values in by_variant.values() for e in values})
        if not edits:
            continue
        names = [name for name, values in by_variant.items() if values]
        lines += ["", f"## {metric}, side by side", "", "| edits | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        lines += [f"| {int(e)} | " + " | ".join(_fmt(by_variant[n].get(e)) for n in names) + " |" for e in edits]
    return lines


def _pooled_correlations(study: Study, results: list[dict]) -> list[str]:
    """Spearman ρ over the evaluation points of all variants together, of each layer's HE and of the
    edit count against each metric the collapse rule reads. Within one run any quantity that grows
    with the edits correlates; pooled, HE has to order the variants too (same edits, other damage)."""
    if not study.collapse or len(results) < 2:
        return []
    points = [p for r in results for p in r["points"] if p["edits"] > 0 and any(k.startswith("he/") for k in p)]
    layers = sorted({k for p in points for k in p if k.startswith("he/")})
    lines = ["", "## Pooled over the variants: Spearman ρ against the metrics the collapse rule reads", "",
             "| metric | points | edit count | " + " | ".join(layers) + " |", "|---|---:|---:|" + "---:|" * len(layers)]
    for metric in dict.fromkeys(c["metric"] for c in study.collapse.conditions):
        have = [p for p in points if metric in p and all(layer in p for layer in layers)]
        if not have:
            continue
        values = [p[metric] for p in have]
        cells = [spearman([p["edits"] for p in have], values)] + [spearman([p[layer] for p in have], values) for layer in layers]
        lines.append(f"| {metric} | {len(have)} | " + " | ".join(_fmt(c, ".2f") for c in cells) + " |")
    return lines


def _plots(results: list[dict], metrics: list[str], directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({k.split("/", 1)[1] for r in results for row in r["rows"] for k in row if k.startswith("he_relative/")})
    if layers:
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.2), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            for r in results:
                pts = [(row["edits"], row[f"he_relative/{layer}"]) for row in r["rows"] if f"he_relative/{layer}" in row]
                if pts:
                    ax.plot(*zip(*pts), label=r["variant"])
            ax.set_title(f"ΔHE/HE {layer}")
            ax.set_xlabel("edits")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / "he.png", dpi=110)
        plt.close(fig)
    if metrics:
        cols = min(3, len(metrics))
        fig, axes = plt.subplots(-(-len(metrics) // cols), cols, figsize=(4.2 * cols, 3.2 * -(-len(metrics) // cols)), squeeze=False)
        for ax, metric in zip(axes.flat, metrics):
            for r in results:
                pts = [(row["edits"], row[metric]) for row in r["points"] if metric in row]
                if pts:
                    ax.plot(*zip(*pts), marker="o", markersize=3, label=r["variant"])
            ax.set_title(metric, fontsize=9)
            ax.set_xlabel("edits")
            if "perplexity" in metric and ax.has_data() and min(row[metric] for r in results for row in r["points"] if metric in row) > 0:
                ax.set_yscale("log")  # a collapse takes perplexity up by orders of magnitude
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / "metrics.png", dpi=110)
        plt.close(fig)


# ------------------------------------------------------------------------------ helpers


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else (base / p)


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _temp_file(directory: Path, text: str) -> str:
    path = directory / ".study-overrides.check.yaml"
    path.write_text(text)
    return str(path)


def _print_config(args: list[str], variant: str) -> dict:
    """The variant's whole fit config as `fit --print_config` gives it (settings checked, nothing
    loaded); a refused setting or an unknown method becomes a StudyConfigError naming the variant."""
    from .cli import main
    from ..editing.methods.base import METHODS

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([*args, "--print_config"])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                err.write(e.code)
    if code != 0:
        lines = [line for line in err.getvalue().strip().splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "")
        raise StudyConfigError(f"variant {variant!r}: {detail.removeprefix('error: ')}")
    config = yaml.safe_load(out.getvalue())
    method = _get(config, "model.method")
    if isinstance(method, str) and method.strip().lower() not in METHODS:
        raise StudyConfigError(f"variant {variant!r}: field 'model.method': unknown editing method {method!r}; known methods: {sorted(METHODS)}")
    _instantiate_settings(config, variant)
    return config


def _instantiate_settings(config: dict, variant: str) -> None:
    """Build what the variant's settings describe, except the model (`--print_config` checks types;
    a method's or callback's own checks, e.g. `values.lr` > 0, run when it is built)."""
    from jsonargparse import ArgumentParser

    from ..editing.methods.base import EditMethod
    from ..editing.writer import DeltaFilter
    from .cli import SECTIONS, _raised_by_sphere_pl
    from .datamodule import EditDataModule

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
        parser.instantiate_classes(parser.parse_object(given))
    except (ValueError, TypeError, OSError) as e:
        own = _raised_by_sphere_pl(e)  # the setting's own refusal, out of jsonargparse's wrapping
        raise StudyConfigError(f"variant {variant!r}: {own if own is not None else str(e).strip().splitlines()[0]}") from None


def _without_paths(config: dict) -> dict:
    """A fit config without what the study sets per run (where files go, the W&B run)."""
    config = json.loads(json.dumps(config))
    for dotted in ("trainer.default_root_dir", "trainer.logger", "checkpoint.dirpath", "summary.dirpath", "he_analysis.dirpath",
                   "model.cases_dir", "ckpt_path", "config"):
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


def _with_old_defaults(config: dict) -> dict:
    """A recorded fit config with the values that settings added later had then, where they changed
    what a run does (ZsRE edits taught `alt` before `data.zsre_target` existed), and settings that
    moved in the new place (the model's loading settings, now `model.model`)."""
    data = config.get("data") or {}
    if "zsre_target" not in data and data.get("schema") == "zsre":
        config = {**config, "data": {**data, "zsre_target": "alt"}}
    model = config.get("model") or {}
    if "model_name_or_path" in model:  # what is loaded had no section of its own before `PretrainedModel`
        loading = {key: model.get(old) for key, old in _MOVED_TO_MODEL_SECTION.items()}
        model = {k: v for k, v in model.items() if k not in _MOVED_TO_MODEL_SECTION.values()}
        config = {**config, "model": {**model, "model": {"class_path": "sphere_pl.PretrainedModel", "init_args": loading}}}
    return config


# PretrainedModel's arguments and the SequentialEditor arguments they were
_MOVED_TO_MODEL_SECTION = {"name_or_path": "model_name_or_path", "dtype": "dtype", "gguf_file": "gguf_file",
                           "trust_remote_code": "trust_remote_code", "module_templates": "module_templates"}


def _differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if a == b else [f"{where}: {a!r} then, {b!r} now"]


def _error_lines(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()[-200:]
    errors = [line for line in lines if line.startswith(("error:", "hint:"))]
    return "\n".join(errors or lines[-20:])


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sphere_pl study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the study's YAML file")
    parser.add_argument("--report", action="store_true", help="only rebuild report.md, report.csv and the plots from what is on disk")
    parser.add_argument("--variants", nargs="+", metavar="NAME", help="run only these variants (default: all)")
    parser.add_argument("--export", metavar="DIR", help="only copy the report and every variant's rows (no checkpoints) into DIR")
    args = parser.parse_args(argv)
    try:
        study = Study.load(args.config)
        if args.export:
            print(f"wrote {export(study, Path(args.export))}")
            return 0
        if args.report:
            print(f"wrote {write_report(study)}")
            return 0
        return study.run(args.variants)
    except StudyConfigError as e:
        raise SystemExit(f"error: {e}\nhint: fix the study config; nothing was edited") from None

"""A study's config: what it is, how each variant's `fit` config is made from it, and its check
before any edit.

    name: compare-200
    directory: runs/studies/compare-200      # one folder per variant below it
    configs: [configs/smollm2/common.yaml]   # fit configs, merged in order (relative: to this file)
    overrides: {data.dataset_size_limit: 200, data.num_edits: 20}
    variants:
    - {name: memit, configs: [configs/smollm2/memit.yaml], overrides: {model.filters: []}}
    - {name: memit+sphere, configs: [configs/smollm2/memit.yaml]}
    collapse:                                # the rule (sphere_pl.monitors.rules), stated before the run
      conditions:
      - {metric: edited_so_far/efficacy_score, below: 0.5}
      - {metric: never_edited/specificity_score, drop_from_start: 0.2}
      points_in_a_row: 2
      stop: true                             # end a variant once it has collapsed
    logger: {project: sphere_pl}             # W&B, offline unless credentials: one run per variant, grouped
    streams:                                 # optional: every variant on every edit order, as <variant>@<stream>
    - {name: file-order}
    - {name: shuffle-1, overrides: {data.shuffle: true, data.seed: 1}}
    pairs: [[memit, memit+sphere]]           # compared stream by stream in the report
    batch_rule:                              # optional: the rule on the canaries recorded after every batch
      conditions: [{metric: canary/perplexity, ratio_to_start_above: 2.0}]

The file is read by the study command's jsonargparse parser (`parser()`), so `--print_config` shows
it and a value on the command line overrides it. Before any edit every variant's whole fit config is
parsed by the fit command's own parser and its settings are built (`check`).
"""

from __future__ import annotations

import json
import os
from argparse import ArgumentError
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ...errors import SettingsError, SpherePLError
from ...files import atomic_write_text
from ...lightning import RunLock
from ...monitors.rules import CollapseRule
from .preflight import differences_from_recorded, fit_config

STATUS, FIT_CONFIG, OVERRIDES = "status.json", "fit-config.yaml", "study-overrides.yaml"


class StudyConfigError(SpherePLError, ValueError):
    """A study config that cannot run: the message names the variant and the field."""

    hint = "fix the study config; nothing was edited"


@dataclass
class Variant:
    """One variant: fit configs merged after the study's, and dotted overrides after the study's.

    Args:
        name: its folder's name under the study directory.
        configs: fit configs, merged after the study's.
        overrides: dotted settings (`model.method.init_args.layers: [4]`), applied last.
    """

    name: str
    configs: list[str] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)


@dataclass
class Stream:
    """One order of the edit records: every variant runs on every stream, in `<variant>@<stream>`.

    Args:
        name: its part of the run's folder name.
        overrides: dotted settings of this stream (e.g. data.shuffle: true, data.seed: 1).
    """

    name: str
    overrides: dict = field(default_factory=dict)


@dataclass
class BatchRule:
    """The collapse rule on the series recorded after every batch (the canaries): names the batch where a
    collapse starts (the report), beside the evaluation points' rule.

    Args:
        conditions: the conditions (sphere_pl.monitors.rules), on canary/* metrics.
        points_in_a_row: collapsed batches in a row that make a collapse.
    """

    conditions: list[dict]
    points_in_a_row: int = 2


@dataclass
class Collapse:
    """When a variant has collapsed (the rule language of `sphere_pl.monitors.rules`).

    Args:
        conditions: the conditions; a point is collapsed where any holds.
        points_in_a_row: collapsed evaluation points in a row that make a collapse.
        stop: end a variant once it has collapsed.
    """

    conditions: list[dict]
    points_in_a_row: int = 2
    stop: bool = False


def parser() -> ArgumentParser:
    """The study command's arguments: the study's fields (usually from `--config`) and what to do."""
    p = ArgumentParser(prog="python -m sphere_pl study", description="run one edit stream with several variants, each a real fit",
                       exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="the study's YAML file")
    p.add_argument("--name", type=str, required=True, help="the study's name (its W&B group)")
    p.add_argument("--directory", type=str, required=True, help="one folder per variant below it")
    p.add_argument("--configs", type=list[str], default=[], help="fit configs every variant starts from, merged in order")
    p.add_argument("--overrides", type=dict, default={}, help="dotted settings every variant shares")
    p.add_argument("--variants", type=list[Variant], required=True, help="the variants")
    p.add_argument("--collapse", type=Collapse | None, default=None, help="the collapse rule, stated before the run")
    p.add_argument("--batch_rule", type=BatchRule | None, default=None, help="the collapse rule on the per-batch canaries")
    p.add_argument("--streams", type=list[Stream] | None, default=None, help="edit orders every variant runs on")
    p.add_argument("--pairs", type=list[list[str]] | None, default=None, help="[variant, its twin] compared on each stream")
    p.add_argument("--logger", type=dict | None, default=None, help="W&B logger settings (AutoWandbLogger)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these variants (default: all)")
    p.add_argument("--report", action="store_true", help="only rebuild report.md, report.csv and the plots from what is on disk")
    p.add_argument("--export", type=str | None, default=None, metavar="DIR",
                   help="only copy the report and every variant's rows (no checkpoints) into DIR")
    return p


@dataclass
class Study:
    name: str
    directory: Path
    configs: list[str]
    overrides: dict
    variants: list[Variant]
    collapse: CollapseRule | None
    stop: bool
    logger: dict | None
    source: Path
    batch_rule: CollapseRule | None = None
    streams: list[Stream] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_args(cls, parsed: Namespace) -> "Study":
        source = Path(str(parsed.config[-1])) if parsed.get("config") else Path("study.yaml")
        base = source.resolve().parent
        variants, seen = [], set()
        for entry in parsed.variants:
            variant = Variant(str(entry.name), list(entry.configs or []), dict(entry.overrides or {}))
            if variant.name in seen:
                raise StudyConfigError(f"{source}: variant {variant.name!r}: field 'name': two variants are named {variant.name!r}")
            if not variant.name or "/" in variant.name or "@" in variant.name or variant.name.startswith("."):
                raise StudyConfigError(f"{source}: variant {variant.name!r}: field 'name': must be a plain folder name (no / or @)")
            seen.add(variant.name)
            variant.configs = [str(_resolve(c, base)) for c in variant.configs]
            for c in variant.configs:
                if not Path(c).is_file():
                    raise StudyConfigError(f"{source}: variant {variant.name!r}: field 'configs': {c} does not exist")
            variants.append(variant)
        configs = [str(_resolve(c, base)) for c in parsed.configs or []]
        for c in configs:
            if not Path(c).is_file():
                raise StudyConfigError(f"{source}: field 'configs': {c} does not exist")
        rule, stop = None, False
        if parsed.collapse is not None:
            try:
                rule = CollapseRule(parsed.collapse.conditions, parsed.collapse.points_in_a_row, f"{source}: collapse")
            except ValueError as e:
                raise StudyConfigError(str(e)) from None
            stop = bool(parsed.collapse.stop)
        logger = dict(parsed.logger) if parsed.logger else None
        batch_rule = None
        if parsed.get("batch_rule") is not None:
            try:
                batch_rule = CollapseRule(parsed.batch_rule.conditions, parsed.batch_rule.points_in_a_row, f"{source}: batch_rule")
            except ValueError as e:
                raise StudyConfigError(str(e)) from None
        streams = [Stream(str(s.name), dict(s.overrides or {})) for s in parsed.get("streams") or []]
        bases = [v.name for v in variants]
        pairs = [tuple(pair) for pair in parsed.get("pairs") or []]
        for pair in pairs:
            if len(pair) != 2 or any(name not in bases for name in pair):
                raise StudyConfigError(f"{source}: field 'pairs': {list(pair)} must name two variants of the study ({', '.join(bases)})")
        if streams:  # every variant on every stream, a variant's streams one after another
            names = [s.name for s in streams]
            if len(set(names)) != len(names) or any(not n or "/" in n or "@" in n for n in names):
                raise StudyConfigError(f"{source}: field 'streams': names must be distinct plain names, got {names}")
            variants = [Variant(f"{v.name}@{s.name}", v.configs, {**s.overrides, **v.overrides}) for v in variants for s in streams]
        return cls(str(parsed.name), Path(parsed.directory), configs, dict(parsed.overrides or {}), variants, rule, stop, logger, source,
                   batch_rule, streams, pairs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Study":
        """A study from its YAML file (what `--config FILE` gives the command)."""
        if not Path(path).is_file():
            raise StudyConfigError(f"study config not found: {path}")
        return cls.from_args(parse(["--config", str(path)]))

    # ---------------------------------------------------------------- configs
    def variant_dir(self, variant: Variant) -> Path:
        return self.directory / variant.name

    def status(self, variant: Variant) -> dict:
        """What the variant's status.json says ("unfinished" without one when a checkpoint exists: a killed
        study), or "running" while a `fit` holds the variant's checkpoint directory."""
        directory = self.variant_dir(variant)
        path = directory / STATUS
        started = (directory / "checkpoints" / "last.ckpt").exists()
        found = json.loads(path.read_text()) if path.exists() else {"status": "unfinished" if started else "not started"}
        if found["status"] != "done" and RunLock.held(directory / "checkpoints"):
            found = {**found, "status": "running"}
        return found

    def select(self, names: list[str]) -> list[Variant]:
        """The variants named (in the study's order); an unknown name is an error."""
        known = [v.name for v in self.variants]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise StudyConfigError(f"{self.source}: no variant named {', '.join(map(repr, unknown))} (variants: {', '.join(known)})")
        return [v for v in self.variants if v.name in names]

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
        if self.collapse is not None:
            _set(nested, "collapse", {**self.collapse.as_config(), "stop": self.stop})
        return nested

    def fit_args(self, variant: Variant) -> list[str]:
        """The `fit` arguments of a variant (its override file is written by `prepare`)."""
        args = ["fit"]
        for c in [*self.configs, *variant.configs]:
            args += ["--config", c]
        return args + ["--config", str(self.variant_dir(variant) / OVERRIDES)]

    def prepare(self, variant: Variant) -> dict:
        """Write the variant's override file and check its whole config before any edit; refuse a directory
        that holds another study's run under this variant's name. Returns the variant's fit config."""
        directory = self.variant_dir(variant)
        directory.mkdir(parents=True, exist_ok=True)
        wanted = yaml.safe_dump(self.run_overrides(variant), sort_keys=True)
        try:
            config = fit_config(self.fit_args(variant)[:-2], wanted)
        except SettingsError as e:
            raise StudyConfigError(f"variant {variant.name!r}: {e}") from None
        recorded = directory / FIT_CONFIG
        if recorded.exists():
            added, differences = differences_from_recorded(yaml.safe_load(recorded.read_text()), config)
            if added:  # settings this version of sphere_pl adds: the run could not have set them
                print(f"study {self.name}: {variant.name}: settings added since its run began, taken as this config gives them: "
                      + ", ".join(added), flush=True)
            if differences:
                raise StudyConfigError(
                    f"variant {variant.name!r}: {directory} holds a run made with other settings "
                    f"(field {differences[0]}): give this study another directory, or remove that folder"
                )
        atomic_write_text(directory / OVERRIDES, wanted)
        atomic_write_text(recorded, yaml.safe_dump(config, sort_keys=True))
        return config


def parse(argv: list[str]) -> Namespace:
    """The study command's arguments; a refused one is a StudyConfigError naming the field."""
    try:
        return parser().parse_args(argv)
    except ArgumentError as e:
        raise StudyConfigError(" ".join(line.strip() for line in str(e).splitlines() if line.strip())) from None


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else (base / p)


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def as_plain(value):
    """A jsonargparse Namespace (or anything nested) as plain dicts and lists."""
    return json.loads(json.dumps(value, default=lambda v: v.as_dict() if isinstance(v, Namespace) else str(v)))

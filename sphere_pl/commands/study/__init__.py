"""`python -m sphere_pl study --config study.yaml`: one edit stream, several variants, each a real `fit`.

`config.py` reads the study and makes each variant's fit config, `preflight.py` checks those before
any edit, `runner.py` runs the variants, `report.py` writes the report and exports the rows.

    python -m sphere_pl study --config benchmarks/studies/compare_methods.yaml              # all, resumable
    python -m sphere_pl study --config benchmarks/studies/compare_methods.yaml --only memit rome
    python -m sphere_pl study --config benchmarks/studies/compare_methods.yaml --report     # report only
    python -m sphere_pl study --config benchmarks/studies/compare_methods.yaml --export DIR  # rows, no checkpoints
"""

from __future__ import annotations

from pathlib import Path

from .config import Study, StudyConfigError, Variant, parse
from .report import export, write_report
from .runner import run

__all__ = ["Study", "StudyConfigError", "Variant", "export", "main", "run", "write_report"]


def main(argv: list[str]) -> int:
    parsed = parse(argv)
    study = Study.from_args(parsed)
    if (parsed.export or parsed.report) and not study.directory.is_dir():
        raise StudyConfigError(f"study {study.name!r} has not run yet ({study.directory} does not exist): there is nothing to "
                               "report; run it first (the same command without --report / --export)")
    if parsed.export:
        print(f"wrote {export(study, Path(parsed.export))}")
        return 0
    if parsed.report:
        print(f"wrote {write_report(study)}")
        return 0
    return run(study, parsed.only)

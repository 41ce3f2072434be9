"""Running a study: each variant as its own `python -m sphere_pl fit` process, one after another.

Each variant has the same checkpoints and exact resume as any run. An interrupted study resumes
every unfinished variant from its last checkpoint and skips finished ones; a variant that fails is
recorded with its error (`status.json`) and the others go on; a variant that another study process
is running is left to it. The report is rebuilt after every variant.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from ...files import atomic_write_json
from .config import STATUS, Study, Variant
from .report import write_report

ATTEMPT_MARK = "\n=== "  # begins each attempt's section of a variant's fit.log


def run(study: Study, only: list[str] | None = None) -> int:
    """Every unfinished variant (or those in `only`), one after another; the report after each.
    Returns the exit status."""
    chosen = study.select(only) if only else study.variants
    study.directory.mkdir(parents=True, exist_ok=True)
    for variant in chosen:  # every config checked before the first edit of any variant
        study.prepare(variant)
    stopped = _Forwarder()
    for variant in chosen:
        state = study.status(variant)["status"]
        if state in ("done", "running"):
            # a variant another study process is running is left to it (its status file too)
            print(f"study {study.name}: {variant.name}: {state}, skipped", flush=True)
            continue
        code = _run_variant(study, variant, stopped)
        write_report(study)
        if stopped.signal is not None:
            print(f"study {study.name}: stopped by {signal.Signals(stopped.signal).name}; run the same command to resume", file=sys.stderr)
            return 128 + stopped.signal
        if code != 0:
            print(f"study {study.name}: {variant.name} failed (exit {code}); going on with the others", file=sys.stderr, flush=True)
    write_report(study)
    return 1 if any(study.status(v)["status"] == "failed" for v in chosen) else 0


def _run_variant(study: Study, variant: Variant, stopped: "_Forwarder") -> int:
    directory = study.variant_dir(variant)
    last = directory / "checkpoints" / "last.ckpt"
    args = study.fit_args(variant) + (["--ckpt_path", str(last)] if last.exists() else [])
    print(f"study {study.name}: {variant.name}: {'resuming from ' + str(last) if last.exists() else 'starting'} "
          f"(log: {directory / 'fit.log'})", flush=True)
    start = time.time()
    with open(directory / "fit.log", "a") as log:
        log.write(f"{ATTEMPT_MARK}{time.strftime('%Y-%m-%d %H:%M:%S')} python -m sphere_pl {' '.join(args)}\n")
        log.flush()
        process = subprocess.Popen([sys.executable, "-m", "sphere_pl", *args], stdout=log, stderr=subprocess.STDOUT)
        with stopped.forwarding_to(process):
            code = process.wait()
    result = {"status": "done" if code == 0 else "failed", "exit": code, "seconds": round(time.time() - start, 1)}
    if code != 0:
        result["error"] = _error_lines(directory / "fit.log")
        if stopped.signal is not None:
            result["status"] = "stopped"
    atomic_write_json(directory / STATUS, result, indent=1)
    print(f"study {study.name}: {variant.name}: {result['status']} after {result['seconds']:.0f} s", flush=True)
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


def _error_lines(log: Path) -> str:
    """The error and hint lines of the latest attempt only: a resumed variant appends to the same log."""
    text = log.read_text(errors="replace")
    latest = text[text.rfind(ATTEMPT_MARK) + 1:]  # no mark: rfind gives -1, the whole text
    lines = latest.splitlines()[-200:]
    errors = [line for line in lines if line.startswith(("error:", "hint:"))]
    return "\n".join(errors or lines[-20:])

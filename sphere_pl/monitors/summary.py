"""What a run says at its start and leaves at its end.

`RunHeader` prints, when `fit` starts, what is about to be edited and how (in place of Lightning's
table of trainable parameters: there are none). `RunSummary`, the last callback of a run, prints
a table of the final metrics and the HE change per layer, and writes `summary.json` and
`metrics.csv` (every recorded row) through the run record, so results can be read without W&B.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ..lightning.record import METRICS, SUMMARY
from ..placement import describe as placement_lines, placement, weight_location
from . import protocol


class RunHeader(L.Callback):
    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        print(format_header(pl_module, trainer.datamodule), flush=True)


class RunSummary(L.Callback):
    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        record, editor = pl_module.record, pl_module.editor
        rows = [dict(row) for row in record.history]
        last = rows[-1] if rows else {}
        he = {
            key.split("/", 1)[1]: {"he": last.get(f"he/{key.split('/', 1)[1]}"), "he_delta": last[key], "he_relative": last.get(f"he_relative/{key.split('/', 1)[1]}")}
            for key in sorted(last)
            if key.startswith("he_delta/")
        }
        summary = {
            "model_id": editor.lm.model_id,
            "edits": editor.edits_applied,
            "batches": editor.batches_done,
            "settings": editor.settings(),
            "final": {k: v for k, v in record.final.items() if k.startswith(protocol.FINAL_EDITED)},
            "last_evaluation": {k: v for k, v in last.items() if k.startswith(protocol.FACT_PREFIXES)},
            "hyperspherical_energy": he,
            "seconds": {k: round(v, 3) for k, v in editor.timer.seconds.items()},
            "machine": machine(),
        }
        if placement(editor.model):
            summary["placement"] = {"blocks": placement(editor.model),
                                     "edited": {name: weight_location(editor.model, name) for name in editor.edited_modules}}
        precision = getattr(editor.method, "precision", None)
        if precision is not None:
            summary["precision"] = precision.as_dict()  # what the value search multiplied in, and the rates measured
        record.write_json(SUMMARY, summary)
        record.write_rows_csv(METRICS, rows)
        print(format_summary(summary, record.directory))


def machine() -> dict:
    """What ran the run: the CPU and the instruction sets that decide bfloat16 speed, torch's threads, the GPU."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    return {"cpu": model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bfloat16_instructions": sorted(flags & {"avx512f", "avx512_bf16", "amx_bf16"}),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__}


def read_summary(directory: str | Path) -> dict | None:
    """A finished run's `summary.json`, or None before the run has one."""
    path = Path(directory) / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


def format_header(pl_module, datamodule) -> str:
    """The lines printed when `fit` starts: model, method, filters, edits, C0, memory settings."""
    editor = pl_module.editor
    method = editor.method
    settings = method.settings()
    dtype = str(next(editor.model.parameters()).dtype).removeprefix("torch.")
    lines = [f"sphere_pl fit: {editor.lm.model_id} in {dtype} on {editor.lm.device}"]
    values = settings.get("values")
    how = f"; value search {values['num_grad_steps']} steps, lr {values['lr']}, clamp {values['clamp_norm_factor']}, weight decay {values['weight_decay']}" if values else ""
    lines.append(f"  method   {method.name} on layers {list(method.layers)}{how}")
    lines += [f"  {line}" for line in placement_lines(editor.model, editor.edited_modules)]  # a dispatched model: where each block is
    filters = ", ".join(f"{f['name']}({', '.join(f'{k} {v}' for k, v in f.items() if k != 'name')})" for f in editor.settings()["filters"]) or "none"
    lines.append(f"  filters  {filters}")
    if datamodule is not None and getattr(datamodule, "edit_requests", None):
        total, size = len(datamodule.edit_requests), datamodule.num_edits
        resumed = f"; resuming after {editor.edits_applied}" if editor.edits_applied else ""
        lines.append(f"  edits    {total} in batches of {size} ({-(-total // size)} batches), {len(datamodule.holdout_requests)} held out{resumed}")
    stats = settings.get("stats")
    if stats:
        source = stats["from_file"] or f"{stats['corpus']}, {stats['num_samples']} x {stats['seq_len']} tokens (cached in {stats['cache_dir']})"
        lines.append(f"  C0       {source}")
    if values:
        budget = getattr(method, "value_budget", None)
        memory = f"within {budget.bytes / 1024**3:.2f} GB ({budget.source})" if budget is not None else "explicit"
        precision = getattr(method, "precision", None)
        compute = precision.describe() if precision is not None else values["compute_dtype"]
        lines.append(f"  memory   value search: requests_per_pass {values['requests_per_pass']}, recompute_activations "
                     f"{values['recompute_activations']}, {memory}; compute {compute}")
    return "\n".join(lines)


def format_summary(summary: dict, directory: Path) -> str:
    """The console table: final metrics, then HE per edited layer."""
    lines = [f"sphere_pl run summary: {summary['edits']} edits in {summary['batches']} batches on {summary['model_id']}"]
    metrics = summary["final"] or summary["last_evaluation"]
    if metrics:
        width = max(len(k) for k in metrics)
        lines += ["", f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
        lines += [f"{k:<{width}}  {v:6.3f}" for k, v in sorted(metrics.items())]
    if summary["hyperspherical_energy"]:
        lines += ["", f"{'layer':<8}  {'HE':>12}  {'ΔHE':>12}  {'ΔHE/HE':>10}", f"{'-' * 8}  {'-' * 12}  {'-' * 12}  {'-' * 10}"]
        for layer, v in summary["hyperspherical_energy"].items():
            lines.append(f"{layer:<8}  {v['he']:12.6f}  {v['he_delta']:12.4e}  {v['he_relative']:10.3e}")
    lines += ["", f"written: {directory / SUMMARY}, {directory / METRICS}"]
    return "\n".join(lines)

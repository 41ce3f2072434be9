"""Every editing method with and without the SPHERE projection, side by side, on the same
sequence of CounterFact edits (SmolLM2-135M-Instruct by default).

    python benchmarks/compare_methods.py --edits 200 --batch 20 --rome-edits 100   # all 12 variants
    python benchmarks/compare_methods.py --methods memit rect --edits 40   # a subset

For each variant (method x {plain, sphere}) it edits the first `--edits` records of
`--data` in batches of `--batch` through the `Editor` core and, after every batch, records
efficacy / generalization / specificity on all facts edited so far, specificity on the
neighborhood prompts of `--holdout` never-edited records, the hyperspherical energy of the
edited layers and the seconds spent editing. It writes

    <out>/<variant>/progress.jsonl   one row per batch (kept in the repository, with a `done` mark)
    <out>/table.md                   the comparison table (final row of every variant)
    <out>/curves.png                 mean relative HE change and efficacy against edits

A variant's editor state is saved after every batch (`state.pt`), so an interrupted
comparison continues where it stopped: run the same command again. Finished variants are
skipped. The hyper-parameters are SmolLM2-sized (see VARIANT_SETTINGS below); they are printed
and recorded in every progress row.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sphere_pl import Editor, SphereProjection, create_method, load_edit_requests, load_model_and_tokenizer
from sphere_pl.editing.stats import KeyStatistics
from sphere_pl.editing.values import ValueOptimization
from sphere_pl.evaluation import CounterFactEvaluator
from sphere_pl.sphere import hyperspherical_energy

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHOD_NAMES = ["alphaedit", "memit", "rect", "prune", "rome", "ft"]


def method_settings(name: str, num_layers: int, corpus: str, stats_samples: int, steps: int) -> dict:
    """Per-method settings for a small model: the paper's layer choice scaled to its depth,
    the value search that converges on SmolLM2 (SPEC's Qwen2.5-7B starting point)."""
    values = ValueOptimization(num_grad_steps=steps, lr=0.5, clamp_norm_factor=4.0, weight_decay=1e-3)
    stats = KeyStatistics(corpus=corpus, num_samples=stats_samples, seq_len=256)
    locate = [layer for layer in (4, 5, 6, 7, 8) if layer < num_layers - 1] or [1, 2]
    if name in ("alphaedit", "memit", "rect", "prune"):
        return {"layers": locate, "values": values, "stats": stats}
    if name == "rome":
        return {"layer": locate[1] if len(locate) > 1 else locate[0], "values": values, "stats": stats}
    if name == "ft":  # LLaMA3-8B: layer 21 of 32
        return {"layer": max(0, round(num_layers * 21 / 32) - 1), "num_steps": steps, "lr": 5e-4}
    raise ValueError(name)


def _plain(value):
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    return value


def evaluate(scores, edited, holdout) -> dict[str, float]:
    """`scores(requests) -> {metric: value}` on the edited facts, and specificity on the held-out ones."""
    row = {f"edited/{k}": v for k, v in scores(edited).items() if k.endswith("_score")}
    if holdout:
        row["holdout/specificity_score"] = scores(holdout)["specificity_score"]
    return row


def he_of_evaluated(editor: Editor, initial: dict[int, float]) -> dict[str, float]:
    """HE of the weights that are evaluated (PRUNE: the restrained ones), relative to the pretrained HE."""
    with editor.evaluation_weights():
        energies = {layer: float(hyperspherical_energy(w)) for layer, w in editor.edited_weights().items()}
    relative = [(energies[layer] - initial[layer]) / abs(initial[layer]) for layer in energies]
    return {"he_relative_mean": sum(relative) / len(relative), **{f"he/layer{k}": v for k, v in energies.items()}}


def run_variant(args, name: str, sphere: bool, model, tokenizer, pretrained, records, holdout) -> list[dict]:
    variant = f"{name}+sphere" if sphere else name
    directory = Path(args.out) / variant
    directory.mkdir(parents=True, exist_ok=True)
    progress, state_path, done_path = directory / "progress.jsonl", directory / "state.pt", directory / "done"
    if done_path.exists():
        return [json.loads(line) for line in progress.read_text().splitlines()]

    for param_name, tensor in pretrained.items():  # every variant starts from the pretrained model
        model.get_parameter(param_name).data.copy_(tensor)
    num_layers = model.config.num_hidden_layers
    settings = method_settings(name, num_layers, args.corpus, args.stats_samples, args.steps)
    method = create_method(name, **settings)
    filters = [SphereProjection(0.5, method.sphere_strength)] if sphere else []
    editor = Editor(model, tokenizer, method, filters, model_id=args.model_id, history_size=0)
    initial = {layer: float(hyperspherical_energy(w)) for layer, w in editor.edited_weights().items()}
    rows: list[dict] = []
    if state_path.exists():  # resume this variant
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        editor.load_state_dict(saved["editor"])
        rows = [json.loads(line) for line in progress.read_text().splitlines()][: editor.batches_done]
        initial = {int(k): v for k, v in saved["initial_he"].items()}
    editor.prepare()
    editor.timer.seconds.clear()  # the statistics are a one-off cost per model, not per edit
    batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    elapsed = rows[-1]["edit_seconds"] if rows else 0.0
    # seconds per phase (as edit_speed.py splits them), cumulative over the edits they cover
    # (rows written before this split existed have none: those edits are not covered)
    phase_base = dict(rows[-1].get("phase_seconds", {})) if rows else {}
    phase_edits_base = rows[-1].get("phase_edits", 0) if rows else 0
    first_timed_batch = editor.batches_done
    for index in range(editor.batches_done, len(batches)):
        start = time.perf_counter()
        editor.apply(batches[index])
        elapsed += time.perf_counter() - start
        row = {
            "variant": variant,
            "edits": editor.edits_applied,
            **evaluate(editor.evaluate, records[: editor.edits_applied], holdout),  # not timed: evaluation is outside the editor's timer
            **he_of_evaluated(editor, initial),
            "edit_seconds": elapsed,
            "seconds_per_edit": elapsed / editor.edits_applied,
            "phase_seconds": {k: phase_base.get(k, 0.0) + v for k, v in editor.timer.seconds.items() if k != "statistics"},
            "phase_edits": phase_edits_base + sum(len(b) for b in batches[first_timed_batch : index + 1]),
            "settings": {k: _plain(v) for k, v in settings.items()},
        }
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "settings"}), flush=True)
        tmp = state_path.with_name("state.pt.tmp")
        torch.save({"editor": editor.state_dict(), "initial_he": initial}, tmp)
        with open(progress, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, state_path)
    done_path.write_text("done\n")
    return rows


def pretrained_row(args, model, tokenizer, edited, holdout) -> dict:
    """The unedited model on the same facts (cached in <out>/pretrained.json): the reference every row moves from."""
    path = Path(args.out) / "pretrained.json"
    if path.exists():
        return json.loads(path.read_text())
    def scores(requests):
        return {k: float(v) for k, v in CounterFactEvaluator().evaluate(model, tokenizer, requests).items()}

    row = {"variant": "pretrained (no edit)", "edits": 0, **evaluate(scores, edited, holdout), "he_relative_mean": 0.0, "seconds_per_edit": float("nan")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))
    return row


def write_table(results: dict[str, list[dict]], path: Path) -> str:
    header = "| variant | edits | efficacy | generalization | specificity | holdout specificity | mean ΔHE/HE | s per edit |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for variant, rows in results.items():
        r = rows[-1]
        lines.append(
            f"| {variant} | {r['edits']} | {r.get('edited/efficacy_score', float('nan')):.3f} | "
            f"{r.get('edited/generalization_score', float('nan')):.3f} | {r.get('edited/specificity_score', float('nan')):.3f} | "
            f"{r.get('holdout/specificity_score', float('nan')):.3f} | {r['he_relative_mean']:.3e} | {r['seconds_per_edit']:.2f} |"
        )
    text = header + "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (he_ax, eff_ax) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {name: f"C{i}" for i, name in enumerate(METHOD_NAMES)}
    for variant, rows in results.items():
        if variant not in {f"{m}{s}" for m in METHOD_NAMES for s in ("", "+sphere")}:
            continue  # the pretrained reference row is in the table only
        edits = [r["edits"] for r in rows]
        kind = dict(color=colors[variant.split("+")[0]], linestyle="-" if "+sphere" in variant else "--", marker=".", label=variant)
        he_ax.plot(edits, [r["he_relative_mean"] for r in rows], **kind)
        eff_ax.plot(edits, [r.get("edited/efficacy_score", float("nan")) for r in rows], **kind)
    he_ax.set(xlabel="edits", ylabel="mean relative HE change of the edited layers", title="hyperspherical energy (solid: + SPHERE)")
    he_ax.set_yscale("symlog", linthresh=1e-7)
    eff_ax.set(xlabel="edits", ylabel="efficacy on all facts edited so far", title="efficacy", ylim=(-0.02, 1.02))
    eff_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHOD_NAMES, choices=METHOD_NAMES)
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--rome-edits", type=int, default=None, help="ROME edits request by request: it may run on fewer edits (default: --edits)")
    parser.add_argument("--holdout", type=int, default=50, help="never-edited records whose neighborhood prompts are scored")
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-val.json"))
    parser.add_argument("--model", default=None, help="hub name or local path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--corpus", default=str(SHARED / "wikitext-2" / "valid.txt"))
    parser.add_argument("--stats-samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25, help="value-optimisation (and FT) steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_methods"), help="finished variants' rows are kept in the repository; state.pt is ignored by git")
    parser.add_argument("--report", action="store_true", help="only write the table and plot from the rows saved so far")
    args = parser.parse_args(argv)
    if args.report:
        out = Path(args.out)
        model, tokenizer = load_model_and_tokenizer(args.model)
        args.model_id = args.model or "embedded:smollm2-135m-instruct"
        records = load_edit_requests(args.data)
        results = {"pretrained (no edit)": [pretrained_row(args, model, tokenizer, records[: args.edits], records[args.edits : args.edits + args.holdout])]}
        for name in args.methods:
            for variant in (name, f"{name}+sphere"):
                progress = out / variant / "progress.jsonl"
                if progress.exists() and progress.read_text().strip():
                    results[variant] = [json.loads(line) for line in progress.read_text().splitlines()]
        print(write_table(results, out / "table.md"))
        write_plot(results, out / "curves.png")
        return

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    args.model_id = args.model or "embedded:smollm2-135m-instruct"
    pretrained = {k: v.detach().clone() for k, v in model.named_parameters()}
    records = load_edit_requests(args.data)
    if len(records) < args.edits + args.holdout:
        raise SystemExit(f"{args.data} has {len(records)} records: fewer than --edits {args.edits} + --holdout {args.holdout}")
    edited, holdout = records[: args.edits], records[args.edits : args.edits + args.holdout]
    print(f"{len(edited)} edits in batches of {args.batch}, {len(holdout)} held-out records, from {args.data}")
    results = {"pretrained (no edit)": [pretrained_row(args, model, tokenizer, edited, holdout)]}
    for name in args.methods:
        for sphere in (False, True):
            variant = f"{name}+sphere" if sphere else name
            variant_start = time.perf_counter()
            mine = edited[: args.rome_edits] if name == "rome" and args.rome_edits else edited
            results[variant] = run_variant(args, name, sphere, model, tokenizer, pretrained, mine, holdout)
            print(f"{variant}: done in {time.perf_counter() - variant_start:.0f} s", flush=True)
    out = Path(args.out)
    for name in METHOD_NAMES:  # the table and plot always show every variant with saved rows, not only this run's
        for variant in (name, f"{name}+sphere"):
            progress = out / variant / "progress.jsonl"
            if variant not in results and progress.exists() and progress.read_text().strip():
                results[variant] = [json.loads(line) for line in progress.read_text().splitlines()]
    results = {k: results[k] for k in ["pretrained (no edit)"] + [v for n in METHOD_NAMES for v in (n, f"{n}+sphere")] if k in results}
    table = write_table(results, out / "table.md")
    write_plot(results, out / "curves.png")
    print(table)
    print(f"whole comparison (this invocation): {time.perf_counter() - start:.0f} s; wrote {out / 'table.md'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()

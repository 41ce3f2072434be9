"""Seconds per edit, split by phase, and peak memory, for AlphaEdit + SPHERE on SmolLM2.

    python benchmarks/edit_speed.py                      # fast path, 30 quickstart edits in batches of 10
    python benchmarks/edit_speed.py --reference          # per-request value optimisation with full forward passes
    python benchmarks/edit_speed.py --fresh-stats        # also time the key statistics (empty cache)
    python benchmarks/edit_speed.py --hparams paper --data counterfact   # the paper's LLaMA3-8B settings, real CounterFact
    python benchmarks/edit_speed.py --method memit --batch 20 --edits 40 --data counterfact   # any registered method
    python benchmarks/edit_speed.py --method ultraedit --batch 100 --edits 200 --data counterfact --no-sphere   # UltraEdit as in configs/smollm2/ultraedit.yaml
    python benchmarks/edit_speed.py --malloc-peak        # also the peak of malloc'd bytes, beside the RSS (glibc)
    python benchmarks/edit_speed.py --random-init llama3-8b --dtype bfloat16 --batch 100 --edits 200 \
        --tokenizer DIR --data counterfact --hparams paper  # LLaMA3-8B's shapes, random weights (timing only; GPU)

It runs the real Lightning loop (SequentialEditor + EditDataModule, CSV logging, no
checkpoints) and reads the editor's phase timer, on the GPU when there is one. Statistics are a one-off cost per model
and corpus, so they are reported apart from the per-edit figure unless --fresh-stats.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

from sphere_pl import EditDataModule, FactMonitor, HypersphericalEnergyMonitor, PretrainedModel, SequentialEditor, SphereProjection
from sphere_pl.lightning import EditingStrategy
from sphere_pl.editing.methods import METHODS, LocateThenEdit
from sphere_pl.editing.stats import KeyStatistics
from sphere_pl.editing.value_memory import PassPlan
from sphere_pl.editing.values import ValueOptimization

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "editing"))  # the per-request value search the tests check against
from brute_force import optimize_values_reference  # noqa: E402
CORPUS = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"
# value-optimisation settings: the quickstart's (SPEC's Qwen2.5-7B starting point) and the paper's LLaMA3-8B ones
HPARAMS = {
    "quickstart": dict(lr=0.5, clamp_norm_factor=4.0, weight_decay=1e-3),
    "paper": dict(lr=0.1, clamp_norm_factor=0.75, weight_decay=0.5),
}
PHASES = ["statistics", "value_optimisation", "norm_anchor", "warmup", "keys", "solve", "projection", "he", "evaluation"]
EDITING = ("value_optimisation", "norm_anchor", "keys", "solve", "projection")  # the editing phases (warmup: once per run)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


class MemoryMarks(L.Callback):
    """Resident memory after set-up (statistics, projectors) and its peak up to then; on a GPU the same
    for device memory, whose peak counter is then reset so that the editing peak is read apart."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.after_setup, self.peak_at_setup = rss_gb(), peak_rss_gb()
        self.device = pl_module.device  # Lightning moves the module back to the CPU when fit ends
        if torch.cuda.is_available():
            self.cuda_after_setup = torch.cuda.memory_allocated() / 1024**3
            self.cuda_peak_at_setup = torch.cuda.max_memory_allocated() / 1024**3
            torch.cuda.reset_peak_memory_stats()


class Progress(L.Callback):
    """Prints set-up and each batch as they finish, so that a run stopped by a time limit still says where it was."""

    def __init__(self, timer):
        self.timer = timer

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()
        print(f"set-up done: {dict((k, round(v, 1)) for k, v in self.timer.seconds.items())}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = {k: round(v, 1) for k, v in self.timer.seconds.items() if k not in ("setup", "statistics")}
        print(f"batch {batch_idx}: {time.perf_counter() - self.start:.1f} s since set-up; phases so far {seconds}", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_end = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        # Lightning's teardown runs between the two hooks (with its own strategy it moved the module back to
        # the CPU: on LLaMA3-8B 15 GB of weights and 7.7 GB of method buffers); a one-off cost, not of the edits
        self.teardown_seconds = time.perf_counter() - self.train_end


def with_reference_values(cls: type[LocateThenEdit]) -> type[LocateThenEdit]:
    """`cls` with its value search replaced by the per-request reference (full forward passes, one
    request at a time): the baseline of `--reference`. A subclass, through the method's public
    `value_search`; ROME's reference norm is not passed on (the reference clamps by h's norm)."""
    if not issubclass(cls, LocateThenEdit) or cls is METHODS["rome"]:  # ROME reads the search's delta
        raise SystemExit(f"--reference needs a batched locate-then-edit method, not {cls.__name__}")

    class ReferenceValues(cls):
        def value_search(self, lm, requests, layer, reference=None):
            with lm.timer("value_optimisation"):
                z = optimize_values_reference(lm.model, lm.tokenizer, lm.templates, requests, self.context_groups, layer, self.values)
            plan = PassPlan(1, False, 0, None)  # one request at a time, full forward passes
            n = len(requests)
            return z, {"loss": torch.zeros(n), "steps": torch.zeros(n), "delta_norm": torch.ones(n), "initial_loss": torch.ones(n), "plan": plan}

    ReferenceValues.__name__ = f"Reference{cls.__name__}"
    return ReferenceValues


class PeakByPhase:
    """Observes the editor's phase timer: how much each phase raised the process's peak RSS."""

    def __init__(self):
        self.raised, self._before = {}, {}

    def __call__(self, phase: str, event: str) -> None:
        if event == "start":
            self._before[phase] = peak_rss_gb()
        else:
            self.raised[phase] = self.raised.get(phase, 0.0) + peak_rss_gb() - self._before.pop(phase)


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (glibc >= 2.33)
    _fields_ = [(f, ctypes.c_size_t) for f in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


class AllocatedPeak:
    """Peak of the bytes malloc has handed out and not taken back (glibc's mallinfo2), sampled every
    `interval` s in a thread, beside what malloc held from the system at that moment.

    RSS also counts blocks that were freed but that glibc keeps, so the two together say how much of
    the peak is memory the program holds and how much is the allocator's. Off where libc has no mallinfo2."""

    def __init__(self, interval: float = 0.005):
        try:
            self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
            self._mallinfo2.restype = _MallInfo2
        except (OSError, AttributeError):
            self._mallinfo2 = None
        self.available = self._mallinfo2 is not None
        self.interval, self.peak, self.held_at_peak = interval, 0.0, 0.0
        self._stop = threading.Event()

    def now(self) -> tuple[float, float]:
        m = self._mallinfo2()
        return (m.uordblks + m.hblkhd) / 1024**3, (m.arena + m.hblkhd) / 1024**3  # (allocated, held from the system)

    def start(self) -> "AllocatedPeak":
        if self.available:
            self.at_start = self.now()[0]
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            allocated, held = self.now()
            if allocated > self.peak:
                self.peak, self.held_at_peak = allocated, held

    def stop(self) -> None:
        self._stop.set()


def auto_or(kind):
    """argparse type: 'auto', or a value of `kind`."""
    return lambda text: "auto" if text == "auto" else kind(text)


def yes_no(text: str) -> bool:
    if text not in ("yes", "no"):
        raise argparse.ArgumentTypeError("expected yes, no or auto")
    return text == "yes"


class PassPlans(L.Callback):
    """The value search's pass plan of every batch (`edit/requests_per_pass`, `edit/recompute_activations`)."""

    def __init__(self):
        self.plans = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        info = pl_module.editor.last_info
        if "requests_per_pass" in info:
            self.plans.append((int(info["requests_per_pass"]), bool(info["recompute_activations"])))


def tensor_gb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--requests-per-pass", type=auto_or(int), default="auto",
                        help="values.requests_per_pass: requests sharing one forward/backward pass of the value search (default: auto)")
    parser.add_argument("--recompute", type=auto_or(yes_no), default="auto",
                        help="values.recompute_activations: yes, no or auto (default): re-run each upper block in the backward pass")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32", help="values.compute_dtype")
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="values.memory_budget_gb: the most memory auto may plan with")
    parser.add_argument("--malloc-peak", action="store_true",
                        help="also sample malloc's allocated bytes (glibc mallinfo2, every 5 ms): slows the run by a few per cent")
    parser.add_argument("--reference", action="store_true", help="straightforward one-request-at-a-time value optimisation")
    parser.add_argument("--fresh-stats", action="store_true", help="compute key statistics into an empty cache")
    parser.add_argument("--stats-samples", type=int, default=200)
    parser.add_argument("--hparams", choices=sorted(HPARAMS), default="quickstart", help="value-optimisation settings")
    parser.add_argument("--method", default="alphaedit", help="a registered method (alphaedit, memit, rect, prune, rome, ft, ultraedit)")
    parser.add_argument("--no-sphere", action="store_true", help="no SphereProjection filter (the method's update alone)")
    parser.add_argument("--data", default="quickstart", help="quickstart, or 'counterfact' for real CounterFact records (../shared/data)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="edited layers (default: the method's, 4-8)")
    parser.add_argument("--nullspace-threshold", type=float, default=None,
                        help="AlphaEdit's (default 2e-2). A random model's C0 may have no eigenvalue below it; the projector's "
                             "cost does not depend on how many directions it keeps")
    parser.add_argument("--model", default=None, help="hub name or local path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", help="the model's dtype (float32, bfloat16, float16)")
    parser.add_argument("--random-init", metavar="CONFIG", default=None,
                        help="random weights with this architecture (benchmarks/configs name or config.json), built on the run's device")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="with --random-init on a GPU: dispatch with accelerate, at most this much on the GPU (the rest of the blocks in CPU memory)")
    parser.add_argument("--tokenizer", default=None, help="with --random-init: a tokenizer directory (default: the embedded SmolLM2's)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Trainer's accelerator="auto" picks the same

    scratch = tempfile.TemporaryDirectory(prefix="sphere_pl-edit-speed-")  # removed at exit, also on errors
    cache = os.path.join(scratch.name, "stats") if args.fresh_stats else "~/.cache/sphere_pl/stats"
    values = ValueOptimization(num_grad_steps=args.steps, requests_per_pass=args.requests_per_pass, recompute_activations=args.recompute,
                               compute_dtype=args.compute_dtype, memory_budget_gb=args.memory_budget_gb, **HPARAMS[args.hparams])
    stats = KeyStatistics(corpus=str(CORPUS), num_samples=args.stats_samples, seq_len=256, cache_dir=cache)
    if args.method == "ft":  # one down_proj (LLaMA3: layer 21 of 32; SmolLM2: 20 of 30), no statistics
        kwargs = dict(layer=20, num_steps=args.steps)
    elif args.method == "ultraedit":  # configs/smollm2/ultraedit.yaml's settings (no value search, no key statistics)
        kwargs = dict(targets={"mlp.down_proj": args.layers or [10, 11, 21, 22, 26, 27, 28]}, lr=1e-3, ridge=10.0, mini_batch=10,
                      variance="exact", whitening="full", warmup_source=str(COUNTERFACT), warmup_records=1000)
    elif args.method == "rome":
        kwargs = dict(layer=5, values=values, stats=stats)
    else:
        kwargs = dict(values=values, stats=stats, **({"layers": args.layers} if args.layers else {}))
        if args.nullspace_threshold is not None:
            kwargs["nullspace_threshold"] = args.nullspace_threshold
    method = (with_reference_values(METHODS[args.method]) if args.reference else METHODS[args.method])(**kwargs)
    baseline = rss_gb()  # interpreter, torch, transformers, lightning imported
    allocated = AllocatedPeak().start() if args.malloc_peak else None
    start = time.perf_counter()
    if args.random_init:
        from random_model import build_random_model

        model, tokenizer = build_random_model(args.random_init, args.tokenizer, args.dtype, device, args.max_memory_gb)
        pretrained = PretrainedModel.wrap(model, tokenizer, f"random:{args.random_init}", args.dtype)
    else:
        pretrained = PretrainedModel(args.model, args.dtype)
    filters = [] if args.no_sphere else [SphereProjection(0.5, method.sphere_strength)]
    editor = SequentialEditor(pretrained, method=method, filters=filters)
    load_s = time.perf_counter() - start
    peaks = PeakByPhase()
    editor.editor.lm.timer.observers.append(peaks)
    after_load = rss_gb()
    marks, progress, plans = MemoryMarks(), Progress(editor.editor.lm.timer), PassPlans()
    source = str(COUNTERFACT) if args.data == "counterfact" else args.data
    data = EditDataModule(source=source, num_edits=args.batch, dataset_size_limit=args.edits, num_holdout=2, shuffle=False)
    trainer = L.Trainer(
        max_epochs=1,
        logger=L.pytorch.loggers.CSVLogger(os.path.join(scratch.name, "logs")),
        callbacks=[FactMonitor(every_n_batches=1), HypersphericalEnergyMonitor(), marks, progress, plans],
        strategy=EditingStrategy(),  # as the CLI: no copy of the model back to the CPU when fit ends
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    start = time.perf_counter()
    trainer.fit(editor, data)
    total = time.perf_counter() - start
    if allocated:
        allocated.stop()

    seconds = dict(editor.editor.lm.timer.seconds)
    n = editor.editor.edits_applied
    # one-off costs: statistics (cached after the first run) and the rest of set-up
    # (null-space projectors, context templates); "setup" includes "statistics"
    setup_s = seconds.pop("setup", 0.0)
    statistics_s = seconds.pop("statistics", 0.0)
    teardown_s = progress.teardown_seconds
    per_edit = total - setup_s - teardown_s
    name = f"random {args.random_init}" if args.random_init else (args.model or "SmolLM2-135M-Instruct (embedded)")
    gpu = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
    print(f"model: {name}, {args.dtype}; device: {marks.device}{gpu}, torch {torch.__version__}, "
          f"threads: {torch.get_num_threads()}, model load {load_s:.1f} s")
    searches = args.method != "ultraedit"  # UltraEdit has no value search: its settings would mislead
    values = (f"{args.steps} value steps, {args.hparams} hyper-parameters {HPARAMS[args.hparams]}, value search in {args.compute_dtype}"
              if searches else "no value search (configs/smollm2/ultraedit.yaml's settings)")
    print(f"mode: {'reference (per request, full forward passes)' if args.reference else 'fast (batched, prefix-cached)'}; "
          f"{args.method}, {n} edits from {args.data} in batches of {args.batch}, {values}")
    chosen = sorted(set(plans.plans))
    if searches:
        print(f"value search passes: requests_per_pass={args.requests_per_pass}, recompute_activations={args.recompute}"
              f"{'' if args.memory_budget_gb is None else f', memory_budget_gb={args.memory_budget_gb}'} -> "
              + "; ".join(f"{size} per pass, activations {'recomputed' if again else 'kept'}" for size, again in chosen)
              + (f" (budget: {editor.method.value_budget.source})" if getattr(editor.method, "value_budget", None) else ""))
    print(f"one-off: statistics {statistics_s:.1f} s ({'forced to compute' if args.fresh_stats else 'computed only when not cached'}), "
          f"other set-up {setup_s - statistics_s:.1f} s; end of fit {teardown_s:.1f} s (EditingStrategy: the module stays on its device)")
    print(f"{'phase':<22}{'s/edit':>10}")
    for p in PHASES[1:]:
        print(f"{p:<22}{seconds.get(p, 0.0) / n:>10.3f}")
    print(f"{'editing phases':<22}{sum(seconds.get(p, 0.0) for p in EDITING) / n:>10.3f}   ({' + '.join(EDITING)})")
    print(f"{'other (loop, logging)':<22}{(per_edit - sum(seconds.values())) / n:>10.3f}")
    print(f"{'total per edit':<22}{per_edit / n:>10.3f}   (excluding the one-off set-up)")
    print(f"{'with set-up amortised':<22}{total / n:>10.3f}   (over these {n} edits, with the end of fit)")
    print(f"peak memory (max RSS): {peak_rss_gb():.2f} GB")
    model_gb = tensor_gb(list(editor.editor.model.parameters()))
    stats_gb = tensor_gb(list(editor.editor.method.buffers()))  # C0-derived matrices the method holds
    print(f"memory: after imports {baseline:.2f} GB; model load +{after_load - baseline:.2f} GB (parameters {model_gb:.2f} GB); "
          f"set-up +{marks.after_setup - after_load:.2f} GB (method statistics {stats_gb:.3f} GB; peak during set-up {marks.peak_at_setup:.2f} GB); "
          f"editing peak {peak_rss_gb():.2f} GB")
    print("phases that raised the peak: " + ", ".join(f"{p} +{gb:.2f} GB" for p, gb in peaks.raised.items() if gb >= 0.005))
    budget = 1.5 * (model_gb + stats_gb)
    print(f"peak above the imports: {peak_rss_gb() - baseline:.2f} GB; budget 1.5 x (model + statistics) = {budget:.2f} GB")
    if allocated and allocated.available:
        print(f"malloc: peak allocated {allocated.peak:.2f} GB ({allocated.peak - allocated.at_start:.2f} above the imports), "
              f"held from the system at that moment {allocated.held_at_peak:.2f} GB (the rest of the RSS: interpreter, libraries, "
              f"Python's own arenas)")
    if device == "cuda":
        print(f"GPU memory (allocated by torch): after set-up {marks.cuda_after_setup:.2f} GB, peak during set-up "
              f"{marks.cuda_peak_at_setup:.2f} GB, peak while editing {torch.cuda.max_memory_allocated() / 1024**3:.2f} GB; "
              f"reserved by the caching allocator {torch.cuda.max_memory_reserved() / 1024**3:.2f} GB")


if __name__ == "__main__":
    main()

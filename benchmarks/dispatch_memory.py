"""Memory and seconds per edit of editing SmolLM2 with most blocks offloaded to disk (accelerate's
dispatch, `model.model.device_map`) against the same model loaded whole.

    python benchmarks/dispatch_memory.py --placement whole
    python benchmarks/dispatch_memory.py --placement offloaded     # blocks 0-3, 9-29 on disk; 4-8 (edited) on the CPU
    python benchmarks/dispatch_memory.py --placement offloaded --recompute yes   # offloaded blocks brought in one at a time

Each invocation is one process (peak RSS is per process). The model is the embedded SmolLM2-135M-Instruct
saved once as safetensors (`--model-dir`), so both placements load the same files; C0 is cached after
the first run (statistics are a one-off, reported apart). MEMIT on layers 4-8, the quickstart's value
search (25 steps, lr 0.5, clamp 4, weight decay 1e-3) on the first `--edits` CounterFact records of
counterfact-val.json in batches of `--batch`, float32.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import torch

from sphere_pl import Editor, load_model_and_tokenizer
from sphere_pl.data.readers import load_edit_requests
from sphere_pl.editing.methods import create_method
from sphere_pl.editing.stats import KeyStatistics
from sphere_pl.editing.values import ValueOptimization
from sphere_pl.placement import describe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
EDITED = [4, 5, 6, 7, 8]


def rss_gb(kind: str = "") -> float:
    """Resident memory (GB): all of it, or `Anon` (malloc'd, what must fit) or `File` (mapped files, e.g.
    safetensors and accelerate's offloaded weights: pages the kernel may drop and read again)."""
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(f"Rss{kind}:" if kind else "VmRSS:"))
    return int(line.split()[1]) / 1024**2  # kB


class RSSPeak:
    """The largest resident set (total, anonymous, file-backed) seen from `start()` on, sampled every 5 ms
    (ru_maxrss cannot be reset, and does not say which kind of memory it was)."""

    KINDS = ("", "Anon", "File")

    def __init__(self):
        self.peak, self._stop = {}, threading.Event()

    def start(self) -> "RSSPeak":
        self.peak = {k: rss_gb(k) for k in self.KINDS}
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for k in self.KINDS:
                self.peak[k] = max(self.peak[k], rss_gb(k))
            time.sleep(0.005)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        return self.peak


def offloaded_map(num_layers: int) -> dict[str, str]:
    """Every block on disk but the edited ones; the (tied) embedding and LM head and the final norm on the CPU."""
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" if i in EDITED else "disk" for i in range(num_layers)})
    return device_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--placement", choices=["whole", "offloaded"], required=True)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--recompute", choices=["auto", "yes", "no"], default="auto",
                        help="values.recompute_activations: yes re-runs each upper block in the backward pass, so an offloaded "
                             "block's weights are brought in and dropped block by block instead of held for the whole backward pass")
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "sphere_pl-smollm2-safetensors"))
    args = parser.parse_args()

    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):  # the embedded GGUF, saved once as safetensors
        from transformers import AutoModelForCausalLM

        model, tok = load_model_and_tokenizer(None)
        config = model.config
        config.__dict__.pop("quantization_config", None)  # plain float32 weights once dequantised: no GGUF loader when read back
        plain = AutoModelForCausalLM.from_config(config)  # transformers refuses to save a GGUF-loaded model
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(args.model_dir)
        tok.save_pretrained(args.model_dir)
        del model
    start_rss = rss_gb()
    start = time.perf_counter()
    offload = tempfile.TemporaryDirectory(prefix="sphere_pl-offload-")
    if args.placement == "whole":
        model, tok = load_model_and_tokenizer(args.model_dir)
    else:
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(args.model_dir).num_hidden_layers
        model, tok = load_model_and_tokenizer(args.model_dir, device_map=offloaded_map(layers), offload_folder=offload.name)
    load_s, load_peak = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    after_load = {k: rss_gb(k) for k in RSSPeak.KINDS}

    stats = KeyStatistics(corpus=str(SHARED / "wikitext-2" / "valid.txt"), num_samples=200, seq_len=256)
    recompute = {"auto": "auto", "yes": True, "no": False}[args.recompute]
    values = ValueOptimization(num_grad_steps=25, lr=0.5, clamp_norm_factor=4.0, weight_decay=1e-3, recompute_activations=recompute)
    method = create_method("memit", layers=EDITED, values=values, stats=stats)
    editor = Editor(model, tok, method, [], model_id=args.model_dir)
    for line in describe(model, editor.edited_modules):
        print(line)
    editor.prepare()  # C0 (cached after the first run) and the method's matrices: one-off
    requests = load_edit_requests(str(SHARED / "counterfact" / "counterfact-val.json"))[: args.edits]
    peak = RSSPeak().start()
    start = time.perf_counter()
    for i in range(0, len(requests), args.batch):
        editor.apply(requests[i : i + args.batch])
    edit_s = time.perf_counter() - start
    editing_peak = peak.stop()
    seconds = dict(editor.timer.seconds)
    print(f"placement {args.placement}, recompute_activations {args.recompute}: {editor.edits_applied} edits in batches of {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"load {load_s:.1f} s; RSS after imports {start_rss:.2f} GB, after load {after_load['']:.2f} GB (anonymous {after_load['Anon']:.2f}, "
          f"mapped files {after_load['File']:.2f}; peak while loading {load_peak:.2f} GB)")
    print(f"one-off set-up (C0 from the cache or computed, matrices): {seconds.get('setup', 0.0):.1f} s")
    print(f"editing: {edit_s / editor.edits_applied:.3f} s per edit (value search {seconds.get('value_optimisation', 0) / editor.edits_applied:.3f}, "
          f"keys {seconds.get('keys', 0) / editor.edits_applied:.3f}); peak RSS while editing {editing_peak['']:.2f} GB "
          f"(anonymous {editing_peak['Anon']:.2f}, mapped files {editing_peak['File']:.2f}; peaks of each, not a sum)")


if __name__ == "__main__":
    main()

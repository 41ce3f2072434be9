"""Key statistics: the uncentred second moment C0 = E[k kᵀ] of down-projection inputs over generic text.

C0 says which input directions the model already uses, so MEMIT-style methods can keep
their outputs while writing new facts. It is computed once per (model, layer, corpus,
sample count) and cached on disk; the cache is reused as long as its key and a fingerprint
of the weights below and at the layer (C0 depends on all of them) match.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import logging
import os
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..models import ModuleTemplates, weights_fingerprint
from ..tracing import capture

log = logging.getLogger(__name__)


@dataclass
class KeyStatistics:
    """Where and how much text C0 is estimated from.

    `corpus` is a Hugging Face hub dataset name (read with `corpus_config` / `split` /
    `text_field`) or local text: a file, a directory of .txt files, or a glob.
    `num_samples` counts token sequences of `seq_len` tokens (the paper: 100k Wikipedia samples).
    """

    corpus: str = "wikitext"
    corpus_config: str | None = "wikitext-103-raw-v1"
    split: str = "train"
    text_field: str = "text"
    num_samples: int = 100_000
    seq_len: int = 256
    batch_size: int = 8
    cache_dir: str = "~/.cache/sphere_pl/stats"


def _local_files(corpus: str) -> list[str] | None:
    path = os.path.expanduser(corpus)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.txt")))
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
    elif os.path.isfile(path):
        files = [path]
    else:
        return None
    if not files:
        raise FileNotFoundError(f"no text files found for corpus {corpus!r}")
    return files


def load_corpus(cfg: KeyStatistics):
    """The corpus as a `datasets` Dataset with a text column (local files need no network)."""
    import datasets

    files = _local_files(cfg.corpus)
    if files is not None:
        return datasets.load_dataset("text", data_files=files, split="train"), "text"
    return datasets.load_dataset(cfg.corpus, cfg.corpus_config, split=cfg.split), cfg.text_field


def _token_sequences(dataset, text_field: str, tokenizer, seq_len: int):
    """Concatenate non-empty texts and yield consecutive `seq_len`-token chunks."""
    buffer: list[int] = []
    for record in dataset:
        text = record[text_field]
        if not text or not text.strip():
            continue
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]


def model_fingerprint(model, templates: ModuleTemplates, layer: int) -> str:
    """Fingerprint of every parameter the keys of `layer` depend on (embeddings and blocks
    0..layer): tells a cache built for other weights apart cheaply."""
    blocks = tuple(templates.layer_at(i) + "." for i in range(layer + 1))
    stack_prefix = templates.layers + "."
    return weights_fingerprint(model, keep=lambda name: not name.startswith(stack_prefix) or name.startswith(blocks))


def _cache_path(cfg: KeyStatistics, model_id: str, module_name: str) -> str:
    local = _local_files(cfg.corpus) is not None
    corpus = os.path.abspath(os.path.expanduser(cfg.corpus)) if local else cfg.corpus  # one key however the path is written
    corpus_key = f"{corpus}|{cfg.corpus_config}|{cfg.split}|{cfg.text_field}"
    key = hashlib.sha256(f"{model_id}|{module_name}|{corpus_key}|{cfg.num_samples}|{cfg.seq_len}".encode()).hexdigest()[:16]
    safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)[-60:]
    return os.path.join(os.path.expanduser(cfg.cache_dir), safe_model, f"{module_name}.{cfg.num_samples}x{cfg.seq_len}.{key}.pt")


def _load_cached(path: str, fingerprint: str) -> torch.Tensor | None:
    if not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file from an interrupted run
        log.warning("ignoring unreadable statistics cache %s (%s)", path, e)
        return None
    if saved.get("fingerprint") != fingerprint:
        log.warning("statistics cache %s was built for other weights; recomputing", path)
        return None
    return saved["second_moment"]


@torch.no_grad()
def second_moments(model, tokenizer, templates: ModuleTemplates, layers: list[int], cfg: KeyStatistics, model_id: str) -> dict[int, torch.Tensor]:
    """C0 (d_in x d_in, float32, on CPU) for each layer, from the cache where it is valid."""
    names = {layer: templates.down_proj_at(layer) for layer in layers}
    fingerprints = {layer: model_fingerprint(model, templates, layer) for layer in layers}
    paths = {layer: _cache_path(cfg, model_id, names[layer]) for layer in layers}
    result = {layer: _load_cached(paths[layer], fingerprints[layer]) for layer in layers}
    missing = [layer for layer, c in result.items() if c is None]
    if not missing:
        return result

    log.info("computing key statistics for layers %s over %s (%d x %d tokens)", missing, cfg.corpus, cfg.num_samples, cfg.seq_len)
    device = next(model.parameters()).device
    dataset, text_field = load_corpus(cfg)
    sums = {layer: None for layer in missing}
    count = 0  # token positions accumulated
    stop = templates.layer_at(max(missing))
    sequences = _token_sequences(dataset, text_field, tokenizer, cfg.seq_len)
    with tqdm(total=cfg.num_samples, desc="key statistics", unit="seq") as bar:
        while bar.n < cfg.num_samples:
            chunk = list(itertools.islice(sequences, min(cfg.batch_size, cfg.num_samples - bar.n)))
            if not chunk:
                break
            ids = torch.tensor(chunk, device=device)
            found = capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, inputs_of=[names[layer] for layer in missing], stop_after=stop)
            for layer in missing:
                keys = found[("in", names[layer])].flatten(0, -2).float()
                moment = keys.T @ keys
                sums[layer] = moment if sums[layer] is None else sums[layer] + moment
            count += ids.numel()
            bar.update(len(chunk))
    if count == 0:
        raise ValueError(f"corpus {cfg.corpus!r} gave no text to compute key statistics from")
    if bar.n < cfg.num_samples:
        log.warning("corpus %s ran out after %d of %d sequences", cfg.corpus, bar.n, cfg.num_samples)

    for layer in missing:
        result[layer] = (sums[layer] / count).cpu()
        os.makedirs(os.path.dirname(paths[layer]), exist_ok=True)
        tmp = paths[layer] + ".tmp"
        torch.save({"second_moment": result[layer], "fingerprint": fingerprints[layer], "tokens": count, "config": asdict(cfg), "model": model_id}, tmp)
        os.replace(tmp, paths[layer])
    return result

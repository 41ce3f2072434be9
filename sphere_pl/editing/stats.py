"""Key statistics: the uncentred second moment C0 = E[k kᵀ] of down-projection inputs over generic text.

C0 says which input directions the model already uses, so MEMIT-style methods can keep
their outputs while writing new facts. It is computed once per (model, layer, corpus,
sample count) and cached on disk; the cache is reused as long as its key and a fingerprint
of the weights below and at the layer (C0 depends on all of them) match.
"""

from __future__ import annotations

import contextlib

import glob
import hashlib
import itertools
import logging
import os
import re
import zipfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..errors import SettingsError, SpherePLError
from ..files import atomic_write, load_checkpoint_file, save_checkpoint_file
from ..models import ModuleTemplates, linear_weight, weights_fingerprint
from ..placement import input_device
from ..tracing import capture

log = logging.getLogger(__name__)

ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
MOM2_FILE = re.compile(r"^(?P<module>.+)_(?P<dtype>float16|float32|float64)_mom2(?:_t[^_]*)?(?:_(?P<samples>\d+))?\.npz$")


class StatisticsFileError(SpherePLError, ValueError):
    """A published statistics file that does not fit the model or layer (names file, field and fix)."""

    hint = "point stats.from_file at the .npz files computed for this model (<module>_<dtype>_mom2_<n>.npz), or remove it to compute C0"


@dataclass
class KeyStatistics:
    """Where and how much text C0 is estimated from.

    `corpus` is a Hugging Face hub dataset name (read with `corpus_config` / `split` /
    `text_field`) or local text: a file, a directory of .txt files, or a glob.
    `num_samples` counts token sequences of `seq_len` tokens (the paper: 100k Wikipedia samples).

    `from_file` reads C0 instead of computing it: a second-moment file as the ROME, MEMIT,
    AlphaEdit and SPHERE code bases write and share (`<module>_<dtype>_mom2_<n>.npz`, with
    `mom2.mom2` the sum of k kᵀ and `mom2.count` the number of keys), or a directory searched
    (recursively) for the edited modules' files. When several sample counts are present,
    the one equal to `num_samples` is used. `accumulate_dtype` is the precision of the running
    sums when C0 is computed (the forward runs in the model's dtype). `checkpoint_every`
    sequences the partial sums are saved, so an interrupted computation resumes (0: never).
    `nullspace_threshold` is only reported: how many eigenvalues of C0 lie below it as samples
    grow (AlphaEdit's default), next to the relative change of C0.
    """

    corpus: str = "wikitext"
    corpus_config: str | None = "wikitext-103-raw-v1"
    split: str = "train"
    text_field: str = "text"
    num_samples: int = 100_000
    seq_len: int = 256
    batch_size: int = 8
    cache_dir: str = "~/.cache/sphere_pl/stats"
    from_file: str | None = None
    accumulate_dtype: str = "float32"
    checkpoint_every: int = 1000
    nullspace_threshold: float = 2e-2

    def __post_init__(self):
        if self.accumulate_dtype not in ACCUMULATE_DTYPES:
            raise SettingsError(f"stats.accumulate_dtype must be one of {sorted(ACCUMULATE_DTYPES)}, got {self.accumulate_dtype!r}")


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
    if cfg.corpus.endswith((".txt", ".json", ".jsonl")) or cfg.corpus.startswith((".", "/", "~")):
        # a path, not a hub dataset name: say so, instead of the hub lookup's traceback
        raise FileNotFoundError(f"stats.corpus {cfg.corpus!r} does not exist (relative paths are read from {os.getcwd()})")
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
    if cfg.from_file:
        return {layer: read_published_moment(cfg.from_file, names[layer], _in_features(model, names[layer]), cfg.num_samples) for layer in layers}
    fingerprints = {layer: model_fingerprint(model, templates, layer) for layer in layers}
    paths = {layer: _cache_path(cfg, model_id, names[layer]) for layer in layers}
    result = {layer: _load_cached(paths[layer], fingerprints[layer]) for layer in layers}
    missing = [layer for layer, c in result.items() if c is None]
    if not missing:
        return result

    moments, tokens, convergence = accumulate_moments(model, tokenizer, templates, missing, cfg, fingerprints, _partial_path(paths, missing))
    for layer in missing:
        result[layer] = moments[layer]
        if _rank_and_world()[0] == 0:  # every rank holds the same reduced C0; one writes it
            saved = {"second_moment": result[layer], "fingerprint": fingerprints[layer], "tokens": tokens, "config": asdict(cfg), "model": model_id}
            saved["convergence"] = [row for row in convergence if row["layer"] == layer]
            atomic_write(paths[layer], lambda tmp, saved=saved: torch.save(saved, tmp))
    _barrier()
    return result


# ------------------------------------------------------------------- accumulation


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or min/max) over DDP ranks, in place; a no-op on one process."""
    if _rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor


def _barrier() -> None:
    if _rank_and_world()[1] > 1:
        dist.barrier()


def _partial_path(paths: dict[int, str], layers: list[int]) -> str:
    key = hashlib.sha256("|".join(paths[layer] for layer in layers).encode()).hexdigest()[:16]
    rank, world = _rank_and_world()
    return os.path.join(os.path.dirname(paths[layers[0]]), f"partial.{key}.rank{rank}of{world}.safetensors")


def _load_partial(path: str, fingerprints: dict[int, str], layers: list[int]) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        partial = load_checkpoint_file(path)
    except Exception as e:  # a file cut short by a kill: start again
        log.warning("ignoring unreadable partial statistics %s (%s)", path, e)
        return None
    if partial.get("fingerprints") != {str(layer): fingerprints[layer] for layer in layers}:
        log.warning("partial statistics %s were computed for other weights; starting again", path)
        return None
    return partial


def _save_partial(path: str, state: dict) -> None:
    save_checkpoint_file(state, path)  # safetensors, written whole or not at all


def _convergence_rows(sums, previous, count_tensor, layers, batches, sequences, cfg) -> tuple[list[dict], dict]:
    """Relative change of each layer's C0 since the last report and its near-null-space dimension."""
    count = float(_all_reduce(count_tensor.clone())) or 1.0
    rows, estimates = [], {}
    for layer in layers:
        estimate = _all_reduce(sums[layer].clone()).double() / count
        before = previous.get(layer)
        change = float(torch.linalg.matrix_norm(estimate - before.double()) / torch.linalg.matrix_norm(estimate)) if before is not None else float("nan")
        dimension = int((torch.linalg.eigvalsh(estimate) < cfg.nullspace_threshold).sum())
        rows.append({"layer": layer, "sequences": sequences, "tokens": int(count), "relative_change": change, "nullspace_dim": dimension})
        estimates[layer] = estimate.float()  # kept until the next report: float32 halves it (5 x 0.8 GB on LLaMA3-8B)
        log.info(
            "key statistics, layer %d: %d sequences (%d tokens): C0 changed by %.3g since the last report; %d directions below %g",
            layer, sequences, int(count), change, dimension, cfg.nullspace_threshold,
        )
    return rows, estimates


@torch.no_grad()
def accumulate_moments(
    model, tokenizer, templates: ModuleTemplates, layers: list[int], cfg: KeyStatistics, fingerprints: dict[int, str], partial_path: str,
    timer=None,
):
    """Σ k kᵀ / n over `cfg.num_samples` sequences for `layers`, in one forward per batch.

    - Sharded: under DDP (an initialised process group) rank r takes the batches b with
      b % world == r, and the sums and counts are all-reduced at the end.
    - Resumable: every `cfg.checkpoint_every` sequences each rank saves its partial sums
      (safetensors) next to the cache; an interrupted computation continues from them.
    - Sums in `cfg.accumulate_dtype`, the forward in the model's dtype.
    - Convergence: at 1, 2, 4, 8, ... batches and at the end, the relative change of C0 since
      the last report and the number of its eigenvalues below `cfg.nullspace_threshold` are
      logged and returned (rows of dicts), so a user sees when more samples stop mattering.
      (The first report after a resume has no earlier estimate to compare with: NaN.)
    - `timer` (a `PhaseTimer`, optional) times the reports apart, as phase "convergence_report".

    Returns ({layer: C0 float32 CPU}, tokens, convergence rows).
    """
    rank, world = _rank_and_world()
    log.info("computing key statistics for layers %s over %s (%d x %d tokens, %d process(es))", layers, cfg.corpus, cfg.num_samples, cfg.seq_len, world)
    device = input_device(model)
    dtype = ACCUMULATE_DTYPES[cfg.accumulate_dtype]
    names = {layer: templates.down_proj_at(layer) for layer in layers}
    d_in = {layer: _in_features(model, names[layer]) for layer in layers}
    sums = {layer: torch.zeros(d_in[layer], d_in[layer], dtype=dtype, device=device) for layer in layers}
    count = torch.zeros((), dtype=torch.int64, device=device)  # token positions summed on this rank
    start, convergence, previous = 0, [], {}

    partial = _load_partial(partial_path, fingerprints, layers) if cfg.checkpoint_every else None
    resume_at = torch.tensor(partial["batches"] if partial else 0, device=device)
    low, high = _all_reduce(resume_at.clone(), "min"), _all_reduce(resume_at.clone(), "max")
    if partial and int(low) == int(high) and int(low) > 0:  # every rank resumes from the same batch
        start = int(low)
        for layer in layers:
            sums[layer] = partial["sums"][str(layer)].to(device, dtype)
        count = torch.tensor(partial["count"], dtype=torch.int64, device=device)
        convergence = list(partial["convergence"])
        log.info("resuming key statistics from %s: %d of %d sequences done", partial_path, start * cfg.batch_size, cfg.num_samples)

    dataset, text_field = load_corpus(cfg)
    sequences = _token_sequences(dataset, text_field, tokenizer, cfg.seq_len)
    stop = templates.layer_at(max(layers))
    batches = -(-cfg.num_samples // cfg.batch_size)
    every = max(1, cfg.checkpoint_every // cfg.batch_size) if cfg.checkpoint_every else 0
    done_sequences, finished, reported = 0, 0, 0
    with tqdm(total=cfg.num_samples, desc="key statistics", unit="seq", disable=rank != 0) as bar:
        for batch in range(batches):
            size = min(cfg.batch_size, cfg.num_samples - batch * cfg.batch_size)
            chunk = list(itertools.islice(sequences, size))  # every rank reads the stream, to stay in step
            if not chunk:
                log.warning("corpus %s ran out after %d of %d sequences", cfg.corpus, batch * cfg.batch_size, cfg.num_samples)
                break
            done_sequences = batch * cfg.batch_size + len(chunk)
            finished = batch + 1
            bar.update(len(chunk))
            if batch < start:
                reported = finished  # the reports up to here came with the partial sums
                continue
            if batch % world == rank:
                ids = torch.tensor(chunk, device=device)
                found = capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, inputs_of=list(names.values()), stop_after=stop)
                for layer in layers:
                    keys = found[("in", names[layer])].flatten(0, -2).to(dtype)
                    sums[layer] += keys.T @ keys
                count += ids.numel()
            if finished & (finished - 1) == 0:  # 1, 2, 4, 8, ... batches
                with timer("convergence_report") if timer is not None else contextlib.nullcontext():
                    rows, previous = _convergence_rows(sums, previous, count, layers, finished, done_sequences, cfg)
                convergence, reported = convergence + rows, finished
            if every and finished % every == 0 and finished < batches:
                _save_partial(partial_path, {
                    "batches": finished, "count": int(count), "fingerprints": {str(k): v for k, v in fingerprints.items() if k in layers},
                    "sums": {str(k): v for k, v in sums.items()}, "convergence": convergence,
                })  # fmt: skip
    if finished and reported != finished:  # and at the end
        with timer("convergence_report") if timer is not None else contextlib.nullcontext():
            rows, previous = _convergence_rows(sums, previous, count, layers, finished, done_sequences, cfg)
        convergence += rows
    total = int(_all_reduce(count.clone()))
    if total == 0:
        raise SettingsError(f"corpus {cfg.corpus!r} gave no text to compute key statistics from")
    moments = {layer: (_all_reduce(sums[layer]) / total).float().cpu() for layer in layers}
    if os.path.exists(partial_path):
        os.remove(partial_path)
    return moments, total, convergence


# ------------------------------------------------------------ published statistics files


def _in_features(model, module_name: str) -> int:
    return linear_weight(model.get_submodule(module_name)).shape[1]


def mom2_file_name(module_name: str, dtype: str, num_samples: int) -> str:
    """The official code bases' name for a module's second-moment file."""
    return f"{module_name}_{dtype}_mom2_{num_samples}.npz"


def write_mom2_file(directory: str, module_name: str, mom2_sum: torch.Tensor, count: int, dtype: str, num_samples: int) -> str:
    """Write a second-moment file in the official format (`mom2.mom2` = Σ k kᵀ, `mom2.count`)."""
    path = os.path.join(directory, mom2_file_name(module_name, dtype, num_samples))
    arrays = {"mom2.constructor": np.array("util.runningstats.SecondMoment()"), "mom2.count": np.array(count), "mom2.mom2": mom2_sum.to(getattr(torch, dtype)).numpy()}

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)
    return path


def find_mom2_file(from_file: str, module_name: str, num_samples: int) -> str:
    """The statistics file for `module_name` under `from_file` (a file or a directory)."""
    path = os.path.expanduser(from_file)
    if os.path.isfile(path):
        match = MOM2_FILE.match(os.path.basename(path))
        if match and match["module"] != module_name:
            raise StatisticsFileError(
                f"stats.from_file {path} holds statistics of module {match['module']!r}, but {module_name!r} is edited: "
                "point stats.from_file at the directory that holds one file per edited module"
            )
        return path
    if not os.path.isdir(path):
        raise StatisticsFileError(f"stats.from_file {path} does not exist (give a .npz file or a directory of them)")
    found = []
    for candidate in sorted(glob.glob(os.path.join(path, "**", "*.npz"), recursive=True)):
        match = MOM2_FILE.match(os.path.basename(candidate))
        if match and match["module"] == module_name:
            found.append((candidate, match["samples"]))
    if not found:
        raise StatisticsFileError(
            f"stats.from_file {path} has no file for module {module_name!r} (expected a name like "
            f"{mom2_file_name(module_name, 'float32', num_samples)}): check the model's layers and the directory"
        )
    exact = [c for c, n in found if n is not None and int(n) == num_samples]
    if len(exact) == 1 or len(found) == 1:
        return (exact or [found[0][0]])[0]
    raise StatisticsFileError(
        f"stats.from_file {path} has several files for {module_name!r} {[os.path.basename(c) for c, _ in found]}: "
        "set stats.num_samples to the sample count of the one to use"
    )


def read_published_moment(from_file: str, module_name: str, d_in: int, num_samples: int) -> torch.Tensor:
    """C0 = mom2 / count (float32, CPU) from an official-format file, checked against the layer.
    Read with `allow_pickle=False`: no code in the file runs."""
    path = find_mom2_file(from_file, module_name, num_samples)
    try:
        with np.load(path, allow_pickle=False) as data:
            fields = set(data.files)
            missing = [f for f in ("mom2.mom2", "mom2.count") if f not in fields]
            if missing:
                raise StatisticsFileError(f"{path}: field {missing[0]!r} is missing (fields: {sorted(fields)}): not a second-moment file of the official code")
            mom2, count = data["mom2.mom2"], data["mom2.count"]
    except StatisticsFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise StatisticsFileError(f"{path} is not a readable .npz statistics file ({str(e).splitlines()[0][:200]})") from None
    if mom2.dtype not in (np.float16, np.float32, np.float64):
        raise StatisticsFileError(f"{path}: field 'mom2.mom2' has dtype {mom2.dtype}; expected float16, float32 or float64")
    if mom2.shape != (d_in, d_in):
        raise StatisticsFileError(
            f"{path}: field 'mom2.mom2' has shape {tuple(mom2.shape)}, but {module_name} takes {d_in} inputs, so C0 is "
            f"({d_in}, {d_in}): the file was computed for another model or module"
        )
    if count.shape != () or not np.issubdtype(count.dtype, np.integer) or int(count) <= 0:
        raise StatisticsFileError(f"{path}: field 'mom2.count' is {count!r}; expected a positive integer (the number of keys summed)")
    moment = torch.from_numpy(mom2.astype(np.float64)) / int(count)
    if not bool(torch.isfinite(moment).all()):
        raise StatisticsFileError(f"{path}: field 'mom2.mom2' holds non-finite values")
    asymmetry = float((moment - moment.T).abs().max())
    if asymmetry > 1e-3 * float(moment.abs().max()):
        raise StatisticsFileError(f"{path}: field 'mom2.mom2' is not symmetric (max |C - Cᵀ| = {asymmetry:.3g}): not a second moment")
    if int(count) < d_in:
        log.warning("%s sums only %d keys for a %d-dimensional C0: it is rank-deficient", path, int(count), d_in)
    log.info("read C0 of %s from %s (%d keys)", module_name, path, int(count))
    return moment.float()

"""C0 at scale: sharded over DDP ranks, resumable from partial sums, convergence reported."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import tiny_llama, tiny_tokenizer
from sphere_pl.editing.lm import PhaseTimer
from sphere_pl.editing.stats import KeyStatistics, accumulate_moments, model_fingerprint, second_moments
from sphere_pl.models import resolve_templates

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2" / "valid.txt"
LAYERS = [1, 2]


def small_stats(tmp_path, **changes) -> KeyStatistics:
    return KeyStatistics(corpus=str(CORPUS), num_samples=24, seq_len=32, batch_size=2, cache_dir=str(tmp_path / "cache"), **changes)


def brute_force(model, tok, cfg) -> dict[int, torch.Tensor]:
    """Σ k kᵀ / n in float64, one sequence at a time, from a plain forward with hooks."""
    from sphere_pl.editing.stats import _token_sequences, load_corpus

    dataset, field = load_corpus(cfg)
    templates = resolve_templates(model)
    model = model.double()
    sums = {layer: torch.zeros(64, 64, dtype=torch.float64) for layer in LAYERS}
    count, keys = 0, {}
    hooks = [model.get_submodule(templates.down_proj_at(layer)).register_forward_pre_hook(
        lambda m, args, layer=layer: keys.__setitem__(layer, args[0].reshape(-1, args[0].shape[-1]))) for layer in LAYERS]  # fmt: skip
    for i, sequence in enumerate(_token_sequences(dataset, field, tok, cfg.seq_len)):
        if i == cfg.num_samples:
            break
        with torch.no_grad():
            model(torch.tensor([sequence]))
        for layer in LAYERS:
            sums[layer] += keys[layer].T @ keys[layer]
        count += len(sequence)
    for hook in hooks:
        hook.remove()
    return {layer: s / count for layer, s in sums.items()}


class Interrupt(Exception):
    pass


def test_an_interrupted_computation_resumes_from_its_partial_sums_exactly(tmp_path):
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    templates = resolve_templates(model)
    cfg = small_stats(tmp_path, checkpoint_every=4)  # partial sums every 2 batches
    fingerprints = {layer: model_fingerprint(model, templates, layer) for layer in LAYERS}
    partial = str(tmp_path / "partial.safetensors")
    reference, tokens, _ = accumulate_moments(model, tok, templates, LAYERS, dataclasses.replace(cfg, checkpoint_every=0), fingerprints, partial)

    calls = []

    def stop_after_seven(module, args):
        calls.append(1)
        if len(calls) == 7:
            raise Interrupt  # the process dies during batch 7 of 12

    hook = model.get_submodule(templates.layer_at(0)).register_forward_pre_hook(stop_after_seven)
    with pytest.raises(Interrupt):
        accumulate_moments(model, tok, templates, LAYERS, cfg, fingerprints, partial)
    hook.remove()
    assert os.path.exists(partial)  # saved after batch 6

    calls.clear()
    counter = model.get_submodule(templates.layer_at(0)).register_forward_pre_hook(lambda m, a: calls.append(1))
    resumed, resumed_tokens, convergence = accumulate_moments(model, tok, templates, LAYERS, cfg, fingerprints, partial)
    counter.remove()
    assert len(calls) == 12 - 6  # only the batches after the partial sums ran
    assert resumed_tokens == tokens == 24 * 32
    for layer in LAYERS:
        assert torch.equal(resumed[layer], reference[layer])  # the same additions in the same order
    assert not os.path.exists(partial)  # removed once C0 is complete
    # the reports made before the interruption came back with the partial sums
    assert sorted({row["sequences"] for row in convergence}) == [2, 4, 8, 16, 24]


def test_convergence_is_reported_at_doubling_sample_counts(tmp_path, caplog):
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    templates = resolve_templates(model)
    cfg = small_stats(tmp_path)
    fingerprints = {layer: model_fingerprint(model, templates, layer) for layer in LAYERS}
    timer = PhaseTimer()
    with caplog.at_level("INFO", logger="sphere_pl.editing.stats"):
        moments, _, rows = accumulate_moments(model, tok, templates, LAYERS, cfg, fingerprints, str(tmp_path / "p.safetensors"), timer=timer)
    assert set(timer.seconds) == {"convergence_report"} and timer.seconds["convergence_report"] > 0  # the reports, timed apart
    expected = brute_force(tiny_llama(seed=0), tok, cfg)
    for layer in LAYERS:
        mine = [r for r in rows if r["layer"] == layer]
        assert [r["sequences"] for r in mine] == [2, 4, 8, 16, 24]
        assert mine[-1]["tokens"] == 24 * 32
        # the last report describes the final C0: its near-null-space dimension, recomputed independently
        assert mine[-1]["nullspace_dim"] == int((torch.linalg.eigvalsh(expected[layer]) < cfg.nullspace_threshold).sum())
        assert float((moments[layer].double() - expected[layer]).abs().max() / expected[layer].abs().max()) < 1e-5
        changes = [r["relative_change"] for r in mine]
        assert changes[0] != changes[0] and all(0 < c < 2 for c in changes[1:])  # NaN first, then finite
    assert "C0 changed by" in caplog.text and "directions below 0.02" in caplog.text


def _rank_moments(rank: int, world: int, port: int, cache: str, out: str) -> None:
    """One DDP rank (gloo): C0 through the public entry point, as `Editor.prepare` calls it."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_DATASETS_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tok = tiny_llama(seed=0), tiny_tokenizer()
        templates = resolve_templates(model)
        forwards = []
        model.get_submodule(templates.layer_at(0)).register_forward_pre_hook(lambda m, a: forwards.append(1))
        cfg = KeyStatistics(corpus=str(CORPUS), num_samples=24, seq_len=32, batch_size=2, cache_dir=cache)
        moments = second_moments(model, tok, templates, LAYERS, cfg, "tiny")
        torch.save({"moments": moments, "forwards": len(forwards)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_c0(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_moments, args=(2, port, str(tmp_path / "ddp-cache"), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    single = second_moments(model, tok, resolve_templates(model), LAYERS, small_stats(tmp_path), "tiny")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["forwards"] for r in ranks] == [6, 6]  # the 12 batches were shared, not repeated
    for layer in LAYERS:
        assert torch.equal(ranks[0]["moments"][layer], ranks[1]["moments"][layer])  # every rank holds the reduced C0
        assert torch.allclose(ranks[0]["moments"][layer], single[layer], rtol=1e-5, atol=1e-6)
    # rank 0 wrote the cache (with its convergence report); the next run reads it
    cached = list((tmp_path / "ddp-cache").rglob("*.pt"))
    assert len(cached) == len(LAYERS)
    report = torch.load(cached[0], weights_only=True)["convergence"]
    assert json.loads(json.dumps(report))[-1]["tokens"] == 24 * 32


def test_phase_timer_observers_are_told_each_phase_start_and_end_outside_the_timed_span():
    timer, events = PhaseTimer(), []
    timer.observers.append(lambda phase, event: events.append((phase, event, dict(timer.seconds))))
    with timer("keys"):
        pass
    with pytest.raises(RuntimeError), timer("solve"):
        raise RuntimeError("a failing phase still ends")
    assert [(p, e) for p, e, _ in events] == [("keys", "start"), ("keys", "end"), ("solve", "start"), ("solve", "end")]
    assert "keys" not in events[0][2] and "keys" in events[1][2]  # the end comes after the phase's seconds are counted
    assert "solve" in events[3][2]

"""The editing engine against independent computations on tiny random models.

Every check compares the library with something computed separately here: float64 brute
force (full forward passes with hooks, explicit matrices, token search by hand) or the
slow per-request value search in brute_force.py. Tiny models only (milliseconds per forward).
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import os

import pytest
import torch
from torch import nn

import sphere_pl.editing.values as values_module
import sphere_pl.editing.stats as stats_module
from conftest import CONTEXT_TEMPLATES
from sphere_pl.editing.lm import LoadedModel
from sphere_pl.editing.methods import BatchEdit, EditMethod
from sphere_pl.editing.writer import NonFiniteUpdateError, WeightWriter
from sphere_pl.editing.values import ValueOptimization, optimize_values
from helpers import tiny_llama
from sphere_pl.models import linear_weight, resolve_templates
from sphere_pl.sphere.projection import SphereProjection
from sphere_pl.data.records import EditRequest
from sphere_pl.editing.stats import KeyStatistics, second_moments
from sphere_pl.tracing import run_from_layer

from brute_force import (
    _brute_force_block_output, _brute_force_keys, _rel_err, _single_forward_reads, _subject_last_index, compute_keys, optimize_values_reference,
)

VOCAB = 257  # the byte tokenizer's vocabulary (256 bytes + <eos>)

REQUESTS = [  # different prompt lengths, targets of different (all multi-token) lengths
    EditRequest(0, "{} is located in", "Eiffel Tower", "Rome", "Paris"),
    EditRequest(1, "The capital of {} is", "Japan", "Kyoto city", "Tokyo"),
    EditRequest(2, "{} plays", "Messi", "basketball and chess", "football"),
]
SECOND_BATCH = [
    EditRequest(3, "{} was born in", "Einstein", "Madrid", "Ulm"),
    EditRequest(4, "The language of {} is", "Brazil", "Dutch", "Portuguese"),
]
GROUPS = [["{}"], list(CONTEXT_TEMPLATES)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: thread start-up costs more than the matmuls, so run single-threaded here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# 1. batched value optimisation == one request at a time


def _record_losses(monkeypatch):
    """Record the per-request loss vector that optimize_values computes at every iteration."""
    trajectory = []
    original = values_module._request_losses

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        trajectory.append(out[0].detach().clone())
        return out

    monkeypatch.setattr(values_module, "_request_losses", recording)
    return trajectory


def test_requests_cover_multi_token_targets_and_prompt_lengths(tok):
    target_lengths = {len(tok(" " + r.target_new, add_special_tokens=False)["input_ids"]) for r in REQUESTS}
    prompt_lengths = {len(tok(r.rewrite_prompt)["input_ids"]) for r in REQUESTS}
    assert min(target_lengths) > 1 and len(target_lengths) == len(REQUESTS)
    assert len(prompt_lengths) == len(REQUESTS)


def test_value_loss_kl_is_edited_given_original_like_the_official_code(tok, float64_default):
    """The KL term is KL(edited || original) = Σ p_edited (log p_edited − log p_original), what the
    ROME/MEMIT/AlphaEdit code computes with kl_div(log p_original, log p_edited, log_target=True)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    contexts = [c for g in GROUPS for c in g]
    p = values_module._build_problem([values_module._tokenize_request(tok, r, contexts) for r in REQUESTS], tok.pad_token_id, "cpu")
    n_seq, width, d = p.seq_request.shape[0], p.batch["input_ids"].shape[1], 8
    hidden = torch.randn(n_seq, width, d, generator=g, dtype=torch.float64)
    lm_head = torch.nn.Linear(d, VOCAB, bias=False).double()
    kl_init = torch.log_softmax(torch.randn(len(REQUESTS), VOCAB, generator=g, dtype=torch.float64), dim=-1)
    seqs = torch.arange(n_seq)
    delta, h_norm = torch.zeros(len(REQUESTS), d, dtype=torch.float64), torch.ones(len(REQUESTS), dtype=torch.float64)

    def loss(kl_factor):
        hp = ValueOptimization(kl_factor=kl_factor, weight_decay=0.0)
        return values_module._request_losses(p, seqs, lambda s, pos: hidden[s, pos], lm_head, kl_init, delta, h_norm, hp)

    (with_kl, kl_log_probs), (without_kl, _) = loss(1.0), loss(0.0)
    expected = F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="none").sum(-1)  # per request
    assert torch.allclose(with_kl - without_kl, expected, rtol=1e-12, atol=1e-12)
    reverse = F.kl_div(kl_log_probs, kl_init, log_target=True, reduction="none").sum(-1)
    assert not torch.allclose(with_kl - without_kl, reverse, rtol=1e-3)  # the other direction differs here


def test_the_token_slots_reported_are_those_of_the_passes_run(tok):
    """info["token_slots"]: with every request in one pass and no early stop, each of the steps runs every
    sequence, padded to the longest prefix (up to the subject's last token) and the longest suffix."""
    model = tiny_llama()
    requests = REQUESTS + SECOND_BATCH
    hp = ValueOptimization(num_grad_steps=3, lr=0.1, early_stop_loss=-1.0, requests_per_pass=len(requests), recompute_activations=False)
    _, info = optimize_values(model, tok, resolve_templates(model), requests, GROUPS, 2, hp)
    contexts = [c for group in GROUPS for c in group]
    sequences = []  # (length, position of the subject's last token) of every sequence the search runs
    for r in requests:
        tokens = values_module._tokenize_request(tok, r, contexts)
        sequences += [(len(ids), at) for ids, at in zip(tokens.ids, tokens.lookup)]
    n = len(sequences)
    expected = {"suffix real": sum(length - at for length, at in sequences), "prefix real": sum(at for _, at in sequences),
                "suffix padded": n * max(length - at for length, at in sequences), "prefix padded": n * max(at for _, at in sequences)}
    assert info["token_slots"] == {k: 3 * v for k, v in expected.items()}
    assert expected["suffix padded"] > expected["suffix real"]  # padding is counted, not assumed away


@pytest.mark.parametrize("requests_per_pass, recompute", [(1, True), (2, True), (2, False)])
def test_requests_in_groups_of_any_size_match_the_reference_float64(tok, float64_default, requests_per_pass, recompute):
    """Requests solved a few per pass (grouped by length, so not in the given order) give the
    per-request reference's values, each in its own request's place: group size changes memory, not results."""
    model = tiny_llama().double()
    templates = resolve_templates(model)
    requests = [REQUESTS[2], REQUESTS[0], SECOND_BATCH[1], REQUESTS[1], SECOND_BATCH[0]]
    hp = ValueOptimization(num_grad_steps=6, lr=0.1, early_stop_loss=-1.0, requests_per_pass=requests_per_pass, recompute_activations=recompute)
    z, info = optimize_values(model, tok, templates, requests, GROUPS, 2, hp)
    z_ref = optimize_values_reference(model, tok, templates, requests, GROUPS, 2, hp)
    assert z.shape == z_ref.shape == (len(requests), model.config.hidden_size)
    assert (z - z_ref).abs().max() <= 1e-9 * z_ref.abs().max()
    h = _brute_force_block_output(model, tok, templates, requests, 2)
    assert torch.allclose(info["delta"], z - h, atol=1e-9 * float(h.abs().max()))  # info rows in the same order
    assert values_module.pass_order(tok, requests) != list(range(len(requests)))  # the grouping really reordered them


def test_value_search_computes_no_weight_gradients_and_restores_requires_grad(tok):
    """A caller's model that still requires gradients gets none (they would cost a copy of the
    upper weights and their backward at every step), and keeps its flags afterwards."""
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)  # a mixed set of flags, restored as they were
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    optimize_values(model, tok, resolve_templates(model), REQUESTS[:2], GROUPS, 1, ValueOptimization(num_grad_steps=3, early_stop_loss=-1.0))
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ  # the attention switch is scoped to the passes
    assert any(flags.values()) and not all(flags.values())


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("layer, loss_layer", [(2, -1), (1, 2)])
def test_optimize_values_matches_reference_float64(tok, float64_default, layer, loss_layer, recompute):
    model = tiny_llama().double()
    templates = resolve_templates(model)
    # lr 0.1 with clamp 0.75 makes the clamp bite; KL and weight decay are on
    hp = ValueOptimization(num_grad_steps=8, lr=0.1, loss_layer=loss_layer, early_stop_loss=-1.0, recompute_activations=recompute)
    z, info = optimize_values(model, tok, templates, REQUESTS, GROUPS, layer, hp)
    z_ref = optimize_values_reference(model, tok, templates, REQUESTS, GROUPS, layer, hp)
    assert z.dtype == torch.float64
    assert info["steps"].tolist() == [hp.num_grad_steps - 1] * len(REQUESTS)
    h = _brute_force_block_output(model, tok, templates, REQUESTS, layer)
    assert (z - h).norm(dim=-1).min() > 1e-3 * h.norm(dim=-1).min()  # the search moved every request
    assert (z - z_ref).abs().max() <= 1e-9 * z_ref.abs().max()


def test_optimize_values_early_stopping_matches_reference_float64(tok, float64_default, monkeypatch):
    model = tiny_llama().double()
    templates = resolve_templates(model)
    n_steps = 10
    # a small step and no weight decay: losses fall steadily, so thresholds stop requests mid-way
    hp = ValueOptimization(num_grad_steps=n_steps, lr=0.01, weight_decay=0.0, clamp_norm_factor=4.0, early_stop_loss=-1.0)

    # first run without early stopping: the per-request loss at every iteration
    trajectory = _record_losses(monkeypatch)
    optimize_values(model, tok, templates, REQUESTS, GROUPS, 2, hp)
    # (iterations, requests), columns in the given order: one pass holds all three requests, sorted by length
    losses = torch.stack(trajectory)[:, torch.argsort(torch.tensor(values_module.pass_order(tok, REQUESTS)))]
    assert losses.shape == (n_steps, len(REQUESTS))
    monkeypatch.undo()

    def expected_steps(threshold):
        below = losses < threshold
        return [int(below[:, r].nonzero()[0]) if below[:, r].any() else n_steps - 1 for r in range(len(REQUESTS))]

    # a threshold half-way between two observed losses that splits the requests' stopping iterations
    values = losses.flatten().sort().values
    best = None
    for lo, hi in zip(values[:-1].tolist(), values[1:].tolist()):
        threshold, margin = (lo + hi) / 2, (hi - lo) / 2
        steps = expected_steps(threshold)
        stops_midway = any(0 < s < n_steps - 1 for s in steps)  # frozen while others keep stepping
        if margin > 1e-6 and stops_midway and len(set(steps)) > 1:
            score = (len(set(steps)), margin)
            if best is None or score > best[0]:
                best = (score, threshold, steps)
    assert best is not None, f"no threshold splits the requests; losses:\n{losses}"
    _, threshold, steps = best

    hp = dataclasses.replace(hp, early_stop_loss=threshold)
    z, info = optimize_values(model, tok, templates, REQUESTS, GROUPS, 2, hp)
    assert info["steps"].tolist() == steps
    assert len(set(info["steps"].tolist())) > 1
    # the reported loss is each request's loss at the iteration it stopped
    stopped_at = torch.stack([losses[s, r] for r, s in enumerate(steps)])
    assert (info["loss"].double() - stopped_at).abs().max() <= 1e-9 * stopped_at.abs().max()
    z_ref = optimize_values_reference(model, tok, templates, REQUESTS, GROUPS, 2, hp)
    assert (z - z_ref).abs().max() <= 1e-9 * z_ref.abs().max()

    # the stopped requests really differ from where they would have gone without stopping
    z_full, _ = optimize_values(model, tok, templates, REQUESTS, GROUPS, 2, dataclasses.replace(hp, early_stop_loss=-1.0))
    early = torch.tensor(steps) < n_steps - 1
    assert ((z_full - z)[early].norm(dim=-1) > 1e-6 * z_full[early].norm(dim=-1)).all()


@pytest.mark.parametrize("lr", [0.5, 0.05])
def test_optimize_values_matches_reference_float32(tok, lr):
    model = tiny_llama()
    templates = resolve_templates(model)
    hp = ValueOptimization(num_grad_steps=5, lr=lr, early_stop_loss=-1.0)
    z, info = optimize_values(model, tok, templates, REQUESTS, GROUPS, 2, hp)
    z_ref = optimize_values_reference(model, tok, templates, REQUESTS, GROUPS, 2, hp)
    assert z.dtype == torch.float32 and info["steps"].tolist() == [4] * len(REQUESTS)
    h = _brute_force_block_output(model, tok, templates, REQUESTS, 2)
    assert ((z.double() - h).norm(dim=-1) > 1e-2 * h.norm(dim=-1)).all()
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5 * float(z_ref.abs().max()))


def test_optimize_values_float64_model_under_float32_default_dtype(tok):
    """A float64 model (models.parse_dtype accepts "float64") must not depend on torch's default dtype."""
    assert torch.get_default_dtype() == torch.float32
    model = tiny_llama().double()
    templates = resolve_templates(model)
    hp = ValueOptimization(num_grad_steps=3, lr=0.1, early_stop_loss=-1.0)
    z, info = optimize_values(model, tok, templates, REQUESTS[:2], GROUPS, 2, hp)
    z_ref = optimize_values_reference(model, tok, templates, REQUESTS[:2], GROUPS, 2, hp)
    assert (z - z_ref).abs().max() <= 1e-9 * z_ref.abs().max()


def test_recomputed_activations_give_the_same_values_and_keep_a_fraction_of_the_graph(tok, float64_default):
    """values.recompute_activations re-runs each upper block in the backward pass: the search takes the
    same path bit for bit (same operations on the same numbers), early stopping (a subset of rows)
    included, while autograd keeps only the blocks' inputs."""
    model = tiny_llama(layers=6).double()
    templates = resolve_templates(model)
    hp = ValueOptimization(num_grad_steps=6, lr=0.05, early_stop_loss=-1.0)
    saved_bytes = {}
    results = {}
    for recompute in (False, True):
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            results[recompute] = optimize_values(model, tok, templates, REQUESTS, GROUPS, 1, dataclasses.replace(hp, recompute_activations=recompute))
        saved_bytes[recompute] = sum(sizes)
    (z_kept, info_kept), (z_recomputed, info_recomputed) = results[False], results[True]
    assert torch.equal(z_kept, z_recomputed)
    assert torch.equal(info_kept["loss"], info_recomputed["loss"])
    # the hook also sees what the re-run saves during the backward pass, and the re-run blocks'
    # inputs, so the ratio is far from the ideal 1/(tensors per block); still well under half
    assert saved_bytes[True] < 0.5 * saved_bytes[False], saved_bytes
    # a threshold between the two lowest starting losses stops one request at once: the other
    # requests' later steps run on a subset of the rows
    start = info_kept["initial_loss"].sort().values
    stop = dataclasses.replace(hp, early_stop_loss=float(start[0] + start[1]) / 2)
    z_stop_kept, info_stop = optimize_values(model, tok, templates, REQUESTS, GROUPS, 1, dataclasses.replace(stop, recompute_activations=False))
    z_stop_recomputed, _ = optimize_values(model, tok, templates, REQUESTS, GROUPS, 1, stop)
    assert len(set(info_stop["steps"].tolist())) > 1  # requests did stop at different steps
    assert torch.equal(z_stop_kept, z_stop_recomputed)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gptj", "qwen2", "mistral"])
def test_optimize_values_matches_reference_on_other_families(tok, float64_default, family):
    """The prefix cache and the recomputed blocks through each family's own attention code
    (cache update signatures, rotary or learned positions) give the full-forward reference's values."""
    model = _tiny_family(family).double()
    templates = resolve_templates(model)
    hp = ValueOptimization(num_grad_steps=5, lr=0.1, early_stop_loss=-1.0, requests_per_pass=2)

    def cache_slots():
        return [(name, m.layer_idx) for name, m in model.named_modules() if isinstance(getattr(m, "layer_idx", None), int)]

    slots = cache_slots()
    assert len({idx for _, idx in slots}) == len(model.get_submodule(templates.layers))  # one slot per block
    z_ref = optimize_values_reference(model, tok, templates, REQUESTS, GROUPS, 1, hp)
    for recompute in (True, False):
        z, _ = optimize_values(model, tok, templates, REQUESTS, GROUPS, 1, dataclasses.replace(hp, recompute_activations=recompute))
        assert (z - z_ref).abs().max() <= 1e-9 * z_ref.abs().max(), (family, recompute)
    blocks = model.get_submodule(templates.layers)
    assert all("forward" not in block.__dict__ for block in blocks)  # the recompute wrappers are gone
    assert cache_slots() == slots  # renumbered from 0 for the runs (and their backward re-runs), then put back


def test_value_optimization_rejects_a_non_boolean_recompute_switch():
    with pytest.raises(ValueError, match="values.recompute_activations = 'yes' must be true, false or auto"):
        ValueOptimization(recompute_activations="yes")


# ---------------------------------------------------------------------------------------------
# 2. keys


@pytest.mark.parametrize("key_layers, output_layer", [([1, 3], 2), ([0, 1], 3)])
def test_compute_keys_matches_brute_force(tok, key_layers, output_layer):
    model = tiny_llama()
    model64 = copy.deepcopy(model).double()
    templates = resolve_templates(model)
    # unequal group sizes: averaging within groups then across differs from a plain mean
    groups = [["{}"], list(CONTEXT_TEMPLATES), ["Yes. {}", "No no no. {}", "Well, {}"]]
    keys, outputs = compute_keys(model, tok, templates, REQUESTS, groups, key_layers, output_layer=output_layer, batch_size=4)
    assert set(keys) == set(key_layers)
    for layer in key_layers:
        expected = _brute_force_keys(model64, tok, templates, REQUESTS, groups, layer)
        assert keys[layer].shape == expected.shape
        assert _rel_err(keys[layer], expected) < 1e-5
        # the plain mean over all contexts is measurably different, so the check above discriminates
        flat = torch.stack(
            [
                torch.stack(
                    [
                        _single_forward_reads(model64, tok, t, pre_hook_modules=[templates.down_proj_at(layer)])[
                            ("in", templates.down_proj_at(layer))
                        ][_subject_last_index(tok, t, r.subject)]
                        for c in sum(groups, [])
                        for t in [c.replace("{}", r.prompt, 1).replace("{}", r.subject)]
                    ]
                ).mean(0)
                for r in REQUESTS
            ]
        )
        assert _rel_err(flat, expected) > 1e-3
    expected_out = _brute_force_block_output(model64, tok, templates, REQUESTS, output_layer)
    assert _rel_err(outputs, expected_out) < 1e-5

    keys_only, none = compute_keys(model, tok, templates, REQUESTS, groups, key_layers)
    assert none is None
    for layer in key_layers:
        torch.testing.assert_close(keys_only[layer], keys[layer], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 3. run_from_layer


def _tiny_family(family: str, layers: int = 4) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        model = tiny_llama(layers=layers)
    elif family == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        )
    elif family == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(
            tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
        )
    elif family == "gptj":
        model = tf.GPTJForCausalLM(
            tf.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, rotary_dim=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        )
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(
            tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
        )
    elif family == "mistral":
        model = tf.MistralForCausalLM(
            tf.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
        )
    elif family == "opt":
        model = tf.OPTForCausalLM(
            tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)
        )
    elif family == "falcon":
        model = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4))
    else:
        raise AssertionError(family)
    return model.eval()


OPT_TEMPLATES = {
    "down_proj": "model.decoder.layers.{}.fc2",
    "layer": "model.decoder.layers.{}",
    "layers": "model.decoder.layers",
    "final_norm": "model.decoder.final_layer_norm",
    "lm_head": "lm_head",
}


def _padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB - 1, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    ids[mask == 0] = VOCAB - 1
    return ids, mask


def _assert_valid_positions_close(actual, expected, mask, tol=1e-10):
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        error, scale = float((actual[i, :n] - expected[i, :n]).abs().max()), float(expected[i, :n].abs().max())
        assert error <= tol * scale, f"row {i}: max error {error:.3g}, max value {scale:.3g}"


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gptj", "qwen2", "mistral"])
def test_run_from_layer_equals_full_forward(family):
    model = _tiny_family(family).double()
    templates = resolve_templates(model)
    ids, mask = _padded_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states  # hs[l] enters block l; hs[-1] is final-normed
        n_layers = len(model.get_submodule(templates.layers))
        assert len(hs) == n_layers + 1
        lm_head = model.get_submodule(templates.lm_head)
        final_norm = model.get_submodule(templates.final_norm)
        for start in range(n_layers):
            final = run_from_layer(model, templates, hs[start], mask, start)
            _assert_valid_positions_close(final, hs[-1], mask)
            _assert_valid_positions_close(lm_head(final), out.logits, mask)
        for start, stop in [(0, 2), (1, 3), (2, 3)]:
            final = run_from_layer(model, templates, hs[start], mask, start, stop)
            _assert_valid_positions_close(final, final_norm(hs[stop]), mask)
        # the blocks are restored afterwards
        assert len(model.get_submodule(templates.layers)) == n_layers


def test_run_from_layer_gpt2_needs_its_positions_removed():
    """The GPT-2 case above discriminates: blocks 1.. fed `inputs_embeds=hidden` with positions added again are wrong."""
    model = _tiny_family("gpt2").double()
    templates = resolve_templates(model)
    ids, mask = _padded_batch()
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        blocks = model.transformer.h
        model.transformer.h = nn.ModuleList(list(blocks)[1:])
        try:
            naive = model.transformer(inputs_embeds=hs[1], attention_mask=mask).last_hidden_state
        finally:
            model.transformer.h = blocks
        assert (naive - hs[-1]).abs().max() > 1e-3 * hs[-1].abs().max()
        _assert_valid_positions_close(run_from_layer(model, templates, hs[1], mask, 1), hs[-1], mask)


def test_run_from_layer_with_module_template_overrides_opt():
    """An architecture outside the table, made to work with `module_templates` (OPT: learned positions)."""
    model = _tiny_family("opt", layers=3).double()
    templates = resolve_templates(model, OPT_TEMPLATES)
    ids, mask = _padded_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        for start in (1, 2):
            final = run_from_layer(model, templates, out.hidden_states[start], mask, start)
            _assert_valid_positions_close(model.lm_head(final), out.logits, mask)


# ---------------------------------------------------------------------------------------------
# 4. resolve_templates


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "gptj", "gpt_neox"])
def test_resolve_templates_known_families(family):
    model = _tiny_family(family, layers=2)
    templates = resolve_templates(model)
    layers = model.get_submodule(templates.layers)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 2
    hidden = model.config.hidden_size
    for i in range(2):
        assert model.get_submodule(templates.layer_at(i)) is layers[i]
        down = model.get_submodule(templates.down_proj_at(i))
        # the MLP's output projection: nn.Linear layout (d_model x d_mlp), owned by block i
        d_out, d_in = linear_weight(down).shape
        assert d_out == hidden and d_in > hidden
        assert any(m is down for m in layers[i].modules())
    norm = model.get_submodule(templates.final_norm)
    assert norm.weight.shape == (hidden,)
    assert model.get_submodule(templates.lm_head) is model.get_output_embeddings()


@pytest.mark.parametrize("family", ["opt", "falcon"])
def test_resolve_templates_unknown_architecture(family):
    model = _tiny_family(family, layers=2)
    fields = ["down_proj", "layer", "layers", "final_norm", "lm_head"]
    with pytest.raises(ValueError) as err:
        resolve_templates(model)
    message = str(err.value)
    assert "module_templates" in message and family in message
    for f in fields:
        assert f in message

    partial = {"down_proj": "x.{}", "layers": "y"}
    with pytest.raises(ValueError) as err:
        resolve_templates(model, partial)
    message = str(err.value)
    assert "module_templates" in message
    for f in ("layer", "final_norm", "lm_head"):
        assert repr(f) in message


def test_resolve_templates_overrides():
    model = _tiny_family("opt", layers=2)
    templates = resolve_templates(model, OPT_TEMPLATES)
    assert templates.down_proj_at(1) == "model.decoder.layers.1.fc2"
    assert model.get_submodule(templates.down_proj_at(1)) is model.model.decoder.layers[1].fc2
    assert model.get_submodule(templates.lm_head) is model.lm_head

    # an override of a known family replaces just that field
    llama = tiny_llama(layers=2)
    t = resolve_templates(llama, {"down_proj": "model.layers.{}.mlp.up_proj"})
    assert t.down_proj == "model.layers.{}.mlp.up_proj" and t.layer == "model.layers.{}"
    # a wrong module name or an unknown field is refused
    with pytest.raises(ValueError, match="not found"):
        resolve_templates(model, {**OPT_TEMPLATES, "down_proj": "model.decoder.layers.{}.fc9"})
    with pytest.raises(ValueError, match="unknown module template"):
        resolve_templates(llama, {"mlp": "model.layers.{}.mlp"})


# ---------------------------------------------------------------------------------------------
# 5. AlphaEdit


def _down_weights(model, templates, layers):
    return {layer: linear_weight(model.get_submodule(templates.down_proj_at(layer))).detach().clone() for layer in layers}


def _null_space_threshold(moments, layers):
    """A threshold between the singular values of C0 so that the null space is neither empty nor everything."""
    svals = torch.cat([torch.linalg.svdvals(moments[layer].double()) for layer in layers]).sort().values
    # midway between two neighbouring singular values: a threshold equal to one of them would
    # leave that direction's side to rounding
    middle = len(svals) // 2
    threshold = float(svals[middle - 1] + svals[middle]) / 2
    for layer in layers:
        s = torch.linalg.svdvals(moments[layer].double())
        assert 0 < int((s < threshold).sum()) < s.numel()
    return threshold


def _float64_setting(tok, tiny_method):
    """A float64 tiny model (so weight changes are not drowned by rounding), its C0 and a null-space threshold."""
    model = tiny_llama().double()
    templates = resolve_templates(model)
    lm = LoadedModel(model, tok, templates, "test-editing/tiny-llama-f64")
    probe = tiny_method()
    moments = second_moments(model, tok, templates, probe.layers, probe.stats, lm.model_id)
    return model, templates, lm, moments, _null_space_threshold(moments, probe.layers)


def test_alphaedit_update_preserves_keys_outside_null_space(tok, tiny_method, float64_default):
    model, templates, lm, moments, threshold = _float64_setting(tok, tiny_method)

    method = tiny_method(nullspace_threshold=threshold)
    method.setup(lm)
    reference_model = copy.deepcopy(model)
    before = _down_weights(model, templates, method.layers)
    writer = WeightWriter(lm, [SphereProjection(cumulative_ratio=0.0)])
    method.edit(lm, REQUESTS, writer)
    after = _down_weights(model, templates, method.layers)

    # SPEC section 4, step by step in float64: targets z at the last edited layer, then per layer
    # keys K, residual R = (z − h) / (layers left), ΔW = Xᵀ with (P K Kᵀ + L2 I) X = P K Rᵀ (no earlier batches)
    z_layer = method.layers[-1]
    z, _ = optimize_values(reference_model, tok, templates, REQUESTS, method.context_groups, z_layer, method.values)
    for i, layer in enumerate(method.layers):
        k = _brute_force_keys(reference_model, tok, templates, REQUESTS, method.context_groups, layer).T
        h = _brute_force_block_output(reference_model, tok, templates, REQUESTS, z_layer)
        r = (z - h).T / (len(method.layers) - i)
        u, s, _ = torch.linalg.svd(moments[layer].double())
        p = u[:, s < threshold] @ u[:, s < threshold].T
        x = torch.linalg.solve(p @ k @ k.T + method.L2 * torch.eye(p.shape[0]), p @ k @ r.T)
        assert _rel_err(after[layer] - before[layer], x.T) < 1e-5, f"layer {layer}"
        with torch.no_grad():
            reference_model.get_submodule(templates.down_proj_at(layer)).weight.add_(x.T)

    for layer in method.layers:
        delta = after[layer] - before[layer]
        assert delta.norm() > 1e-8 * before[layer].norm()
        u, s, _ = torch.linalg.svd(moments[layer].double())
        preserved, null = u[:, s >= threshold], u[:, s < threshold]
        # unit vectors k with P k = 0: ‖ΔW k‖ / (‖ΔW‖ ‖k‖)
        leak = (delta @ preserved).norm(dim=0) / delta.norm()
        assert leak.max() < 1e-4, f"layer {layer}: {leak.max():.3g}"
        assert (delta @ null).norm(dim=0).max() / delta.norm() > 1e-2  # the update lives in the null space
        assert _rel_err(delta @ null @ null.T, delta) < 1e-4


def test_alphaedit_cumulative_key_moments(tok, tiny_method, float64_default):
    model, templates, lm, moments, threshold = _float64_setting(tok, tiny_method)
    # a small ridge term so that the K Kᵀ terms, not L2, decide the solution
    method = tiny_method(nullspace_threshold=threshold, L2=1e-6)
    method.setup(lm)
    assert torch.count_nonzero(method.previous_key_moments) == 0
    writer = WeightWriter(lm, [SphereProjection(cumulative_ratio=0.0)])

    method.commit(method.edit(lm, REQUESTS, writer).state)  # the editor commits after the writes
    keys_1 = {layer: _brute_force_keys(model, tok, templates, REQUESTS, method.context_groups, layer) for layer in method.layers}
    for i, layer in enumerate(method.layers):
        expected = keys_1[layer].T @ keys_1[layer]  # Σ k kᵀ
        assert _rel_err(method.previous_key_moments[i], expected) < 1e-5

    # the second batch, with and without the memory of the first batch's keys
    without_memory = copy.deepcopy(method)
    without_memory.previous_key_moments.zero_()
    model_2 = copy.deepcopy(model)
    lm_2 = LoadedModel(model_2, tok, templates, lm.model_id)
    before = _down_weights(model, templates, method.layers)
    method.commit(method.edit(lm, SECOND_BATCH, writer).state)
    without_memory.edit(lm_2, SECOND_BATCH, WeightWriter(lm_2, []))
    after, after_2 = _down_weights(model, templates, method.layers), _down_weights(model_2, templates, method.layers)

    for i, layer in enumerate(method.layers):
        keys_2 = _brute_force_keys(model, tok, templates, SECOND_BATCH, method.context_groups, layer)
        expected = keys_1[layer].T @ keys_1[layer] + keys_2.T @ keys_2
        assert _rel_err(method.previous_key_moments[i], expected) < 1e-5

        k1 = keys_1[layer].T  # (d_in, n)
        delta, delta_2 = after[layer] - before[layer], after_2[layer] - before[layer]
        with_term = (delta @ k1).norm() / (delta.norm() * k1.norm())
        without_term = (delta_2 @ k1).norm() / (delta_2.norm() * k1.norm())
        assert with_term < 0.1 * without_term, f"layer {layer}: {with_term:.3g} vs {without_term:.3g}"


# ---------------------------------------------------------------------------------------------
# 6. the SPHERE projection as a WeightWriter filter, for any method


class FixedDeltaMethod(EditMethod):
    """Writes whatever deltas it is given: stands for any editing method."""

    def __init__(self, layers):
        super().__init__(layers)
        self.deltas: dict[str, torch.Tensor] = {}

    def edit(self, lm, requests, writer):
        for name in self.edited_modules(lm.templates):
            writer.write(name, self.deltas[name])
        return BatchEdit()


def _explicit_directions(weight: torch.Tensor, eta: float) -> torch.Tensor:
    """U (d_in x r), float64, from the explicit C = ÂᵀÂ / d_out; r = #{k : cumsum_k/total <= η} + 1."""
    a = weight.double()
    a = a / a.norm(dim=1, keepdim=True)
    c = a.T @ a / a.shape[0]
    values, vectors = torch.linalg.eigh(c)
    values, vectors = values.flip(0), vectors.flip(1)
    total, cumulative, r = float(values.sum()), 0.0, 1
    for v in values.tolist():
        cumulative += v
        if cumulative / total <= eta:
            r += 1
    return vectors[:, :r]


@pytest.mark.parametrize("family, dtype, tol", [("llama", torch.float64, 1e-10), ("gpt2", torch.float32, 2e-5)])
@pytest.mark.parametrize("basis", ["current", "pretrained"])
def test_sphere_projection_through_writer(tok, family, dtype, tol, basis):
    eta, alpha = 0.5, 0.7  # α != 1 − α, so the two cannot be confused
    model = _tiny_family(family, layers=3).to(dtype)
    templates = resolve_templates(model)
    lm = LoadedModel(model, tok, templates, "fixed-delta")
    method = FixedDeltaMethod([0, 2])
    names = method.edited_modules(templates)
    projection = SphereProjection(eta, alpha, basis)
    projection.prepare(model, names)
    writer = WeightWriter(lm, [projection])
    g = torch.Generator().manual_seed(3)

    pretrained = {name: linear_weight(model.get_submodule(name)).detach().double().clone() for name in names}
    for round_ in range(2):
        before = {name: linear_weight(model.get_submodule(name)).detach().double().clone() for name in names}
        # the first delta is large so that the weight's principal directions move
        scale = 3.0 if round_ == 0 else 0.5
        method.deltas = {
            name: (scale * before[name].std() * torch.randn(before[name].shape, generator=g, dtype=torch.float64)).to(dtype)
            for name in names
        }
        method.edit(lm, [REQUESTS[0]], writer)
        for name in names:
            d = method.deltas[name].double()
            change = linear_weight(model.get_submodule(name)).detach().double() - before[name]
            u = _explicit_directions(pretrained[name] if basis == "pretrained" else before[name], eta)
            assert 1 < u.shape[1] < min(before[name].shape)
            expected = d @ (torch.eye(d.shape[1], dtype=torch.float64) - alpha * u @ u.T).T
            assert _rel_err(change, expected) < tol
            # along U: scaled by exactly 1 − α; orthogonal to U: unchanged
            assert _rel_err(change @ u, (1 - alpha) * (d @ u)) < tol
            assert _rel_err(change - change @ u @ u.T, d - d @ u @ u.T) < tol

            if round_ == 1:
                # the weight has moved: its current principal directions differ from the pretrained ones
                u_now = _explicit_directions(before[name], eta)
                u_pre = _explicit_directions(pretrained[name], eta)
                assert (u_now @ u_now.T - u_pre @ u_pre.T).norm() > 0.1
                other = u_now if basis == "pretrained" else u_pre
                wrong = d @ (torch.eye(d.shape[1], dtype=torch.float64) - alpha * other @ other.T).T
                assert _rel_err(change, wrong) > 100 * tol


# ---------------------------------------------------------------------------------------------
# 7. WeightWriter refuses bad deltas


def _writer_target(tok):
    """A tiny model's context, an edited module's name, its weight (a view) and a copy of it."""
    model = tiny_llama(layers=2)
    templates = resolve_templates(model)
    lm = LoadedModel(model, tok, templates, "writer")
    name = templates.down_proj_at(1)
    weight = linear_weight(model.get_submodule(name))
    return lm, name, weight, weight.detach().clone()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_weight_writer_refuses_non_finite(tok, bad):
    lm, name, weight, original = _writer_target(tok)
    delta = torch.full_like(original, 1e-3)
    delta[3, 5] = bad
    with pytest.raises(NonFiniteUpdateError):
        WeightWriter(lm).write(name, delta)
    assert torch.equal(weight, original)

    # a filter that produces a non-finite delta is refused too
    def poisoning(module_name, w, d):
        d = d.clone()
        d[0, 0] = bad
        return d

    with pytest.raises(NonFiniteUpdateError):
        WeightWriter(lm, [poisoning]).write(name, torch.full_like(original, 1e-3))
    assert torch.equal(weight, original)


def test_weight_writer_refuses_wrong_shape_and_writes_linear_layout(tok):
    lm, name, weight, original = _writer_target(tok)
    for shape in [original.shape[::-1], (original.shape[0], original.shape[1] - 1), (original.numel(),)]:
        with pytest.raises(ValueError):
            WeightWriter(lm).write(name, torch.zeros(shape))
        assert torch.equal(weight, original)
    delta = torch.randn(original.shape)
    WeightWriter(lm).write(name, delta)
    torch.testing.assert_close(weight.detach(), original + delta)

    # GPT-2 stores the transpose (Conv1D): the delta still arrives in nn.Linear layout
    gpt2 = _tiny_family("gpt2", layers=2)
    t2 = resolve_templates(gpt2)
    conv = gpt2.get_submodule(t2.down_proj_at(0))
    raw = conv.weight.detach().clone()  # (d_in, d_out)
    delta = torch.randn(raw.shape[1], raw.shape[0])
    WeightWriter(LoadedModel(gpt2, tok, t2, "writer")).write(t2.down_proj_at(0), delta)
    torch.testing.assert_close(conv.weight.detach(), raw + delta.T)
    with pytest.raises(ValueError):
        WeightWriter(LoadedModel(gpt2, tok, t2, "writer")).write(t2.down_proj_at(0), torch.zeros(raw.shape))


# ---------------------------------------------------------------------------------------------
# 8. key statistics


CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "",
    "   ",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "Sequential editing writes many facts into the same weights, batch after batch.",
    "A tiny corpus for a tiny model.",
]


def _brute_force_moments(model, tokenizer, templates, layers, lines, num_samples, seq_len):
    """E[k kᵀ] in float64 over all positions of the first `num_samples` chunks of `seq_len` tokens."""
    ids = []
    for line in lines:
        if line.strip():
            ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
    assert len(ids) >= num_samples * seq_len
    chunks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(num_samples)]
    names = {layer: templates.down_proj_at(layer) for layer in layers}
    sums = {layer: 0 for layer in layers}
    for chunk in chunks:
        found, handles = {}, []
        for layer, name in names.items():
            handles.append(
                model.get_submodule(name).register_forward_pre_hook(lambda m, a, layer=layer: found.__setitem__(layer, a[0][0].double()))
            )
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([chunk]), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for layer in layers:
            sums[layer] = sums[layer] + found[layer].T @ found[layer]
    return {layer: sums[layer] / (num_samples * seq_len) for layer in layers}


def _cache_files(cache_dir, templates, layers):
    files = {}
    for layer in layers:
        hits = glob.glob(os.path.join(cache_dir, "**", f"*{templates.down_proj_at(layer)}.*.pt"), recursive=True)
        assert len(hits) == 1, hits
        files[layer] = hits[0]
    return files


def _stamp(path):
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def test_second_moments_brute_force_and_cache(tok, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS_LINES * 3) + "\n")
    lines = corpus.read_text().splitlines()
    cfg = KeyStatistics(corpus=str(corpus), num_samples=5, seq_len=16, batch_size=2, cache_dir=str(tmp_path / "cache"))
    layers = [1, 3]
    model = tiny_llama()
    model64 = copy.deepcopy(model).double()
    templates = resolve_templates(model)

    first = second_moments(model, tok, templates, layers, cfg, "test-editing/stats")
    expected = _brute_force_moments(model64, tok, templates, layers, lines, cfg.num_samples, cfg.seq_len)
    for layer in layers:
        assert first[layer].dtype == torch.float32 and first[layer].shape == (64, 64)
        assert _rel_err(first[layer], expected[layer]) < 1e-5
    files = _cache_files(cfg.cache_dir, templates, layers)
    stamps = {layer: _stamp(path) for layer, path in files.items()}

    # second call: from the cache, no forward pass at all
    def no_capture(*args, **kwargs):
        raise AssertionError("second_moments recomputed although the cache is valid")

    monkeypatch.setattr(stats_module, "capture", no_capture)
    again = second_moments(model, tok, templates, layers, cfg, "test-editing/stats")
    for layer in layers:
        assert torch.equal(again[layer], first[layer])
        assert _stamp(files[layer]) == stamps[layer]
    monkeypatch.undo()

    # changed weights of layer 3: recomputed for layer 3 only
    captured = []
    real_capture = stats_module.capture

    def spy(model_, inputs, inputs_of=(), **kwargs):
        captured.append(list(inputs_of))
        return real_capture(model_, inputs, inputs_of=inputs_of, **kwargs)

    monkeypatch.setattr(stats_module, "capture", spy)
    with torch.no_grad():
        model.get_submodule(templates.down_proj_at(3)).weight.mul_(1.5)
    changed = second_moments(model, tok, templates, layers, cfg, "test-editing/stats")
    assert captured and all(names == [templates.down_proj_at(3)] for names in captured)
    assert _stamp(files[1]) == stamps[1] and _stamp(files[3]) != stamps[3]
    assert torch.equal(changed[1], first[1])
    # layer 3's own weight does not feed its inputs, so the recomputed moment is the same
    assert _rel_err(changed[3], expected[3]) < 1e-5

    # a cache built for other weights under the same model id: recomputed, equals the new model's moments
    captured.clear()
    other = tiny_llama(seed=1)
    moments_other = second_moments(other, tok, templates, layers, cfg, "test-editing/stats")
    expected_other = _brute_force_moments(copy.deepcopy(other).double(), tok, templates, layers, lines, cfg.num_samples, cfg.seq_len)
    assert captured
    for layer in layers:
        assert _rel_err(moments_other[layer], expected_other[layer]) < 1e-5
        assert _rel_err(expected_other[layer], expected[layer]) > 1e-2
        saved = torch.load(files[layer], weights_only=True)["second_moment"]
        assert torch.equal(saved, moments_other[layer])

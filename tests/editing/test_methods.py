"""Per-method properties, each against an independent computation:
MEMIT's closed form in float64, RECT's sparsity."""

from __future__ import annotations

import copy

import pytest
import torch

from brute_force import _brute_force_block_output, _brute_force_keys, _rel_err
from helpers import tiny_llama
from sphere_pl.data.records import EditRequest
from sphere_pl.editing.lm import LoadedModel
from sphere_pl.editing.stats import second_moments
from sphere_pl.editing.values import optimize_values
from sphere_pl.editing.writer import DeltaFilter, WeightWriter
from sphere_pl.models import linear_weight, resolve_templates

REQUESTS = [
    EditRequest(0, "{} is located in", "Eiffel Tower", "Rome", "Paris"),
    EditRequest(1, "The capital of {} is", "Japan", "Kyoto city", "Tokyo"),
    EditRequest(2, "{} plays", "Messi", "basketball and chess", "football"),
]


def _weights(model, templates, layers):
    return {layer: linear_weight(model.get_submodule(templates.down_proj_at(layer))).detach().clone() for layer in layers}


def test_memit_delta_equals_the_closed_form_in_float64(tok, method_factory, float64_default):
    model = tiny_llama().double()
    templates = resolve_templates(model)
    lm = LoadedModel(model, tok, templates, "test-methods/tiny-llama-f64")
    lam = 3.0  # small enough that K Kᵀ matters next to λ C0
    method = method_factory("memit", mom2_update_weight=lam)
    method.setup(lm)
    moments = second_moments(model, tok, templates, method.layers, method.stats, lm.model_id)
    reference = copy.deepcopy(model)
    before = _weights(model, templates, method.layers)
    method.edit(lm, REQUESTS, WeightWriter(lm, []))
    after = _weights(model, templates, method.layers)

    # SPEC section 4 step by step: z at the last layer; per layer keys K and residual R read with the
    # earlier layers' raw deltas applied; ΔW = R Kᵀ (λ C0 + K Kᵀ)⁻¹ (an explicit inverse here)
    z_layer = method.layers[-1]
    z, _ = optimize_values(reference, tok, templates, REQUESTS, method.context_groups, z_layer, method.values)
    for i, layer in enumerate(method.layers):
        k = _brute_force_keys(reference, tok, templates, REQUESTS, method.context_groups, layer).T
        h = _brute_force_block_output(reference, tok, templates, REQUESTS, z_layer)
        r = (z - h).T / (len(method.layers) - i)
        expected = r @ k.T @ torch.linalg.inv(lam * moments[layer].double() + k @ k.T)
        assert expected.norm() > 1e-6 * before[layer].norm()
        assert _rel_err(after[layer] - before[layer], expected) < 1e-6, f"layer {layer}"  # keys are read in float32
        with torch.no_grad():
            reference.get_submodule(templates.down_proj_at(layer)).weight.add_(expected)


class _Capture(DeltaFilter):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, module_name, weight, delta):
        self.seen.append((weight.detach().clone(), delta.detach().clone()))
        return delta


def test_rect_keeps_at_most_40_percent_of_entries_the_largest_relative_changes(tok, method_factory):
    model = tiny_llama()
    templates = resolve_templates(model)
    lm = LoadedModel(model, tok, templates, "test-methods/tiny-llama")
    method = method_factory("rect")
    method.setup(lm)
    raw, sparse = _Capture(), _Capture()
    # the raw MEMIT delta (before RECT's sparsifier) and what the writer writes (after it)
    writer = WeightWriter(lm, [raw, *method.delta_filters(), sparse])
    before = _weights(model, templates, method.layers)
    method.edit(lm, REQUESTS, writer)
    after = _weights(model, templates, method.layers)

    assert len(raw.seen) == len(sparse.seen) == len(method.layers)
    for layer, (weight, delta), (_, kept) in zip(method.layers, raw.seen, sparse.seen):
        nonzero = kept != 0
        assert 0 < int(nonzero.sum()) <= 0.4 * kept.numel(), f"layer {layer}"
        assert torch.equal(kept[nonzero], delta[nonzero])  # kept entries are untouched
        relative = (delta / (weight + 1e-8)).abs()
        assert relative[nonzero].min() >= relative[~nonzero].max()  # and they are the largest changes
        written = after[layer] - before[layer]
        assert int((written != 0).sum()) <= 0.4 * written.numel()


def test_memit_computes_every_layer_with_raw_deltas_and_writes_them_at_the_end(tiny_model_dir, method_factory):
    """As the official code: the SPHERE projection changes what is written, never what later layers see."""
    from sphere_pl import Editor, SphereProjection, load_model_and_tokenizer

    proposals = {}
    for variant, filters in (("plain", []), ("sphere", [SphereProjection(0.5, 0.5)])):
        model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
        capture = _Capture()
        Editor(model, tokenizer, method_factory("memit"), filters=[capture, *filters], model_id=tiny_model_dir).apply(REQUESTS)
        proposals[variant] = capture.seen
    for (w_plain, d_plain), (w_sphere, d_sphere) in zip(proposals["plain"], proposals["sphere"]):
        assert torch.equal(w_plain, w_sphere)  # every write starts from the pre-batch weight
        assert torch.equal(d_plain, d_sphere)  # the later layers' proposals did not see projected deltas


def test_rome_writes_one_rank_one_update_per_request(tiny_model_dir, method_factory):
    from sphere_pl import Editor, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    capture = _Capture()
    editor = Editor(model, tokenizer, method_factory("rome"), filters=[capture], model_id=tiny_model_dir)
    patch = editor.apply(REQUESTS[:2])
    assert len(capture.seen) == 2  # request by request
    for weight, delta in capture.seen:
        s = torch.linalg.svdvals(delta.double())
        assert s[0] > 0 and s[1] <= 1e-6 * s[0]  # rank one
    assert not torch.equal(capture.seen[0][0], capture.seen[1][0])  # the second request saw the first one's edit
    s = torch.linalg.svdvals(patch.delta(editor.edited_modules[0]).double())
    assert s[2] <= 1e-5 * s[0]  # the batch's change has rank two


def test_ft_delta_respects_its_norm_bound(tiny_model_dir, method_factory):
    from sphere_pl import Editor, load_model_and_tokenizer

    bound = 2e-3
    deltas = {}
    for constraint in (None, bound):
        model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
        editor = Editor(model, tokenizer, method_factory("ft", norm_constraint=constraint), filters=[], model_id=tiny_model_dir)
        deltas[constraint] = editor.apply(REQUESTS).delta(editor.edited_modules[0])
    assert deltas[None].abs().max() > 2 * bound  # unconstrained, the same steps move entries further
    assert deltas[bound].abs().max() <= bound * (1 + 1e-6)
    assert int((deltas[bound].abs() > 0.5 * bound).sum()) > 0  # and the bound is reached, not idle


def test_restrain_singular_values_log_compresses_only_those_above_the_bound():
    from sphere_pl.editing.methods import restrain_singular_values

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 8, generator=g, dtype=torch.float64))
    sigma = torch.tensor([9.0, 5.0, 3.0, 2.5, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    delta = (u * sigma) @ v.T
    bound = 2.0
    restrained = torch.linalg.svdvals(restrain_singular_values(delta, bound))
    expected = torch.where(sigma > bound, torch.log(sigma) - torch.log(torch.tensor(bound)) + bound, sigma)
    assert torch.allclose(restrained, expected.sort(descending=True).values, rtol=1e-10)
    assert (restrained[sigma > bound] < sigma[sigma > bound]).all()  # compressed, and still above the bound
    assert torch.allclose(restrain_singular_values(delta, 100.0), delta, atol=1e-12)  # nothing above: unchanged


def test_prune_restrained_cumulative_delta_has_no_singular_value_above_its_bound(tiny_model_dir, method_factory):
    from sphere_pl import Editor, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    editor = Editor(model, tokenizer, method_factory("prune"), filters=[], model_id=tiny_model_dir)
    pretrained = {n: model.get_submodule(n).weight.detach().clone() for n in editor.edited_modules}
    editor.apply(REQUESTS[:2])
    editor.apply(REQUESTS[2:])
    method = editor.method
    live = {n: model.get_submodule(n).weight.detach().clone() for n in editor.edited_modules}
    # a bound below the raw cumulative change's largest singular value, so that compression acts
    method.sigma_max = [0.5 * float(torch.linalg.svdvals((live[n] - pretrained[n]).double())[0]) for n in editor.edited_modules]
    with editor.evaluation_weights():
        evaluated = {n: model.get_submodule(n).weight.detach().clone() for n in editor.edited_modules}
    for i, name in enumerate(editor.edited_modules):
        assert torch.equal(model.get_submodule(name).weight, live[name])  # the live model keeps the raw deltas
        raw = torch.linalg.svdvals((live[name] - pretrained[name]).double())
        bound = method.sigma_max[i]
        restrained = torch.linalg.svdvals((evaluated[name] - pretrained[name]).double())
        cap = torch.where(raw > bound, torch.log(raw) - torch.log(torch.tensor(bound)) + bound, raw)
        assert (raw > bound).any()
        assert (restrained <= cap * (1 + 1e-5) + 1e-7).all()  # no singular value above its bound
        assert torch.allclose(restrained[: int((raw > bound).sum())], cap[: int((raw > bound).sum())], rtol=1e-4)


def test_prune_live_mode_puts_the_restrained_weights_in_the_model(tiny_model_dir, method_factory):
    from sphere_pl import Editor, load_model_and_tokenizer
    from sphere_pl.editing.methods import restrain_singular_values

    deltas = {}
    for mode in ("evaluation", "live"):
        model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
        editor = Editor(model, tokenizer, method_factory("prune", restrain=mode), filters=[], model_id=tiny_model_dir)
        pretrained = {n: model.get_submodule(n).weight.detach().clone() for n in editor.edited_modules}
        editor.prepare()
        editor.method.sigma_max = [1e-4] * len(editor.edited_modules)  # low enough that the restraint acts
        editor.apply(REQUESTS[:2])
        deltas[mode] = {n: model.get_submodule(n).weight.detach() - pretrained[n] for n in editor.edited_modules}
    for name in deltas["live"]:
        expected = restrain_singular_values(deltas["evaluation"][name], 1e-4)
        assert float((expected - deltas["evaluation"][name]).abs().max()) > 0.1 * float(deltas["evaluation"][name].abs().max())
        assert float((deltas["live"][name] - expected).abs().max()) <= 1e-6 * float(expected.abs().max())


def _alphaedit_with_state(layers: int, d_in: int):
    """An AlphaEdit whose C_p buffer exists (as after set-up), without a model."""
    from sphere_pl.editing.methods.alphaedit import AlphaEdit

    method = AlphaEdit(layers=list(range(layers)))
    method.register_buffer("projectors", torch.zeros(layers, d_in, d_in), persistent=False)
    method.register_buffer("previous_key_moments", torch.zeros(layers, d_in, d_in), persistent=False)
    return method


def test_alphaedit_checkpoints_keys_not_matrices_and_folds_them_past_d_in_exactly():
    layers, d_in, batch = 2, 16, 3
    generator = torch.Generator().manual_seed(0)
    batches = [[torch.randn(d_in, batch, generator=generator) for _ in range(layers)] for _ in range(9)]  # 27 keys > d_in
    running = _alphaedit_with_state(layers, d_in)
    states = []
    for keys in batches:
        running.commit(keys)
        states.append(copy.deepcopy(running.state_dict()))

    # no d_in x d_in buffer is saved; while keys < d_in they are all kept, and C_p is their K Kᵀ sum
    assert not {"projectors", "previous_key_moments"} & set(states[0])
    assert len(states[4]["_extra_state"]["batch_keys"]) == 5 and states[4]["_extra_state"]["folded_key_moments"] is None
    # the 6th batch reaches d_in keys: the oldest are folded until at most d_in / 2 keys remain
    extra = states[5]["_extra_state"]
    assert extra["folded_batches"] == 4 and len(extra["batch_keys"]) == 2
    assert extra["folded_key_moments"].shape == (layers, d_in, d_in)
    expected = torch.zeros(layers, d_in, d_in, dtype=torch.float64)
    for keys in batches[:6]:
        for i, k in enumerate(keys):
            expected[i] += k.double() @ k.double().T
    assert _rel_err(running_after(states[5], layers, d_in), expected) < 1e-6

    # every saved state rebuilds C_p bit for bit as the uninterrupted sum had it
    for n, state in enumerate(states):
        reference = _alphaedit_with_state(layers, d_in)
        for keys in batches[: n + 1]:
            reference.commit(keys)
        assert torch.equal(running_after(state, layers, d_in), reference.previous_key_moments)

    # batches still kept as keys revert exactly; folded ones are refused with the reason
    reverted = revert_alphaedit(states[5], 2)
    assert reverted["_extra_state"]["batch_keys"] == [] and torch.equal(running_after(reverted, layers, d_in), running_after(states[3], layers, d_in))
    with pytest.raises(ValueError, match=r"keeps the keys of the last 2 batch\(es\) \(the 4 before them were folded"):
        revert_alphaedit(states[5], 3)


def running_after(state: dict, layers: int, d_in: int) -> torch.Tensor:
    method = _alphaedit_with_state(layers, d_in)
    method.load_state_dict(state)
    return method.previous_key_moments


def revert_alphaedit(state: dict, n: int) -> dict:
    from sphere_pl.editing.methods.alphaedit import AlphaEdit

    return AlphaEdit.revert_state(state, n)


def _official_ft(model, tok, templates, requests, layer, num_steps, lr, batch_size, official_targets=False):
    """FT as the official baseline schedules it (baselines/ft/ft_main.py), written out plainly in
    float64: epochs over minibatches of `batch_size`, a step per minibatch whose loss is >= 1e-2, the
    epochs ending once the epoch's size-weighted mean loss is below 1e-2. Returns W - W0."""
    weight = model.get_submodule(templates.down_proj_at(layer)).weight
    w0 = weight.detach().clone()
    model.requires_grad_(False)
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    for _ in range(num_steps):
        losses = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            per_request = []
            targets = [tok(" " + r.target_new, add_special_tokens=official_targets)["input_ids"] for r in chunk]
            width = max(len(t) for t in targets)
            for r, target in zip(chunk, targets):  # one request at a time: no padding in the prompt
                ids = torch.tensor([tok(r.rewrite_prompt)["input_ids"]])
                if official_targets:  # the official code scores its target padding too (all but unk)
                    target = [t for t in target + [tok.pad_token_id] * (width - len(target)) if t != tok.unk_token_id]
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), dim=-1)
                per_request.append(-log_probs[target].mean())
            loss = torch.stack(per_request).mean()
            losses.append((float(loss), len(chunk)))
            if float(loss) >= 1e-2:
                opt.zero_grad()
                loss.backward()
                opt.step()
        if sum(v * n for v, n in losses) / len(requests) < 1e-2:
            break
    weight.requires_grad_(False)
    return weight.detach() - w0


@pytest.mark.parametrize("batch_size", [2, 64])
def test_ft_follows_the_official_schedule_of_minibatches_and_epochs(tok, method_factory, float64_default, batch_size):
    """5 requests in minibatches of 2 take 3 Adam steps an epoch (of 64: 1), and end with the official loop's weights."""
    requests = REQUESTS + [EditRequest(3, "{} was born in", "Einstein", "Madrid", "Ulm"), EditRequest(4, "The language of {} is", "Brazil", "Dutch", "Portuguese")]
    model = tiny_llama().double()
    templates = resolve_templates(model)
    reference = copy.deepcopy(model)
    method = method_factory("ft", batch_size=batch_size, num_steps=4, lr=1e-3)
    lm = LoadedModel(model, tok, templates, "test-methods/tiny-llama-f64")
    method.setup(lm)
    before = _weights(model, templates, method.layers)[method.layers[0]]
    info = method.edit(lm, requests, WeightWriter(lm, [])).info
    assert info["value_steps"] == 4 * -(-len(requests) // batch_size)  # no early stop on a random model
    expected = _official_ft(reference, tok, templates, requests, method.layers[0], 4, 1e-3, batch_size)
    delta = _weights(model, templates, method.layers)[method.layers[0]] - before
    assert expected.norm() > 0 and _rel_err(delta, expected) < 1e-9


def test_ft_batch_size_must_be_a_positive_integer(method_factory):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"batch_size = {bad!r} must be an integer >= 1"):
            method_factory("ft", batch_size=bad)


def test_ft_official_targets_scores_special_tokens_and_padding_as_the_official_code(tok, method_factory, float64_default):
    model = tiny_llama().double()
    templates = resolve_templates(model)
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    lm = LoadedModel(model, tok, templates, "test-methods/tiny-llama-f64")
    method = method_factory("ft", num_steps=3, lr=1e-3, official_targets=True)
    method.setup(lm)
    before = _weights(model, templates, method.layers)[method.layers[0]]
    method.edit(lm, REQUESTS, WeightWriter(lm, []))  # targets of 5, 11 and 21 bytes: padded in one minibatch
    delta = _weights(model, templates, method.layers)[method.layers[0]] - before
    expected = _official_ft(reference, tok, templates, REQUESTS, method.layers[0], 3, 1e-3, 64, official_targets=True)
    assert _rel_err(delta, expected) < 1e-9
    without = _official_ft(plain, tok, templates, REQUESTS, method.layers[0], 3, 1e-3, 64, official_targets=False)
    assert _rel_err(delta, without) > 1e-3  # scoring the padding really changes the edit

"""Norm anchoring (NAS) against the official rule written plainly in float64, and wired into the
locate-then-edit methods: the reference norm equals an independent measurement (brute-force value search,
one unpadded pass per request), is cached like C0, and the anchored batches say what the rule did."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from brute_force import optimize_values_reference
from helpers import tiny_llama, tiny_tokenizer
from sphere_pl import Editor
from sphere_pl.data.readers import QUICKSTART_PATH, load_edit_requests
from sphere_pl.editing.norm_anchor import NormAnchor, anchor, trimmed_mean
from sphere_pl.models import resolve_templates
from sphere_pl.tracing import token_positions

REQUESTS = load_edit_requests(str(QUICKSTART_PATH))


def official_rule(v0: torch.Tensor, delta: torch.Tensor, reference: float, threshold: float) -> torch.Tensor:
    """The official compute_z's rule, request by request, in float64."""
    out = []
    for v0_i, d_i in zip(v0.double(), delta.double()):
        v = v0_i + d_i
        norm = float(v.norm())
        out.append(torch.zeros_like(d_i) if norm > threshold * reference else v * (reference / (norm + 1e-10)) - v0_i)
    return torch.stack(out)


def test_the_rule_equals_the_official_one_request_by_request():
    torch.manual_seed(0)
    v0, delta = torch.randn(50, 16), torch.randn(50, 16) * torch.linspace(0.1, 4, 50)[:, None]
    reference = float((v0 + delta).norm(dim=-1).median())
    mine, dropped = anchor(v0, delta, reference, 2.0)
    expected = official_rule(v0, delta, reference, 2.0)
    assert torch.allclose(mine.double(), expected, rtol=1e-5, atol=1e-6)
    assert 0 < int(dropped.sum()) < 50  # both branches taken
    kept = ~dropped
    assert torch.allclose((v0 + mine)[kept].norm(dim=-1), torch.full((int(kept.sum()),), reference), rtol=1e-5)
    assert trimmed_mean(torch.tensor([5.0, 1.0, 2.0, 100.0, 3.0]), 0.2) == pytest.approx(11 / 4)  # the largest 1 of 5 left out


def test_the_reference_norm_equals_an_independent_measurement_and_is_cached(method_factory, stats_cache):
    settings = NormAnchor(source=str(QUICKSTART_PATH), samples=6, trim=0.2, seed=3)
    method = method_factory("alphaedit", norm_anchor=settings)
    editor = Editor(tiny_llama(seed=0), tiny_tokenizer(), method)
    editor.prepare()
    # independently: the same seeded draw, each request's push by the brute-force search (bare prompt), v0 by a plain pass
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    templates = resolve_templates(model)
    drawn = random.Random(3).sample(REQUESTS, 6)
    layer = method.layers[-1]
    z = optimize_values_reference(model, tok, templates, drawn, [["{}"]], layer, method.values)
    norms = []
    for request, z_i in zip(drawn, z):
        ids = tok(request.rewrite_prompt, return_tensors="pt")
        position = token_positions(tok, [(request.prompt, request.subject)])[0]
        found = {}
        down = model.get_submodule(templates.down_proj_at(layer)).register_forward_hook(lambda m, i, o: found.__setitem__("v0", o[0, position]))
        block = model.get_submodule(templates.layer_at(layer)).register_forward_hook(
            lambda m, i, o: found.__setitem__("h", (o[0] if isinstance(o, tuple) else o)[0, position]))
        with torch.no_grad():
            model(**ids)
        down.remove()
        block.remove()
        norms.append(float((found["v0"] + (z_i - found["h"])).norm()))  # v0 + δ, with δ = z − h
    expected = sum(sorted(norms)[:5]) / 5  # 20 % of 6: the largest one left out
    assert method.anchor_norm == pytest.approx(expected, rel=1e-4)
    cached = list(Path(stats_cache).rglob("vstar_norm.layer*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["reference_norm"] == method.anchor_norm
    again = method_factory("alphaedit", norm_anchor=settings)
    Editor(tiny_llama(seed=0), tiny_tokenizer(), again).prepare()  # read back, not measured again
    assert again.anchor_norm == method.anchor_norm and len(list(Path(stats_cache).rglob("vstar_norm.layer*.json"))) == 1


@pytest.mark.parametrize("name", ["alphaedit", "memit", "rome"])
def test_an_anchored_batch_says_what_the_rule_did_and_edits_otherwise_than_the_plain_method(method_factory, name):
    settings = NormAnchor(source=str(QUICKSTART_PATH), samples=6, trim=0.0, threshold=2.0)
    batch = REQUESTS[:4]
    anchored = Editor(tiny_llama(seed=0), tiny_tokenizer(), method_factory(name, norm_anchor=settings))
    plain = Editor(tiny_llama(seed=0), tiny_tokenizer(), method_factory(name))
    anchored.apply(batch)
    plain.apply(batch)
    info = anchored.last_info
    assert 0.0 <= info["norm_anchor_dropped"] <= 1.0 and info["norm_anchor_rescaled"] == pytest.approx(1.0 - info["norm_anchor_dropped"])
    assert info["norm_anchor_ratio"] > 0 and "norm_anchor_dropped" not in plain.last_info
    assert any(not torch.equal(a, b) for a, b in zip(anchored.edited_weights().values(), plain.edited_weights().values()))
    assert anchored.method.settings()["norm_anchor"]["reference_norm"] == anchored.method.anchor_norm


@pytest.mark.parametrize("settings, message", [
    (dict(threshold=0.0), "norm_anchor.threshold = 0.0 must be a positive number"),
    (dict(samples=1), "norm_anchor.samples = 1 must be an integer >= 2"),
    (dict(trim=1.0), r"norm_anchor.trim = 1.0 must lie in \[0, 1\)"),
])
def test_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        NormAnchor(source="x.json", **settings)

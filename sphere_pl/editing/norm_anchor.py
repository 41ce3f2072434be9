"""Norm anchoring of target values (NAS: "Norm Anchors Make Model Edits Last", arXiv 2602.02543; official
code SasyaTitech/NAS), an option of every locate-then-edit method.

Collapse under sequential editing is read there as a feedback loop on the norm of the solved target: a
value whose norm grows makes weights grow, which makes the next values larger. The rule, applied to each
request's value at the last edited layer: v* = v0 + δ, where v0 is the MLP output at the subject's last
token (bare rewrite prompt) and δ the push the value search found. With ρ the reference norm of the
unedited model:

* ‖v*‖ > threshold · ρ: the push is dropped (δ = 0: this request gets no push);
* otherwise v* is rescaled to norm ρ exactly (up or down), and the target becomes h − v0 + v*.

ρ is the mean of ‖v0 + δ‖ over `samples` requests drawn (seeded) from `source`, δ found by the method's own
value search on the unedited model with bare prompts, the largest `trim` share of the norms left out. It is
computed at set-up and cached on disk like C0 (keyed by the model's weights, the layer, the records and the
value settings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass

import torch

from ..data.readers import load_edit_requests
from ..data.records import EditRequest
from ..errors import SettingsError
from ..files import atomic_write_json
from ..tracing import capture, token_positions, tokenize

log = logging.getLogger(__name__)


@dataclass
class NormAnchor:
    """Args:
    source: edit records the reference norm ρ is measured on (the official code: 1,000 random
        MultiCounterFact rewrites); keep them apart from the edited stream.
    threshold: a value whose norm exceeds threshold x ρ keeps no push (official: 2; ROME's code: 5).
    samples: how many records (drawn at random with `seed`).
    trim: the largest share of the norms left out of the mean (official: 0.05).
    seed: the draw's seed.
    """

    source: str
    threshold: float = 2.0
    samples: int = 1000
    trim: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and self.threshold > 0):
            raise SettingsError(f"norm_anchor.threshold = {self.threshold!r} must be a positive number (official: 2)")
        if not (isinstance(self.samples, int) and not isinstance(self.samples, bool) and self.samples >= 2):
            raise SettingsError(f"norm_anchor.samples = {self.samples!r} must be an integer >= 2")
        if not (isinstance(self.trim, (int, float)) and 0 <= self.trim < 1):
            raise SettingsError(f"norm_anchor.trim = {self.trim!r} must lie in [0, 1)")


def anchor(v0: torch.Tensor, delta: torch.Tensor, reference: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the anchored push, which requests lost theirs): v* = v0 + δ rescaled to norm `reference`, or δ = 0
    where ‖v*‖ > threshold · reference. Rows are requests."""
    v = v0 + delta
    norms = v.norm(dim=-1, keepdim=True)
    dropped = norms.squeeze(-1) > threshold * reference
    anchored = v * (reference / (norms + 1e-10)) - v0
    return torch.where(dropped[:, None], torch.zeros_like(delta), anchored), dropped


def trimmed_mean(norms: torch.Tensor, trim: float) -> float:
    """The mean without the largest floor(trim · n) values."""
    ordered = torch.sort(norms.double()).values
    keep = len(ordered) - int(trim * len(ordered))
    return float(ordered[:keep].mean())


def mlp_outputs(lm, requests: list[EditRequest], layer: int) -> torch.Tensor:
    """(n, d) the MLP output (the down-projection's) of `layer` at each request's subject's last token, bare rewrite prompt."""
    name = lm.templates.down_proj_at(layer)
    out = []
    for request in requests:  # one at a time: no padding can touch the position read
        found = capture(lm.model, tokenize(lm.tokenizer, [request.rewrite_prompt], lm.device), outputs_of=[name], stop_after=name)
        out.append(found[("out", name)][0, token_positions(lm.tokenizer, [(request.prompt, request.subject)])[0]])
    return torch.stack(out).float()


def reference_norm(lm, anchor_settings: NormAnchor, layer: int, search, values_key: dict, cache_dir: str, fingerprint: str) -> float:
    """ρ at `layer` on the unedited model: from the cache when it was measured for these weights, records and
    settings, else measured now (`search(requests)` gives the pushes δ, bare prompts) and cached."""
    key = json.dumps({"model": lm.model_id, "weights": fingerprint, "layer": layer, "settings": dataclasses.asdict(anchor_settings),
                      "source": os.path.abspath(os.path.expanduser(anchor_settings.source)), "values": values_key}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in lm.model_id)[-60:]
    path = os.path.join(os.path.expanduser(cache_dir), safe_model, f"vstar_norm.layer{layer}.{digest}.json")
    if os.path.exists(path):
        cached = json.loads(open(path).read())
        log.info("norm anchor: reference norm %.4f at layer %d from %s", cached["reference_norm"], layer, path)
        return float(cached["reference_norm"])
    records = load_edit_requests(anchor_settings.source)
    if len(records) < anchor_settings.samples:
        raise SettingsError(f"norm_anchor.samples = {anchor_settings.samples}, but {anchor_settings.source} holds {len(records)} records")
    requests = random.Random(anchor_settings.seed).sample(records, anchor_settings.samples)
    log.info("norm anchor: measuring the reference norm at layer %d on %d records of %s (once; cached)", layer, len(requests), anchor_settings.source)
    deltas = search(requests)
    norms = (mlp_outputs(lm, requests, layer) + deltas.float().to(lm.device)).norm(dim=-1)
    value = trimmed_mean(norms, anchor_settings.trim)
    atomic_write_json(path, {"reference_norm": value, "norms": [float(x) for x in norms], "key": json.loads(key)})
    return value

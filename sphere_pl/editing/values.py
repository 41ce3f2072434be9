"""Target values z (a.k.a. v*): the residual-stream vector at the subject's last token of the
last edited layer that makes the model say the new target.

For each request a vector delta is added to that block's output at the subject's last
token of every rewriting prompt; Adam minimises

    NLL(target_new | prompt) + kl_factor * KL(edited || original) on "{subject} is a"
    + weight_decay * ||delta|| / ||h||^2,

delta is clamped to clamp_norm_factor * ||h||, and a request stops early once its loss is
below `early_stop_loss`. z = h + delta.

`optimize_values` solves several requests in each forward and backward pass. Because the
blocks below the edited layer do not depend on delta, their output is computed once; every
step runs only the blocks above it, only on the tokens from the subject's last token on
(the keys and values of the earlier tokens are cached), and logits only where the loss
reads them. Adam acts element-wise, so a joint optimisation of per-request deltas on the
sum of per-request losses follows exactly the same path as one optimisation per request;
hence requests can also be split into groups of any size (`requests_per_pass`, which sets
the memory) without changing the result. By default (`recompute_activations`) the backward
pass re-runs each upper block rather than keeping its intermediates: the same numbers, a
fraction of the memory, one more forward pass of those blocks per step.
The tests compare it with a straightforward per-request version (full forward passes, full
logits) in tests/editing/brute_force.py, which `benchmarks/edit_speed.py --reference` also times.
"""

from __future__ import annotations

import math
import copy
import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import SettingsError
from ..heap import trim_heap
from ..models import ModuleTemplates
from ..placement import input_device
from ..data.records import EditRequest
from ..tracing import SuffixRunner, capture, pad_id_lists, token_positions
from .keys import fill
from .value_memory import (
    CPU_PASS, GB, SMALL_PASS, MemoryBudget, PassPlan, PassShape, Precision, StackShapes, ValueMemoryError, is_budget_gb, memory_budget, plan_passes,
)

log = logging.getLogger(__name__)

KL_PROMPT = "{} is a"


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32: losses and deltas of half-precision models are kept in float32."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class ValueOptimization:
    """Hyper-parameters of the target-value search (defaults: the paper's LLaMA3-8B values).

    `requests_per_pass`, `recompute_activations` and `compute_dtype` set speed and memory. The
    first two are `auto` by default: sized from the model's shapes, each batch's token counts and
    the memory free on the device (`value_memory`); an explicit value wins. `memory_budget_gb`
    caps what `auto` may use. With float32, neither changes a result beyond the order of
    floating-point sums (bit for bit for a fixed pass size); `compute_dtype: bfloat16` does change
    results a little (BENCHMARKS.md measures by how much).
    """

    num_grad_steps: int = 25
    lr: float = 0.1
    loss_layer: int = -1  # -1: the last layer
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    # requests optimised in one forward/backward pass: memory and speed, not results
    requests_per_pass: int | Literal["auto"] = "auto"
    # keep only each upper block's input and re-run the block in the backward pass: the same
    # gradients for a fraction of the activation memory and one more forward pass (BENCHMARKS.md)
    recompute_activations: bool | Literal["auto"] = "auto"
    # the most memory (GB) `auto` may plan a pass with (default: a share of the device's free memory)
    memory_budget_gb: float | None = None
    # bfloat16: the blocks above the edited layer run on a bfloat16 copy of their weights (autocast);
    # delta, Adam, the clamp and the losses stay float32. A half-precision model runs in its own dtype.
    # Measured on the device at set-up (`precision.py`): bfloat16 is used only where it is not slower
    # than float32 (unless forced); auto takes bfloat16 where it is clearly faster.
    compute_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    # run bfloat16 even where it measures slower than float32
    force_compute_dtype: bool = False

    def __post_init__(self):
        def need(ok: bool, name: str, rule: str, why: str = "the edit would change nothing or diverge"):
            if not ok:
                raise SettingsError(f"values.{name} = {getattr(self, name)!r} {rule}: {why}")

        def integer(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        need(integer(self.num_grad_steps) and self.num_grad_steps >= 1, "num_grad_steps", "must be an integer >= 1")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "must be a positive finite number")
        need(math.isfinite(self.clamp_norm_factor) and self.clamp_norm_factor > 0, "clamp_norm_factor", "must be positive")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(math.isfinite(self.kl_factor) and self.kl_factor >= 0, "kl_factor", "must be >= 0")
        need(self.requests_per_pass == "auto" or (integer(self.requests_per_pass) and self.requests_per_pass >= 1), "requests_per_pass",
             "must be an integer >= 1 or auto", "it is how many requests share a pass")
        need(self.recompute_activations == "auto" or isinstance(self.recompute_activations, bool), "recompute_activations",
             "must be true, false or auto", "it switches activation checkpointing")
        need(is_budget_gb(self.memory_budget_gb), "memory_budget_gb", "must be a positive number of GB (or null: a share of the free memory)",
             "it is the memory `auto` may plan the value search with")
        need(self.compute_dtype in ("float32", "bfloat16", "auto"), "compute_dtype", "must be float32, bfloat16 or auto",
             "the upper blocks run in that precision")
        need(isinstance(self.force_compute_dtype, bool), "force_compute_dtype", "must be true or false", "it overrides the measured choice")

    @property
    def is_auto(self) -> bool:
        return "auto" in (self.requests_per_pass, self.recompute_activations)


@dataclass
class _Problem:
    """Token-level layout of all rewriting and KL sequences of a batch of requests."""

    batch: dict  # input_ids, attention_mask of all sequences
    seq_request: torch.Tensor  # (S,) request index of each sequence
    lookup: torch.Tensor  # (S,) position of the subject's last token
    is_kl: torch.Tensor  # (S,) bool
    target_seq: torch.Tensor  # (P,) sequence of each predicted target token
    target_pos: torch.Tensor  # (P,) position whose logits predict it
    target_label: torch.Tensor  # (P,)
    target_len: torch.Tensor  # (n,) target tokens per request
    init_seq: torch.Tensor  # (n,) the sequence (bare prompt) whose hidden state is h
    num_requests: int


@dataclass
class _RequestTokens:
    """The token ids of one request's sequences: one per context template, then its KL prompt."""

    ids: list[list[int]]  # prompt (+ target without its last token) per sequence
    lookup: list[int]  # position of the subject's last token, per sequence
    prompt_len: list[int]  # tokens of each rewriting prompt (without the target)
    target: list[int]

    def shape(self) -> PassShape:
        """This request's token counts, as `value_memory` plans passes with them."""
        return PassShape(
            sequences=len(self.ids),
            prefix=max(self.lookup),
            suffix=max(len(ids) - at for ids, at in zip(self.ids, self.lookup)),
            full=max(len(ids) for ids in self.ids),
            logit_rows=len(self.prompt_len) * len(self.target),
            kl_rows=1,
        )


def _tokenize_request(tokenizer, r: EditRequest, contexts: list[str]) -> _RequestTokens:
    target = tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"]
    if not target:
        raise ValueError(f"request case_id={r.case_id!r}: target_new tokenises to nothing")
    ids, lookup, prompt_len = [], [], []
    for context in contexts:
        template = fill(context, r.prompt)
        prompt_ids = tokenizer(template.replace("{}", r.subject))["input_ids"]
        ids.append(prompt_ids + target[:-1])
        lookup.append(token_positions(tokenizer, [(template, r.subject)])[0])
        prompt_len.append(len(prompt_ids))
    ids.append(tokenizer(KL_PROMPT.replace("{}", r.subject))["input_ids"])
    lookup.append(token_positions(tokenizer, [(KL_PROMPT, r.subject)])[0])
    return _RequestTokens(ids, lookup, prompt_len, target)


def _build_problem(requests: list[_RequestTokens], pad_id: int, device) -> _Problem:
    ids, seq_request, lookup, is_kl = [], [], [], []
    target_seq, target_pos, target_label, target_len, init_seq = [], [], [], [], []
    for r_idx, r in enumerate(requests):
        target_len.append(len(r.target))
        init_seq.append(len(ids))  # the first context is the bare prompt
        for c_idx, prompt_len in enumerate(r.prompt_len):
            for j, token in enumerate(r.target):
                target_seq.append(len(ids))
                target_pos.append(prompt_len - 1 + j)
                target_label.append(token)
            ids.append(r.ids[c_idx])
            seq_request.append(r_idx)
            lookup.append(r.lookup[c_idx])
            is_kl.append(False)
        ids.append(r.ids[-1])
        seq_request.append(r_idx)
        lookup.append(r.lookup[-1])
        is_kl.append(True)

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return _Problem(
        batch=pad_id_lists(ids, pad_id, device),
        seq_request=t(seq_request),
        lookup=t(lookup),
        is_kl=t(is_kl, torch.bool),
        target_seq=t(target_seq),
        target_pos=t(target_pos),
        target_label=t(target_label),
        target_len=t(target_len),
        init_seq=t(init_seq),
        num_requests=len(requests),
    )


def _request_losses(p: _Problem, seqs: torch.Tensor, final_at, lm_head, kl_init, delta, h_norm, hp: ValueOptimization):
    """Per-request loss terms for the sequences `seqs` (a sorted subset), given
    `final_at(seq_index_tensor, positions) -> final-normed hidden states`.
    Returns (loss (n,), kl_log_probs (k, V) for the KL sequences in `seqs`).
    """
    n = p.num_requests
    in_set = torch.zeros(p.seq_request.shape[0], dtype=torch.bool, device=seqs.device)
    in_set[seqs] = True

    # NLL of the target tokens, length-normalised per sequence, averaged over a request's rewriting prompts
    keep = in_set[p.target_seq]
    t_seq, t_pos, t_lab = p.target_seq[keep], p.target_pos[keep], p.target_label[keep]
    log_probs = torch.log_softmax(_wide(lm_head(final_at(t_seq, t_pos))), dim=-1)
    token_lp = log_probs.gather(1, t_lab[:, None]).squeeze(1)
    per_seq = token_lp.new_zeros(p.seq_request.shape[0]).index_add(0, t_seq, token_lp)
    rewriting = seqs[~p.is_kl[seqs]]
    per_seq_nll = -per_seq[rewriting] / p.target_len[p.seq_request[rewriting]]
    nll = per_seq.new_zeros(n).index_add(0, p.seq_request[rewriting], per_seq_nll)
    counts = per_seq.new_zeros(n).index_add(0, p.seq_request[rewriting], torch.ones_like(per_seq_nll))
    nll = nll / counts.clamp(min=1)

    kl_seqs = seqs[p.is_kl[seqs]]
    kl_log_probs = torch.log_softmax(_wide(lm_head(final_at(kl_seqs, p.lookup[kl_seqs]))), dim=-1)
    kl = per_seq.new_zeros(n)
    if kl_init is not None:
        init = kl_init[p.seq_request[kl_seqs]]
        # KL(edited || original) = Σ p_edited (log p_edited − log p_original), one KL prompt per request;
        # the direction of the ROME/MEMIT/AlphaEdit code: kl_div(log p_original, log p_edited, log_target=True)
        kl = kl.index_add(0, p.seq_request[kl_seqs], (kl_log_probs.exp() * (kl_log_probs - init)).sum(-1))
    decay = hp.weight_decay * delta.norm(dim=-1) / h_norm**2
    return nll + hp.kl_factor * kl + decay, kl_log_probs


def _check_layers(model, templates: ModuleTemplates, layer: int, hp: ValueOptimization) -> int:
    num_layers = len(model.get_submodule(templates.layers))
    loss_layer = hp.loss_layer if hp.loss_layer >= 0 else num_layers + hp.loss_layer
    if not layer <= loss_layer < num_layers:
        raise SettingsError(f"value loss layer {loss_layer} must lie between the edited layer {layer} and {num_layers - 1}")
    return loss_layer


def _suffix_tokens(tokenizer, request: EditRequest) -> tuple[int, int]:
    """(tokens from the subject's last token on, tokens before it) of the bare rewriting prompt and its target:
    what a step's forward pass and its cached prefix grow with."""
    prompt = len(tokenizer(request.prompt.replace("{}", request.subject))["input_ids"])
    target = len(tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"])
    lookup = token_positions(tokenizer, [(request.prompt, request.subject)])[0]
    return prompt - lookup + target, lookup


def pass_order(tokenizer, requests: list[EditRequest]) -> list[int]:
    """Indices of `requests` sorted by (suffix tokens, prefix tokens): the order passes are cut
    from, so that the requests of a pass pad little."""
    return sorted(range(len(requests)), key=lambda i: _suffix_tokens(tokenizer, requests[i]))


def optimize_values(
    model, tokenizer, templates: ModuleTemplates, requests: list[EditRequest], context_groups, layer: int, hp: ValueOptimization,
    reference: torch.Tensor | None = None, budget: MemoryBudget | None = None,
):
    """Target values z (n, d_model) for all requests. Returns (z, info), both in the order of `requests`;
    `info["plan"]` is the `PassPlan` the batch ran with; `info["token_slots"]` counts the token
    slots the upper blocks computed, real and padded (what the grouping by length saves).

    Each request's search depends only on its own loss (Adam and the clamp act per element
    and per row, early stopping per request), so requests are solved in passes of a few, one
    pass after another: the result does not depend on the pass size beyond the order of
    floating-point sums, while memory (the autograd graph over the upper blocks, the cached
    prefixes) grows with it. Requests are grouped by length so that a pass pads little; this
    is why a large batch costs less per edit than a small one. `auto` settings are planned
    within `budget` (default: measured now; an editing method measures it once, at set-up).

    The clamp and the weight decay are relative to the norm of h, the block output at the
    subject's last token, unless `reference` (n, d_model) gives other vectors (ROME: the MLP output).
    """
    loss_layer = _check_layers(model, templates, layer, hp)
    order = pass_order(tokenizer, requests)
    contexts = [c for g in context_groups for c in g]
    tokens = [_tokenize_request(tokenizer, requests[i], contexts) for i in order]
    device = input_device(model)
    blocks = lower_precision_blocks(model, templates, layer + 1, loss_layer + 1, hp.compute_dtype)
    if hp.is_auto and budget is None:
        budget = memory_budget(device, hp.memory_budget_gb)
    plan = plan_value_passes(model, loss_layer - layer, [t.shape() for t in tokens], hp, device, budget, blocks is not None)
    zs, infos = [], []
    with _frozen(model):
        for start in range(0, len(order), plan.requests_per_pass):
            group = order[start : start + plan.requests_per_pass]
            ref = None if reference is None else reference[group]
            z, info = _optimize_group(
                model, tokenizer.pad_token_id, templates, tokens[start : start + plan.requests_per_pass], layer, loss_layer, hp, ref,
                recompute=plan.recompute, blocks=blocks,
            )
            zs.append(z)
            infos.append(info)
            trim_heap()  # the next group's tensors have other shapes
    back = torch.argsort(torch.tensor(order))  # position in `order` of each request
    z = torch.cat(zs)[back.to(zs[0].device)]
    info = {key: torch.cat([i[key] for i in infos])[back.to(infos[0][key].device)] for key in infos[0] if key != "token_slots"}
    info["plan"] = plan
    info["token_slots"] = {k: sum(i["token_slots"][k] for i in infos) for k in infos[0]["token_slots"]}
    return z, info


def plan_value_passes(
    model, upper_blocks: int, shapes: list[PassShape], hp: ValueOptimization, device: torch.device, budget: MemoryBudget | None,
    lower_precision: bool,
) -> PassPlan:
    """The `PassPlan` of a batch whose requests have `shapes` (in pass order), for a search over
    `upper_blocks` blocks. Activations take the model's element size; on bfloat16 copies
    (`lower_precision`) they stay float32 (a bfloat16 product keeps only its weight for the backward)."""
    element = next(model.parameters()).element_size()
    precision = Precision(4, 4, 4) if lower_precision else Precision(element, element, element)
    return plan_passes(
        StackShapes.of(model, upper_blocks), shapes, device.type, precision,
        hp.requests_per_pass, hp.recompute_activations, None if budget is None else budget.bytes,
    )


def check_value_memory(
    model, tokenizer, templates: ModuleTemplates, requests: list[EditRequest], context_groups, layer: int, hp: ValueOptimization,
    budget: MemoryBudget,
) -> None:
    """Refuse, before any edit, a request whose value search would not fit `budget` even alone (with
    `auto`, the smallest pass the planner may choose): `ValueMemoryError` names it and the bytes it needs."""
    loss_layer = _check_layers(model, templates, layer, hp)
    contexts = [c for g in context_groups for c in g]
    device = input_device(model)
    lower = hp.compute_dtype == "bfloat16" and next(model.parameters()).dtype not in (torch.bfloat16, torch.float16)
    shapes = {r.case_id: _tokenize_request(tokenizer, r, contexts).shape() for r in requests}
    # the request with the most tokens in its pass is the one that needs the most memory
    case_id, shape = max(shapes.items(), key=lambda item: item[1].sequences * (item[1].prefix + item[1].suffix))
    try:
        together = 1 if hp.requests_per_pass == "auto" else min(len(requests), hp.requests_per_pass)  # auto may go down to one
        plan_value_passes(model, loss_layer - layer, [shape] * together, hp, device, budget, lower)
    except ValueMemoryError as e:
        raise ValueMemoryError(f"request case_id={case_id!r}: {e}") from None


def prepare_value_search(model, templates: ModuleTemplates, layer: int, hp: ValueOptimization, device: torch.device) -> MemoryBudget | None:
    """Set-up of an editing method's value search at `layer` (`hp.compute_dtype`: the precision already
    chosen, `precision.py`): make the lower-precision copy of the upper blocks once, and measure the
    memory budget for `auto` settings. Says what `auto` will do (logging, `sphere_pl` logger)."""
    loss_layer = _check_layers(model, templates, layer, hp)
    copies = lower_precision_blocks(model, templates, layer + 1, loss_layer + 1, hp.compute_dtype)
    dtype = "bfloat16 copies of the upper blocks" if copies is not None else f"{str(next(model.parameters()).dtype).removeprefix('torch.')}"
    if not hp.is_auto:
        log.info("value search: %s request(s) per pass, activations %s, %s", hp.requests_per_pass,
                 "recomputed" if hp.recompute_activations else "kept", dtype)
        return None
    budget = memory_budget(device, hp.memory_budget_gb)
    size = hp.requests_per_pass if hp.requests_per_pass != "auto" else (
        "auto: the whole batch where it fits" if device.type == "cuda" else f"auto: {CPU_PASS} where they fit")
    again = hp.recompute_activations if hp.recompute_activations != "auto" else f"auto: kept unless a pass of {SMALL_PASS} does not fit"
    log.info("value search: memory budget %.2f GB (%s); requests per pass %s; recompute activations %s; %s",
             budget.bytes / GB, budget.source, size, again, dtype)
    return budget


_LOWER_PRECISION: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def lower_precision_blocks(model, templates: ModuleTemplates, start: int, stop: int, compute_dtype: str) -> list[nn.Module] | None:
    """Copies of blocks [start, stop) whose matrix products run in bfloat16 (`compute_dtype: bfloat16`),
    or None (float32, or a model already in half precision, which runs as it is).

    Each linear layer of a copy holds its weight in bfloat16 (`_BFloat16Product`); everything else
    (norms, attention, the MLP's activation, the residual stream) stays in the model's dtype. The
    blocks above the edited layers are never edited, so the copies are made once per model and kept
    while every weight they were made from is unchanged (its version counter and storage)."""
    if compute_dtype != "bfloat16":
        return None
    blocks = list(model.get_submodule(templates.layers))[start:stop]
    if next(model.parameters()).dtype in (torch.bfloat16, torch.float16):
        return None
    offloaded = [start + i for i, b in enumerate(blocks) if any(p.device.type == "meta" for p in b.parameters())]
    if offloaded:  # a copy would hold in memory what the device map keeps out of it
        raise SettingsError(f"values.compute_dtype = 'bfloat16' copies the blocks above the edited layer, and model.model.device_map "
                            f"offloads blocks {offloaded}: use compute_dtype float32 with offloaded blocks")
    key = (start, stop, tuple((p.data_ptr(), p._version) for b in blocks for p in b.parameters()))
    cached = _LOWER_PRECISION.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    _LOWER_PRECISION.pop(model, None)  # free the old copies before making new ones
    copies = []
    for block in blocks:
        twin = copy.deepcopy(block).requires_grad_(False)
        cast = _LastCast()  # queries, keys and values (gate and up) read the same input: cast it once
        for name, module in list(twin.named_modules()):
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2's transposed linear
                parent, _, attr = name.rpartition(".")
                setattr(twin.get_submodule(parent) if parent else twin, attr, _BFloat16Product(module, cast))
        copies.append(twin)
    _LOWER_PRECISION[model] = (key, copies)
    return copies


class _LastCast:
    """The bfloat16 cast of the last input given, reused while the same tensor comes again: the
    products of one block that read one input share one cast (in the graph and in memory)."""

    def __init__(self):
        self.source, self.version, self.cast = None, None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.source or x._version != self.version:
            self.source, self.version, self.cast = x, x._version, x.to(torch.bfloat16)
        return self.cast

    def __deepcopy__(self, memo):  # never share a cast between copies
        return _LastCast()


class _BFloat16Product(nn.Module):
    """A frozen linear layer whose matrix product runs in bfloat16: the weight is kept in bfloat16
    (cast once, where autocast would cast it at every call), the input is cast for the product and the
    output cast back to the input's dtype, so the rest of the block computes as before."""

    def __init__(self, linear: nn.Module, cast: _LastCast):
        super().__init__()
        weight = linear.weight.detach()
        weight = weight.T if type(linear).__name__ == "Conv1D" else weight  # Conv1D stores (in, out)
        self.register_buffer("weight", weight.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))
        self.cast = cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.cast(x), self.weight, self.bias).to(x.dtype)


@contextmanager
def _frozen(model):
    """Only delta needs gradients: a caller's model that still requires them would otherwise get
    a gradient for every weight above the layer at every step (time, and memory the size of those weights)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _optimize_group(
    model, pad_id: int, templates, requests: list[_RequestTokens], layer: int, loss_layer: int, hp: ValueOptimization, reference,
    recompute: bool, blocks: list[nn.Module] | None,
):
    """`optimize_values` for one pass of requests, all optimised in the same forward and backward passes.
    `blocks`: lower-precision copies of the upper blocks to run instead of the model's."""
    device = input_device(model)
    lm_head = model.get_submodule(templates.lm_head)
    p = _build_problem(requests, pad_id, device)
    n = p.num_requests

    block_out = capture(model, p.batch, outputs_of=[templates.layer_at(layer)], stop_after=templates.layer_at(layer))[
        ("out", templates.layer_at(layer))
    ]
    h_init = _wide(block_out[p.init_seq, p.lookup[p.init_seq]])  # (n, d)
    h_norm = (h_init if reference is None else _wide(reference)).norm(dim=-1)
    max_norm = hp.clamp_norm_factor * h_norm
    runner = SuffixRunner(model, templates, block_out, p.batch["attention_mask"], p.lookup, layer + 1, loss_layer + 1, recompute=recompute, blocks=blocks)
    dtype = block_out.dtype
    del block_out  # the runner keeps only the suffixes and the prefixes' keys and values

    delta = torch.zeros_like(h_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    active = torch.ones(n, dtype=torch.bool, device=device)
    all_seqs = torch.arange(p.seq_request.shape[0], device=device)
    kl_init = None
    steps = torch.zeros(n, dtype=torch.long)
    final_loss = torch.zeros(n, dtype=h_init.dtype)
    initial_loss = None

    for it in range(hp.num_grad_steps):
        seqs = all_seqs[active[p.seq_request]]
        final = runner.run(seqs, delta[p.seq_request[seqs]])
        remap = torch.full((p.seq_request.shape[0],), -1, dtype=torch.long, device=device)
        remap[seqs] = torch.arange(len(seqs), device=device)

        def final_at(seq_idx, pos):
            return final[remap[seq_idx], pos - p.lookup[seq_idx]]  # suffixes start at the lookup token

        loss, kl_log_probs = _request_losses(p, seqs, final_at, lm_head, kl_init, delta, h_norm, hp)
        if kl_init is None:
            kl_init = kl_log_probs.new_zeros(n, kl_log_probs.shape[-1])
            kl_init[p.seq_request[seqs[p.is_kl[seqs]]]] = kl_log_probs.detach()

        loss_now = loss.detach()
        if initial_loss is None:
            initial_loss = loss_now.cpu().clone()
        final_loss[active.cpu()] = loss_now[active].cpu()
        done = active & (loss_now < hp.early_stop_loss)
        stepping = active & ~done
        if it == hp.num_grad_steps - 1 or not stepping.any():
            break
        frozen = delta.detach()[~stepping].clone()
        opt.zero_grad()
        loss[stepping].sum().backward()
        opt.step()
        with torch.no_grad():
            delta[~stepping] = frozen
            norms = delta.norm(dim=-1)
            scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
            delta.mul_(scale[:, None])
        steps[stepping.cpu()] += 1
        active = stepping

    z = (h_init + delta.detach()).to(dtype)
    slots = {k: int(v) for k, v in runner.token_slots.items()}
    return z, {"steps": steps, "loss": final_loss, "initial_loss": initial_loss, "delta_norm": delta.detach().norm(dim=-1).cpu(), "delta": delta.detach(),
               "init": h_init.detach(),
               "token_slots": slots}

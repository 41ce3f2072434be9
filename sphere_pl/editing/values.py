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
`optimize_values_reference` is the straightforward per-request version, kept for tests and
for the benchmark's baseline.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..heap import trim_heap
from ..models import ModuleTemplates
from ..data.records import EditRequest
from ..tracing import SuffixRunner, capture, pad_id_lists, token_positions
from .keys import fill

KL_PROMPT = "{} is a"


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32: losses and deltas of half-precision models are kept in float32."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class ValueOptimization:
    """Hyper-parameters of the target-value search (defaults: the paper's LLaMA3-8B values)."""

    num_grad_steps: int = 25
    lr: float = 0.1
    loss_layer: int = -1  # -1: the last layer
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    requests_per_pass: int = 4  # requests optimised in one forward/backward pass: memory, not results
    # keep only each upper block's input and re-run the block in the backward pass: the same
    # gradients for a fraction of the activation memory and one more forward pass (BENCHMARKS.md)
    recompute_activations: bool = True

    def __post_init__(self):
        def need(ok: bool, name: str, rule: str, why: str = "the edit would change nothing or diverge"):
            if not ok:
                raise ValueError(f"values.{name} = {getattr(self, name)!r} {rule}: {why}")

        need(isinstance(self.num_grad_steps, int) and self.num_grad_steps >= 1, "num_grad_steps", "must be an integer >= 1")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "must be a positive finite number")
        need(math.isfinite(self.clamp_norm_factor) and self.clamp_norm_factor > 0, "clamp_norm_factor", "must be positive")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(math.isfinite(self.kl_factor) and self.kl_factor >= 0, "kl_factor", "must be >= 0")
        need(isinstance(self.requests_per_pass, int) and self.requests_per_pass >= 1, "requests_per_pass", "must be an integer >= 1", "it is how many requests share a pass")
        need(isinstance(self.recompute_activations, bool), "recompute_activations", "must be true or false", "it switches activation checkpointing")


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


def _build_problem(tokenizer, requests: list[EditRequest], context_groups: list[list[str]], device) -> _Problem:
    contexts = [c for g in context_groups for c in g]
    ids, seq_request, lookup, is_kl = [], [], [], []
    target_seq, target_pos, target_label, target_len, init_seq = [], [], [], [], []
    for r_idx, r in enumerate(requests):
        target = tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError(f"request case_id={r.case_id!r}: target_new tokenises to nothing")
        target_len.append(len(target))
        for c_idx, context in enumerate(contexts):
            template = fill(context, r.prompt)
            prompt_ids = tokenizer(template.replace("{}", r.subject))["input_ids"]
            if c_idx == 0:
                init_seq.append(len(ids))
            for j, token in enumerate(target):
                target_seq.append(len(ids))
                target_pos.append(len(prompt_ids) - 1 + j)
                target_label.append(token)
            ids.append(prompt_ids + target[:-1])
            seq_request.append(r_idx)
            lookup.append(token_positions(tokenizer, [(template, r.subject)])[0])
            is_kl.append(False)
        ids.append(tokenizer(KL_PROMPT.replace("{}", r.subject))["input_ids"])
        seq_request.append(r_idx)
        lookup.append(token_positions(tokenizer, [(KL_PROMPT, r.subject)])[0])
        is_kl.append(True)

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return _Problem(
        batch=pad_id_lists(ids, tokenizer.pad_token_id, device),
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
        raise ValueError(f"value loss layer {loss_layer} must lie between the edited layer {layer} and {num_layers - 1}")
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
    reference: torch.Tensor | None = None,
):
    """Target values z (n, d_model) for all requests. Returns (z, info), both in the order of `requests`.

    Each request's search depends only on its own loss (Adam and the clamp act per element
    and per row, early stopping per request), so requests are solved in groups of
    `hp.requests_per_pass`, one group after another: the result does not depend on the group
    size, while memory (the autograd graph over the upper blocks, the cached prefixes) grows
    with it. Requests are grouped by length so that a group pads little; this is why a large
    batch costs less per edit than a small one.

    The clamp and the weight decay are relative to the norm of h, the block output at the
    subject's last token, unless `reference` (n, d_model) gives other vectors (ROME: the MLP output).
    """
    loss_layer = _check_layers(model, templates, layer, hp)
    order = pass_order(tokenizer, requests)
    zs, infos = [], []
    with _frozen(model):
        for start in range(0, len(order), hp.requests_per_pass):
            group = order[start : start + hp.requests_per_pass]
            ref = None if reference is None else reference[group]
            z, info = _optimize_group(model, tokenizer, templates, [requests[i] for i in group], context_groups, layer, loss_layer, hp, ref)
            zs.append(z)
            infos.append(info)
            trim_heap()  # the next group's tensors have other shapes
    back = torch.argsort(torch.tensor(order))  # position in `order` of each request
    z = torch.cat(zs)[back.to(zs[0].device)]
    info = {key: torch.cat([i[key] for i in infos])[back.to(infos[0][key].device)] for key in infos[0]}
    return z, info


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


def _optimize_group(model, tokenizer, templates, requests, context_groups, layer: int, loss_layer: int, hp: ValueOptimization, reference):
    """`optimize_values` for one group of requests, all optimised in the same forward and backward passes."""
    device = next(model.parameters()).device
    lm_head = model.get_submodule(templates.lm_head)
    p = _build_problem(tokenizer, requests, context_groups, device)
    n = p.num_requests

    block_out = capture(model, p.batch, outputs_of=[templates.layer_at(layer)], stop_after=templates.layer_at(layer))[
        ("out", templates.layer_at(layer))
    ]
    h_init = _wide(block_out[p.init_seq, p.lookup[p.init_seq]])  # (n, d)
    h_norm = (h_init if reference is None else _wide(reference)).norm(dim=-1)
    max_norm = hp.clamp_norm_factor * h_norm
    runner = SuffixRunner(model, templates, block_out, p.batch["attention_mask"], p.lookup, layer + 1, loss_layer + 1, recompute=hp.recompute_activations)
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
    return z, {"steps": steps, "loss": final_loss, "initial_loss": initial_loss, "delta_norm": delta.detach().norm(dim=-1).cpu(), "delta": delta.detach()}


def optimize_values_reference(model, tokenizer, templates: ModuleTemplates, requests: list[EditRequest], context_groups, layer: int, hp: ValueOptimization):
    """One request at a time with full forward passes and full logits: slow, obviously right."""
    loss_layer = _check_layers(model, templates, layer, hp)
    device = next(model.parameters()).device
    lm_head = model.get_submodule(templates.lm_head)
    num_layers = len(model.get_submodule(templates.layers))
    zs = []
    for request in requests:
        p = _build_problem(tokenizer, [request], context_groups, device)
        delta = torch.zeros(model.config.hidden_size, device=device, dtype=_wide(lm_head.weight).dtype, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.lr)
        state = {}

        def add_delta(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if "h" not in state:
                state["h"] = _wide(hidden[p.init_seq[0], p.lookup[p.init_seq[0]]].detach()).clone()
            rows = torch.arange(hidden.shape[0], device=device)
            hidden = hidden.index_put((rows, p.lookup), delta.to(hidden.dtype).expand(len(rows), -1), accumulate=True)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        handle = model.get_submodule(templates.layer_at(layer)).register_forward_hook(add_delta)
        kl_init = None
        try:
            for it in range(hp.num_grad_steps):
                out = model(**p.batch, output_hidden_states=True, use_cache=False)
                if loss_layer == num_layers - 1:
                    logits = out.logits
                else:
                    logits = lm_head(model.get_submodule(templates.final_norm)(out.hidden_states[loss_layer + 1]))
                all_log_probs = torch.log_softmax(_wide(logits), dim=-1)
                nll_terms = -all_log_probs[p.target_seq, p.target_pos, p.target_label]
                rewriting = (~p.is_kl).nonzero().squeeze(1)
                per_seq = nll_terms.new_zeros(p.seq_request.shape[0]).index_add(0, p.target_seq, nll_terms)
                nll = (per_seq[rewriting] / p.target_len[0]).mean()
                kl_seq = p.is_kl.nonzero().squeeze(1)
                kl_lp = torch.log_softmax(_wide(logits[kl_seq, p.lookup[kl_seq]]), dim=-1)
                if kl_init is None:
                    kl_init = kl_lp.detach().clone()
                kl = (kl_lp.exp() * (kl_lp - kl_init)).sum()  # KL(edited || original)
                h_norm = state["h"].norm()
                loss = nll + hp.kl_factor * kl + hp.weight_decay * delta.norm() / h_norm**2
                if loss.item() < hp.early_stop_loss or it == hp.num_grad_steps - 1:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    max_norm = hp.clamp_norm_factor * h_norm
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
        finally:
            handle.remove()
        zs.append(state["h"] + delta.detach())
    return torch.stack(zs)

"""Brute-force references for the editing tests: one unpadded full forward pass per text, and the
value search one request at a time with full forward passes (`optimize_values_reference`, also the
baseline `benchmarks/edit_speed.py --reference` times)."""

from __future__ import annotations

import torch

from sphere_pl.data.records import EditRequest
from sphere_pl.editing.keys import KeyReader
from sphere_pl.editing.values import ValueOptimization, _build_problem, _check_layers, _tokenize_request, _wide
from sphere_pl.models import ModuleTemplates


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _subject_last_index(tokenizer, text: str, subject: str) -> int:
    """Index of the subject's last token in `text`, by searching the subject's ids in the text's ids."""
    ids = tokenizer(text)["input_ids"]
    sub = tokenizer(subject, add_special_tokens=False)["input_ids"]
    hits = [i + len(sub) - 1 for i in range(len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub]
    assert len(hits) == 1, f"subject {subject!r} must occur exactly once in {text!r}"
    return hits[0]


def _single_forward_reads(model, tokenizer, text, pre_hook_modules=(), hook_modules=()):
    """Full forward pass of one unpadded text; inputs of `pre_hook_modules`, outputs of `hook_modules`."""
    found, handles = {}, []
    for name in pre_hook_modules:
        handles.append(
            model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: found.__setitem__(("in", name), a[0][0]))
        )
    for name in hook_modules:
        handles.append(
            model.get_submodule(name).register_forward_hook(
                lambda m, a, out, name=name: found.__setitem__(("out", name), (out[0] if isinstance(out, tuple) else out)[0])
            )
        )
    try:
        with torch.no_grad():
            model(**tokenizer(text, return_tensors="pt"), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found


def _brute_force_keys(model, tokenizer, templates, requests, groups, layer):
    """(n, d_in) float64: down_proj input at the subject's last token, mean within groups then across."""
    name = templates.down_proj_at(layer)
    keys = []
    for r in requests:
        group_means = []
        for group in groups:
            vectors = []
            for context in group:
                text = context.replace("{}", r.prompt, 1).replace("{}", r.subject)
                idx = _subject_last_index(tokenizer, text, r.subject)
                vectors.append(_single_forward_reads(model, tokenizer, text, pre_hook_modules=[name])[("in", name)][idx].double())
            group_means.append(torch.stack(vectors).mean(0))
        keys.append(torch.stack(group_means).mean(0))
    return torch.stack(keys)


def _brute_force_block_output(model, tokenizer, templates, requests, layer):
    """(n, d_model) float64: output of block `layer` at the subject's last token of each bare prompt."""
    name = templates.layer_at(layer)
    out = []
    for r in requests:
        text = r.prompt.replace("{}", r.subject)
        idx = _subject_last_index(tokenizer, text, r.subject)
        out.append(_single_forward_reads(model, tokenizer, text, hook_modules=[name])[("out", name)][idx].double())
    return torch.stack(out)


def compute_keys(
    model,
    tokenizer,
    templates: ModuleTemplates,
    requests: list[EditRequest],
    context_groups: list[list[str]],
    key_layers: list[int],
    output_layer: int | None = None,
    batch_size: int = 16,
):
    """Keys (and outputs) from one read of a `KeyReader` starting at the lowest layer asked for."""
    lowest = min(key_layers + ([output_layer] if output_layer is not None else []))
    reader = KeyReader(model, tokenizer, templates, requests, context_groups, lowest, batch_size)
    return reader.read(key_layers, output_layer)


def optimize_values_reference(model, tokenizer, templates: ModuleTemplates, requests: list[EditRequest], context_groups, layer: int, hp: ValueOptimization):
    """One request at a time with full forward passes and full logits: slow, obviously right."""
    loss_layer = _check_layers(model, templates, layer, hp)
    device = next(model.parameters()).device
    lm_head = model.get_submodule(templates.lm_head)
    num_layers = len(model.get_submodule(templates.layers))
    zs = []
    for request in requests:
        contexts = [c for g in context_groups for c in g]
        p = _build_problem([_tokenize_request(tokenizer, request, contexts)], tokenizer.pad_token_id, device)
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

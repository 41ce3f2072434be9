"""Brute-force references for the editing tests: one unpadded full forward pass per text."""

from __future__ import annotations

import torch


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



"""Context templates and the keys (down-projection inputs) of edit requests.

A request's key at a layer is the down-projection input at the subject's last token,
averaged first within each group of context templates and then across groups, so the
edit generalises beyond the exact prompt. The first group is always the bare prompt.
"""

from __future__ import annotations

import torch
from einops import rearrange

from ..models import ModuleTemplates
from ..requests import EditRequest
from ..tracing import capture, token_positions, tokenize

GENERATION_PREFIXES = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_context_templates(model, tokenizer, num_tokens: int = 10, prefixes=GENERATION_PREFIXES, seed: int = 0) -> list[list[str]]:
    """[["{}"], [one short sampled continuation of each prefix + ". {}"]], reproducibly seeded.

    Braces in generated text are blanked so the result stays a valid template.
    """
    device = next(model.parameters()).device
    generated = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for prefix in prefixes:
            enc = tokenize(tokenizer, [prefix], device)
            out = model.generate(
                **enc, do_sample=True, top_k=5, max_new_tokens=num_tokens, pad_token_id=tokenizer.pad_token_id
            )
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            text = text.replace("{", " ").replace("}", " ").replace("\n", " ").strip()
            generated.append(text + ". {}")
    return [["{}"], generated]


def fill(context: str, prompt: str) -> str:
    """Put a request prompt (itself a "{}" template) into a context template."""
    return context.replace("{}", prompt, 1)


def contextual_prompts(requests: list[EditRequest], context_groups: list[list[str]]) -> list[tuple[str, str]]:
    """(template, subject) for every request x every context, request-major."""
    return [(fill(ctx, r.prompt), r.subject) for r in requests for group in context_groups for ctx in group]


def _group_average(per_prompt: torch.Tensor, n_requests: int, context_groups: list[list[str]]) -> torch.Tensor:
    """Average (n_requests * n_contexts, d) rows within each context group, then across groups."""
    per_request = rearrange(per_prompt, "(n c) d -> n c d", n=n_requests)
    means, start = [], 0
    for group in context_groups:
        means.append(per_request[:, start : start + len(group)].mean(dim=1))
        start += len(group)
    return torch.stack(means, dim=0).mean(dim=0)


@torch.no_grad()
def compute_keys(
    model,
    tokenizer,
    templates: ModuleTemplates,
    requests: list[EditRequest],
    context_groups: list[list[str]],
    key_layers: list[int],
    output_layer: int | None = None,
    batch_size: int = 64,
):
    """Keys {layer: (n, d_in)} at `key_layers`, and optionally the block output of `output_layer`
    at the subject's last token of each bare prompt, shape (n, d_model).

    The forward pass stops after the highest layer it needs.
    """
    if context_groups[0] != ["{}"]:
        raise ValueError("the first context group must be ['{}'] (the bare prompt)")
    device = next(model.parameters()).device
    prompts = contextual_prompts(requests, context_groups)
    positions = token_positions(tokenizer, prompts)
    texts = [t.replace("{}", s) for t, s in prompts]
    key_names = [templates.down_proj_at(layer) for layer in key_layers]
    out_name = templates.layer_at(output_layer) if output_layer is not None else None
    last = max(key_layers + ([output_layer] if output_layer is not None else []))
    stop = templates.layer_at(last)

    keys = {layer: [] for layer in key_layers}
    outputs = []
    for start in range(0, len(texts), batch_size):
        enc = tokenize(tokenizer, texts[start : start + batch_size], device)
        rows = torch.arange(enc["input_ids"].shape[0], device=device)
        cols = torch.tensor(positions[start : start + batch_size], device=device)
        found = capture(model, enc, inputs_of=key_names, outputs_of=[out_name] if out_name else [], stop_after=stop)
        for layer, name in zip(key_layers, key_names):
            keys[layer].append(found[("in", name)][rows, cols].float())
        if out_name:
            outputs.append(found[("out", out_name)][rows, cols].float())

    n = len(requests)
    keys = {layer: _group_average(torch.cat(v), n, context_groups) for layer, v in keys.items()}
    if out_name is None:
        return keys, None
    bare_outputs = rearrange(torch.cat(outputs), "(n c) d -> n c d", n=n)[:, 0]  # context 0 is the bare prompt
    return keys, bare_outputs

"""Context templates and the keys (down-projection inputs) of edit requests.

A request's key at a layer is the down-projection input at the subject's last token,
averaged first within each group of context templates and then across groups, so the
edit generalises beyond the exact prompt. The first context of the first group is always the
bare prompt ("{}"); ROME uses one flat group, the MEMIT family a group of its own for it.
"""

from __future__ import annotations

import torch
from einops import rearrange

from ..errors import SettingsError
from ..models import ModuleTemplates
from ..placement import input_device
from ..data.records import EditRequest
from ..tracing import capture, run_from_layer, token_positions, tokenize

GENERATION_PREFIXES = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_context_templates(model, tokenizer, num_tokens: int = 10, prefixes=GENERATION_PREFIXES, seed: int = 0) -> list[list[str]]:
    """[["{}"], [one short sampled continuation of each prefix + ". {}"]], reproducibly seeded.

    Braces in generated text are blanked so the result stays a valid template.
    """
    device = input_device(model)
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
    return [(fill(context, r.prompt), r.subject) for r in requests for group in context_groups for context in group]


def _group_average(per_prompt: torch.Tensor, n_requests: int, context_groups: list[list[str]]) -> torch.Tensor:
    """Average (n_requests * n_contexts, d) rows within each context group, then across groups."""
    per_request = rearrange(per_prompt, "(n c) d -> n c d", n=n_requests)
    means, start = [], 0
    for group in context_groups:
        means.append(per_request[:, start : start + len(group)].mean(dim=1))
        start += len(group)
    return torch.stack(means, dim=0).mean(dim=0)


class KeyReader:
    """Keys of a batch of requests, read again and again while the layers at and above
    `from_layer` change (AlphaEdit updates one layer at a time).

    The blocks below `from_layer` never change during a batch, so the hidden states entering
    it are computed once and every read runs only the blocks from there to the highest
    layer it needs. Prompts go through `batch_size` at a time: on SmolLM2 (120 prompts, 5 layers)
    16 at a time allocates 27 MB at the peak against 54 MB for 64, for 13 % more time in a
    phase that is ~5 % of an edit, which keeps the key reads under the value search's peak.
    """

    def __init__(self, model, tokenizer, templates: ModuleTemplates, requests: list[EditRequest], context_groups: list[list[str]], from_layer: int, batch_size: int = 16):
        if context_groups[0][0] != "{}":
            raise SettingsError("the first context template must be '{}' (the bare prompt)")
        self.model, self.templates, self.from_layer = model, templates, from_layer
        self.n, self.context_groups = len(requests), context_groups
        device = input_device(model)
        prompts = contextual_prompts(requests, context_groups)
        positions = token_positions(tokenizer, prompts)
        texts = [t.replace("{}", s) for t, s in prompts]
        entering = templates.layer_at(from_layer)
        self.chunks = []  # (hidden states entering `from_layer`, attention mask, subject positions)
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                enc = tokenize(tokenizer, texts[start : start + batch_size], device)
                found = capture(model, enc, inputs_of=[entering], stop_after=entering)
                cols = torch.tensor(positions[start : start + batch_size], device=device)
                self.chunks.append((found[("in", entering)], enc["attention_mask"], cols))

    @torch.no_grad()
    def read(self, key_layers: list[int], output_layer: int | None = None):
        """Keys {layer: (n, d_in)} at `key_layers`, and optionally the block output of
        `output_layer` at the subject's last token of each bare prompt, shape (n, d_model)."""
        needed = key_layers + ([output_layer] if output_layer is not None else [])
        if min(needed) < self.from_layer:
            raise ValueError(f"layers {needed} lie below layer {self.from_layer}, where this reader starts")
        key_names = [self.templates.down_proj_at(layer) for layer in key_layers]
        out_name = self.templates.layer_at(output_layer) if output_layer is not None else None
        keys = {layer: [] for layer in key_layers}
        outputs = []
        for hidden, mask, cols in self.chunks:
            rows = torch.arange(hidden.shape[0], device=hidden.device)

            def run(hidden=hidden, mask=mask):
                run_from_layer(self.model, self.templates, hidden, mask, self.from_layer, max(needed) + 1)

            def at_subject(x, rows=rows, cols=cols):  # (seqs, d): the subject's last token, taken inside the hook
                return x[rows, cols].float()

            found = capture(self.model, None, inputs_of=key_names, outputs_of=[out_name] if out_name else [], run=run, keep=at_subject)
            for layer, name in zip(key_layers, key_names):
                keys[layer].append(found[("in", name)])
            if out_name:
                outputs.append(found[("out", out_name)])

        keys = {layer: _group_average(torch.cat(v), self.n, self.context_groups) for layer, v in keys.items()}
        if out_name is None:
            return keys, None
        bare_outputs = rearrange(torch.cat(outputs), "(n c) d -> n c d", n=self.n)[:, 0]  # context 0 is the bare prompt
        return keys, bare_outputs

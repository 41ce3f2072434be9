"""Reading activations out of a transformer, and running only the part of it that is needed.

Editors need (a) inputs of a down-projection and outputs of a block at one token, and
(b) the top of the network re-run from a block's output. Running the full model for
either wastes most of the compute, so `capture` stops the forward pass once the last
hooked module has run, and `run_from_layer` feeds hidden states straight into a later block.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .models import ModuleTemplates


class _StopForward(Exception):
    pass


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def capture(model: nn.Module, inputs: dict, inputs_of: list[str] = (), outputs_of: list[str] = (), stop_after: str | None = None):
    """Run `model(**inputs)` and return {name: tensor} for module inputs and outputs.

    With `stop_after`, the forward pass is abandoned as soon as that module has run.
    """
    found: dict[str, torch.Tensor] = {}
    handles = []

    def input_hook(name):
        def hook(module, args, kwargs):
            found[("in", name)] = (args[0] if args else next(iter(kwargs.values()))).detach()
        return hook

    def output_hook(name):
        def hook(module, args, output):
            found[("out", name)] = _first(output).detach()
            if name == stop_after:
                raise _StopForward
        return hook

    try:
        for name in inputs_of:
            handles.append(model.get_submodule(name).register_forward_pre_hook(input_hook(name), with_kwargs=True))
        for name in set(outputs_of) | ({stop_after} if stop_after else set()):
            handles.append(model.get_submodule(name).register_forward_hook(output_hook(name)))
        try:
            model(**inputs, use_cache=False)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    return found


def token_positions(tokenizer, prompts_with_subject: list[tuple[str, str]]) -> list[int]:
    """Index of the subject's last token in each `template.format(subject)`.

    Counts the tokens of the text up to the end of the subject, the way the whole prompt
    is tokenised (special tokens included), which is exact for right-padded batches.
    """
    positions = []
    for template, subject in prompts_with_subject:
        prefix = template[: template.index("{}")]
        n = len(tokenizer(prefix + subject)["input_ids"])
        positions.append(n - 1)
    return positions


def tokenize(tokenizer, texts: list[str], device) -> dict:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def pad_id_lists(id_lists: list[list[int]], pad_id: int, device) -> dict:
    """Right-pad token id lists into a batch with its attention mask."""
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for i, ids in enumerate(id_lists):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def base_model_name(templates: ModuleTemplates) -> str:
    """The module that owns the block list (e.g. `model` in LlamaForCausalLM)."""
    return templates.layers.rsplit(".", 1)[0]


class _Zero(nn.Module):
    """Stands in for learned absolute position embeddings, which are already in the hidden states."""

    def __init__(self, like: nn.Module):
        super().__init__()
        self.like = [like]

    def forward(self, positions):
        w = self.like[0].weight
        return torch.zeros(*positions.shape, w.shape[-1], dtype=w.dtype, device=w.device)


@contextmanager
def _swapped(parent: nn.Module, attr: str, replacement: nn.Module):
    original = getattr(parent, attr)
    setattr(parent, attr, replacement)
    try:
        yield original
    finally:
        setattr(parent, attr, original)


def run_from_layer(
    model: nn.Module, templates: ModuleTemplates, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int | None = None
) -> torch.Tensor:
    """Final-normed hidden states when block `start` receives `hidden` and block `stop - 1` is the last run.

    `hidden` is the residual stream entering block `start` (the output of block start-1).
    The blocks outside [start, stop) are skipped, which is what makes repeated evaluation of
    the top of the network cheap. Works by temporarily replacing the block list with that slice.
    """
    base = model.get_submodule(base_model_name(templates))
    layers_parent_name, layers_attr = templates.layers.rsplit(".", 1)
    layers_parent = model.get_submodule(layers_parent_name)
    blocks = getattr(layers_parent, layers_attr)
    tail = nn.ModuleList(list(blocks)[start:stop])
    position_attr = "wpe" if hasattr(base, "wpe") else None  # GPT-2 adds learned positions to inputs_embeds
    with _swapped(layers_parent, layers_attr, tail):
        if position_attr:
            with _swapped(base, position_attr, _Zero(getattr(base, position_attr))):
                out = base(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)
        else:
            out = base(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state

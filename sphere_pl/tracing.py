"""Reading activations out of a transformer, and running only the part of it that is needed.

Editors need (a) inputs of a down-projection and outputs of a block at one token, and
(b) the top of the network re-run from a block's output. Running the full model for
either wastes most of the compute, so `capture` stops the forward pass once the last
hooked module has run, and `run_from_layer` feeds hidden states straight into a later block.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .models import ModuleTemplates


class _StopForward(Exception):
    pass


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def capture(
    model: nn.Module, inputs: dict | None, inputs_of: list[str] = (), outputs_of: list[str] = (), stop_after: str | None = None, run=None,
    keep=None,
):
    """Run `model(**inputs)` (or `run()`) and return {("in"|"out", name): tensor} for module inputs and outputs.

    With `stop_after`, the forward pass is abandoned as soon as that module has run.
    Module names are resolved before anything runs, so `run` may swap blocks around.
    `keep` (tensor -> tensor), e.g. a gather of a few positions, is applied inside the hook,
    so the whole (batch, seq, d) activation is never held past its module.
    """
    keep = keep or (lambda x: x)
    found: dict[str, torch.Tensor] = {}
    handles = []

    def input_hook(name):
        def hook(module, args, kwargs):
            found[("in", name)] = keep((args[0] if args else next(iter(kwargs.values()))).detach())
        return hook

    def output_hook(name):
        def hook(module, args, output):
            found[("out", name)] = keep(_first(output).detach())
            if name == stop_after:
                raise _StopForward
        return hook

    try:
        for name in inputs_of:
            handles.append(model.get_submodule(name).register_forward_pre_hook(input_hook(name), with_kwargs=True))
        for name in set(outputs_of) | ({stop_after} if stop_after else set()):
            handles.append(model.get_submodule(name).register_forward_hook(output_hook(name)))
        try:
            run() if run is not None else model(**inputs, use_cache=False)
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


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextmanager
def _sdpa_without_repeated_kv():
    """Ask transformers to give grouped-query attention to SDPA as it is (`enable_gqa`) instead of
    first copying every key/value head once per query head it serves, which it does whenever
    there is a mask (always here). Those copies are what the backward pass keeps: on SmolLM2
    (9 query, 3 key/value heads) the value search takes 0.1 GB less and 13 % less time without
    them (BENCHMARKS.md). transformers reads this switch at every attention call."""
    previous = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_FORCE_GQA]
        else:
            os.environ[_FORCE_GQA] = previous


@contextmanager
def _swapped(parent: nn.Module, attr: str, replacement: nn.Module):
    original = getattr(parent, attr)
    setattr(parent, attr, replacement)
    try:
        yield original
    finally:
        setattr(parent, attr, original)


@contextmanager
def upper_blocks(
    model: nn.Module, templates: ModuleTemplates, start: int, stop: int | None = None, recompute: bool = False, blocks: list[nn.Module] | None = None,
):
    """Temporarily make blocks[start:stop] the model's whole stack; yields `forward(hidden, **kwargs)`.

    `hidden` goes into the first kept block exactly as given: a pre-hook replaces whatever
    the embedding stage made of it (learned positions, scaling), so this works for any
    family. The kept blocks' cache slots are renumbered from 0 so a KV cache holds just them.
    With `recompute`, each kept block runs under activation checkpointing (`_recomputed`);
    a KV cache given to it must then not be written to (`_PrefixCache`).
    `blocks`, when given, run in place of blocks[start:stop] (copies of them in another precision).
    """
    base_name, layers_attr = templates.layers.rsplit(".", 1)
    base = model.get_submodule(base_name)  # owns the block list (e.g. `model` in LlamaForCausalLM)
    tail = list(getattr(base, layers_attr))[start:stop] if blocks is None else list(blocks)
    slots = [  # (module, block position): the cache slot each attention module takes while only `tail` runs
        (m, j) for j, block in enumerate(tail) for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)
    ]

    def forward(hidden: torch.Tensor, **kwargs):
        def feed(module, args, module_kwargs):
            if args:
                return (hidden,) + tuple(args[1:]), module_kwargs
            return args, {**module_kwargs, "hidden_states": hidden}

        handle = tail[0].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            with _sdpa_without_repeated_kv():
                return base(inputs_embeds=hidden, **kwargs)
        finally:
            handle.remove()

    with _swapped(base, layers_attr, nn.ModuleList(tail)), _cache_slots(slots):
        own_forwards = [block.__dict__.get("forward") for block in tail]  # None: the class's
        if recompute:
            for j, block in enumerate(tail):
                block.forward = _recomputed(block.forward, [(m, slot) for m, slot in slots if slot == j])
        try:
            yield forward
        finally:
            if recompute:
                for block, own in zip(tail, own_forwards):
                    if own is None:
                        del block.forward
                    else:
                        block.forward = own


@contextmanager
def _cache_slots(slots: list[tuple[nn.Module, int]]):
    """Give each attention module the KV-cache slot paired with it, and its own back afterwards."""
    before = [(m, m.layer_idx) for m, _ in slots]
    for m, slot in slots:
        m.layer_idx = slot
    try:
        yield
    finally:
        for m, idx in before:
            m.layer_idx = idx


def _recomputed(forward, slots):
    """`forward` under activation checkpointing: autograd keeps only the block's inputs and runs the
    block again in the backward pass, instead of keeping its intermediates. The backward pass runs
    after `upper_blocks` has put the cache slots and attention switch back, so the re-run sets
    them again (`slots`: this block's (module, cache slot) pairs)."""

    def run(*args, **kwargs):
        def again(*args, **kwargs):
            with _cache_slots(slots), _sdpa_without_repeated_kv():
                return forward(*args, **kwargs)

        return checkpoint(again, *args, use_reentrant=False, **kwargs)

    return run


class _PrefixCache(DynamicCache):
    """A KV cache that serves a fixed prefix and is never written: each block gets the prefix's keys and
    values followed by its own, and the cache stays as it was, so that a block can be run again
    (activation checkpointing) and see exactly what it saw the first time."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.layers = []
        for keys, values in prefix:  # held as given: DynamicCache(ddp_cache_data=...) would copy them
            layer = DynamicLayer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            self.layers.append(layer)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def run_from_layer(
    model: nn.Module, templates: ModuleTemplates, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int | None = None
) -> torch.Tensor:
    """Final-normed hidden states when block `start` receives `hidden` and block `stop - 1` is the last run.

    `hidden` is the residual stream entering block `start` (the output of block start-1).
    The blocks outside [start, stop) are skipped.
    """
    with upper_blocks(model, templates, start, stop) as forward:
        return forward(hidden, attention_mask=attention_mask, use_cache=False).last_hidden_state


class SuffixRunner:
    """Re-runs blocks [start, stop) on the suffix of each sequence, from position `split[i]` on,
    with the prefix's keys and values computed once and cached.

    For target-value optimisation, everything before the subject's last token is unaffected
    by the vector being optimised, so a step only needs the tokens from there on — about a
    third of them. `hidden` is the residual stream entering block `start` for every position.
    With `recompute`, the backward pass re-runs each block instead of keeping its
    intermediates: same gradients, less memory, one more forward pass of the blocks.
    `blocks` run in place of the model's blocks [start, stop) (`upper_blocks`).
    """

    def __init__(
        self, model, templates: ModuleTemplates, hidden: torch.Tensor, attention_mask: torch.Tensor, split: torch.Tensor,
        start: int, stop: int | None = None, recompute: bool = False, blocks: list[nn.Module] | None = None,
    ):
        self.model, self.templates, self.start, self.stop, self.recompute, self.blocks = model, templates, start, stop, recompute, blocks
        device = hidden.device
        lengths = attention_mask.sum(dim=1)
        self.split, self.suffix_len = split, lengths - split
        self.prefix_len = int(split.max())
        width = int((lengths - split).max())
        offsets = torch.arange(width, device=device)
        index = split[:, None] + offsets  # absolute position of each suffix slot
        self.suffix_mask = (offsets[None, :] < (lengths - split)[:, None]).long()
        self.positions = index
        gather = index.clamp(max=hidden.shape[1] - 1)
        self.suffix_hidden = hidden.gather(1, gather[..., None].expand(-1, -1, hidden.shape[-1]))
        self.prefix_mask = (torch.arange(self.prefix_len, device=device)[None, :] < split[:, None]).long()
        self.kv = None
        # token slots every `run` computed, real and padded (0-dim tensors: counting costs no device sync)
        self.token_slots = {"suffix real": 0, "suffix padded": 0, "prefix real": 0, "prefix padded": 0}
        if self.prefix_len:
            # Pure causal attention here: real prefix tokens never see the padding after them,
            # and padding rows stay finite (they are masked out when the suffix runs).
            cache = DynamicCache()
            with torch.no_grad(), upper_blocks(model, templates, start, stop, blocks=blocks) as forward:
                forward(
                    hidden[:, : self.prefix_len],
                    attention_mask=torch.ones_like(self.prefix_mask),
                    position_ids=torch.arange(self.prefix_len, device=device).expand(hidden.shape[0], -1),
                    past_key_values=cache,
                    use_cache=True,
                )
            self.kv = [(layer.keys, layer.values) for layer in cache.layers]

    def run(self, rows: torch.Tensor, add_at_split: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (len(rows), suffix, d) of the suffixes of `rows`, with
        `add_at_split` (len(rows), d) added to the hidden state at each suffix's first position.

        Padded only to the longest prefix and suffix among `rows` (rows drop out as their
        requests stop early).
        """
        prefix = int(self.split[rows].max())
        suffix = int(self.suffix_len[rows].max())
        slots = self.token_slots
        slots["suffix real"] = slots["suffix real"] + self.suffix_len[rows].sum()
        slots["suffix padded"] += len(rows) * suffix
        slots["prefix real"] = slots["prefix real"] + self.split[rows].sum()
        slots["prefix padded"] += len(rows) * prefix
        hidden = self.suffix_hidden[rows, :suffix]
        hidden = torch.cat([hidden[:, :1] + add_at_split[:, None].to(hidden.dtype), hidden[:, 1:]], dim=1)
        kwargs = {"use_cache": False}
        mask = self.suffix_mask[rows, :suffix]
        if self.kv is not None and prefix:
            # rows are sorted and distinct, so as many as there are sequences means all of them: a view, no copy
            pick = slice(None) if len(rows) == self.split.shape[0] else rows
            cache = _PrefixCache([(k[pick, :, :prefix], v[pick, :, :prefix]) for k, v in self.kv])
            kwargs = {"past_key_values": cache, "use_cache": True}
            mask = torch.cat([self.prefix_mask[rows, :prefix], mask], dim=1)
        with upper_blocks(self.model, self.templates, self.start, self.stop, recompute=self.recompute, blocks=self.blocks) as forward:
            out = forward(hidden, attention_mask=mask, position_ids=self.positions[rows, :suffix], **kwargs)
        return out.last_hidden_state

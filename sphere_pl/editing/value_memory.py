"""How much memory a pass of the value search needs, how much the device has, and the settings
`auto` picks from the two.

The value search (`values.py`) runs a batch's requests a few at a time ("passes"). A pass keeps,
for the backward pass, the activations of every block above the edited layer over the
suffixes of its sequences, the keys and values of their prefixes, and logits over the
vocabulary where the loss reads them. `kept_bytes` estimates that from the model's shapes and
the pass's token counts (checked against the tensors autograd saves, in the tests), `pass_bytes`
the pass's peak, and `ALLOCATOR_SLACK` what the allocator holds beside it. `plan_passes` then
picks, for one batch:

* no recomputation when a pass of `SMALL_PASS` requests fits without it (recomputing re-runs
  every upper block in the backward pass: ~40 % more value-search time on the CPU);
* the pass size that is fastest on the device where it fits: on a GPU the largest (small passes
  are launch-bound), on a CPU `CPU_PASS` (measured: larger passes fall out of cache; BENCHMARKS.md);
* recomputation only when not even a pass of `SMALL_PASS` fits without it, with the largest
  pass size that then fits;
* an error naming the setting and the bytes when not even one request fits.

The budget is a share of the memory free on the device when the run is set up
(`memory_budget`): available RAM on the CPU, free device memory on CUDA, capped by
`values.memory_budget_gb`. The plan depends only on the budget and the batch, so a run that
records its budget (the method checkpoints it) plans every batch again the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SpherePLError

#: share of the free memory that `auto` may plan with: the CPU's RAM is shared with the
#: evaluation, the loggers and the rest of the machine; a GPU is the run's own
AUTO_SHARE = {"cpu": 0.5, "cuda": 0.8}
#: requests per pass on a CPU: the fastest in a scan at 2 threads, float32 and bfloat16 (8-16 within 7 %; BENCHMARKS.md)
CPU_PASS = 12
#: the smallest pass worth running without recomputation before recomputing instead
SMALL_PASS = 4
GB = 1024**3


class ValueMemoryError(SpherePLError, ValueError):
    """Not even one request's pass of the value search fits the memory budget."""

    hint = "raise values.memory_budget_gb (or free memory on the device), or shorten that record's prompt"


@dataclass(frozen=True)
class StackShapes:
    """What the memory of a pass over blocks [start, stop) and the LM head depends on."""

    hidden: int
    intermediate: int
    kv_dim: int  # key (= value) width of one token: key/value heads x head dim
    heads: int
    blocks: int
    vocab: int
    gated: bool  # a gated MLP (LLaMA, Qwen, Mistral): its backward keeps gate, activation and up

    @classmethod
    def of(cls, model, blocks: int) -> "StackShapes":
        c = model.config
        hidden = c.hidden_size
        heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
        head_dim = getattr(c, "head_dim", None) or hidden // heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        intermediate = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
        gated = getattr(c, "model_type", "") in ("llama", "qwen2", "mistral")
        return cls(hidden, intermediate, kv_heads * head_dim, heads, blocks, c.vocab_size, gated)

    def block_token_bytes(self, element: int, mlp_element: int) -> int:
        """Bytes autograd keeps per token in one block: four hidden-wide tensors (the normed inputs
        of attention and MLP, queries, the attention output), the MLP's intermediates (gated: gate,
        activation and up, at `mlp_element` bytes; GELU: the pre-activation and its elementwise
        intermediates) and per-head softmax statistics (measured: tests/editing/test_value_memory.py)."""
        mlp = 3 if self.gated else 5
        return 4 * self.hidden * element + mlp * self.intermediate * mlp_element + 2 * self.heads * 4


@dataclass(frozen=True)
class PassShape:
    """Token counts of one pass, padded as the search pads them."""

    sequences: int
    prefix: int  # longest prefix (tokens before the subject's last token)
    suffix: int  # longest suffix (from the subject's last token on)
    full: int  # longest whole sequence (the pass below the edited layer)
    logit_rows: int  # target tokens whose log-probabilities the loss reads
    kl_rows: int  # KL prompts (one per request)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a pass keeps: hidden-wide activations, the MLP's and attention's
    (bfloat16 products of a float32 model keep float32 residuals but half-size intermediates)."""

    hidden: int
    mlp: int
    kv: int


def kept_bytes(shapes: StackShapes, p: PassShape, recompute: bool, precision: Precision) -> int:
    """Bytes autograd keeps after a pass's forward for its backward: every upper block's activations
    (or, recomputing, only each block's input) and the log-probabilities over the vocabulary."""
    tokens = p.sequences * p.suffix
    kv = p.sequences * (p.prefix + p.suffix) * 2 * shapes.kv_dim * precision.kv  # keys and values attention keeps, per block
    if recompute:
        blocks = shapes.blocks * tokens * shapes.hidden * precision.hidden
    else:
        blocks = shapes.blocks * (tokens * shapes.block_token_bytes(precision.hidden, precision.mlp) + kv)
    return blocks + (p.logit_rows + p.kl_rows) * shapes.vocab * 4


def pass_bytes(shapes: StackShapes, p: PassShape, recompute: bool, precision: Precision) -> int:
    """Estimated peak of the bytes one pass of the value search holds allocated (tensors; what the
    allocator keeps beside them is `ALLOCATOR_SLACK`): what autograd keeps, the prefixes' keys and
    values, the gradient of the log-probabilities, one block re-run (recomputing) or the gradients
    flowing back through one, and the KL reference."""
    tokens = p.sequences * p.suffix
    kv = p.sequences * (p.prefix + p.suffix) * 2 * shapes.kv_dim * precision.kv
    one_block = tokens * shapes.block_token_bytes(precision.hidden, precision.mlp) + kv if recompute else 0
    prefix_cache = shapes.blocks * p.sequences * p.prefix * 2 * shapes.kv_dim * precision.kv
    logits = (p.logit_rows + p.kl_rows) * shapes.vocab * 4 + p.kl_rows * shapes.vocab * 4
    transient = tokens * (shapes.hidden + shapes.intermediate) * 4
    # the pass below the edited layer (no gradients): its output over whole sequences, one block's work
    below = p.sequences * p.full * (2 * shapes.hidden + 2 * shapes.intermediate) * 4
    return max(kept_bytes(shapes, p, recompute, precision) + one_block + prefix_cache + logits + transient, below)


#: resident memory per allocated byte at the value search's peak: glibc keeps freed blocks of one
#: step's tensors that the next step's do not fit (measured on SmolLM2: RSS 1.6x the allocated peak
#: with activations kept, 2.8x recomputed), CUDA's caching allocator its reserved blocks (1.33x on an H100)
ALLOCATOR_SLACK = {"cpu": 3.0, "cuda": 1.35}


@dataclass(frozen=True)
class PassPlan:
    """What one batch's value search runs with, and why."""

    requests_per_pass: int
    recompute: bool
    peak_bytes: int  # estimated peak of the largest pass, allocator slack included
    budget_bytes: int | None  # None: explicit settings, no budget applied

    def describe(self) -> str:
        text = f"{self.requests_per_pass} request(s) per pass, activations {'recomputed' if self.recompute else 'kept'}"
        text += f", largest pass ~{self.peak_bytes / GB:.2f} GB"
        return text + (f" of a {self.budget_bytes / GB:.2f} GB budget" if self.budget_bytes is not None else "")


def _largest_pass(shapes: StackShapes, passes: list[list[PassShape]], recompute: bool, precision: Precision, slack: float) -> int:
    return int(slack * max(pass_bytes(shapes, merge(group), recompute, precision) for group in passes))


def merge(parts: list[PassShape]) -> PassShape:
    """The padded shape of requests run together in one pass."""
    return PassShape(
        sequences=sum(q.sequences for q in parts),
        prefix=max(q.prefix for q in parts),
        suffix=max(q.suffix for q in parts),
        full=max(q.full for q in parts),
        logit_rows=sum(q.logit_rows for q in parts),
        kl_rows=sum(q.kl_rows for q in parts),
    )


def plan_passes(
    shapes: StackShapes, requests: list[PassShape], device_type: str, precision: Precision,
    requests_per_pass: int | str, recompute: bool | str, budget_bytes: int | None,
) -> PassPlan:
    """The pass size and recomputation for one batch, `requests` in the order passes are cut from.

    Explicit settings are kept as given (their estimate is still reported). `auto` ones follow the
    policy in the module docstring; raises `ValueMemoryError` when not even one request fits."""
    n = len(requests)

    def cut(size: int) -> list[list[PassShape]]:
        return [requests[i : i + size] for i in range(0, n, size)]

    def peak(size: int, again: bool) -> int:
        return _largest_pass(shapes, cut(size), again, precision, ALLOCATOR_SLACK["cuda" if device_type == "cuda" else "cpu"])

    fixed_size = None if requests_per_pass == "auto" else int(requests_per_pass)
    fixed_recompute = None if recompute == "auto" else bool(recompute)
    if fixed_size is not None and fixed_recompute is not None:
        return PassPlan(fixed_size, fixed_recompute, peak(fixed_size, fixed_recompute), None)
    if budget_bytes is None:
        raise ValueError("an `auto` value-search setting needs a memory budget")
    preferred = n if device_type == "cuda" else min(CPU_PASS, n)

    def largest_fitting(again: bool) -> int | None:
        if fixed_size is not None:
            return fixed_size if peak(fixed_size, again) <= budget_bytes else None
        size = preferred
        while size >= 1 and peak(size, again) > budget_bytes:
            size = size // 2 if size > 16 else size - 1  # halve the large ones, then step down
        return size if size >= 1 else None

    if fixed_recompute is None:
        small = min(SMALL_PASS, n) if fixed_size is None else fixed_size
        if peak(small, False) <= budget_bytes:
            size = largest_fitting(False)
            return PassPlan(size, False, peak(size, False), budget_bytes)
        size = largest_fitting(True)
        again = True
    else:
        size, again = largest_fitting(fixed_recompute), fixed_recompute
    if size is None:
        one = peak(1 if fixed_size is None else fixed_size, True if fixed_recompute is None else fixed_recompute)
        what = "one request" if fixed_size is None else f"a pass of {fixed_size} requests"
        raise ValueMemoryError(
            f"values: {what} needs ~{one / GB:.3f} GB in the value search "
            f"({'activations recomputed' if (fixed_recompute is None or fixed_recompute) else 'activations kept'}), "
            f"more than its memory budget of {budget_bytes / GB:.3f} GB (values.memory_budget_gb, or the free memory "
            "of the device): raise values.memory_budget_gb or free memory"
        )
    return PassPlan(size, again, peak(size, again), budget_bytes)


# --------------------------------------------------------------------------- free memory


def _cgroup_bytes_left() -> int | None:
    """Room left under the container's memory limit (cgroup v2 or v1), None where there is no limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except OSError:
            continue
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return max(int(limit) - usage, 0)
    return None


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device`: available RAM (under the container's limit) on the
    CPU; on CUDA the device's free memory plus what torch's caching allocator holds unused."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    available = int(psutil.virtual_memory().available)
    left = _cgroup_bytes_left()
    return available if left is None else min(available, left)


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes `auto` may plan a pass with, and where the figure came from (printed at set-up)."""

    bytes: int
    source: str


def memory_budget(device: torch.device, cap_gb: float | None) -> MemoryBudget:
    """`AUTO_SHARE` of the memory free on `device` now, capped by `cap_gb` (values.memory_budget_gb)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    free = free_bytes(device)
    share = int(AUTO_SHARE[kind] * free)
    where = "free GPU memory" if kind == "cuda" else "available RAM"
    source = f"{AUTO_SHARE[kind]:.0%} of {free / GB:.1f} GB {where}"
    if cap_gb is not None and cap_gb * GB < share:
        return MemoryBudget(int(cap_gb * GB), f"values.memory_budget_gb = {cap_gb:g} (below {source})")
    return MemoryBudget(share, source + (f"; values.memory_budget_gb = {cap_gb:g} is above it" if cap_gb is not None else ""))


def is_budget_gb(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0)


__all__ = [
    "ALLOCATOR_SLACK", "AUTO_SHARE", "CPU_PASS", "SMALL_PASS", "MemoryBudget", "PassPlan", "PassShape", "Precision", "StackShapes", "ValueMemoryError",
    "free_bytes", "kept_bytes", "memory_budget", "pass_bytes", "plan_passes",
]

"""UltraEdit (Gu et al., TMLR 2026; official code XiaojieGu/UltraEdit) with StableEdit's refinements
(ICML 2026; MINE-USTC/StableEdit) as options: a closed-form edit with no value optimisation and no
covariance statistics of a corpus, whose scale is kept by statistics of every edit so far.

Per batch (one "turn"):

1. The requests, sorted by token count (longest first), go through the model in mini-batches of
   `mini_batch`: one forward and backward pass each, the loss the cross-entropy of the answer tokens
   (the prompt is not scored). For every target linear layer, the input (its key) and the gradient of
   the loss w.r.t. its output are taken at every answer position: one row per token.
2. The **lifelong normalisation**: running mean and variance of the rows [key ; gradient], one set per
   weight shape (shared by every target of that shape), merged mini-batch by mini-batch, module by
   module, before the solve and kept across batches (never reset).
3. Per target: normalised keys k̂ and gradients ĝ; the row targets v = −lr · ‖k̂‖² · ĝ; the update is the
   ridge solve ΔWᵀ = (KᵀK + λI)⁻¹ Kᵀ V with the *raw* keys K (float32), written through the weight writer
   (so `SphereProjection` and every other filter act on it).

StableEdit's options: `ridge` (its λ = 10), `variance: exact` (the exact merge of the batch's biased
variance; UltraEdit counts the batch's unbiased variance m times), `whitening: full` (the gradient part
whitened by its full running covariance, Σ^{-1/2}, once there are more rows than its width) and a
statistics warm-up (`warmup_source`, `warmup_records`: the statistics only; StableEdit also applies the
warm-up edits). Differences from the official code: DEVIATIONS.md.
"""

from __future__ import annotations

import copy

import torch

from ...data.readers import load_edit_requests
from ...data.records import EditRequest
from ...errors import SettingsError
from ...models import linear_weight
from ...tracing import pad_id_lists
from ..lm import LoadedModel
from ..writer import WeightWriter
from .base import BatchEdit, EditMethod, register_method

VARIANCES = ("ultraedit", "exact")
WHITENINGS = ("diagonal", "full")
EIGEN_FLOOR = 1e-6  # StableEdit's floor on the covariance's eigenvalues before Σ^{-1/2}


@register_method("ultraedit")
class UltraEdit(EditMethod):
    """Args:
    targets: the linear layers edited, as {submodule of a block: [layer indices]} (default: the official
        LLaMA3-8B setting, gate_proj of layers 11-15 and up_proj of 18-24).
    lr: the scale of the row targets v = −lr · ‖k̂‖² · ĝ (1e-6, the official value for 7-8B models).
    ridge: λ of the solve (KᵀK + λI) (1, UltraEdit's; StableEdit uses 10).
    mini_batch: requests per forward/backward pass (10, as the official code).
    variance: how a mini-batch's variance is merged into the running one: `ultraedit` (the official
        m · unbiased variance) or `exact` (StableEdit's m · biased variance, the exact merge).
    whitening: `diagonal` (UltraEdit: every dimension standardised) or `full` (StableEdit: the gradient
        part whitened by its running covariance once it has more rows than dimensions; keys diagonal).
    warmup_source: edit records whose keys and gradients fill the statistics before the first edit
        (nothing is written); None: no warm-up (UltraEdit).
    warmup_records: how many of them (the first ones of the file).
    keep_states: statistics kept for reverting that many batches exactly (rollback, the collapse guard).
    """

    sphere_strength = 0.8

    def __init__(
        self,
        targets: dict[str, list[int]] | None = None,
        lr: float = 1e-6,
        ridge: float = 1.0,
        mini_batch: int = 10,
        variance: str = "ultraedit",
        whitening: str = "diagonal",
        warmup_source: str | None = None,
        warmup_records: int = 0,
        keep_states: int = 8,
    ):
        targets = {"mlp.gate_proj": [11, 12, 13, 14, 15], "mlp.up_proj": [18, 19, 20, 21, 22, 23, 24]} if targets is None else targets
        if not targets or any(not layers for layers in targets.values()):
            raise SettingsError(f"ultraedit targets must name at least one submodule with at least one layer, got {targets}")
        pairs = [(suffix, layer) for suffix, layers in targets.items() for layer in layers]
        if len(set(pairs)) != len(pairs):
            raise SettingsError(f"ultraedit targets list a module more than once: {targets}")
        super().__init__(sorted({layer for _, layer in pairs}))
        for name, value, rule in (("lr", lr, lr > 0), ("ridge", ridge, ridge > 0)):
            if not (isinstance(value, (int, float)) and rule):
                raise SettingsError(f"ultraedit.{name} = {value!r} must be a positive number")
        for name, value, least in (("mini_batch", mini_batch, 1), ("warmup_records", warmup_records, 0), ("keep_states", keep_states, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise SettingsError(f"ultraedit.{name} = {value!r} must be an integer >= {least}")
        if variance not in VARIANCES:
            raise SettingsError(f"ultraedit.variance must be one of {list(VARIANCES)}, got {variance!r}")
        if whitening not in WHITENINGS:
            raise SettingsError(f"ultraedit.whitening must be one of {list(WHITENINGS)}, got {whitening!r}")
        if warmup_records and not warmup_source:
            raise SettingsError("ultraedit.warmup_records needs warmup_source: the edit records whose statistics warm up")
        self.targets = {suffix: list(layers) for suffix, layers in targets.items()}
        self.lr, self.ridge, self.mini_batch = float(lr), float(ridge), mini_batch
        self.variance, self.whitening = variance, whitening
        self.warmup_source, self.warmup_records, self.keep_states = warmup_source, warmup_records, keep_states
        self.statistics: dict[str, dict[str, torch.Tensor]] = {}  # per weight shape "in x out"
        self.history: list[dict] = []  # the statistics before each of the last `keep_states` batches

    # ------------------------------------------------------------------ what is edited
    def _pairs(self) -> list[tuple[str, int]]:
        return [(suffix, layer) for suffix, layers in self.targets.items() for layer in layers]

    def edited_modules(self, templates) -> list[str]:
        return [f"{templates.layer_at(layer)}.{suffix}" for suffix, layer in self._pairs()]

    def weight_labels(self) -> list[str]:
        pairs = self._pairs()
        one_each = len({layer for _, layer in pairs}) == len(pairs)
        return [f"layer{layer}" if one_each else f"layer{layer}.{suffix.rsplit('.', 1)[-1]}" for suffix, layer in pairs]

    def settings(self) -> dict:
        return {**super().settings(), "targets": self.targets, "lr": self.lr, "ridge": self.ridge, "mini_batch": self.mini_batch,
                "variance": self.variance, "whitening": self.whitening, "warmup_source": self.warmup_source,
                "warmup_records": self.warmup_records}

    # ------------------------------------------------------------------ the edit
    def edit(self, lm: LoadedModel, requests: list[EditRequest], writer: WeightWriter) -> BatchEdit:
        statistics = copy.deepcopy(self.statistics)
        names = self.edited_modules(lm.templates)
        if not _rows(statistics) and self.warmup_records:
            with lm.timer("warmup"):
                self._collect(lm, load_edit_requests(self.warmup_source)[: self.warmup_records], names, statistics)
        with lm.timer("keys"):
            keys, gradients, loss = self._collect(lm, requests, names, statistics)
        shift_norms = []
        with lm.timer("solve"):
            for name in names:
                weight = linear_weight(lm.model.get_submodule(name))
                shape = _shape_key(weight)
                k, g = torch.cat(keys[name]), torch.cat(gradients[name])  # (rows, d_in), (rows, d_out), float32
                k_hat, g_hat = self._normalised(statistics[shape], k, g)
                values = -self.lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat
                gram = k.T @ k + self.ridge * torch.eye(k.shape[1], dtype=k.dtype, device=k.device)
                shift = torch.linalg.solve(gram, k.T @ values)  # (d_in, d_out)
                shift_norms.append(float(shift.norm()))
                writer.write(name, shift.T.to(weight.device))
        return BatchEdit(info={"answer_loss": loss, "rows": float(sum(len(k) for k in keys[names[0]])),
                               "mean_shift_norm": sum(shift_norms) / len(shift_norms)}, state=statistics)

    def _collect(self, lm: LoadedModel, requests: list[EditRequest], names: list[str], statistics: dict):
        """Keys and output gradients of every target at every answer token, mini-batch by mini-batch (sorted by
        token count, longest first); `statistics` take in each mini-batch's rows, module by module."""
        encoded = sorted((self._encode(lm, r) for r in requests), key=lambda e: len(e[0]), reverse=True)
        keys = {name: [] for name in names}
        gradients = {name: [] for name in names}
        losses = []
        for start in range(0, len(encoded), self.mini_batch):
            part = encoded[start : start + self.mini_batch]
            captured, loss = self._keys_and_gradients(lm, part, names)
            losses.append(loss)
            for name in names:
                k, g = captured[name]
                _merge(statistics.setdefault(_shape_key(linear_weight(lm.model.get_submodule(name))), {}), torch.cat([k, g], dim=1),
                       self.variance, self.whitening == "full", k.shape[1])
                keys[name].append(k)
                gradients[name].append(g)
        return keys, gradients, sum(losses) / len(losses)

    @staticmethod
    def _encode(lm: LoadedModel, request: EditRequest) -> tuple[list[int], list[int]]:
        """(input ids, answer ids): the prompt as the tokenizer gives it, then the answer but its last token."""
        tok = lm.tokenizer
        prompt = tok(request.rewrite_prompt)["input_ids"]
        answer = tok(" " + request.target_new, add_special_tokens=False)["input_ids"]
        return prompt + answer[:-1], answer

    @staticmethod
    def _keys_and_gradients(lm: LoadedModel, part: list[tuple[list[int], list[int]]], names: list[str]):
        """One forward and backward pass of a mini-batch: {module: (keys, gradients)} at the answer positions
        (rows in batch-major order), and the mean cross-entropy of the answer tokens."""
        model = lm.model
        batch = pad_id_lists([ids for ids, _ in part], lm.tokenizer.pad_token_id, lm.device)
        scored = torch.zeros(batch["input_ids"].shape, dtype=torch.bool, device=lm.device)
        labels = torch.zeros(batch["input_ids"].shape, dtype=torch.long, device=lm.device)
        for i, (ids, answer) in enumerate(part):
            first = len(ids) - len(answer)  # the last prompt token predicts the first answer token
            scored[i, first : first + len(answer)] = True
            labels[i, first : first + len(answer)] = torch.tensor(answer, device=lm.device)
        keys, outputs = {}, {}

        def hook(name):
            def record(module, inputs, output):
                keys[name] = inputs[0][scored].detach().float()
                outputs[name] = output
            return record

        def differentiable(module, inputs, output):  # the weights stay frozen: gradients flow through activations only
            return output.detach().requires_grad_(True)

        handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
        handles.append(model.get_input_embeddings().register_forward_hook(differentiable))
        try:
            with torch.enable_grad():
                logits = model(**batch, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[scored].float(), labels[scored])
                grads = torch.autograd.grad(loss, [outputs[name] for name in names])
        finally:
            for handle in handles:
                handle.remove()
        return {name: (keys[name], grad[scored].detach().float()) for name, grad in zip(names, grads)}, float(loss.detach())

    def _normalised(self, stats: dict, k: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k̂, ĝ): both standardised per dimension, or (`whitening: full`, once the gradient covariance has more
        rows than dimensions) the gradients whitened by Σ^{-1/2}."""
        eps = torch.finfo(torch.float32).eps
        z = (torch.cat([k, g], dim=1) - stats["mean"]) / (stats["std"] + eps)
        k_hat, g_hat = z[:, : k.shape[1]], z[:, k.shape[1] :]
        d_out = g.shape[1]
        if self.whitening == "full" and float(stats["n"]) > d_out + 1:
            sigma = stats["cov_m2"] / (stats["n"] - d_out - 1 + eps)
            eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
            inverse_root = eigenvectors @ torch.diag(eigenvalues.clamp(min=EIGEN_FLOOR).rsqrt()) @ eigenvectors.T
            g_hat = (g - stats["mean"][k.shape[1] :]) @ inverse_root
        return k_hat, g_hat

    # ------------------------------------------------------------------ state
    def commit(self, state) -> None:
        if self.keep_states:
            self.history = (self.history + [self.statistics])[-self.keep_states :]
        self.statistics = state

    def get_extra_state(self):
        return {"statistics": self.statistics, "history": self.history}

    def set_extra_state(self, state):
        self.statistics = state.get("statistics", {})
        self.history = list(state.get("history", []))

    @classmethod
    def revert_state(cls, state: dict, num_batches: int) -> dict:
        extra = state["_extra_state"]
        history = list(extra["history"])
        if num_batches > len(history):
            raise ValueError(f"cannot revert {num_batches} batches: UltraEdit keeps the statistics of the last {len(history)} batch(es) "
                             "(raise keep_states)")
        return {**state, "_extra_state": {"statistics": history[-num_batches], "history": history[:-num_batches]}}


def _shape_key(weight: torch.Tensor) -> str:
    """The official code's key of a weight shape: in x out (one set of statistics per shape)."""
    return f"{weight.shape[1]}x{weight.shape[0]}"


def _rows(statistics: dict) -> float:
    return sum(float(s["n"]) for s in statistics.values())


def _merge(stats: dict, x: torch.Tensor, variance: str, covariance: bool, d_in: int) -> None:
    """Fold the rows `x` (m x width, float32) into the running statistics (n, mean, M2, std; and with
    `covariance` the gradient part's M2 matrix), in place. `variance: ultraedit` merges m times the batch's
    unbiased variance, as the official code; `exact`, m times its biased variance (a one-row batch: 0)."""
    m = x.shape[0]
    if not stats:
        width = x.shape[1]
        stats.update(n=torch.zeros((), dtype=x.dtype, device=x.device), mean=torch.zeros(width, dtype=x.dtype, device=x.device),
                     m2=torch.zeros(width, dtype=x.dtype, device=x.device), std=torch.zeros(width, dtype=x.dtype, device=x.device))
    if covariance and "cov_m2" not in stats:
        d_out = x.shape[1] - d_in
        stats["cov_m2"] = torch.zeros(d_out, d_out, dtype=x.dtype, device=x.device)
    n_before = stats["n"].clone()
    n = n_before + m
    batch_mean = x.mean(0)
    delta = batch_mean - stats["mean"]
    batch_variance = x.var(0, unbiased=variance == "ultraedit") if m > 1 else torch.zeros_like(batch_mean)
    stats["mean"] = stats["mean"] + m * delta / n
    stats["m2"] = stats["m2"] + m * batch_variance + n_before * m * delta.pow(2) / n
    stats["std"] = (stats["m2"] / (n - 1 + torch.finfo(x.dtype).eps)).sqrt()
    if covariance:
        g = x[:, d_in:]
        centred = g - batch_mean[d_in:]
        delta_g = delta[d_in:]
        stats["cov_m2"] = stats["cov_m2"] + centred.T @ centred + n_before * m / n * torch.outer(delta_g, delta_g)
    stats["n"] = n

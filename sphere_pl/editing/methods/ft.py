"""FT-L (SPEC section 4): constrained fine-tuning of one layer's down-projection.

Adam optimises only the edited weight on the official baseline's schedule
(`baselines/ft/ft_main.py`): `num_steps` epochs over the batch's requests in minibatches of
`batch_size` (64), one Adam step per minibatch, so 100 requests take 2 steps an epoch. The loss
of a minibatch: at the last prompt token, the mean over the target's tokens of −log p(token)
(every target token is scored at that one position), averaged over its requests. A minibatch
whose loss is already below `early_stop_loss` (1e-2) takes no step, and the epochs end once an
epoch's mean loss (weighted by minibatch size) is below it. With `norm_constraint` ε, every entry
is clamped to W₀ ± ε after each minibatch. The change W − W₀ is then restored and written
through the writer (and with it through the SPHERE projection on W₀).

Targets: by default tokenised without special tokens and scored only on their own tokens.
`official_targets: true` reproduces the official code instead, which tokenises the targets as
prompts (a tokenizer that adds BOS, such as LLaMA3's, puts it first among the target tokens) and
scores the padding of the shorter targets too (its mask leaves out only `unk` tokens).
"""

from __future__ import annotations

import torch

from ...errors import SettingsError
from ...data.records import EditRequest
from ...models import linear_weight
from ...tracing import pad_id_lists
from ..lm import LoadedModel
from ..writer import WeightWriter
from .base import BatchEdit, EditMethod, register_method, single_layer


@register_method("ft")
class FineTune(EditMethod):
    """Args:
    layer: the layer whose down-projection is fine-tuned (the paper: 21 on LLaMA3-8B).
    layers: accepted as a one-element list instead of `layer`; several are refused.
    num_steps: epochs over the batch at most (25); each takes one Adam step per minibatch.
    batch_size: requests per minibatch (64, as the official code).
    lr: Adam learning rate (5e-4).
    weight_decay: Adam weight decay (0).
    norm_constraint: ε, the largest change of any entry (None: unconstrained, as for LLaMA3-8B).
    early_stop_loss: no step on a minibatch whose loss is below this, and no more epochs once an
        epoch's mean loss is below it (1e-2).
    official_targets: tokenise targets with the tokenizer's special tokens and score their padding,
        as the official code (off: only the target's own tokens).
    """

    def __init__(
        self,
        layer: int = 21,
        num_steps: int = 25,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        norm_constraint: float | None = None,
        early_stop_loss: float = 1e-2,
        layers: list[int] | None = None,
        batch_size: int = 64,
        official_targets: bool = False,
    ):
        super().__init__([single_layer(self, layer, layers)])
        if not (isinstance(num_steps, int) and num_steps >= 1):
            raise SettingsError(f"num_steps = {num_steps!r} must be an integer >= 1: the edit would change nothing")
        if not lr > 0:
            raise SettingsError(f"lr = {lr} must be > 0: the edit would change nothing")
        if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
            raise SettingsError(f"batch_size = {batch_size!r} must be an integer >= 1")
        if norm_constraint is not None and not norm_constraint > 0:
            raise SettingsError(f"norm_constraint = {norm_constraint} must be > 0 (or None for no bound)")
        self.num_steps, self.lr, self.weight_decay = num_steps, lr, weight_decay
        self.norm_constraint = norm_constraint
        self.early_stop_loss = early_stop_loss
        self.batch_size, self.official_targets = batch_size, official_targets

    def settings(self) -> dict:
        return {
            **super().settings(),
            "num_steps": self.num_steps,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "norm_constraint": self.norm_constraint,
            "early_stop_loss": self.early_stop_loss,
            "batch_size": self.batch_size,
            "official_targets": self.official_targets,
        }

    def edit(self, lm: LoadedModel, requests: list[EditRequest], writer: WeightWriter) -> BatchEdit:
        name = lm.templates.down_proj_at(self.layers[0])
        module = lm.model.get_submodule(name)
        original = linear_weight(module).detach().clone()
        minibatches = [self._batch(lm, requests[i : i + self.batch_size]) for i in range(0, len(requests), self.batch_size)]
        steps, epoch_loss = 0, float("nan")
        with writer.training(name) as param:  # the weight is put back exactly afterwards; the change is written as a delta
            optimizer = torch.optim.Adam([param], lr=self.lr, weight_decay=self.weight_decay)
            with lm.timer("value_optimisation"):
                for _ in range(self.num_steps):
                    total = 0.0
                    for batch, last, targets, mask in minibatches:
                        loss = self._loss(lm.model, batch, last, targets, mask)
                        loss_value = float(loss.detach())
                        total += loss_value * len(last)
                        if loss_value >= self.early_stop_loss:
                            optimizer.zero_grad()
                            loss.backward()
                            optimizer.step()
                            steps += 1
                        if self.norm_constraint is not None:
                            with torch.no_grad():
                                w = linear_weight(module)
                                w.copy_(torch.clamp(w, original - self.norm_constraint, original + self.norm_constraint))
                    epoch_loss = total / len(requests)
                    if epoch_loss < self.early_stop_loss:
                        break
            delta = linear_weight(module).detach() - original
        writer.write(name, delta)
        return BatchEdit(info={"value_loss": epoch_loss, "value_steps": float(steps)})

    def _batch(self, lm: LoadedModel, requests: list[EditRequest]):
        """Right-padded prompts, each prompt's last position, and the padded target ids with their mask."""
        tok = lm.tokenizer
        prompts = [tok(r.rewrite_prompt)["input_ids"] for r in requests]
        targets = [tok(" " + r.target_new, add_special_tokens=self.official_targets)["input_ids"] for r in requests]
        batch = pad_id_lists(prompts, tok.pad_token_id, lm.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=lm.device)
        width = max(len(t) for t in targets)
        target_ids = torch.full((len(targets), width), tok.pad_token_id if self.official_targets else 0, dtype=torch.long, device=lm.device)
        mask = torch.zeros(len(targets), width, device=lm.device)
        for i, t in enumerate(targets):
            target_ids[i, : len(t)] = torch.tensor(t, device=lm.device)
            mask[i, : len(t)] = 1
        if self.official_targets:  # every slot but `unk` scored, padding included
            mask = (target_ids != tok.unk_token_id).float() if tok.unk_token_id is not None else torch.ones_like(mask)
        return batch, last, target_ids, mask

    @staticmethod
    def _loss(model, batch, last, targets, mask) -> torch.Tensor:
        logits = model(**batch, use_cache=False).logits[torch.arange(len(last), device=last.device), last]
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision up to float32, float64 kept
        log_probs = torch.log_softmax(wide, dim=-1).gather(1, targets)  # every target token at the last position
        return (-(log_probs * mask).sum(1) / mask.sum(1)).mean()

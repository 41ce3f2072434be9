"""FT-L (SPEC section 4): constrained fine-tuning of one layer's down-projection.

Adam optimises only the edited weight, all requests of the batch together, for at most
`num_steps` steps. The loss follows the official baseline (`baselines/ft/ft_main.py`): at
the last prompt token, the mean over the target's tokens of −log p(token) (every target
token is scored at that one position). A step is skipped when the loss is already below
`early_stop_loss` (1e-2), which also ends the loop. With `norm_constraint` ε, every entry is
clamped to W₀ ± ε after each step. The change W − W₀ is then restored and written through
the writer (and with it through the SPHERE projection on W₀).

One deviation: targets are tokenised without special tokens (the official code lets a
tokenizer that adds BOS, such as LLaMA3's, put it among the target tokens).
"""

from __future__ import annotations

import torch

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
    num_steps: Adam steps at most (25).
    lr: Adam learning rate (5e-4).
    weight_decay: Adam weight decay (0).
    norm_constraint: ε, the largest change of any entry (None: unconstrained, as for LLaMA3-8B).
    early_stop_loss: stop once the loss is below this (1e-2).
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
    ):
        super().__init__([single_layer(self, layer, layers)])
        if not (isinstance(num_steps, int) and num_steps >= 1):
            raise ValueError(f"num_steps = {num_steps!r} must be an integer >= 1: the edit would change nothing")
        if not lr > 0:
            raise ValueError(f"lr = {lr} must be > 0: the edit would change nothing")
        if norm_constraint is not None and not norm_constraint > 0:
            raise ValueError(f"norm_constraint = {norm_constraint} must be > 0 (or None for no bound)")
        self.num_steps, self.lr, self.weight_decay = num_steps, lr, weight_decay
        self.norm_constraint = norm_constraint
        self.early_stop_loss = early_stop_loss

    def settings(self) -> dict:
        return {
            **super().settings(),
            "num_steps": self.num_steps,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "norm_constraint": self.norm_constraint,
            "early_stop_loss": self.early_stop_loss,
        }

    def edit(self, lm: LoadedModel, requests: list[EditRequest], writer: WeightWriter) -> BatchEdit:
        name = lm.templates.down_proj_at(self.layers[0])
        module = lm.model.get_submodule(name)
        original = linear_weight(module).detach().clone()
        batch, last, targets, mask = self._batch(lm, requests)
        steps, loss_value = 0, float("nan")
        with writer.training(name) as param:  # the weight is put back exactly afterwards; the change is written as a delta
            optimizer = torch.optim.Adam([param], lr=self.lr, weight_decay=self.weight_decay)
            with lm.timer("value_optimisation"):
                for _ in range(self.num_steps):
                    loss = self._loss(lm.model, batch, last, targets, mask)
                    loss_value = float(loss.detach())
                    if loss_value >= self.early_stop_loss:
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                        steps += 1
                    if self.norm_constraint is not None:
                        with torch.no_grad():
                            w = linear_weight(module)
                            w.copy_(torch.clamp(w, original - self.norm_constraint, original + self.norm_constraint))
                    if loss_value < self.early_stop_loss:
                        break
            delta = linear_weight(module).detach() - original
        writer.write(name, delta)
        return BatchEdit(info={"value_loss": loss_value, "value_steps": float(steps)})

    @staticmethod
    def _batch(lm: LoadedModel, requests: list[EditRequest]):
        """Right-padded prompts, each prompt's last position, and the padded target ids with their mask."""
        tok = lm.tokenizer
        prompts = [tok(r.rewrite_prompt)["input_ids"] for r in requests]
        targets = [tok(" " + r.target_new, add_special_tokens=False)["input_ids"] for r in requests]
        batch = pad_id_lists(prompts, tok.pad_token_id, lm.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=lm.device)
        width = max(len(t) for t in targets)
        target_ids = torch.zeros(len(targets), width, dtype=torch.long, device=lm.device)
        mask = torch.zeros(len(targets), width, device=lm.device)
        for i, t in enumerate(targets):
            target_ids[i, : len(t)] = torch.tensor(t, device=lm.device)
            mask[i, : len(t)] = 1
        return batch, last, target_ids, mask

    @staticmethod
    def _loss(model, batch, last, targets, mask) -> torch.Tensor:
        logits = model(**batch, use_cache=False).logits[torch.arange(len(last), device=last.device), last]
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(1, targets)  # every target token at the last position
        return (-(log_probs * mask).sum(1) / mask.sum(1)).mean()

"""PARP: prune, adjust, re-prune (Lai et al. 2021, "PARP: Prune, Adjust and Re-Prune for
Self-Supervised Speech Recognition"), as pass 2 after dense fine-tuning.

The magnitude mask at the target is taken from the fine-tuned model and the pruned weights
are set to zero ONCE: no mask is held, so they keep receiving gradient and may grow back
("adjust"). Every ``every`` steps, and at the end, the model is re-pruned to the target by
magnitude (zeroed again, again free to revive); the final re-prune is the exported mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pinchgate.errors import PinchgateError
from pinchgate.methods.base import BaselineMethod, zero_pruned
from pinchgate.methods.magnitude import check_allocation, magnitude_masks


@dataclass
class ParpOptions:
    every: int | None = None  # steps between re-prunes; default max_steps // 10
    allocation: str = "uniform"  # uniform | global

    def check(self, spec: str, max_steps: int) -> None:
        if self.every is not None and self.every < 1:
            raise PinchgateError(f"--method {spec}: every must be >= 1")
        check_allocation(spec, self.allocation)


class Parp(BaselineMethod):
    name = "parp"

    def setup(self, model: nn.Module) -> None:
        self.every = self.options.every or max(1, self.cfg.max_steps // 10)
        self.reprune()

    def reprune(self) -> tuple[list[Tensor], list[float]]:
        scores = [layer.weight().abs() for layer in self.layers]
        masks, thresholds = magnitude_masks(scores, self.target.kept, self.options.allocation)
        for layer, mask in zip(self.layers, masks, strict=True):
            zero_pruned(layer, mask)
        self.masks: list[Tensor] | None = masks  # to count the revived weights
        return masks, thresholds

    def load_state(self, state: dict) -> None:
        self.masks = None  # the last re-prune's mask is not saved: no count until the next

    def revived(self) -> int | None:
        """Weights pruned at the last re-prune that are nonzero now."""
        if self.masks is None:
            return None
        with torch.no_grad():
            return sum(
                int(torch.count_nonzero(layer.weight()[~mask]))
                for layer, mask in zip(self.layers, self.masks, strict=True)
            )

    def after_step(self, model: nn.Module, step: int) -> dict:
        due = step % self.every == 0 and step < self.cfg.max_steps  # the last one: finalize
        if not (due or step % self.cfg.log_every == 0 or step == self.cfg.max_steps):
            return {}
        logs = {"revived": self.revived()}
        if due:
            self.reprune()
            logs["repruned_at"] = step
        return logs

    def final_masks(self) -> tuple[list[Tensor], list[float], dict]:
        masks, thresholds = self.reprune()
        extra = {"allocation": self.options.allocation, "reprune_every": self.every}
        return masks, thresholds, extra

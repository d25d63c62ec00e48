"""One-shot magnitude pruning of a fine-tuned model, then fine-tuning with the mask fixed.

Pass 1 is dense fine-tuning (``dense.py``, or a given ``--dense-reference`` run); this file is
pass 2. ``ump`` (uniform magnitude pruning, the paper's baseline) removes the same proportion
of every gated matrix by |W|; ``gmp-global`` removes the smallest |W| of all gated matrices
under one threshold. Either way exactly the target number of gated weights is kept (ties at
the cut are broken by position), so the count is exact from the first step of pass 2.
"""

from __future__ import annotations

from torch import Tensor, nn

from pinchgate.baselines.pruning import PruningMethod, attach_mask, current_mask, magnitude_masks


class OneShotMagnitude(PruningMethod):
    allocation = "uniform"

    def setup(self, model: nn.Module) -> None:
        scores = [layer.weight().abs() for layer in self.layers]
        masks, self.thresholds = magnitude_masks(scores, self.target.kept, self.allocation)
        for layer, mask in zip(self.layers, masks, strict=True):
            attach_mask(layer, mask)

    def final_masks(self) -> tuple[list[Tensor], list[float], dict]:
        masks = [current_mask(layer) for layer in self.layers]
        return masks, self.thresholds, {"allocation": self.allocation}


class UniformMagnitude(OneShotMagnitude):
    name = "ump"
    allocation = "uniform"


class GlobalMagnitude(OneShotMagnitude):
    name = "gmp-global"
    allocation = "global"

"""Dense CTC fine-tuning as a "method": nothing is pruned, the report says ratio 1.

It is the reference accuracy and the first pass of every two-pass baseline (UMP, global
magnitude pruning, PARP); its summary counts the same gated matrices as every other method.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pinchgate.methods.base import BaselineMethod


class DenseMethod(BaselineMethod):
    name = "dense"

    def final_masks(self) -> tuple[list[Tensor], list[float], dict]:
        masks = [torch.ones_like(layer.weight(), dtype=torch.bool) for layer in self.layers]
        return masks, [0.0] * len(self.layers), {}

"""One-shot magnitude pruning of a fine-tuned model, then fine-tuning with the mask fixed.

Pass 1 is dense fine-tuning (``dense.py``, or a given ``--dense-reference`` run); this file is
pass 2. ``ump`` (uniform magnitude pruning, the paper's baseline) removes the same proportion
of every gated matrix by |W|; ``global-magnitude`` (formerly ``gmp-global``) removes the
smallest |W| of all gated matrices under one threshold, once. Either way exactly the target
number of gated weights is kept (ties at the cut are broken by position), so the count is
exact from the first step of pass 2.
The magnitude-mask maths here is shared by gradual pruning, PARP and STR.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pinchgate.errors import PinchgateError
from pinchgate.methods.base import BaselineMethod, attach_mask, current_mask

ALLOCATIONS = ("uniform", "global")


def check_allocation(spec: str, allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise PinchgateError(f"--method {spec}: allocation must be uniform or global")


def uniform_kept_counts(kept: int, numels: list[int]) -> list[int]:
    """Split ``kept`` over layers in proportion to their sizes by largest remainder (integer
    arithmetic): every layer at the same sparsity within one weight, the sum exactly ``kept``."""
    total = sum(numels)
    if not 0 <= kept <= total:
        raise ValueError(f"kept count {kept} outside [0, {total}]")
    counts = [kept * n // total for n in numels]
    order = sorted(range(len(numels)), key=lambda i: (-(kept * numels[i] % total), i))
    for i in order[: kept - sum(counts)]:
        counts[i] += 1
    return counts


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest scores (exactly k, whatever the ties)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view(scores.shape)


def largest_pruned(scores: Tensor, mask: Tensor) -> float:
    """The highest score left out (0 when nothing is): the layer's magnitude threshold."""
    pruned = scores[~mask]
    return float(pruned.max()) if pruned.numel() else 0.0


def magnitude_masks(
    scores: list[Tensor], kept: int, allocation: str
) -> tuple[list[Tensor], list[float]]:
    """Keep the ``kept`` largest scores (e.g. |W|): the same proportion of every layer
    (``uniform``) or one threshold across all layers (``global``). Returns the masks and each
    layer's threshold (its largest pruned score)."""
    if allocation == "uniform":
        counts = uniform_kept_counts(kept, [s.numel() for s in scores])
        masks = [top_k_mask(s, k) for s, k in zip(scores, counts, strict=True)]
    elif allocation == "global":
        flat = torch.cat([s.reshape(-1).float() for s in scores])
        everything = top_k_mask(flat, kept)
        masks = [
            m.view(s.shape)
            for m, s in zip(everything.split([s.numel() for s in scores]), scores, strict=True)
        ]
    else:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    return masks, [largest_pruned(s, m) for s, m in zip(scores, masks, strict=True)]


class OneShotMagnitude(BaselineMethod):
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
    name = "global-magnitude"
    allocation = "global"

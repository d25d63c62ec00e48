"""Sparsity control: compression ratio <-> gated sparsity, and the Lagrangian controller.

Vocabulary:
* total params P: every parameter of the exported model; gated params G <= P.
* compression ratio r = P / kept params, where ungated parameters all count as kept
  (the figure the paper reports).
* gated sparsity s = pruned gated weights / G. Every pruned weight is a gated one, so
  r = P / (P - s G) and s = (P - P / r) / G.

The controller (reference design from CoFi, Xia et al. 2022, and DPHuBERT, Peng et al. 2023):

    L = L_task + lambda1 * (s_soft - s_target(step)) + lambda2 * (s_soft - s_target(step))**2

with s_soft = 1 - (soft kept fraction). The model (weights and thresholds) minimises L; the
multipliers lambda1, lambda2 maximise it (gradient ASCENT: they sit in an optimiser group with
``maximize=True``). lambda2 only grows, making deviation ever costlier; lambda1 drifts to
whatever sign pushes s toward the target. s_target ramps linearly from 0 to the final target
over the first ``ramp_fraction`` of the steps so early training is not shocked.

Learning rates (the multipliers' group here, the thresholds' in ``methods.gates``) follow the
weights' schedule (warm-up, decay) like every group of the optimiser. Adam moves a multiplier
by about its learning rate per step while the gap keeps one sign, and lambda2's gradient
(gap**2) never changes sign, so the multipliers' range of motion grows with the number of
steps: ``lr`` is the rate of a run whose target ramps over at most ``REFERENCE_RAMP_STEPS``
steps, and a longer ramp scales it by ``REFERENCE_RAMP_STEPS / ramp_steps``, so that a
20,000-step run moves its multipliers no further than a 1,000-step one (the thresholds' default
rate, 3 / ramp steps, is scaled the same way). Shorter runs are unchanged.

The soft fraction differs from the hard one (1[|W| > t]) while tau is wide; passing the hard
fraction of the same forward as ``hard_kept`` makes the multipliers see the hard gap while the
gradient still flows through the soft one (straight-through). Either way the Lagrangian alone
lands near the target, not on it: finish with ``GatedModel.fit_thresholds`` (exact).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pinchgate.config import CONTROLS

# The longest target ramp (steps) at which the multipliers take their learning rate unscaled:
# that of the toy preset (1000 steps, 30% ramp), where the default 0.05 was chosen.
REFERENCE_RAMP_STEPS = 300


def _check_counts(total_params: int, gated_params: int) -> None:
    if total_params <= 0:
        raise ValueError(f"total parameter count must be > 0, got {total_params}")
    if not 0 < gated_params <= total_params:
        raise ValueError(
            f"gated parameter count must be in (0, total={total_params}], got {gated_params}"
        )


def max_compression_ratio(total_params: int, gated_params: int) -> float:
    """The ratio reached if every gated weight were pruned (inf when everything is gated)."""
    _check_counts(total_params, gated_params)
    ungated = total_params - gated_params
    return math.inf if ungated == 0 else total_params / ungated


def gated_sparsity_for_ratio(
    compression_ratio: float, total_params: int, gated_params: int
) -> float:
    """Gated sparsity that gives a whole-model compression ratio (total / kept params)."""
    _check_counts(total_params, gated_params)
    if not (math.isfinite(compression_ratio) and compression_ratio > 1.0):
        raise ValueError(f"compression ratio must be a finite number > 1, got {compression_ratio}")
    pruned = total_params - total_params / compression_ratio
    sparsity = pruned / gated_params
    if sparsity >= 1.0:
        raise ValueError(
            f"ratio {compression_ratio:g}x needs gated sparsity {sparsity:.3g} but only "
            f"{gated_params} of {total_params} parameters are gated; the highest reachable "
            f"ratio is {max_compression_ratio(total_params, gated_params):.4g}x "
            f"(all gated weights pruned)"
        )
    return sparsity


def compression_ratio_for_gated_sparsity(
    gated_sparsity: float, total_params: int, gated_params: int
) -> float:
    """Whole-model compression ratio (total / kept params) at a gated sparsity."""
    _check_counts(total_params, gated_params)
    if not 0.0 <= gated_sparsity < 1.0:
        raise ValueError(f"gated sparsity must be in [0, 1), got {gated_sparsity}")
    return total_params / (total_params - gated_sparsity * gated_params)


class SparsityController(nn.Module):
    """Lagrangian sparsity term with multipliers trained by gradient ascent.

    ``control="penalty"`` is the plain quadratic penalty instead, for ablations:
    ``penalty_weight * gap**2`` with a fixed weight (lambda1 = 0, lambda2 = the weight,
    neither trained), the term a Lagrangian reduces to when its multipliers stand still.

    Usage::

        controller = SparsityController(0.75, total_steps, ramp_fraction=0.3, lr=0.05)
        optimizer = torch.optim.AdamW([...model groups..., controller.param_group()])
        kept = gates.kept_fractions()                       # after the forward
        loss = task_loss + controller.loss(kept.soft, step, hard_kept=kept.hard)
    """

    def __init__(
        self,
        target_sparsity: float,
        total_steps: int,
        ramp_fraction: float = 0.3,
        lr: float = 0.05,
        control: str = "lagrangian",
        penalty_weight: float = 10.0,
    ) -> None:
        super().__init__()
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
        if control == "penalty" and not penalty_weight > 0:
            raise ValueError(f"penalty weight must be > 0, got {penalty_weight}")
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if not 0.0 <= ramp_fraction <= 1.0:
            raise ValueError(f"ramp_fraction must be in [0, 1], got {ramp_fraction}")
        if not lr > 0:
            raise ValueError(f"multiplier learning rate must be > 0, got {lr}")
        self.target_sparsity = float(target_sparsity)
        self.total_steps = int(total_steps)
        self.ramp_fraction = float(ramp_fraction)
        self.lr = float(lr)
        self.control = control
        trained = control == "lagrangian"
        self.lambda1 = nn.Parameter(torch.zeros(()), requires_grad=trained)
        start = 0.0 if trained else float(penalty_weight)
        self.lambda2 = nn.Parameter(torch.tensor(start), requires_grad=trained)

    @property
    def ramp_steps(self) -> int:
        return round(self.ramp_fraction * self.total_steps)

    @property
    def multiplier_lr(self) -> float:
        """The multipliers' learning rate: ``lr``, scaled down for ramps longer than
        ``REFERENCE_RAMP_STEPS`` (see the module docstring)."""
        return self.lr * min(1.0, REFERENCE_RAMP_STEPS / max(1, self.ramp_steps))

    def target_at(self, step: int) -> float:
        """Target sparsity at ``step``: linear from 0 to the final target, then flat."""
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return self.target_sparsity
        return self.target_sparsity * max(step, 0) / self.ramp_steps

    def loss(self, soft_kept: Tensor, step: int, hard_kept: Tensor | None = None) -> Tensor:
        """lambda1 * gap + lambda2 * gap**2 with gap = sparsity - target(step).

        ``soft_kept`` carries the gradient; if ``hard_kept`` is given its value replaces the
        soft one in the gap (straight-through), so the multipliers react to the hard count.
        """
        kept = soft_kept
        if hard_kept is not None:
            kept = soft_kept + (hard_kept.to(soft_kept.dtype) - soft_kept).detach()
        gap = (1.0 - kept) - self.target_at(step)
        lambda1 = self.lambda1.to(gap.device, gap.dtype)
        lambda2 = self.lambda2.to(gap.device, gap.dtype)
        return lambda1 * gap + lambda2 * gap * gap

    def param_group(self) -> dict:
        """Optimiser group for the multipliers: own lr, no decay, gradient ascent."""
        return {
            "params": [self.lambda1, self.lambda2],
            "lr": self.multiplier_lr,
            "weight_decay": 0.0,
            "maximize": True,
        }

    def extra_repr(self) -> str:
        return (
            f"target_sparsity={self.target_sparsity}, total_steps={self.total_steps}, "
            f"ramp_fraction={self.ramp_fraction}, lr={self.lr}, control={self.control}"
        )

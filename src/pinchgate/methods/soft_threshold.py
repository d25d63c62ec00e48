"""STR: soft threshold reparameterization (Kusupati et al. 2020), one pass, exact landing.

Each gated matrix computes with ``sign(W) * relu(|W| - sigmoid(s) * SPAN * RMS(W))``: one
learnable ``s`` per matrix, scale-relative so one ``init`` suits every layer (``RMS`` is taken
when fine-tuning starts; ``SPAN`` = 4 lets the threshold cover 0 to 4 RMS). Weights under the
threshold compute as exactly 0 and get no gradient; ``s`` gets the gradient of the loss and a
decoupled weight decay that pulls it toward 0, i.e. raises the thresholds: STR's own push to
sparsity. STR settles wherever that balance lies, not on a target, so (as for the gates) at
``1 - frozen_fraction`` of the steps one common factor c scales every threshold so that
exactly the target count of weights is kept (the kept ones are the top-k of |W| / threshold,
the learned per-layer allocation is kept); the kept weights are soft-thresholded once with
c x threshold, the mask is frozen, and fine-tuning goes on with it to the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor, nn

from pinchgate.errors import PinchgateError
from pinchgate.methods.base import BaselineMask, BaselineMethod, register
from pinchgate.methods.magnitude import magnitude_masks

SPAN = 4.0  # threshold = sigmoid(s) * SPAN * RMS(W): s = 0 puts it at 2 RMS
_MIN_RMS = 1e-10


def soft_threshold(weight: Tensor, threshold: Tensor) -> Tensor:
    """STR's weight: sign(w) * relu(|w| - threshold)."""
    return torch.sign(weight) * torch.relu(weight.abs() - threshold)


def default_decay(target_sparsity: float) -> float:
    """A heuristic (ours): under Adam the loss moves ``s`` by at most the learning rate per
    step and the decay by lr * decay * |s|, so ``s`` settles at or above -1 / decay; pick the
    decay that puts the threshold there at the target's |W| quantile for Gaussian weights."""
    z = NormalDist().inv_cdf((1.0 + target_sparsity) / 2.0)  # |W| / RMS at the target
    fraction = min(max(z / SPAN, 1e-3), 0.49)  # sigmoid(s) wanted; below 0.5: s < 0
    return -1.0 / math.log(fraction / (1.0 - fraction))


@dataclass
class StrOptions:
    init: float = -5.0  # s at the start: threshold = sigmoid(-5) x 4 RMS = 0.027 RMS
    lr: float | None = None  # learning rate of s; default 10 / max_steps
    decay: float | None = None  # weight decay of s; default from the target (see soft_threshold)

    def check(self, spec: str, max_steps: int) -> None:
        if self.lr is not None and not self.lr > 0:
            raise PinchgateError(f"--method {spec}: lr must be > 0")
        if self.decay is not None and not self.decay >= 0:
            raise PinchgateError(f"--method {spec}: decay must be >= 0")


class SoftThreshold(BaselineMask):
    """W -> sign(W) relu(|W| - sigmoid(s) * scale); once frozen, W -> W * mask."""

    def __init__(self, rms: float, s_init: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s_init)))
        self.register_buffer("scale", torch.tensor(SPAN * max(rms, _MIN_RMS)))
        self.register_buffer("mask", None)  # set by the exact step

    @property
    def frozen(self) -> bool:
        return self.mask is not None

    def threshold(self) -> Tensor:
        return torch.sigmoid(self.s) * self.scale

    def forward(self, weight: Tensor) -> Tensor:
        if self.mask is not None:
            return weight * self.mask
        return soft_threshold(weight, self.threshold().to(weight.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        key = prefix + "mask"  # a checkpoint from the frozen stretch carries the mask
        if key in state_dict and self.mask is None:
            self.mask = torch.empty_like(state_dict[key], device=self.scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SoftThresholdMethod(BaselineMethod):
    name = "str"
    unused_parameters = True  # s gets no gradient once the masks are frozen

    def setup(self, model: nn.Module) -> None:
        opts = self.options
        self.lr = opts.lr or 10.0 / self.cfg.max_steps
        self.decay = opts.decay if opts.decay is not None else default_decay(self.target.sparsity)
        self.freeze_step = self.cfg.max_steps - round(self.cfg.frozen_fraction * self.cfg.max_steps)
        self.fit: dict = {}
        for layer in self.layers:
            if layer.raw_weight() is None:
                raise PinchgateError(
                    f"--method str: {layer.name} is already parametrized (weight norm); STR "
                    "prunes plain weights only (leave out --include-pos-conv)"
                )
            rms = float(layer.weight().float().square().mean().sqrt())
            register(layer, SoftThreshold(rms, opts.init))

    def parametrizations(self) -> list[SoftThreshold]:
        return [layer.module.parametrizations.weight[-1] for layer in self.layers]

    def param_groups(self, model: nn.Module) -> list[dict]:
        params = [p.s for p in self.parametrizations()]
        return [{"params": params, "lr": self.lr, "weight_decay": self.decay}]

    def natural_kept(self) -> int:
        """Weights STR itself keeps: |W| > its threshold."""
        with torch.no_grad():
            return sum(
                int(torch.count_nonzero(layer.weight().abs() > p.threshold()))
                for layer, p in zip(self.layers, self.parametrizations(), strict=True)
            )

    def fit_and_freeze(self, step: int) -> dict:
        """Scale every threshold by one factor c so exactly the target count is kept; bake
        sign(W) relu(|W| - c t) into the kept weights and 0 into the others; freeze."""
        natural = self.natural_kept()
        with torch.no_grad():
            parts = list(zip(self.layers, self.parametrizations(), strict=True))
            thresholds = [p.threshold().detach() for _, p in parts]
            scores = [
                layer.weight().abs() / t for (layer, _), t in zip(parts, thresholds, strict=True)
            ]
            masks, cuts = magnitude_masks(scores, self.target.kept, "global")
            factor = max(cuts)  # the highest pruned |W| / t: kept iff above it
            for (layer, p), t, mask in zip(parts, thresholds, masks, strict=True):
                raw = layer.raw_weight()
                raw.copy_(soft_threshold(raw, factor * t).masked_fill_(~mask, 0))
                p.mask = mask
        self.fit = {
            "frozen_at": step,
            "sparsity_before_fit": 1.0 - natural / self.target.gated_params,
            "final_fit_factor": factor,
            "thresholds": [factor * float(t) for t in thresholds],
        }
        return self.fit

    def after_step(self, model: nn.Module, step: int) -> dict:
        frozen = self.parametrizations()[0].frozen
        logs = {}
        if step == self.freeze_step and not frozen and step < self.cfg.max_steps:
            fit = self.fit_and_freeze(step)
            logs = {k: fit[k] for k in ("frozen_at", "sparsity_before_fit", "final_fit_factor")}
        elif not frozen and (step % self.cfg.log_every == 0 or step == self.cfg.max_steps):
            logs["str_sparsity"] = 1.0 - self.natural_kept() / self.target.gated_params
        return logs

    def state(self) -> dict:
        return {"fit": self.fit}  # s and the masks are in the model

    def load_state(self, state: dict) -> None:
        self.fit = state.get("fit", {})

    def final_masks(self) -> tuple[list[Tensor], list[float], dict]:
        if not self.parametrizations()[0].frozen:  # no frozen stretch: the exact step here
            self.fit_and_freeze(self.cfg.max_steps)
        masks = [p.mask.clone() for p in self.parametrizations()]
        extra = {
            "final_fit_factor": self.fit["final_fit_factor"],
            "sparsity_before_fit": self.fit["sparsity_before_fit"],
            "frozen_at": self.fit["frozen_at"],
            "str": {"init": self.options.init, "lr": self.lr, "decay": self.decay, "span": SPAN},
        }
        return masks, self.fit["thresholds"], extra

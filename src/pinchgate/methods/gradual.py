"""Gradual magnitude pruning (GMP; Zhu & Gupta 2017, "To prune, or not to prune"), one pass.

From the pretrained model, fine-tuning prunes every ``every`` steps from ``start_step`` to
``end_step`` following the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))**3,   t = t0, t0 + dt, ..., t0 + n dt

removing at each event the smallest |W| among the weights still kept (the same proportion
in every gated matrix by default, as in the paper; or under one global threshold). At
``end_step`` the target count is kept exactly; the mask is fixed from then on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pinchgate.errors import PinchgateError
from pinchgate.methods.base import BaselineMethod, attach_mask, current_mask, set_mask
from pinchgate.methods.magnitude import check_allocation, magnitude_masks


def cubic_sparsity(
    step: int, final: float, start_step: int, end_step: int, initial: float = 0.0
) -> float:
    """Zhu & Gupta's schedule: 0 before ``start_step`` (dense), ``initial`` at it, rising as a
    cubic to ``final`` at ``end_step`` and flat after."""
    if step < start_step:
        return 0.0
    if step >= end_step:
        return final
    progress = (step - start_step) / (end_step - start_step)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass
class GmpSchedule:
    start_step: int  # t0
    end_step: int  # t0 + n dt
    every: int  # dt
    initial: float  # s_i

    @classmethod
    def for_run(cls, options, max_steps: int) -> GmpSchedule:
        """Steps from the options' fractions of ``max_steps``; ``end`` is rounded down to the
        last pruning event, so the schedule fits (checked by ``GmpOptions.check``)."""
        start = round(options.start * max_steps)
        every = options.every or max(1, round(0.01 * max_steps))
        events = (round(options.end * max_steps) - start) // every
        return cls(start, start + events * every, every, options.initial)

    def prunes_at(self, step: int) -> bool:
        return (
            self.start_step <= step <= self.end_step and (step - self.start_step) % self.every == 0
        )

    def sparsity_at(self, step: int, final: float) -> float:
        return cubic_sparsity(step, final, self.start_step, self.end_step, self.initial)


@dataclass
class GmpOptions:
    start: float = 0.1  # first pruning step, as a fraction of max_steps
    end: float = 0.7  # last pruning step (rounded down to an event), fraction of max_steps
    every: int | None = None  # steps between pruning events; default 1% of max_steps
    initial: float = 0.0  # sparsity of the first event
    allocation: str = "uniform"  # uniform (the paper) | global

    def check(self, spec: str, max_steps: int) -> None:
        if not 0 <= self.start < self.end <= 1:
            raise PinchgateError(f"--method {spec}: need 0 <= start < end <= 1")
        if self.every is not None and self.every < 1:
            raise PinchgateError(f"--method {spec}: every must be >= 1")
        if not 0 <= self.initial < 1:
            raise PinchgateError(f"--method {spec}: initial must be in [0, 1)")
        check_allocation(spec, self.allocation)
        schedule = GmpSchedule.for_run(self, max_steps)
        if schedule.end_step <= schedule.start_step:
            raise PinchgateError(
                f"--method {spec}: no pruning event fits between steps {schedule.start_step} "
                f"and {round(self.end * max_steps)} every {schedule.every} steps"
            )


class GradualMagnitude(BaselineMethod):
    name = "gmp"

    def setup(self, model: nn.Module) -> None:
        self.schedule = GmpSchedule.for_run(self.options, self.cfg.max_steps)
        self.thresholds = [0.0] * len(self.layers)
        for layer in self.layers:
            attach_mask(layer, torch.ones_like(layer.weight(), dtype=torch.bool))
        if self.schedule.prunes_at(0):
            self.prune(0)

    def kept_at(self, step: int) -> int:
        if step >= self.schedule.end_step:
            return self.target.kept  # exact, whatever the float schedule rounds to
        sparsity = self.schedule.sparsity_at(step, self.target.sparsity)
        return round((1.0 - sparsity) * self.target.gated_params)

    def prune(self, step: int) -> None:
        """Keep the largest |W| among the weights still kept (the pruned ones score 0)."""
        scores = [layer.weight().abs() * current_mask(layer) for layer in self.layers]
        masks, self.thresholds = magnitude_masks(
            scores, self.kept_at(step), self.options.allocation
        )
        for layer, mask in zip(self.layers, masks, strict=True):
            set_mask(layer, mask)

    def after_step(self, model: nn.Module, step: int) -> dict:
        pruned = self.schedule.prunes_at(step)
        if pruned:
            self.prune(step)
        if not (pruned or step % self.cfg.log_every == 0 or step == self.cfg.max_steps):
            return {}
        masks = [current_mask(layer) for layer in self.layers]
        return {
            "schedule_sparsity": self.schedule.sparsity_at(step, self.target.sparsity),
            "hard_sparsity": self.hard_sparsity(masks),
        }

    def state(self) -> dict:
        return {"thresholds": list(self.thresholds)}  # the masks are in the model

    def load_state(self, state: dict) -> None:
        self.thresholds = list(state.get("thresholds", self.thresholds))

    def final_masks(self) -> tuple[list[Tensor], list[float], dict]:
        masks = [current_mask(layer) for layer in self.layers]
        if sum(int(m.sum()) for m in masks) != self.target.kept:  # schedule not finished
            self.prune(self.schedule.end_step)
            masks = [current_mask(layer) for layer in self.layers]
        s = self.schedule
        extra = {
            "allocation": self.options.allocation,
            "schedule": {"start_step": s.start_step, "end_step": s.end_step,
                         "every": s.every, "initial_sparsity": s.initial},
        }  # fmt: skip
        return masks, self.thresholds, extra

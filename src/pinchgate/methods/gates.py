"""The paper's method: one-pass compression with sparsity-aware self-pinching gates.

Gates (``pinchgate.gates``) are attached before the optimiser is built; thresholds and
Lagrange multipliers get their own parameter groups; the sparsity term joins the loss every
step; tau is annealed; at ``1 - frozen_fraction`` of the steps every threshold is scaled by
one common factor so the hard count is exact, the masks are frozen for the final stretch,
and at the end the masks are baked into the weights (hardened) before export.
"""

from __future__ import annotations

import json
import time

import torch
from torch import Tensor, nn

from pinchgate.console import is_main_process, say
from pinchgate.errors import PinchgateError
from pinchgate.families import count_parameters
from pinchgate.gates import GatedModel, attach_gates, gates_of, tau_anneal_factor
from pinchgate.methods.base import (
    CompressionMethod,
    CompressionSummary,
    CompressionTarget,
    compression_target,
    gate_config,
)
from pinchgate.sparsity import SparsityController


class GateMethod(CompressionMethod):
    """The hooks that turn fine-tuning into one-pass compression."""

    name = "gates"
    unused_parameters = True  # thresholds get no gradient once the masks are frozen

    def __init__(self, cfg, run_dir, options=None) -> None:
        super().__init__(cfg, run_dir, options)
        self.gates = None
        self.controller: SparsityController | None = None
        self.target: CompressionTarget | None = None
        self.freeze_step = cfg.max_steps - round(cfg.frozen_fraction * cfg.max_steps)
        self.anneal_end = self.freeze_step
        # The exact fit: the hard sparsity training reached on its own, and the common factor
        # the fit moved every threshold by (kept in checkpoints for the report).
        self.fit: dict = {"sparsity_before_fit": None, "final_fit_factor": None}
        self._last: Tensor | None = None  # the soft kept fraction of the last step, for logs

    @property
    def target_sparsity(self) -> float:
        return self.target.sparsity

    # -- before the optimiser --------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        total = count_parameters(model)["total"]
        try:
            self.gates = attach_gates(model, gate_config(self.cfg))
        except ValueError as exc:
            raise PinchgateError(f"--model {self.cfg.model}: {exc}") from None
        try:
            self.target = compression_target(self.cfg, total, self.gates.numel)
        except ValueError as exc:
            raise PinchgateError(f"--target-ratio {self.cfg.target_ratio}: {exc}") from None
        self.controller = self.make_controller(next(model.parameters()).device)
        t = self.target
        say(
            f"gates on {len(self.gates.layers)} layers ({t.gated_params:,} of "
            f"{t.total_params:,} parameters); target: {t.compression_ratio:.2f}x = gated "
            f"sparsity {t.sparsity:.4f}"
        )

    def make_controller(self, device: torch.device) -> SparsityController:
        """The sparsity term for the target, with the run's schedule and control."""
        cfg = self.cfg
        return SparsityController(
            self.target.sparsity,
            cfg.max_steps,
            cfg.ramp_fraction,
            cfg.multiplier_lr,
            cfg.sparsity_control,
            cfg.penalty_weight,
        ).to(device)

    def param_groups(self, model: nn.Module) -> list[dict]:
        ramp_steps = max(1, self.controller.ramp_steps)
        lr = self.cfg.threshold_lr or 3.0 / ramp_steps
        thresholds = {"params": self.gates.threshold_parameters(), "lr": lr, "weight_decay": 0.0}
        return [thresholds, self.controller.param_group()]

    # -- every step ------------------------------------------------------------------------
    def sparsity_term(self, model: nn.Module, step: int) -> tuple[Tensor | None, dict]:
        """The controller's term on the kept fraction of this step's forward (none once the
        masks are frozen)."""
        if self.gates.frozen:
            return None, {}
        kept = self.gates.kept_fractions()
        self._last = kept.soft.detach()
        return self.controller.loss(kept.soft, step, hard_kept=kept.hard), {}

    def after_step(self, model: nn.Module, step: int) -> dict:
        cfg = self.cfg
        if cfg.tau_final != 1.0 and not self.gates.frozen:
            self.gates.set_tau_scale(tau_anneal_factor(step, 0, self.anneal_end, cfg.tau_final))
        logs = {}
        if step == self.freeze_step and not self.gates.frozen and step < cfg.max_steps:
            before = 1.0 - self.gates.hard_kept_fraction()
            factor = self.fit_thresholds(self.gates)
            self.fit = {"sparsity_before_fit": before, "final_fit_factor": factor}
            kept, total = self.freeze(self.gates)
            logs = {"fit_factor": factor, "sparsity_before_fit": before, "frozen_at": step}
            say(
                f"step {step}: thresholds x{factor:.4f} -> hard sparsity {1 - kept / total:.4f}; "
                "masks frozen"
            )
        if step % cfg.log_every == 0 or step == cfg.max_steps or logs:
            logs.update(self._gate_log(step))
        return logs

    def _gate_log(self, step: int) -> dict:
        hard_kept = self.gates.hard_kept_fraction()
        row = {
            "target_sparsity": self.controller.target_at(step),
            "hard_sparsity": 1.0 - hard_kept,
            "lambda1": self.controller.lambda1.item(),
            "lambda2": self.controller.lambda2.item(),
        }
        if self._last is not None:
            row["soft_sparsity"] = 1.0 - self._last.item()
        if is_main_process():
            with open(self.run_dir / "gates.jsonl", "a", encoding="utf-8") as handle:
                handle.write(
                    json.dumps({"step": step, **row, "thresholds": self.gates.thresholds()}) + "\n"
                )
        return row

    # -- checkpoint state --------------------------------------------------------------------
    def state(self) -> dict:
        # tau and thresholds are in the model
        return {"controller": self.controller.state_dict(), "fit": dict(self.fit)}

    def load_state(self, state: dict) -> None:
        if "controller" in state:
            self.controller.load_state_dict(state["controller"])
        self.fit.update(state.get("fit", {}))

    # -- at the end --------------------------------------------------------------------------
    def fit_now_or_recall(self, gates) -> float | None:
        """At the end: the exact fit if no frozen stretch made it already, else its factor."""
        if gates.frozen:
            return self.fit["final_fit_factor"]
        self.fit["sparsity_before_fit"] = 1.0 - gates.hard_kept_fraction()
        self.fit["final_fit_factor"] = self.fit_thresholds(gates)
        self.freeze(gates)
        return self.fit["final_fit_factor"]

    def fit_thresholds(self, gates) -> float:
        """The exact fit: every threshold scaled by one factor to the target count."""
        return gates.fit_thresholds(self.target.sparsity)

    def freeze(self, gates: GatedModel) -> tuple[int, int]:
        """Freeze the masks keeping exactly the target count (ties broken)."""
        return gates.freeze_masks(self.target.kept)

    def finalize(self, model: nn.Module) -> CompressionSummary:
        gates = gates_of(model)
        started = time.perf_counter()
        factor = self.fit_now_or_recall(gates)
        hardened = gates.harden()
        return self.summary(model, hardened, factor, started)

    def summary(self, model, hardened, factor, started: float, **extra) -> CompressionSummary:
        return CompressionSummary.of(
            self.name,
            model,
            self.target,
            hardened.kept,
            [vars(layer) for layer in hardened.layers],
            final_fit_factor=factor,
            sparsity_before_fit=self.fit["sparsity_before_fit"],
            harden_seconds=time.perf_counter() - started,
            **extra,
        )

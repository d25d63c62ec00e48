"""One-pass compression: CTC fine-tuning with self-pinching gates under a sparsity target.

The loop is `train.run_finetune`'s; this module only adds what the method needs, through
`TrainHooks`: gates attached before the optimiser is built, thresholds and Lagrange
multipliers as their own parameter groups, the sparsity term in the loss, tau annealing,
the exact threshold fit and frozen-mask stretch at the end, and hardening before export.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from rich.console import Console

from pinchgate.config import FinetuneConfig
from pinchgate.errors import PinchgateError
from pinchgate.gates import GateConfig, GatedModel, attach_gates, gates_of, tau_anneal_factor
from pinchgate.models import count_parameters
from pinchgate.sparsity import (
    CONTROLS,
    SparsityController,
    compression_ratio_for_gated_sparsity,
    gated_sparsity_for_ratio,
)
from pinchgate.train import TrainHooks, run_finetune

GRANULARITIES = ("weight", "structured")


@dataclass
class CompressConfig(FinetuneConfig):
    """Fine-tuning options plus the method's. Give a compression ratio OR a gated sparsity."""

    output_dir: str = "runs/compress"
    method: str = "gates"  # or a baseline, NAME[:key=value,...] (pinchgate.baselines)
    target_ratio: float | None = None  # whole model: total params / kept params
    target_sparsity: float | None = None  # fraction of gated weights pruned
    granularity: str = "weight"  # weight | structured (FFN neurons + attention heads)
    tying: str = "matrix"  # one threshold per matrix (structured: per unit) | block | global
    tau_rel: float = 0.2  # tau_l = tau_rel * mean(W_l^2) at the start
    tau_final: float = 1.0  # tau annealed geometrically to tau_final x its start (1: fixed)
    threshold_init_rel: float = 0.3  # t_l starts at this x RMS(W_l)
    threshold_lr: float | None = None  # default 3 / ramp steps (thresholds in RMS units)
    multiplier_lr: float = 0.05
    sparsity_control: str = "lagrangian"  # or penalty: fixed quadratic term (ablation)
    penalty_weight: float = 10.0  # its weight, for sparsity_control = penalty
    ramp_fraction: float = 0.3  # target sparsity ramps from 0 over this part of training
    frozen_fraction: float = 0.1  # final stretch with the exact hard mask frozen
    include_pos_conv: bool = False
    include_feature_encoder: bool = False
    dense_reference: str | None = None  # a `finetune` run directory to compare against
    train_dense_reference: bool = False  # train that reference first, in <output>/dense

    RESUMABLE_CHANGES = FinetuneConfig.RESUMABLE_CHANGES + ("dense_reference",)

    @classmethod
    def toy(cls) -> CompressConfig:
        base = FinetuneConfig.toy().to_dict()
        base["output_dir"] = "runs/toy-compress"
        # Only the transformer is gated and the toy's CNN is a third of it: 1.5x is reachable.
        # The dense reference costs a minute here and makes the report complete.
        return cls(**base, target_ratio=1.5, train_dense_reference=True)

    @classmethod
    def embedded(cls) -> CompressConfig:
        base = FinetuneConfig.embedded().to_dict()
        base["output_dir"] = "runs/embedded-compress"
        # wav2vec2-base -65%, the paper's first result; the dense reference makes the report
        # complete (its cost is reported separately).
        return cls(**base, target_ratio=2.86, train_dense_reference=True)

    def validate(self) -> None:
        super().validate()
        from pinchgate.baselines import parse_method

        parse_method(self.method, self.max_steps)
        if self.granularity not in GRANULARITIES:
            raise PinchgateError(
                f"--granularity {self.granularity!r}: must be {' or '.join(GRANULARITIES)}"
            )
        if self.granularity == "structured":
            if self.method != "gates":
                raise PinchgateError(
                    f"--granularity structured: only with --method gates, not {self.method!r}"
                )
            for name in ("include_pos_conv", "include_feature_encoder"):
                if getattr(self, name):
                    raise PinchgateError(
                        f"--{name.replace('_', '-')}: a weight-level option, not for "
                        "--granularity structured"
                    )
        if self.method == "dense":  # nothing is pruned: a target is ignored
            return
        if (self.target_ratio is None) == (self.target_sparsity is None):
            raise PinchgateError("give exactly one of --target-ratio and --target-sparsity")
        if self.target_ratio is not None and not self.target_ratio > 1:
            raise PinchgateError(f"--target-ratio {self.target_ratio}: must be > 1")
        if self.target_sparsity is not None and not 0 <= self.target_sparsity < 1:
            raise PinchgateError(f"--target-sparsity {self.target_sparsity}: must be in [0, 1)")
        if self.tying not in ("matrix", "block", "global"):
            raise PinchgateError(f"--tying {self.tying!r}: must be matrix, block or global")
        if self.sparsity_control not in CONTROLS:
            raise PinchgateError(
                f"--sparsity-control {self.sparsity_control!r}: must be {' or '.join(CONTROLS)}"
            )
        for name in (
            "tau_rel",
            "tau_final",
            "threshold_init_rel",
            "multiplier_lr",
            "penalty_weight",
        ):
            if not getattr(self, name) > 0:
                raise PinchgateError(
                    f"--{name.replace('_', '-')} {getattr(self, name)}: must be > 0"
                )
        for name in ("ramp_fraction", "frozen_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise PinchgateError(
                    f"--{name.replace('_', '-')} {getattr(self, name)}: must be in [0, 1)"
                )
        if self.ramp_fraction + self.frozen_fraction >= 1:
            raise PinchgateError("--ramp-fraction + --frozen-fraction must be < 1")

    def gate_config(self) -> GateConfig:
        return GateConfig(
            tau_rel=self.tau_rel,
            threshold_init_rel=self.threshold_init_rel,
            tying=self.tying,
            include_pos_conv=self.include_pos_conv,
            include_feature_encoder=self.include_feature_encoder,
        )

    def finetune_config(self, output_dir: str) -> FinetuneConfig:
        """The dense reference: the same run without the gates."""
        names = FinetuneConfig.__dataclass_fields__
        values = {k: v for k, v in self.to_dict().items() if k in names}
        return FinetuneConfig(**{**values, "output_dir": output_dir})


class GateMethod:
    """The hooks that turn fine-tuning into one-pass compression."""

    def __init__(self, cfg: CompressConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.gates: GatedModel | None = None
        self.controller: SparsityController | None = None
        self.total_params = 0
        self.target_sparsity = 0.0
        self.freeze_step = cfg.max_steps - round(cfg.frozen_fraction * cfg.max_steps)
        self.anneal_end = self.freeze_step
        # The exact fit: the hard sparsity training reached on its own, and the common factor
        # the fit moved every threshold by (kept in checkpoints for the report).
        self.fit: dict = {"sparsity_before_fit": None, "final_fit_factor": None}

    # -- before the optimiser --------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> None:
        self.total_params = count_parameters(model)["total"]
        try:
            self.gates = attach_gates(model, self.cfg.gate_config())
        except ValueError as exc:
            raise PinchgateError(f"--model {self.cfg.model}: {exc}") from None
        gated = self.gates.numel
        try:
            if self.cfg.target_ratio is not None:
                self.target_sparsity = gated_sparsity_for_ratio(
                    self.cfg.target_ratio, self.total_params, gated
                )
            else:
                self.target_sparsity = float(self.cfg.target_sparsity)
        except ValueError as exc:
            raise PinchgateError(f"--target-ratio {self.cfg.target_ratio}: {exc}") from None
        self.controller = self.make_controller(next(model.parameters()).device)
        ratio = compression_ratio_for_gated_sparsity(self.target_sparsity, self.total_params, gated)
        _say(
            f"gates on {len(self.gates.layers)} layers ({gated:,} of {self.total_params:,} "
            f"parameters); target: {ratio:.2f}x = gated sparsity {self.target_sparsity:.4f}"
        )

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        ramp_steps = max(1, self.controller.ramp_steps)
        lr = self.cfg.threshold_lr or 3.0 / ramp_steps
        thresholds = {"params": self.gates.threshold_parameters(), "lr": lr, "weight_decay": 0.0}
        return [thresholds, self.controller.param_group()]

    # -- every step ------------------------------------------------------------------------
    def extra_loss(self, model: torch.nn.Module, step: int) -> tuple[torch.Tensor, dict]:
        if self.gates.frozen:
            return torch.zeros((), device=next(model.parameters()).device), {}
        kept = self.gates.kept_fractions()
        term = self.controller.loss(kept.soft, step, hard_kept=kept.hard)
        self._last = (kept.soft.detach(), step)
        return term, {}

    def after_step(self, model: torch.nn.Module, step: int) -> dict:
        cfg = self.cfg
        if cfg.tau_final != 1.0 and not self.gates.frozen:
            self.gates.set_tau_scale(tau_anneal_factor(step, 0, self.anneal_end, cfg.tau_final))
        logs = {}
        if step == self.freeze_step and not self.gates.frozen and step < cfg.max_steps:
            before = 1.0 - self.gates.hard_kept_fraction()
            factor = self.gates.fit_thresholds(self.target_sparsity)
            self.fit = {"sparsity_before_fit": before, "final_fit_factor": factor}
            kept, total = self._freeze(self.gates)
            logs = {"fit_factor": factor, "sparsity_before_fit": before, "frozen_at": step}
            _say(
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
        last = getattr(self, "_last", None)
        if last is not None:
            row["soft_sparsity"] = 1.0 - last[0].item()
        if PartialState().is_main_process:
            with open(self.run_dir / "gates.jsonl", "a", encoding="utf-8") as handle:
                handle.write(
                    json.dumps({"step": step, **row, "thresholds": self.gates.thresholds()}) + "\n"
                )
        return row

    def make_controller(self, device: torch.device) -> SparsityController:
        """The sparsity term for `target_sparsity`, with the run's schedule and control."""
        cfg = self.cfg
        return SparsityController(
            self.target_sparsity,
            cfg.max_steps,
            cfg.ramp_fraction,
            cfg.multiplier_lr,
            cfg.sparsity_control,
            cfg.penalty_weight,
        ).to(device)

    # -- checkpoint state --------------------------------------------------------------------
    def state(self) -> dict:
        # tau and thresholds are in the model
        return {"controller": self.controller.state_dict(), "fit": dict(self.fit)}

    def load_state(self, state: dict) -> None:
        if "controller" in state:
            self.controller.load_state_dict(state["controller"])
        self.fit.update(state.get("fit", {}))

    def fit_now_or_recall(self, gates) -> float | None:
        """At the end: the exact fit if no frozen stretch made it already, else its factor."""
        if gates.frozen:
            return self.fit["final_fit_factor"]
        self.fit["sparsity_before_fit"] = 1.0 - gates.hard_kept_fraction()
        self.fit["final_fit_factor"] = gates.fit_thresholds(self.target_sparsity)
        self._freeze(gates)
        return self.fit["final_fit_factor"]

    def _freeze(self, gates) -> tuple[int, int]:
        """Freeze the masks; weight-level gates keep exactly the target count (ties broken).
        Structured gates keep whole groups, so they land as close as groups allow."""
        if isinstance(gates, GatedModel):
            return gates.freeze_masks(gates.target_kept(self.target_sparsity))
        return gates.freeze_masks()

    # -- at the end --------------------------------------------------------------------------
    def finalize(self, model: torch.nn.Module) -> dict:
        gates = gates_of(model)
        started = time.perf_counter()
        factor = self.fit_now_or_recall(gates)
        hardened = gates.harden()
        return self.summary(model, hardened, factor, started)

    def summary(self, model: torch.nn.Module, hardened, factor: float | None, started: float):
        """What the report says of a hardened model: counts, ratio, sparsity, fit, time."""
        zeros = sum(int((p == 0).sum()) for p in model.parameters())
        kept_params = self.total_params - (hardened.total - hardened.kept)
        return {
            "compression": {
                "total_params": self.total_params,
                "gated_params": hardened.total,
                "gated_kept": hardened.kept,
                "kept_params": kept_params,
                "zero_params": zeros,
                "compression_ratio": self.total_params / kept_params,
                "parameter_reduction": 1 - kept_params / self.total_params,
                "gated_sparsity": hardened.sparsity,
                "target_sparsity": self.target_sparsity,
                "target_ratio": self.cfg.target_ratio,
                "final_fit_factor": factor,
                "sparsity_before_fit": self.fit["sparsity_before_fit"],
                "harden_seconds": time.perf_counter() - started,
            },
            "layers": [vars(layer) for layer in hardened.layers],
        }

    def hooks(self) -> TrainHooks:
        return TrainHooks(
            extra_loss=self.extra_loss,
            param_groups=self.param_groups,
            after_step=self.after_step,
            state=self.state,
            load_state=self.load_state,
            finalize=self.finalize,
            unused_parameters=True,  # thresholds get no gradient once the masks are frozen
        )


def _say(message: str) -> None:
    if PartialState().is_main_process:
        Console(stderr=True).print(message, highlight=False)


def run_compress(cfg: CompressConfig, console: Console | None = None) -> dict:
    """Compress in one pass; optionally train the dense reference first; write the report."""
    from pinchgate.report import write_report

    cfg.validate()
    if cfg.method != "gates":
        from pinchgate.baselines import run_baseline

        return run_baseline(cfg, console)
    run_dir = Path(cfg.output_dir)
    reference_dir = Path(cfg.dense_reference) if cfg.dense_reference else None
    if reference_dir is not None and not (reference_dir / "results.json").is_file():
        raise PinchgateError(
            f"--dense-reference {reference_dir}: no results.json (not a finished finetune run)"
        )
    if cfg.granularity == "structured":
        from pinchgate.structured import StructuredGateMethod

        method = StructuredGateMethod(cfg, run_dir)
    else:
        method = GateMethod(cfg, run_dir)
    started = time.perf_counter()
    results = run_finetune(cfg, hooks=method.hooks(), build=method.attach, console=console)
    if cfg.granularity == "structured" and PartialState().is_main_process:
        from pinchgate.structured import export_shrunk_run, record_shrunk

        say = (console or Console(stderr=True)).print
        shrunk = export_shrunk_run(results, run_dir, cfg.eval_batch_seconds, say)
        record_shrunk(run_dir, results, shrunk)
    results["wall_seconds"] = time.perf_counter() - started
    # The reference is trained after compression so that every error in the compression
    # options (an unreachable ratio, say) is reported before any training.
    reference_seconds = None
    if cfg.train_dense_reference and reference_dir is None:
        reference_dir = run_dir / "dense"
        started = time.perf_counter()
        run_finetune(cfg.finetune_config(str(reference_dir)), console=console)
        reference_seconds = time.perf_counter() - started
    if PartialState().is_main_process:
        report = write_report(run_dir, cfg, results, reference_dir, reference_seconds)
        results["report"] = report
    return results

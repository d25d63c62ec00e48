"""The compression-method interface, and what every method shares.

A method turns the training loop into a compression run. The loop (``pinchgate.train``)
calls, in order:

    method.attach(model)                  before the optimiser: gates, masks, soft thresholds
    method.param_groups(model)            extra optimiser groups (thresholds, multipliers)
    every step:
      loss = task loss + method.sparsity_term(model, step)   (None: no term)
      backward, optimiser step
      method.after_step(model, step)      schedules, re-pruning, the exact fit and freeze
    method.state() / load_state()         what a checkpoint must carry beyond the model
    method.finalize(model)                freeze and harden: the model as exported, and a
                                          ``CompressionSummary`` for the report

Every method prunes the same weights (the family's gate targets, ``gated_layers``) to the
same exact count (``compression_target``), so methods compare on equal terms.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pinchgate import masking
from pinchgate.config import CompressConfig
from pinchgate.console import say
from pinchgate.errors import PinchgateError
from pinchgate.families import count_parameters
from pinchgate.gates import GateConfig
from pinchgate.sparsity import compression_ratio_for_gated_sparsity, gated_sparsity_for_ratio


@dataclass
class CompressionTarget:
    """What a run must reach: ``kept`` of the ``gated_params`` gated weights (exact)."""

    total_params: int
    gated_params: int
    sparsity: float  # gated sparsity
    kept: int  # exact number of gated weights (or grouped parameters) kept
    ratio: float | None  # as asked (None when a sparsity was asked)

    @property
    def compression_ratio(self) -> float:
        return compression_ratio_for_gated_sparsity(
            self.sparsity, self.total_params, self.gated_params
        )


def compression_target(
    cfg: CompressConfig, total: int, gated: int, dense: bool = False
) -> CompressionTarget:
    """The target from the run's ratio (or sparsity): total params counted before anything
    is attached, kept = round((1 - s) * gated), the rounding every method lands on."""
    if dense:
        return CompressionTarget(total, gated, 0.0, gated, None)
    if cfg.target_ratio is not None:
        sparsity = gated_sparsity_for_ratio(cfg.target_ratio, total, gated)
    else:
        sparsity = float(cfg.target_sparsity)
    kept = round((1.0 - sparsity) * gated)
    return CompressionTarget(total, gated, sparsity, kept, cfg.target_ratio)


def gate_config(cfg: CompressConfig) -> GateConfig:
    """Where the weight-level gates go (and so what every weight-level method prunes)."""
    return GateConfig(
        tau_rel=cfg.tau_rel,
        threshold_init_rel=cfg.threshold_init_rel,
        tying=cfg.tying,
        extras=cfg.gate_extras,
    )


@dataclass
class CompressionSummary:
    """What the report says of a hardened model: counts, ratio, sparsity, fit, time."""

    method: str
    total_params: int
    gated_params: int
    gated_kept: int
    target_gated_kept: int
    kept_params: int
    zero_params: int
    compression_ratio: float
    parameter_reduction: float
    gated_sparsity: float
    target_sparsity: float
    target_ratio: float | None
    final_fit_factor: float | None
    sparsity_before_fit: float | None
    prune_seconds: float
    harden_seconds: float
    extra: dict = field(default_factory=dict)  # method-specific fields, flat in the report
    layers: list[dict] = field(default_factory=list)  # per gated layer (or unit)

    @classmethod
    def of(
        cls,
        method: str,
        model: nn.Module,
        target: CompressionTarget,
        gated_kept: int,
        layers: list[dict],
        **fields,
    ) -> CompressionSummary:
        """The summary of ``model`` (hardened) that keeps ``gated_kept`` gated weights."""
        kept_params = target.total_params - (target.gated_params - gated_kept)
        timing = {"prune_seconds": 0.0, "harden_seconds": 0.0}
        fit = {"final_fit_factor": None, "sparsity_before_fit": None}
        known = {**timing, **fit}
        extra = {k: v for k, v in fields.items() if k not in known}
        known.update({k: v for k, v in fields.items() if k in known})
        return cls(
            method=method,
            total_params=target.total_params,
            gated_params=target.gated_params,
            gated_kept=gated_kept,
            target_gated_kept=target.kept,
            kept_params=kept_params,
            zero_params=sum(int((p == 0).sum()) for p in model.parameters()),
            compression_ratio=target.total_params / kept_params,
            parameter_reduction=1 - kept_params / target.total_params,
            gated_sparsity=1 - gated_kept / target.gated_params,
            target_sparsity=target.sparsity,
            target_ratio=target.ratio,
            extra=extra,
            layers=layers,
            **known,
        )

    def to_results(self) -> dict:
        """The ``compression`` and ``layers`` entries of results.json."""
        values = asdict(self)
        extra, layers = values.pop("extra"), values.pop("layers")
        return {"compression": {**values, **extra}, "layers": layers}


class CompressionMethod:
    """A compression method: override what the method needs (see the module docstring).

    ``unused_parameters``: some parameters may get no gradient in a step (e.g. thresholds
    once masks are frozen), which data-parallel training must be told.
    """

    name = "method"
    unused_parameters = False

    def __init__(self, cfg: CompressConfig, run_dir: Path, options=None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.options = options

    def attach(self, model: nn.Module) -> None:
        pass

    def param_groups(self, model: nn.Module) -> list[dict]:
        return []

    def sparsity_term(self, model: nn.Module, step: int) -> tuple[Tensor | None, dict]:
        return None, {}

    def after_step(self, model: nn.Module, step: int) -> dict:
        return {}

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def finalize(self, model: nn.Module) -> CompressionSummary | None:
        """Freeze and harden: the model as it will be exported, and its summary."""
        raise NotImplementedError


# --- what the baselines share -----------------------------------------------------------------


@dataclass
class MaskedLayer:
    """One gated weight matrix, as the gates would see it."""

    name: str
    module: nn.Module
    numel: int

    def weight(self) -> Tensor:
        """The weight before any mask of ours (e.g. after weight norm), detached."""
        if not masking.has(self.module, BaselineMask):
            return self.module.weight.detach()
        plist = self.module.parametrizations.weight
        return masking.weight_before(self.module, len(plist) - 1).detach()

    def raw_weight(self) -> nn.Parameter | None:
        """The trained tensor itself when the weight is plain (no other parametrization)."""
        plist = getattr(self.module, "parametrizations", None)
        if plist is None or "weight" not in plist:
            return self.module.weight
        plist = plist.weight
        ours_only = len(plist) == 1 and isinstance(plist[0], BaselineMask)
        return plist.original if plist.is_tensor and ours_only else None


def gated_layers(model: nn.Module, cfg: CompressConfig) -> list[MaskedLayer]:
    """The matrices the gates would gate under ``cfg`` (same selection, same order)."""
    try:
        include, exclude = gate_config(cfg).patterns(model)
        targets = masking.select_targets(model, include, exclude)
    except ValueError as exc:
        raise PinchgateError(f"--model {cfg.model}: {exc}") from None
    if not targets:
        raise PinchgateError(
            f"--model {cfg.model}: no gateable layers (Linear/Conv1d/Embedding) found"
        )
    return [MaskedLayer(name, module, module.weight.numel()) for name, module in targets]


def exact_target(cfg: CompressConfig, model: nn.Module, layers: list[MaskedLayer], dense=False):
    """The target as the gates compute it: total params before pruning, exact kept count."""
    total = count_parameters(model)["total"]
    gated = sum(layer.numel for layer in layers)
    try:
        return compression_target(cfg, total, gated, dense)
    except ValueError as exc:
        raise PinchgateError(f"--target-ratio {cfg.target_ratio}: {exc}") from None


class BaselineMask(nn.Module):
    """Base of what the baselines register on a weight: always the last parametrization, with
    a ``mask`` buffer (checkpoints carry it)."""

    param_order: list[str]


class WeightMask(BaselineMask):
    """W -> W * mask with a fixed binary mask: pruned entries compute as 0 and get no gradient."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def register(layer: MaskedLayer, parametrization: BaselineMask) -> None:
    parametrization.to(layer.module.weight.device)
    masking.attach(layer.module, parametrization)


def attach_mask(layer: MaskedLayer, mask: Tensor) -> WeightMask:
    """Register a ``WeightMask`` on the layer's weight; plain weights are zeroed where pruned."""
    register(layer, WeightMask(mask))
    set_mask(layer, mask)
    return layer.module.parametrizations.weight[-1]


def set_mask(layer: MaskedLayer, mask: Tensor) -> None:
    """Replace the layer's mask in place (and zero the pruned entries of a plain weight)."""
    with torch.no_grad():
        layer.module.parametrizations.weight[-1].mask.copy_(mask)
        raw = layer.raw_weight()
        if raw is not None:
            raw.masked_fill_(~mask.to(raw.device), 0)


def current_mask(layer: MaskedLayer) -> Tensor:
    return layer.module.parametrizations.weight[-1].mask.clone()


def zero_pruned(layer: MaskedLayer, mask: Tensor) -> None:
    """Set the pruned weights to exactly 0, once (no mask is kept: they may revive)."""
    with torch.no_grad():
        raw = layer.raw_weight()
        if raw is not None:
            raw.masked_fill_(~mask.to(raw.device), 0)
        else:  # e.g. weight norm: write the masked weight back through its right_inverse
            layer.module.weight = layer.module.weight.detach().masked_fill(~mask, 0)


def bake(layer: MaskedLayer) -> None:
    """Replace a masked weight by its current value (exact zeros) and remove our mask."""
    module = layer.module
    with torch.no_grad():
        effective = module.weight.detach().clone()
        plist = module.parametrizations.weight
        masking.detach(module, len(plist) - 1, plist[-1].param_order, effective)


class BaselineMethod(CompressionMethod):
    """What the baselines share; a baseline fills in ``setup``, ``after_step`` and
    ``final_masks`` (``masks, thresholds`` of the exported model, plus extra report fields)."""

    name = "baseline"

    def __init__(self, cfg: CompressConfig, run_dir: Path, options=None) -> None:
        super().__init__(cfg, run_dir, options)
        self.layers: list[MaskedLayer] = []
        self.target: CompressionTarget | None = None
        self.prune_seconds = 0.0

    def attach(self, model: nn.Module) -> None:
        started = time.perf_counter()
        self.layers = gated_layers(model, self.cfg)
        self.target = exact_target(self.cfg, model, self.layers, dense=self.name == "dense")
        self.setup(model)
        self.prune_seconds += time.perf_counter() - started
        t = self.target
        say(
            f"{self.name}: {len(self.layers)} gated layers ({t.gated_params:,} of "
            f"{t.total_params:,} parameters); target: {t.compression_ratio:.2f}x = "
            f"{t.kept:,} gated weights kept (sparsity {t.sparsity:.4f})"
        )

    def setup(self, model: nn.Module) -> None:
        pass

    def final_masks(self) -> tuple[list[Tensor], list[float], dict]:
        raise NotImplementedError

    def hard_sparsity(self, masks: list[Tensor]) -> float:
        return 1.0 - sum(int(m.sum()) for m in masks) / self.target.gated_params

    def finalize(self, model: nn.Module) -> CompressionSummary:
        started = time.perf_counter()
        masks, thresholds, extra = self.final_masks()
        for layer in self.layers:
            if masking.has(layer.module, BaselineMask):
                bake(layer)
        for layer, mask in zip(self.layers, masks, strict=True):
            zero_pruned(layer, mask)  # no-op for a baked mask; PARP's final re-prune
        harden_seconds = time.perf_counter() - started
        return CompressionSummary.of(
            self.name,
            model,
            self.target,
            sum(int(m.sum()) for m in masks),
            self.layer_rows(masks, thresholds),
            prune_seconds=self.prune_seconds,
            harden_seconds=harden_seconds,
            **extra,
        )

    def layer_rows(self, masks: list[Tensor], thresholds: list[float]) -> list[dict]:
        rows = []
        for layer, mask, threshold in zip(self.layers, masks, thresholds, strict=True):
            kept = int(mask.sum())
            rows.append(
                {
                    "name": layer.name,
                    "numel": layer.numel,
                    "kept": kept,
                    "sparsity": 1.0 - kept / layer.numel,
                    "threshold": threshold,
                    "tau": None,
                }
            )
        return rows

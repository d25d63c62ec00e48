"""What every baseline shares with the gates: the same gated matrices, the same exact target
count, magnitude masks, a fixed-mask parametrization, hardening and the report's summary.

The pruned set is the gates' (``gates._select_targets`` with ``CompressConfig.gate_config()``)
and the target is converted the same way (``sparsity.gated_sparsity_for_ratio``) and rounded
the same way as ``GatedModel.fit_thresholds``: ``kept = round((1 - s) * G)`` gated weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pinchgate.errors import PinchgateError
from pinchgate.gates import _select_targets
from pinchgate.models import count_parameters
from pinchgate.sparsity import compression_ratio_for_gated_sparsity, gated_sparsity_for_ratio
from pinchgate.train import TrainHooks

ALLOCATIONS = ("uniform", "global")


@dataclass
class PrunedLayer:
    """One gated weight matrix, as the gates would see it."""

    name: str
    module: nn.Module
    numel: int

    def weight(self) -> Tensor:
        """The weight before any mask of ours (e.g. after weight norm), detached."""
        plist = getattr(self.module, "parametrizations", None)
        if plist is None or "weight" not in plist:
            return self.module.weight.detach()
        plist = plist.weight
        if not isinstance(plist[-1], PruningParametrization):
            return self.module.weight.detach()
        if len(plist) == 1:
            return plist.original.detach()
        x = plist[0](*_originals(plist))
        for i in range(1, len(plist) - 1):
            x = plist[i](x)
        return x.detach()

    def raw_weight(self) -> nn.Parameter | None:
        """The trained tensor itself when the weight is plain (no other parametrization)."""
        plist = getattr(self.module, "parametrizations", None)
        if plist is None or "weight" not in plist:
            return self.module.weight
        plist = plist.weight
        ours_only = len(plist) == 1 and isinstance(plist[0], PruningParametrization)
        return plist.original if plist.is_tensor and ours_only else None


def _originals(plist) -> list[Tensor]:
    if plist.is_tensor:
        return [plist.original]
    return [getattr(plist, f"original{i}") for i in range(plist.ntensors)]


@dataclass
class PruningTarget:
    total_params: int
    gated_params: int
    sparsity: float  # gated sparsity
    kept: int  # exact number of gated weights kept
    ratio: float | None  # as asked (None when a sparsity was asked)


def gated_layers(model: nn.Module, cfg) -> list[PrunedLayer]:
    """The matrices the gates would gate under ``cfg`` (same selection, same order)."""
    try:
        targets = _select_targets(model, cfg.gate_config())
    except ValueError as exc:
        raise PinchgateError(f"--model {cfg.model}: {exc}") from None
    if not targets:
        raise PinchgateError(f"--model {cfg.model}: no gateable layers (Linear/Conv1d) found")
    return [PrunedLayer(name, module, module.weight.numel()) for name, module in targets]


def exact_target(cfg, model: nn.Module, layers: list[PrunedLayer], dense: bool = False):
    """The target as the gates compute it: total params before pruning, exact kept count."""
    total = count_parameters(model)["total"]
    gated = sum(layer.numel for layer in layers)
    if dense:
        return PruningTarget(total, gated, 0.0, gated, None)
    try:
        if cfg.target_ratio is not None:
            sparsity = gated_sparsity_for_ratio(cfg.target_ratio, total, gated)
        else:
            sparsity = float(cfg.target_sparsity)
    except ValueError as exc:
        raise PinchgateError(f"--target-ratio {cfg.target_ratio}: {exc}") from None
    kept = round((1.0 - sparsity) * gated)  # as GatedModel.fit_thresholds rounds
    return PruningTarget(total, gated, sparsity, kept, cfg.target_ratio)


# --- magnitude masks ---------------------------------------------------------------------------
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


# --- parametrizations -----------------------------------------------------------------------
class PruningParametrization(nn.Module):
    """Base of what the baselines register on a weight: always the last parametrization, with
    a ``mask`` buffer (checkpoints carry it) and the module's parameter order to restore."""

    def __init__(self) -> None:
        super().__init__()
        self.param_order: list[str] = []


class WeightMask(PruningParametrization):
    """W -> W * mask with a fixed binary mask: pruned entries compute as 0 and get no gradient."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def attach_mask(layer: PrunedLayer, mask: Tensor) -> WeightMask:
    """Register a ``WeightMask`` on the layer's weight; plain weights are zeroed where pruned."""
    register(layer, WeightMask(mask))
    set_mask(layer, mask)
    return layer.module.parametrizations.weight[-1]


def register(layer: PrunedLayer, parametrization: PruningParametrization) -> None:
    parametrization.param_order = list(layer.module._parameters.keys())
    parametrization.to(layer.module.weight.device)
    parametrize.register_parametrization(layer.module, "weight", parametrization)


def set_mask(layer: PrunedLayer, mask: Tensor) -> None:
    """Replace the layer's mask in place (and zero the pruned entries of a plain weight)."""
    with torch.no_grad():
        layer.module.parametrizations.weight[-1].mask.copy_(mask)
        raw = layer.raw_weight()
        if raw is not None:
            raw.masked_fill_(~mask.to(raw.device), 0)


def current_mask(layer: PrunedLayer) -> Tensor:
    return layer.module.parametrizations.weight[-1].mask.clone()


def zero_pruned(layer: PrunedLayer, mask: Tensor) -> None:
    """Set the pruned weights to exactly 0, once (no mask is kept: they may revive)."""
    with torch.no_grad():
        raw = layer.raw_weight()
        if raw is not None:
            raw.masked_fill_(~mask.to(raw.device), 0)
        else:  # e.g. weight norm: write the masked weight back through its right_inverse
            layer.module.weight = layer.module.weight.detach().masked_fill(~mask, 0)


def bake(layer: PrunedLayer) -> None:
    """Replace a masked weight by its current value (exact zeros) and remove our mask."""
    module = layer.module
    with torch.no_grad():
        effective = module.weight.detach().clone()
        plist = module.parametrizations.weight
        order = plist[-1].param_order
        if len(plist) == 1:
            # leave_parametrized=False puts the original Parameter object back.
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight.copy_(effective)
            params = module._parameters
            for key in order:  # the pre-attach order, and so the state_dict's
                if key in params:
                    params[key] = params.pop(key)
        else:
            del plist[len(plist) - 1]
            module.weight = effective  # through the remaining right_inverse (weight norm)


# --- what every baseline does --------------------------------------------------------------------
class PruningMethod:
    """Hooks shared by the baselines; a method fills in ``setup``, ``after_step`` and
    ``final_masks`` (``masks, thresholds`` of the exported model, plus extra report fields)."""

    name = "baseline"
    unused_parameters = False

    def __init__(self, cfg, run_dir: Path, options=None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.options = options
        self.layers: list[PrunedLayer] = []
        self.target: PruningTarget | None = None
        self.prune_seconds = 0.0

    def attach(self, model: nn.Module) -> None:
        started = time.perf_counter()
        self.layers = gated_layers(model, self.cfg)
        self.target = exact_target(self.cfg, model, self.layers, dense=self.name == "dense")
        self.setup(model)
        self.prune_seconds += time.perf_counter() - started
        t = self.target
        ratio = compression_ratio_for_gated_sparsity(t.sparsity, t.total_params, t.gated_params)
        _say(
            f"{self.name}: {len(self.layers)} gated layers ({t.gated_params:,} of "
            f"{t.total_params:,} parameters); target: {ratio:.2f}x = {t.kept:,} gated weights "
            f"kept (sparsity {t.sparsity:.4f})"
        )

    def setup(self, model: nn.Module) -> None:
        pass

    def after_step(self, model: nn.Module, step: int) -> dict:
        return {}

    def param_groups(self, model: nn.Module) -> list[dict]:
        return []

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def final_masks(self) -> tuple[list[Tensor], list[float], dict]:
        raise NotImplementedError

    def hard_sparsity(self, masks: list[Tensor]) -> float:
        return 1.0 - sum(int(m.sum()) for m in masks) / self.target.gated_params

    def finalize(self, model: nn.Module) -> dict:
        started = time.perf_counter()
        masks, thresholds, extra = self.final_masks()
        for layer in self.layers:
            if _has_mask(layer.module):
                bake(layer)
        for layer, mask in zip(self.layers, masks, strict=True):
            zero_pruned(layer, mask)  # no-op for a baked mask; PARP's final re-prune
        harden_seconds = time.perf_counter() - started
        return {"compression": self.summary(model, masks, extra, harden_seconds),
                "layers": self.layer_rows(masks, thresholds)}  # fmt: skip

    def summary(self, model, masks, extra: dict, harden_seconds: float) -> dict:
        t = self.target
        gated_kept = sum(int(m.sum()) for m in masks)
        kept_params = t.total_params - (t.gated_params - gated_kept)
        return {
            "method": self.name,
            "total_params": t.total_params,
            "gated_params": t.gated_params,
            "gated_kept": gated_kept,
            "target_gated_kept": t.kept,
            "kept_params": kept_params,
            "zero_params": sum(int((p == 0).sum()) for p in model.parameters()),
            "compression_ratio": t.total_params / kept_params,
            "parameter_reduction": 1 - kept_params / t.total_params,
            "gated_sparsity": 1 - gated_kept / t.gated_params,
            "target_sparsity": t.sparsity,
            "target_ratio": t.ratio,
            "final_fit_factor": None,
            "prune_seconds": self.prune_seconds,
            "harden_seconds": harden_seconds,
            **extra,
        }

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

    def hooks(self) -> TrainHooks:
        return TrainHooks(
            param_groups=self.param_groups,
            after_step=self.after_step,
            state=self.state,
            load_state=self.load_state,
            finalize=self.finalize,
            unused_parameters=self.unused_parameters,
        )


def _has_mask(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and isinstance(
        module.parametrizations.weight[-1], PruningParametrization
    )


def _say(message: str) -> None:
    from accelerate import PartialState
    from rich.console import Console

    if PartialState().is_main_process:
        Console(stderr=True).print(message, highlight=False)

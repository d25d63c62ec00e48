"""Sparsity-aware self-pinching gates (SSPG): attach, train, calibrate, freeze, harden, detach.

A gated weight W is replaced, through ``torch.nn.utils.parametrize``, by ``W * M`` with

    M = sigmoid((W**2 - t**2) / (2 * tau))

where ``t`` is a learnable threshold shared by every weight of a matrix (or of a block, or of
the whole model) and ``tau`` a temperature. No model code is edited (``pinchgate.masking``),
so any model of a family (``pinchgate.families``) or plain ``nn.Module`` can be gated.

Engineering choices (see METHOD.md, "ours"):

* ``t = scale * |raw|`` with ``scale`` the RMS of the tied weights at attach time and ``raw``
  starting at ``threshold_init_rel`` (0.3): the threshold is non-negative, its gradient is alive
  at the start (dM/dt is proportional to t, so t = 0 would never move) and one learning rate
  suits every layer whatever its weight scale.
* ``tau_l = tau_rel * mean(W_l**2)`` at attach time, times a global annealing factor.
* All thresholds live in one ``ThresholdBank``, registered as a submodule of the FIRST gate
  (``<first gated layer>.parametrizations.weight.<i>.thresholds``) and referenced by the others:
  the model's ``state_dict`` and ``parameters()`` carry them without adding a child to the model
  itself (which would break ``nn.Sequential``), and ``threshold_parameters()`` hands them to the
  optimiser as their own group.
* The mask and both kept counts (soft sum of M, hard count of M > 0.5) are produced by one
  custom autograd function during the forward; ``soft_kept_fraction()`` reuses them rather than
  recomputing every mask, and the backward needs only W and M (no chain of autograd temporaries).
* The exact hard mask is ``|W| > t``; ``fit_thresholds`` rescales every threshold by one common
  factor (bisection) so the hard sparsity equals a target while keeping the learned per-layer
  allocation; ``freeze_masks`` fixes the binary mask for a final stretch; ``harden`` bakes it.

Typical loop (see sparsity.SparsityController)::

    gates = attach_gates(model, GateConfig())
    opt = AdamW([{"params": gates.weight_parameters(), "lr": 5e-5},
                 {"params": gates.threshold_parameters(), "lr": 1e-3, "weight_decay": 0.0},
                 controller.param_group()])
    loss = ctc_loss + controller.loss(kept.soft, step, hard_kept=kept.hard)
    #       with kept = gates.kept_fractions(), read after the forward, before backward
    ...
    gates.fit_thresholds(target); gates.freeze_masks(); ...short stretch...; gates.harden()

A gated model's state_dict is for trainer checkpoints (restore: attach_gates with the same
config on the same architecture, then load_state_dict); harden or detach before
``save_pretrained``. Pickling a parametrized module is refused by torch; deepcopy works.

Precision: the gate is computed in the weight's dtype. Under AMP (fp32 master weights) that is
fp32; pure fp16 weights are not recommended (W**2 of small weights underflows).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pinchgate import masking
from pinchgate.families import family_for_model

BANK_NAME = "thresholds"  # attribute of the first gate that owns the ThresholdBank
TYING_MODES = ("matrix", "block", "global")
Tying = Literal["matrix", "block", "global"]


# A transformer block is the prefix up to "layers.<i>" / "blocks.<i>" (a part merely ending
# in "layers", such as a CNN's, is not one).
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|blocks)\.\d+\.")
_MIN_MEAN_SQUARE = 1e-20  # keeps tau and the RMS scale positive for an all-zero weight


@dataclass
class GateConfig:
    """Where gates go and how they start.

    ``include`` / ``exclude`` are regular expressions matched (``re.fullmatch``) against dotted
    module names; ``include=None`` selects the model family's defaults (for CTC models every
    Linear inside the transformer encoder layers plus the feature projection) and
    ``exclude=None`` the family's exclusions (the CTC head). ``extras`` names optional
    groups of the family (CTC: ``pos_conv``, ``feature_encoder``) added to either kind of
    include list.

    Defaults come from a toy study only (3-layer MLP, perturbed "pretrained" start, 300 steps,
    targets 0.5 / 0.75 / 0.9), to be re-checked on speech models: with ``tau_rel`` 0.05 the
    pinched weights often leave the sigmoid's band and the thresholds stall (hard sparsity up
    to 20 pp off target); 0.2 with a threshold lr of 0.03 landed within 0.2 pp of the target on
    5 seeds x 2 targets before the exact step; 0.5 also lands but shrinks every kept weight
    more at the start. The thresholds' learning rate (Adam, in units of the layer RMS per step)
    must let t travel 1-2 RMS during the target ramp, roughly lr >= 3 / ramp_steps; slower
    thresholds lag, the multipliers wind up and the sparsity overshoots.
    """

    tau_rel: float = 0.2
    threshold_init_rel: float = 0.3
    tying: Tying = "matrix"
    extras: tuple[str, ...] = ()
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.tau_rel > 0:
            raise ValueError(f"tau_rel must be > 0, got {self.tau_rel}")
        # A threshold starting at 0 never moves (its gradient is proportional to t).
        if not self.threshold_init_rel > 0:
            raise ValueError(f"threshold_init_rel must be > 0, got {self.threshold_init_rel}")
        if self.tying not in TYING_MODES:
            raise ValueError(f"tying must be one of {TYING_MODES}, got {self.tying!r}")
        # YAML gives lists; keep the config hashable and printable the same way.
        if self.include is not None:
            self.include = tuple(self.include)
        if self.exclude is not None:
            self.exclude = tuple(self.exclude)
        self.extras = tuple(self.extras)

    def patterns(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The (include, exclude) patterns in effect on ``model``."""
        include, exclude = self.include, self.exclude
        if include is not None and exclude is not None and not self.extras:
            return include, exclude
        try:
            family = family_for_model(model)
        except ValueError:  # a plain module: only the patterns given
            if include is None or self.extras:
                raise ValueError(
                    f"no default gate targets for {type(model).__name__}: it has no config "
                    "naming a model family; give include patterns"
                ) from None
            return include, ()
        default_include, default_exclude = family.gate_targets()
        available = family.gate_extras()
        unknown = [name for name in self.extras if name not in available]
        if unknown:
            raise ValueError(
                f"{family.name} models have no optional gate group {', '.join(unknown)} "
                f"(they have: {', '.join(available) or 'none'})"
            )
        include = default_include if include is None else include
        include += tuple(available[name] for name in available if name in self.extras)
        return include, default_exclude if exclude is None else exclude


class _PinchFunction(torch.autograd.Function):
    """out = W * M, plus sum(M) (differentiable) and count(M > 0.5) (not), in one pass.

    Saves only W and M; with s = M(1 - M) and u = s * (g W + g_kept):
    dL/dW = g M + W u / tau and dL/dt = -(t / tau) * sum(u).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, threshold: Tensor, tau: float):
        t = threshold.detach().to(weight.device, weight.dtype)
        # (W^2 - t^2) / (2 tau) in one fused multiply-add, then the sigmoid in place.
        mask = torch.addcmul(t.square().mul(-0.5 / tau), weight, weight, value=0.5 / tau)
        mask.sigmoid_()
        out = weight * mask
        # At least fp32 for the sum: bf16 cannot count millions of weights.
        soft = mask.sum(dtype=torch.promote_types(weight.dtype, torch.float32))
        hard = torch.count_nonzero(mask > 0.5)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(hard)
        ctx.save_for_backward(weight, threshold, mask)
        ctx.tau = tau
        return out, soft, hard

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_soft: Tensor | None, _grad_hard: Tensor | None):
        weight, threshold, mask = ctx.saved_tensors
        tau = ctx.tau
        need_w, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_out is None and grad_soft is None:
            return None, None, None
        s = torch.addcmul(mask, mask, mask, value=-1.0)  # M (1 - M)
        if grad_out is None:
            u = s.mul_(grad_soft.to(s.dtype))
        else:
            if grad_soft is None:
                u = grad_out * weight
            else:
                u = torch.addcmul(grad_soft.to(weight.dtype), grad_out, weight)
            u.mul_(s)
            del s
        grad_w = grad_t = None
        if need_t:
            acc = torch.promote_types(weight.dtype, torch.float32)
            t = threshold.detach().to(weight.device, acc)
            grad_t = (u.sum(dtype=acc) * (-1.0 / tau) * t).to(threshold.device, threshold.dtype)
        if need_w:
            if grad_out is None:
                grad_w = u.mul_(weight).mul_(1.0 / tau)
            else:
                grad_w = grad_out * mask
                grad_w.addcmul_(weight, u, value=1.0 / tau)
        return grad_w, grad_t, None


def pinch(weight: Tensor, threshold: Tensor, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gate one weight: returns (W * M, sum(M), count(M > 0.5)); differentiable in W and t."""
    return _PinchFunction.apply(weight, threshold, tau)


class ThresholdBank(nn.Module):
    """Every learnable threshold of a gated model: t_i = scale_i * |raw_i|."""

    def __init__(self, group_names: Sequence[str], scales: Tensor, init_rel: float) -> None:
        super().__init__()
        self.group_names = list(group_names)
        scales = scales.detach().float()
        self.raw = nn.Parameter(torch.full_like(scales, float(init_rel)))
        self.register_buffer("scale", scales.clone())
        self.register_buffer("tau_scale", torch.ones((), device=scales.device))
        # A Python copy of the annealing factor: the gate needs it without a device sync.
        self.tau_scale_value = 1.0

    def threshold(self, index: int) -> Tensor:
        return self.scale[index] * self.raw[index].abs()

    def thresholds(self) -> Tensor:
        return self.scale * self.raw.abs()

    def set_tau_scale(self, factor: float) -> None:
        if not factor > 0:
            raise ValueError(f"tau scale factor must be > 0, got {factor}")
        self.tau_scale.fill_(float(factor))
        # float32-rounded on the CPU (no device sync), as it reads after a restore.
        self.tau_scale_value = float(torch.tensor(float(factor), dtype=torch.float32))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.tau_scale_value = float(self.tau_scale)

    def extra_repr(self) -> str:
        return f"n_thresholds={self.raw.numel()}"


class SelfPinchingGate(nn.Module):
    """The parametrization registered on one weight: W -> W * M (or W * fixed mask)."""

    def __init__(
        self, name: str, bank: ThresholdBank, index: int, tau: float, owns_bank: bool = False
    ) -> None:
        super().__init__()
        self.name = name
        self.index = index
        # Every gate reads the bank; only the first registers it, so it is saved once.
        object.__setattr__(self, "_bank", bank)
        if owns_bank:
            self.add_module(BANK_NAME, bank)
        self.register_buffer("tau_base", torch.tensor(float(tau), device=bank.raw.device))
        self.register_buffer("hard_mask", None)  # set by freeze_masks()
        # The float32-rounded value, so a restored checkpoint computes bit-identical masks.
        self.tau_base_value = float(self.tau_base)
        self.weight_numel = 0  # set by attach_gates
        self._plist: nn.Module | None = None  # the ParametrizationList holding this gate
        self.param_order: list[str] = []  # the module's parameter order before attaching
        self._cache: tuple[Tensor, Tensor, tuple] | None = None

    @property
    def bank(self) -> ThresholdBank:
        return self._bank

    @property
    def tau(self) -> float:
        return self.tau_base_value * self._bank.tau_scale_value

    @property
    def frozen(self) -> bool:
        return self.hard_mask is not None

    def threshold(self) -> Tensor:
        return self._bank.threshold(self.index)

    def _sources(self) -> list[Tensor]:
        """The tensors the gated weight is computed from (e.g. the original, or g and v)."""
        plist = self._plist
        if plist is None:
            return []
        if plist.is_tensor:
            return [plist.original]
        return [getattr(plist, f"original{i}") for i in range(plist.ntensors)]

    def _state_key(self) -> tuple:
        # Changes whenever a weight or threshold is updated in place (optimizer step, load).
        return (
            tuple(s._version for s in self._sources()),
            self._bank.raw._version,
            self.tau,
            self.hard_mask is not None,
        )

    def forward(self, weight: Tensor) -> Tensor:
        if self.hard_mask is not None:
            self._cache = None
            return weight * self.hard_mask
        out, soft, hard = _PinchFunction.apply(weight, self.threshold(), self.tau)
        self._cache = (soft, hard, self._state_key())
        return out

    def kept_counts(self, weight_fn: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
        """(soft sum of M, hard count) from the last forward if still valid, else recomputed."""
        if self.hard_mask is not None:
            kept = self.hard_mask.sum(dtype=torch.float32)
            return kept, kept
        cache = self._cache
        if cache is not None and cache[2] == self._state_key():
            soft, hard, _ = cache
            stale_graph = torch.is_grad_enabled() and soft.grad_fn is None
            if not (stale_graph and self._bank.raw.requires_grad):
                return soft, hard
        _, soft, hard = _PinchFunction.apply(weight_fn(), self.threshold(), self.tau)
        return soft, hard

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # autograd graphs can be neither deep-copied nor pickled
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # A checkpoint taken during the frozen stretch carries the mask: make room for it.
        key = prefix + "hard_mask"
        if key in state_dict and self.hard_mask is None:
            self.hard_mask = torch.empty_like(state_dict[key], device=self.tau_base.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.tau_base_value = float(self.tau_base)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, index={self.index}, tau={self.tau:.3g}, frozen={self.frozen}"


@dataclass
class GatedLayer:
    """One gated weight matrix (or convolution kernel)."""

    name: str
    module: nn.Module
    gate: SelfPinchingGate

    @property
    def numel(self) -> int:
        return self.gate.weight_numel

    @property
    def position(self) -> int:
        return masking.position(self.module, SelfPinchingGate)

    def pre_gate_weight(self) -> Tensor:
        """The weight the gate sees (the raw parameter, or e.g. the weight-normed kernel)."""
        return masking.weight_before(self.module, self.position)

    def hard_mask(self) -> Tensor:
        """The exact binary mask 1[|W| > t] (or the frozen one)."""
        with torch.no_grad():
            if self.gate.hard_mask is not None:
                return self.gate.hard_mask.clone()
            w = self.pre_gate_weight()
            return w.abs() > self.gate.threshold().to(w.dtype)


@dataclass
class LayerStats:
    name: str
    numel: int
    kept: int
    sparsity: float
    threshold: float
    tau: float


@dataclass
class KeptFractions:
    """Kept fractions over all gated weights from the last forward (no device sync)."""

    soft: Tensor  # differentiable
    hard: Tensor  # count of M > 0.5, i.e. |W| > t up to rounding; not differentiable


@dataclass
class HardenResult:
    kept: int
    total: int
    layers: list[LayerStats]

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total


def has_gate(module: nn.Module) -> bool:
    return masking.has(module, SelfPinchingGate)


def _block_key(name: str) -> str:
    match = _BLOCK_RE.search(name)
    return name if match is None else name[: match.end() - 1]


def tie_key(name: str, tying: str) -> str:
    """The name of the threshold a layer shares under ``tying``: its own, its transformer
    block's, or the model's one."""
    if tying == "global":
        return "global"
    if tying == "block":
        return _block_key(name)
    return name


def attach_gates(model: nn.Module, cfg: GateConfig | None = None) -> GatedModel:
    """Register a self-pinching gate on the weight of every selected layer of ``model``."""
    cfg = cfg or GateConfig()
    if any(has_gate(m) for m in model.modules()):
        raise ValueError(f"gates are already attached to this {type(model).__name__}")
    include, exclude = cfg.patterns(model)
    targets = masking.select_targets(model, include, exclude)
    if not targets:
        raise ValueError(
            f"no gateable layers found in {type(model).__name__}; patterns: "
            f"{list(include)}; exclude: {list(exclude)} (gateable types: Linear, Conv1d, "
            "Embedding; patterns are full-match regexes on module names)"
        )
    keys = [tie_key(name, cfg.tying) for name, _ in targets]
    group_names = list(dict.fromkeys(keys))
    group_index = {k: i for i, k in enumerate(group_names)}
    sumsq = [0.0] * len(group_names)
    count = [0] * len(group_names)
    mean_squares = []
    with torch.no_grad():
        for (_, module), key in zip(targets, keys, strict=True):
            w = module.weight.detach()
            ms = float(w.float().square().mean())
            mean_squares.append(max(ms, _MIN_MEAN_SQUARE))
            sumsq[group_index[key]] += ms * w.numel()
            count[group_index[key]] += w.numel()
    device = targets[0][1].weight.device
    scales = torch.tensor(
        [math.sqrt(max(s / n, _MIN_MEAN_SQUARE)) for s, n in zip(sumsq, count, strict=True)],
        device=device,
    )
    bank = ThresholdBank(group_names, scales, cfg.threshold_init_rel)
    for i, ((name, module), key, ms) in enumerate(zip(targets, keys, mean_squares, strict=True)):
        gate = SelfPinchingGate(name, bank, group_index[key], cfg.tau_rel * ms, owns_bank=i == 0)
        gate.weight_numel = module.weight.numel()
        gate.to(module.weight.device)
        masking.attach(module, gate)
        # A plain reference (not a submodule: the list already owns the gate).
        object.__setattr__(gate, "_plist", module.parametrizations.weight)
        gate._cache = None  # the registration checks ran a forward; do not keep its graph
    return GatedModel(model)


class GateControls:
    """What every gate view shares, given ``model``, ``bank`` (the thresholds), and its own
    ``kept_fractions`` and ``hard_counts``: optimiser groups, fractions, tau and thresholds."""

    model: nn.Module
    bank: ThresholdBank

    def kept_fractions(self) -> KeptFractions:
        raise NotImplementedError

    def hard_counts(self) -> tuple[int, int]:
        raise NotImplementedError

    def threshold_parameters(self) -> list[nn.Parameter]:
        """Parameters to give their own optimiser group (own learning rate, no weight decay)."""
        return [self.bank.raw]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the model except the thresholds."""
        return [p for p in self.model.parameters() if p is not self.bank.raw]

    def soft_kept_fraction(self) -> Tensor:
        """Differentiable kept fraction of the gated parameters."""
        return self.kept_fractions().soft

    def hard_kept_fraction(self) -> float:
        kept, total = self.hard_counts()
        return kept / total

    def set_tau_scale(self, factor: float) -> None:
        """Multiply every initial tau by ``factor`` (annealing; 1 = as attached)."""
        self.bank.set_tau_scale(factor)

    def scale_thresholds(self, factor: float) -> None:
        """Multiply every threshold by one common factor."""
        if not factor >= 0:
            raise ValueError(f"threshold scale factor must be >= 0, got {factor}")
        with torch.no_grad():
            self.bank.raw.mul_(factor)


class GatedModel(GateControls):
    """A view of a model's gates; all state lives in the model (see ``gates_of``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[GatedLayer] = []
        for name, module in model.named_modules():
            if has_gate(module):
                gate = module.parametrizations.weight[masking.position(module, SelfPinchingGate)]
                self.layers.append(GatedLayer(name, module, gate))
        if not self.layers:
            raise ValueError(f"no self-pinching gates are attached to this {type(model).__name__}")
        self.bank: ThresholdBank = self.layers[0].gate.bank

    # --- inventory ----------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Number of gated weights."""
        return sum(layer.numel for layer in self.layers)

    @property
    def frozen(self) -> bool:
        return any(layer.gate.frozen for layer in self.layers)

    def thresholds(self) -> dict[str, float]:
        """Threshold value (weight units) per gated layer."""
        values = self.bank.thresholds().detach().cpu().tolist()
        return {layer.name: values[layer.gate.index] for layer in self.layers}

    # --- kept fractions -----------------------------------------------------------------------
    def kept_fractions(self) -> KeptFractions:
        """Soft and hard kept fractions, reusing the masks of the last forward when current."""
        softs, hards = [], []
        for layer in self.layers:
            soft, hard = layer.gate.kept_counts(layer.pre_gate_weight)
            softs.append(soft)
            hards.append(hard.to(torch.float32))
        total = float(self.numel)
        return KeptFractions(torch.stack(softs).sum() / total, torch.stack(hards).sum() / total)

    def hard_counts(self) -> tuple[int, int]:
        """(kept, total) under the exact hard mask 1[|W| > t]."""
        kept = sum(int(layer.hard_mask().sum()) for layer in self.layers)
        return kept, self.numel

    def layer_stats(self) -> list[LayerStats]:
        thresholds = self.bank.thresholds().detach().cpu().tolist()
        stats = []
        for layer in self.layers:
            kept = int(layer.hard_mask().sum())
            stats.append(
                LayerStats(
                    name=layer.name,
                    numel=layer.numel,
                    kept=kept,
                    sparsity=1.0 - kept / layer.numel,
                    threshold=thresholds[layer.gate.index],
                    tau=layer.gate.tau,
                )
            )
        return stats

    # --- controls -----------------------------------------------------------------------------
    def target_kept(self, target_sparsity: float) -> int:
        """Gated weights kept at a gated sparsity (the baselines round the same way)."""
        return round((1.0 - target_sparsity) * self.numel)

    def fit_thresholds(self, target_sparsity: float, iterations: int = 64) -> float:
        """Scale all thresholds by one factor so the HARD gated sparsity equals the target.

        The Lagrangian lands near the target, not on it; a common factor keeps the learned
        per-layer allocation. Bisection on the factor; returns the factor applied.
        """
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
        if self.frozen:
            raise ValueError("masks are frozen; fit thresholds before freeze_masks()")
        target_kept = self.target_kept(target_sparsity)
        with torch.no_grad():
            weights = [layer.pre_gate_weight().detach() for layer in self.layers]
            thresholds = [layer.gate.threshold().detach() for layer in self.layers]

            def kept_at(factor: float) -> int:
                return sum(
                    int(torch.count_nonzero(w.abs() > (t * factor).to(w.dtype)))
                    for w, t in zip(weights, thresholds, strict=True)
                )

            ratios = [
                float(w.abs().max()) / float(t)
                for w, t in zip(weights, thresholds, strict=True)
                if float(t) > 0 and w.numel() > 0
            ]
            lo, hi = 0.0, max(ratios, default=1.0) * 1.001 + 1e-12
            kept_lo, kept_hi = kept_at(lo), kept_at(hi)
            if kept_lo > target_kept > kept_hi:
                for _ in range(iterations):
                    mid = 0.5 * (lo + hi)
                    kept_mid = kept_at(mid)
                    if kept_mid > target_kept:
                        lo, kept_lo = mid, kept_mid
                    else:
                        hi, kept_hi = mid, kept_mid
                    if kept_hi == target_kept or hi - lo <= 1e-12 * hi:
                        break
            factor = lo if abs(kept_lo - target_kept) < abs(kept_hi - target_kept) else hi
        self.scale_thresholds(factor)
        return factor

    def freeze_masks(self, target_kept: int | None = None) -> tuple[int, int]:
        """Replace every soft gate by its fixed hard mask; weights stay trainable.

        Pruned entries of plain weights are zeroed now, and the mask keeps their effective
        value at zero afterwards. Thresholds stop mattering. With `target_kept`, the masks
        keep exactly that many weights: where no threshold factor can (equal magnitudes at
        the boundary, as in weights stored in fp16), the few entries nearest their layer's
        threshold (by |W| / t) are added or dropped. Returns (kept, total).
        """
        if all(layer.gate.frozen for layer in self.layers):
            return sum(int(layer.gate.hard_mask.sum()) for layer in self.layers), self.numel
        with torch.no_grad():
            masks = [layer.hard_mask() for layer in self.layers]
            if target_kept is not None:
                masks = self._exact_masks(masks, target_kept)
        kept = 0
        with torch.no_grad():
            for layer, mask in zip(self.layers, masks, strict=True):
                plist = layer.module.parametrizations.weight
                if plist.is_tensor and layer.position == 0:
                    plist.original.masked_fill_(~mask, 0)
                layer.gate.hard_mask = mask
                layer.gate._cache = None
                kept += int(mask.sum())
        return kept, self.numel

    def _exact_masks(self, masks: list[Tensor], target_kept: int) -> list[Tensor]:
        """The masks with the `target_kept - kept` boundary entries added (or dropped)."""
        missing = target_kept - sum(int(m.sum()) for m in masks)
        if missing == 0:
            return masks
        want_kept = missing > 0  # add pruned entries, or drop kept ones
        scores, owners = [], []
        for i, (layer, mask) in enumerate(zip(self.layers, masks, strict=True)):
            w = layer.pre_gate_weight().detach().abs().float().flatten()
            t = float(layer.gate.threshold())
            ratio = w / t if t > 0 else w
            candidates = (~mask if want_kept else mask).flatten().nonzero().squeeze(1)
            scores.append(ratio[candidates] if want_kept else -ratio[candidates])
            owners.append(torch.stack([torch.full_like(candidates, i), candidates], dim=1))
        scores, owners = torch.cat(scores), torch.cat(owners)
        if abs(missing) > scores.numel():
            raise ValueError(f"cannot keep {target_kept} of {self.numel} gated weights")
        chosen = owners[torch.topk(scores, abs(missing)).indices]
        masks = [m.clone() for m in masks]
        for i, flat in chosen.tolist():
            masks[i].view(-1)[flat] = want_kept
        return masks

    def harden(self) -> HardenResult:
        """Bake 1[|W| > t] (or the frozen mask) into the weights as exact zeros; remove gates."""
        stats = self.layer_stats()
        with torch.no_grad():
            for layer in self.layers:
                mask = layer.hard_mask()
                plist = layer.module.parametrizations.weight
                if layer.position != len(plist) - 1:
                    raise ValueError(f"{layer.name}: cannot harden a gate that is not last")
                # Written back through any remaining parametrization (e.g. weight_norm's
                # right_inverse), so the effective weight is exactly the masked one.
                effective = layer.pre_gate_weight().detach().masked_fill(~mask, 0)
                masking.detach(layer.module, layer.position, layer.gate.param_order, effective)
        self._forget()
        kept = sum(s.kept for s in stats)
        return HardenResult(kept=kept, total=sum(s.numel for s in stats), layers=stats)

    def detach(self) -> None:
        """Remove every gate, leaving the original unmasked weights (as before attaching)."""
        for layer in self.layers:
            masking.detach(layer.module, layer.position, layer.gate.param_order)
        self._forget()

    def _forget(self) -> None:
        for layer in self.layers:
            layer.gate._cache = None  # drop any graph still referenced
        self.layers = []


def gates_of(model: nn.Module) -> GatedModel:
    """The gates attached to ``model`` (e.g. after a checkpoint restore)."""
    return GatedModel(model)


def _as_gates(model_or_gates: nn.Module | GatedModel) -> GatedModel:
    if isinstance(model_or_gates, GatedModel):
        return model_or_gates
    return GatedModel(model_or_gates)


def harden(model_or_gates: nn.Module | GatedModel) -> HardenResult:
    """Bake the exact hard masks into the weights and remove the gates."""
    return _as_gates(model_or_gates).harden()


def detach_gates(model_or_gates: nn.Module | GatedModel) -> None:
    """Remove the gates without masking anything."""
    _as_gates(model_or_gates).detach()


def set_tau_scale(model_or_gates: nn.Module | GatedModel, factor: float) -> None:
    """Set the multiplicative annealing factor on every gate's tau."""
    _as_gates(model_or_gates).set_tau_scale(factor)


def tau_anneal_factor(step: int, start_step: int, end_step: int, final_factor: float) -> float:
    """Geometric annealing: 1 until ``start_step``, ``final_factor`` from ``end_step`` on.

    Annealing too far freezes the thresholds (METHOD pitfalls): keep final_factor moderate
    (e.g. 0.1) and let ``fit_thresholds`` do the exact landing.
    """
    if not final_factor > 0:
        raise ValueError(f"final tau factor must be > 0, got {final_factor}")
    if end_step <= start_step:
        return 1.0 if step < start_step else final_factor
    progress = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return final_factor**progress

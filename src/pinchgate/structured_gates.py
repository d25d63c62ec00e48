"""Structured self-pinching gates: whole groups of parameters (FFN neurons, attention heads).

The weight-level gate pinches single weights; here the same form acts on a GROUP's magnitude.
The groups come from the model's family (``ModelFamily.structured_units``); for the CTC
family, for every transformer block:

* FFN neuron j: W_in[j, :], b_in[j] and W_out[:, j], 2 * hidden + 1 parameters;
* attention head h: its head_dim rows of q/k/v (weights and biases) and its head_dim columns
  of the output projection, 4 * head_dim * hidden + 3 * head_dim parameters (the output
  bias is shared).

With g the group's L2 norm and n its parameter count, the mask is

    m = sigmoid((g**2 - t**2) / (2 * tau))

computed as ms = g**2 / n (the group's mean square) against a threshold t in RMS units, which is
the same mask (t**2 and tau scale by n too) but puts neurons and heads on one scale, so a
threshold can be tied across them. ``m`` multiplies every parameter of the group (its rows
or columns of each member tensor), through ``torch.nn.utils.parametrize``: no model code is
edited. Scale-relative as the weight-level gates: t = RMS * |raw| with RMS the root mean
square of the tied grouped parameters at attach time (raw starts at ``threshold_init_rel``),
tau = tau_rel * that unit's mean square. One threshold per unit (the FFN neurons of a block,
or its heads) by default; ``tying`` "block" or "global" as for weights.

Counting is in PARAMETERS, so the whole-model compression ratio means what it means for the
weight-level gates; or, with ``cost=True`` (``structured:cost=flops``), in each group's COST
(multiply-adds per second of audio, from the family): the controller, the exact fit and the
kept fractions then count cost, and the parameter counts are only reported.
``StructuredGates`` offers the ``GatedModel`` interface the compression loop uses (kept
fractions for ``SparsityController``, an exact final threshold fit, frozen masks, harden).
The family's ``shrink`` then removes the pruned groups for real.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pinchgate import masking
from pinchgate.families import Member, UnitSpec, family_for_model
from pinchgate.gates import (
    TYING_MODES,
    GateControls,
    HardenResult,
    KeptFractions,
    LayerStats,
    ThresholdBank,
    Tying,
    has_gate,
    tie_key,
)

UNIT_NAME = "group"  # attribute of a unit's first GroupMask that owns the unit
BANK_NAME = "thresholds"  # attribute of the first unit that owns the ThresholdBank
_MIN_MEAN_SQUARE = 1e-20


@dataclass
class StructuredGateConfig:
    """Start values of the structured gates (see the module docstring)."""

    tau_rel: float = 0.2
    threshold_init_rel: float = 0.3
    tying: Tying = "matrix"  # one threshold per unit (FFN neurons, or heads, of a block)

    def __post_init__(self) -> None:
        if not self.tau_rel > 0:
            raise ValueError(f"tau_rel must be > 0, got {self.tau_rel}")
        if not self.threshold_init_rel > 0:  # t = 0 never moves (dm/dt is proportional to t)
            raise ValueError(f"threshold_init_rel must be > 0, got {self.threshold_init_rel}")
        if self.tying not in TYING_MODES:
            raise ValueError(f"tying must be one of {TYING_MODES}, got {self.tying!r}")


def _raw_tensor(member: Member) -> Tensor:
    """The tensor the gate reads: the parametrization's original, never the masked value."""
    if parametrize.is_parametrized(member.module, member.name):
        return getattr(member.module.parametrizations, member.name).original
    return getattr(member.module, member.name)


class GroupUnit(nn.Module):
    """The groups of one module (the neurons of an FFN, or the heads of an attention).

    Holds the unit's tau and, once frozen, its binary group mask; the threshold lives in the
    shared ``ThresholdBank`` at ``index``.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        members: list[Member],
        n_groups: int,
        bank: ThresholdBank,
        index: int,
        tau: float,
        owns_bank: bool = False,
        dead: list[Member] | None = None,
        group_params: int | None = None,
        group_cost: float | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.kind = kind  # "ffn", "heads" or "layers"
        self.n_groups = n_groups
        self.index = index
        object.__setattr__(self, "_members", members)  # plain references: the model owns them
        object.__setattr__(self, "_bank", bank)
        if owns_bank:
            self.add_module(BANK_NAME, bank)
        device = bank.raw.device
        self.register_buffer("tau_base", torch.tensor(float(tau), device=device))
        self.register_buffer("hard_mask", None)  # bool [n_groups], set by freeze
        self.group_size = sum(_raw_tensor(m).numel() for m in members) // n_groups
        # Parameters that go with each group (counted by the controller and the reports):
        # the members' share, or more where ungated tensors die with the group.
        self.group_params = group_params or self.group_size
        # What the controller and the exact fit count per group: parameters, or a cost.
        self.counts_cost = group_cost is not None
        self.group_weight = float(group_cost if group_cost is not None else self.group_params)
        object.__setattr__(self, "_dead", list(dead or []))
        # Restores the modules' parameter order (and so state_dict order) on removal.
        self._param_orders = [list(m.module._parameters) for m in members]

    @property
    def members(self) -> list[Member]:
        return self._members

    @property
    def bank(self) -> ThresholdBank:
        return self._bank

    @property
    def dead(self) -> list[Member]:
        return self._dead

    @property
    def numel(self) -> int:
        """Parameters in this unit's groups."""
        return self.n_groups * self.group_params

    @property
    def weight(self) -> float:
        """What this unit's groups count for the controller (parameters, or cost)."""
        return self.n_groups * self.group_weight

    @property
    def frozen(self) -> bool:
        return self.hard_mask is not None

    def threshold(self) -> Tensor:
        """t in RMS units (compared with the group's mean square as t**2)."""
        return self._bank.threshold(self.index)

    def tau(self) -> Tensor:
        return self.tau_base * self._bank.tau_scale

    def mean_squares(self) -> Tensor:
        """||group||**2 / group_size for every group: differentiable in the weights."""
        total = None
        for member in self.members:
            x = _raw_tensor(member)
            acc = torch.promote_types(x.dtype, torch.float32)
            if member.dim == 0:
                s = x.reshape(self.n_groups, -1).square().sum(1, dtype=acc)
            else:
                s = x.reshape(x.shape[0], self.n_groups, -1).square().sum((0, 2), dtype=acc)
            total = s if total is None else total + s
        return total / self.group_size

    def masks(self) -> tuple[Tensor, Tensor]:
        """(soft mask, exact hard mask ms > t**2) per group; the frozen mask twice if frozen."""
        if self.hard_mask is not None:
            return self.hard_mask.float(), self.hard_mask
        ms = self.mean_squares()
        t2 = self.threshold().to(ms.device, ms.dtype).square()
        soft = torch.sigmoid((ms - t2) / (2 * self.tau().to(ms.device, ms.dtype)))
        return soft, ms.detach() > t2.detach()

    def hard_groups(self) -> Tensor:
        with torch.no_grad():
            return self.masks()[1].clone()

    def broadcast(self, mask: Tensor, member: Member, like: Tensor) -> Tensor:
        """The per-group mask shaped to multiply the member's rows or columns."""
        rows = mask.to(like.dtype).repeat_interleave(like.shape[member.dim] // self.n_groups)
        if member.dim == 0:
            return rows.reshape(-1, *([1] * (like.dim() - 1)))
        return rows.reshape(1, -1, *([1] * (like.dim() - 2)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "hard_mask"  # a checkpoint of the frozen stretch carries the mask
        if key in state_dict and self.hard_mask is None:
            self.hard_mask = torch.empty_like(state_dict[key], device=self.tau_base.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, kind={self.kind}, groups={self.n_groups}, "
            f"group_size={self.group_size}, frozen={self.frozen}"
        )


class GroupMask(nn.Module):
    """The parametrization of one member tensor: x -> x * m (m broadcast over its groups)."""

    def __init__(self, unit: GroupUnit, member: int, owns_unit: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "_unit", unit)
        self.member = member
        if owns_unit:
            self.add_module(UNIT_NAME, unit)

    @property
    def unit(self) -> GroupUnit:
        return self._unit

    def forward(self, x: Tensor) -> Tensor:
        unit = self._unit
        soft, _ = unit.masks()
        return x * unit.broadcast(soft, unit.members[self.member], x)


def attach_structured_gates(
    model: nn.Module,
    cfg: StructuredGateConfig | None = None,
    units: list[UnitSpec] | None = None,
    cost: bool = False,
) -> StructuredGates:
    """Gate every group of ``units`` (default: the model family's structured units, e.g. every
    FFN neuron and attention head of the transformer blocks); with ``cost``, count each
    group's cost (``UnitSpec.cost``) instead of its parameters."""
    cfg = cfg or StructuredGateConfig()
    if any(has_gate(m) for m in model.modules()) or _units_of(model):
        raise ValueError(f"gates are already attached to this {type(model).__name__}")
    if units is None:
        try:
            family = family_for_model(model)
        except ValueError:
            raise ValueError(
                f"no structured units known for {type(model).__name__}: it has no config "
                "naming a model family; give the units"
            ) from None
        units = family.structured_units(model)
    specs = []  # the units with groups to gate
    for unit in units:
        for member in unit.members:
            if parametrize.is_parametrized(member.module, member.name):
                raise ValueError(f"{unit.name}: {member.name} is already parametrized")
        if cost and unit.cost is None:
            raise ValueError(f"{unit.name}: no cost known for its groups (cost=flops)")
        if unit.n_groups > 0:
            specs.append((unit.name, unit.kind, unit.members, unit.n_groups, unit))
    if not specs:
        raise ValueError("no groups to gate")
    keys = [tie_key(name, cfg.tying) for name, *_ in specs]
    tie_names = list(dict.fromkeys(keys))
    sumsq, count, mean_squares = [0.0] * len(tie_names), [0] * len(tie_names), []
    with torch.no_grad():
        for (_, _, members, _, _), key in zip(specs, keys, strict=True):
            s = sum(float(_raw_tensor(m).float().square().sum()) for m in members)
            n = sum(_raw_tensor(m).numel() for m in members)
            mean_squares.append(max(s / n, _MIN_MEAN_SQUARE))
            sumsq[tie_names.index(key)] += s
            count[tie_names.index(key)] += n
    device = _raw_tensor(specs[0][2][0]).device
    scales = torch.tensor(
        [math.sqrt(max(s / n, _MIN_MEAN_SQUARE)) for s, n in zip(sumsq, count, strict=True)],
        device=device,
    )
    bank = ThresholdBank(tie_names, scales, cfg.threshold_init_rel)
    for i, ((name, kind, members, n, spec), key, ms) in enumerate(
        zip(specs, keys, mean_squares, strict=True)
    ):
        index = tie_names.index(key)
        unit = GroupUnit(
            name,
            kind,
            members,
            n,
            bank,
            index,
            cfg.tau_rel * ms,
            owns_bank=i == 0,
            dead=spec.dead,
            group_params=spec.group_params,
            group_cost=spec.cost if cost else None,
        )
        for j, member in enumerate(members):
            mask = GroupMask(unit, j, owns_unit=j == 0)
            parametrize.register_parametrization(member.module, member.name, mask)
    return StructuredGates(model)


def _units_of(model: nn.Module) -> list[GroupUnit]:
    units = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for plist in module.parametrizations.values():
            units += [p.unit for p in plist if isinstance(p, GroupMask) and p.member == 0]
    return units


@dataclass
class UnitStats(LayerStats):
    """LayerStats in parameters (numel, kept), plus the groups; threshold and tau are on the
    group's L2 norm (t * sqrt(group_size), tau * group_size)."""

    kind: str = ""
    groups: int = 0
    groups_kept: int = 0
    group_size: int = 0


class StructuredGates(GateControls):
    """A view of a model's structured gates with ``GatedModel``'s interface; state in the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.units = _units_of(model)
        if not self.units:
            raise ValueError(f"no structured gates are attached to this {type(model).__name__}")
        self.bank: ThresholdBank = self.units[0].bank

    # --- inventory ----------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Parameters in gated groups (the 'gated parameters' of the sparsity controller)."""
        return sum(u.numel for u in self.units)

    @property
    def weight(self) -> float:
        """What the controller counts in all: grouped parameters, or their cost."""
        return sum(u.weight for u in self.units)

    @property
    def counts_cost(self) -> bool:
        return any(u.counts_cost for u in self.units)

    def hard_kept_fraction(self) -> float:
        """The share of `weight` (parameters, or cost) the hard masks keep."""
        kept = sum(float(u.hard_groups().sum()) * u.group_weight for u in self.units)
        return kept / self.weight

    @property
    def layers(self) -> list[GroupUnit]:
        return self.units

    @property
    def frozen(self) -> bool:
        return any(u.frozen for u in self.units)

    def thresholds(self) -> dict[str, float]:
        """Threshold on each unit's group L2 norm."""
        values = self.bank.thresholds().detach().cpu().tolist()
        return {u.name: values[u.index] * math.sqrt(u.group_size) for u in self.units}

    # --- kept fractions -----------------------------------------------------------------------
    def kept_fractions(self) -> KeptFractions:
        """Soft (differentiable) and hard kept fractions of the grouped parameters (or cost)."""
        softs, hards = [], []
        for unit in self.units:
            soft, hard = unit.masks()
            softs.append(soft.sum() * unit.group_weight)
            hards.append(hard.sum().to(torch.float32) * unit.group_weight)
        total = self.weight
        return KeptFractions(torch.stack(softs).sum() / total, torch.stack(hards).sum() / total)

    def hard_counts(self) -> tuple[int, int]:
        """(kept, total) parameters under the exact hard mask."""
        kept = sum(int(u.hard_groups().sum()) * u.group_params for u in self.units)
        return kept, self.numel

    def layer_stats(self) -> list[UnitStats]:
        thresholds = self.bank.thresholds().detach().cpu().tolist()
        stats = []
        for unit in self.units:
            groups_kept = int(unit.hard_groups().sum())
            kept = groups_kept * unit.group_params
            stats.append(
                UnitStats(
                    name=unit.name,
                    numel=unit.numel,
                    kept=kept,
                    sparsity=1.0 - kept / unit.numel,
                    threshold=thresholds[unit.index] * math.sqrt(unit.group_size),
                    tau=float(unit.tau()) * unit.group_size,
                    kind=unit.kind,
                    groups=unit.n_groups,
                    groups_kept=groups_kept,
                    group_size=unit.group_params,
                )
            )
        return stats

    # --- controls -----------------------------------------------------------------------------
    def fit_thresholds(self, target_sparsity: float) -> float:
        """Scale all thresholds by one factor so the hard kept PARAMETER count (or cost) is as
        close to the target as whole groups allow (keeps the learned per-unit allocation).

        A group survives factor f while sqrt(ms) / t > f, so sorting those ratios gives every
        reachable count: the exact answer bisection on f would converge to. Returns f.

        Whole decoder layers (kind ``layers``) are never all removed: a decoder without
        layers cannot transcribe, so the strongest layer stays whatever the target.
        """
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
        if self.frozen:
            raise ValueError("masks are frozen; fit thresholds before freeze_masks()")
        target_kept = (1.0 - target_sparsity) * self.weight
        with torch.no_grad():
            ratios, sizes, layers = [], [], []
            for unit in self.units:
                norm = unit.mean_squares().detach().double().cpu().sqrt()
                t = float(unit.threshold())
                # A zero threshold keeps every non-zero group whatever the factor.
                ratio = norm / t if t > 0 else torch.where(norm > 0, math.inf, 0.0).double()
                ratios.append(ratio)
                sizes.append(torch.full_like(ratio, unit.group_weight))
                layers.append(torch.full_like(ratio, float(unit.kind == "layers")))
            ratio = torch.cat(ratios)
            order = torch.argsort(ratio, descending=True, stable=True)
            r = ratio[order].tolist()
            kept_after = [0.0, *torch.cumsum(torch.cat(sizes)[order], 0).tolist()]
            is_layer = torch.cat(layers)[order].tolist()
        # The fewest groups to keep: up to and including the strongest decoder layer.
        least = is_layer.index(1.0) + 1 if 1.0 in is_layer else 0
        best_k, factor = None, 1.0
        for k in range(least, len(r) + 1):  # keep the k largest ratios: f in [below, above)
            above = r[k - 1] if k > 0 else math.inf
            below = r[k] if k < len(r) else 0.0
            if not above > below:  # equal ratios cannot be split; ratio 0 is never kept
                continue
            if best_k is None or abs(kept_after[k] - target_kept) < abs(
                kept_after[best_k] - target_kept
            ):
                best_k = k
                if math.isinf(above):
                    factor = 2.0 * below if below > 0 else 1.0
                elif below == 0.0:
                    factor = 0.5 * above
                else:
                    factor = math.sqrt(above * below)  # well inside the gap
        self.scale_thresholds(factor)
        return factor

    def fit_uniform(self, target_sparsity: float) -> float:
        """The exact fit with the same number of groups kept in every unit of a stack (the
        units named ``model.encoder...`` or ``model.decoder...``: a stock config holds one
        feed-forward width per stack). The learned allocation sets each stack's share: the
        common-factor fit's mean count per unit, scaled by one factor to the target. Each
        unit's own threshold is then set between its k-th and (k+1)-th largest group.
        Returns the geometric mean of the units' threshold factors."""
        if self.frozen:
            raise ValueError("masks are frozen; fit thresholds before freeze_masks()")
        stacks: dict[str, list[GroupUnit]] = {}
        for unit in self.units:
            stacks.setdefault(_stack(unit.name), []).append(unit)
        for name, units in stacks.items():
            if len({(u.n_groups, u.group_params, u.group_weight) for u in units}) != 1:
                raise ValueError(f"uniform fit: the units of {name} differ in size")
        if len({u.index for u in self.units}) != len(self.units):
            raise ValueError("uniform fit: needs one threshold per unit (tying matrix)")
        saved = self.bank.raw.detach().clone()
        self.fit_thresholds(target_sparsity)  # the learned allocation, as counts per unit
        learned = {
            name: sum(int(u.hard_groups().sum()) for u in units) / len(units)
            for name, units in stacks.items()
        }
        with torch.no_grad():
            self.bank.raw.copy_(saved)
        target_kept = (1.0 - target_sparsity) * self.weight

        def counts(scale: float) -> dict[str, int]:
            return {
                name: min(units[0].n_groups, round(scale * learned[name]))
                for name, units in stacks.items()
            }

        def kept(k: dict[str, int]) -> int:
            return sum(k[n] * len(us) * us[0].group_weight for n, us in stacks.items())

        low, high = 0.0, 1.0
        while kept(counts(high)) < target_kept and high < 1e6:
            high *= 2
        for _ in range(60):  # kept(counts(scale)) grows with scale
            mid = (low + high) / 2
            low, high = (mid, high) if kept(counts(mid)) < target_kept else (low, mid)
        best = min((counts(low), counts(high)), key=lambda k: abs(kept(k) - target_kept))
        factors = []
        with torch.no_grad():
            for name, units in stacks.items():
                for unit in units:
                    norms = unit.mean_squares().detach().double().sqrt().sort(descending=True)
                    g, k = norms.values.tolist(), best[name]
                    if k == 0:
                        t = 2.0 * g[0] if g[0] > 0 else 1.0
                    elif k == len(g):
                        t = 0.5 * g[-1]
                    else:
                        t = math.sqrt(g[k - 1] * g[k]) if g[k] > 0 else 0.5 * g[k - 1]
                    old = float(unit.threshold())
                    scale = float(self.bank.scale[unit.index])
                    self.bank.raw[unit.index] = t / scale
                    if old > 0:
                        factors.append(t / old)
        return math.exp(sum(map(math.log, factors)) / len(factors)) if factors else 1.0

    def freeze_masks(self) -> tuple[int, int]:
        """Fix every unit's binary group mask; pruned groups are zeroed now. (kept, total)."""
        with torch.no_grad():
            for unit in self.units:
                if unit.hard_mask is None:
                    hard = unit.hard_groups()
                    _zero_pruned(unit, hard)
                    unit.hard_mask = hard
        return self.hard_counts()

    def harden(self) -> HardenResult:
        """Bake the hard group masks in as exact zeros and remove the gates (stock modules)."""
        stats = self.layer_stats()
        hards = [unit.hard_groups() for unit in self.units]
        units = self._remove()
        with torch.no_grad():
            for unit, hard in zip(units, hards, strict=True):
                _zero_pruned(unit, hard)
        kept = sum(s.kept for s in stats)
        return HardenResult(kept=kept, total=sum(s.numel for s in stats), layers=stats)

    def detach(self) -> None:
        """Remove every structured gate, leaving the weights unmasked (as before attaching)."""
        self._remove()

    def _remove(self) -> list[GroupUnit]:
        units, self.units = self.units, []
        for unit in units:
            for member, order in zip(unit.members, unit._param_orders, strict=True):
                if parametrize.is_parametrized(member.module, member.name):
                    masking.detach(member.module, 0, order, tensor_name=member.name)
        return units

    def structure(self) -> list[dict]:
        """Groups kept per block, under the current hard masks. A block with several head
        units (a decoder's self- and cross-attention) names each: ``<unit>_heads``."""
        rows: dict[str, dict] = {}
        heads_units: dict[str, int] = {}
        for unit in self.units:
            if unit.kind == "heads":
                block = unit.name.rpartition(".")[0]
                heads_units[block] = heads_units.get(block, 0) + 1
        for unit in self.units:
            block, _, own = unit.name.rpartition(".")
            hard = unit.hard_groups().cpu()
            row = rows.setdefault(block, {"layer": block})
            if unit.kind == "ffn":
                row["neurons"], row["neurons_kept"] = unit.n_groups, int(hard.sum())
            elif unit.kind == "layers":
                row["layer_kept"] = bool(hard.all())
            else:
                key = "heads" if heads_units[block] == 1 else f"{own}_heads"
                row[key] = unit.n_groups
                row[f"{key}_kept"] = torch.nonzero(hard).reshape(-1).tolist()
        return list(rows.values())


def _stack(name: str) -> str:
    """The stack a unit belongs to: its name up to its layer index (model.encoder.layers)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i])
    return name


def _zero_pruned(unit: GroupUnit, hard: Tensor) -> None:
    for member in [*unit.members, *unit.dead]:
        x = _raw_tensor(member)
        keep = unit.broadcast(hard.to(x.device), member, x)
        x.mul_(keep)


def structured_gates_of(model: nn.Module) -> StructuredGates:
    """The structured gates attached to ``model`` (e.g. after a checkpoint restore)."""
    return StructuredGates(model)

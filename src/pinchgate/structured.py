"""Structured self-pinching gates: whole feed-forward neurons and attention heads, then shrinking.

The weight-level gate pinches single weights; here the same form acts on a GROUP's magnitude.
For every transformer block of a wav2vec2-style encoder:

* FFN neuron j: W_in[j, :], b_in[j] (``feed_forward.intermediate_dense``) and W_out[:, j]
  (``feed_forward.output_dense``), 2 * hidden + 1 parameters;
* attention head h: its head_dim rows of q/k/v (weights and biases) and its head_dim columns
  of ``out_proj``, 4 * head_dim * hidden + 3 * head_dim parameters (out_proj's bias is shared).

With g the group's L2 norm and n its parameter count, the mask is

    m = sigmoid((g**2 - t**2) / (2 * tau))

computed as ms = g**2 / n (the group's mean square) against a threshold t in RMS units, which is
the same mask (t**2 and tau scale by n too) but puts neurons and heads on one scale, so a
threshold can be tied across them. ``m`` multiplies every parameter of the group (rows of
W_in / b_in / q / k / v, columns of W_out / out_proj), through ``torch.nn.utils.parametrize``:
no model code is edited. Scale-relative as the weight-level gates: t = RMS * |raw| with RMS the
root mean square of the tied grouped parameters at attach time (raw starts at
``threshold_init_rel``), tau = tau_rel * that unit's mean square. One threshold per unit (the
FFN neurons of a block, or its heads) by default; ``tying`` "block" or "global" as for weights.

Counting is in PARAMETERS, so the whole-model compression ratio means what it means for the
weight-level gates: a pruned neuron removes 2 * hidden + 1 parameters, a head
4 * head_dim * hidden + 3 * head_dim. ``StructuredGates`` offers the ``GatedModel`` interface
the compression loop uses (kept fractions for ``SparsityController``, an exact final threshold
fit, frozen masks, harden). ``shrink`` then removes the pruned groups for real: smaller dense
matrices, per-layer sizes recorded in config.json under ``pinchgate_structure``;
``load_shrunk`` rebuilds that architecture and loads it strictly. A block may lose every
neuron (its FFN adds only the output bias) or every head (its attention adds only out_proj's
bias): both are supported, not prevented.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pinchgate.compress import GateMethod, _say
from pinchgate.errors import PinchgateError
from pinchgate.gates import (
    TYING_MODES,
    GateControls,
    HardenResult,
    KeptFractions,
    LayerStats,
    ThresholdBank,
    Tying,
    _has_gate,
    _tie_key,
)
from pinchgate.models import count_parameters
from pinchgate.sparsity import (
    compression_ratio_for_gated_sparsity,
    gated_sparsity_for_ratio,
    max_compression_ratio,
)

STRUCTURE_KEY = "pinchgate_structure"  # the config.json entry of a shrunken model
STRUCTURE_FORMAT = "pinchgate-shrunk"
STRUCTURE_VERSION = 1
SHRUNK_DIR = "model-shrunk"  # beside model/ in a structured compression run
UNIT_NAME = "group"  # attribute of a unit's first GroupMask that owns the unit
BANK_NAME = "thresholds"  # attribute of the first unit that owns the ThresholdBank
_MIN_MEAN_SQUARE = 1e-20
# WavLM-style attention carries per-head parameters beyond q/k/v/out: not handled here.
_PER_HEAD_EXTRAS = ("gru_rel_pos_const", "gru_rel_pos_linear", "rel_attn_embed")


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


# --- the encoder blocks ----------------------------------------------------------------------


@dataclass
class Block:
    """One transformer block: its dotted name, attention module and feed-forward module."""

    name: str
    attention: nn.Module
    feed_forward: nn.Module

    @property
    def head_dim(self) -> int:
        return int(self.attention.head_dim)


def encoder_blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks of a wav2vec2 / HuBERT / Data2VecAudio encoder, in order."""
    blocks = []
    for name, module in model.named_modules():
        attention = getattr(module, "attention", None)
        feed_forward = getattr(module, "feed_forward", None)
        if not (isinstance(attention, nn.Module) and isinstance(feed_forward, nn.Module)):
            continue
        if not all(
            isinstance(getattr(feed_forward, n, None), nn.Linear)
            for n in ("intermediate_dense", "output_dense")
        ):
            continue
        if not all(
            isinstance(getattr(attention, n, None), nn.Linear)
            for n in ("q_proj", "k_proj", "v_proj", "out_proj")
        ) or not hasattr(attention, "head_dim"):
            continue
        extras = [n for n in _PER_HEAD_EXTRAS if hasattr(attention, n)]
        if extras:
            raise ValueError(
                f"{name}.attention ({type(attention).__name__}) has per-head parameters "
                f"({', '.join(extras)}): structured gates handle wav2vec2, HuBERT and "
                "Data2VecAudio attention only"
            )
        blocks.append(Block(name, attention, feed_forward))
    return blocks


# --- the gate --------------------------------------------------------------------------------


@dataclass
class Member:
    """One tensor of a unit: ``module.<name>``, its groups along rows (dim 0) or columns (1)."""

    module: nn.Linear
    name: str
    dim: int


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
    ) -> None:
        super().__init__()
        self.name = name
        self.kind = kind  # "ffn" or "heads"
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
        # Restores the modules' parameter order (and so state_dict order) on removal.
        self._param_orders = [list(m.module._parameters) for m in members]

    @property
    def members(self) -> list[Member]:
        return self._members

    @property
    def bank(self) -> ThresholdBank:
        return self._bank

    @property
    def numel(self) -> int:
        """Parameters in this unit's groups."""
        return self.n_groups * self.group_size

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


def _unit_members(block: Block, kind: str) -> list[Member]:
    if kind == "ffn":
        fin, fout = block.feed_forward.intermediate_dense, block.feed_forward.output_dense
        candidates = [Member(fin, "weight", 0), Member(fin, "bias", 0), Member(fout, "weight", 1)]
    else:
        a = block.attention
        candidates = [Member(m, "weight", 0) for m in (a.q_proj, a.k_proj, a.v_proj)]
        candidates += [Member(m, "bias", 0) for m in (a.q_proj, a.k_proj, a.v_proj)]
        candidates.append(Member(a.out_proj, "weight", 1))
    return [m for m in candidates if getattr(m.module, m.name, None) is not None]


def attach_structured_gates(
    model: nn.Module, cfg: StructuredGateConfig | None = None
) -> StructuredGates:
    """Gate every FFN neuron and attention head of the model's transformer blocks."""
    cfg = cfg or StructuredGateConfig()
    if any(_has_gate(m) for m in model.modules()) or _units_of(model):
        raise ValueError(f"gates are already attached to this {type(model).__name__}")
    blocks = encoder_blocks(model)
    if not blocks:
        raise ValueError(
            f"no transformer blocks with attention (q/k/v/out_proj) and feed_forward "
            f"(intermediate_dense/output_dense) found in {type(model).__name__}"
        )
    specs = []  # (unit name, kind, members, n_groups)
    for block in blocks:
        heads = int(block.attention.num_heads)
        neurons = block.feed_forward.intermediate_dense.out_features
        for kind, suffix, n in (("heads", "attention", heads), ("ffn", "feed_forward", neurons)):
            members = _unit_members(block, kind)
            for member in members:
                if parametrize.is_parametrized(member.module, member.name):
                    raise ValueError(
                        f"{block.name}.{suffix}: {member.name} is already parametrized"
                    )
            if n > 0:
                specs.append((f"{block.name}.{suffix}" if block.name else suffix, kind, members, n))
    keys = [_tie_key(name, cfg.tying) for name, *_ in specs]
    tie_names = list(dict.fromkeys(keys))
    sumsq, count, mean_squares = [0.0] * len(tie_names), [0] * len(tie_names), []
    with torch.no_grad():
        for (_, _, members, _), key in zip(specs, keys, strict=True):
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
    for i, ((name, kind, members, n), key, ms) in enumerate(
        zip(specs, keys, mean_squares, strict=True)
    ):
        index = tie_names.index(key)
        unit = GroupUnit(name, kind, members, n, bank, index, cfg.tau_rel * ms, owns_bank=i == 0)
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

    # --- inventory -------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Parameters in gated groups (the 'gated parameters' of the sparsity controller)."""
        return sum(u.numel for u in self.units)

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

    # --- kept fractions --------------------------------------------------------------------
    def kept_fractions(self) -> KeptFractions:
        """Soft (differentiable) and hard kept fractions of the grouped parameters."""
        softs, hards = [], []
        for unit in self.units:
            soft, hard = unit.masks()
            softs.append(soft.sum() * unit.group_size)
            hards.append(hard.sum().to(torch.float32) * unit.group_size)
        total = float(self.numel)
        return KeptFractions(torch.stack(softs).sum() / total, torch.stack(hards).sum() / total)

    def hard_counts(self) -> tuple[int, int]:
        """(kept, total) parameters under the exact hard mask."""
        kept = sum(int(u.hard_groups().sum()) * u.group_size for u in self.units)
        return kept, self.numel

    def layer_stats(self) -> list[UnitStats]:
        thresholds = self.bank.thresholds().detach().cpu().tolist()
        stats = []
        for unit in self.units:
            groups_kept = int(unit.hard_groups().sum())
            kept = groups_kept * unit.group_size
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
                    group_size=unit.group_size,
                )
            )
        return stats

    # --- controls --------------------------------------------------------------------------
    def fit_thresholds(self, target_sparsity: float) -> float:
        """Scale all thresholds by one factor so the hard kept PARAMETER count is as close to
        the target as whole groups allow (keeps the learned per-unit allocation).

        A group survives factor f while sqrt(ms) / t > f, so sorting those ratios gives every
        reachable count: the exact answer bisection on f would converge to. Returns f.
        """
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
        if self.frozen:
            raise ValueError("masks are frozen; fit thresholds before freeze_masks()")
        target_kept = (1.0 - target_sparsity) * self.numel
        with torch.no_grad():
            ratios, sizes = [], []
            for unit in self.units:
                norm = unit.mean_squares().detach().double().cpu().sqrt()
                t = float(unit.threshold())
                # A zero threshold keeps every non-zero group whatever the factor.
                ratio = norm / t if t > 0 else torch.where(norm > 0, math.inf, 0.0).double()
                ratios.append(ratio)
                sizes.append(torch.full_like(ratio, float(unit.group_size)))
            ratio = torch.cat(ratios)
            order = torch.argsort(ratio, descending=True, stable=True)
            r = ratio[order].tolist()
            kept_after = [0.0, *torch.cumsum(torch.cat(sizes)[order], 0).tolist()]
        best_k, factor = None, 1.0
        for k in range(len(r) + 1):  # keep the k largest ratios: f in [below, above)
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
            for member in unit.members:
                if parametrize.is_parametrized(member.module, member.name):
                    # False: the original Parameter object goes back (optimisers keep it).
                    parametrize.remove_parametrizations(
                        member.module, member.name, leave_parametrized=False
                    )
            for member, order in zip(unit.members, unit._param_orders, strict=True):
                params = member.module._parameters
                for key in order:
                    if key in params:
                        params[key] = params.pop(key)
        return units

    def structure(self) -> list[dict]:
        """Groups kept per block, under the current hard masks."""
        rows: dict[str, dict] = {}
        for unit in self.units:
            block = unit.name.rpartition(".")[0]
            hard = unit.hard_groups().cpu()
            row = rows.setdefault(block, {"layer": block})
            if unit.kind == "ffn":
                row["neurons"], row["neurons_kept"] = unit.n_groups, int(hard.sum())
            else:
                row["heads"] = unit.n_groups
                row["heads_kept"] = torch.nonzero(hard).reshape(-1).tolist()
        return list(rows.values())


def _zero_pruned(unit: GroupUnit, hard: Tensor) -> None:
    for member in unit.members:
        x = _raw_tensor(member)
        keep = unit.broadcast(hard.to(x.device), member, x)
        x.mul_(keep)


def structured_gates_of(model: nn.Module) -> StructuredGates:
    """The structured gates attached to ``model`` (e.g. after a checkpoint restore)."""
    return StructuredGates(model)


# --- shrinking -------------------------------------------------------------------------------


class HeadlessAttention(nn.Module):
    """An attention block with every head pruned: it adds out_proj's bias, nothing else.

    Keeps the zero-size q/k/v/out_proj Linears so the state dict has the usual names.
    """

    def __init__(self, hidden: int, head_dim: int, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.num_heads = 0
        self.head_dim = head_dim
        for name in ("k_proj", "v_proj", "q_proj"):
            setattr(self, name, _empty_linear(hidden, 0, bias, device, dtype))
        self.out_proj = _empty_linear(0, hidden, bias, device, dtype)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> tuple[Tensor, None]:
        nothing = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        return self.out_proj(nothing), None


def _empty_linear(in_features: int, out_features: int, bias: bool, device, dtype) -> nn.Linear:
    """A Linear without initialisation (its values are copied or loaded next)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-element tensors: "init is a no-op"
        layer = nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=dtype)
    return layer.to_empty(device=device or "cpu")


def _sliced_linear(layer: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None):
    weight = layer.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = layer.bias is not None
    new = _empty_linear(weight.shape[1], weight.shape[0], bias, weight.device, weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias:
            new.bias.copy_(layer.bias.detach() if rows is None else layer.bias.detach()[rows])
    new.train(layer.training)
    return new


def _head_rows(heads: list[int], head_dim: int, device) -> Tensor:
    return torch.tensor(
        [h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long, device=device
    )


def _kept_groups(block: Block) -> tuple[list[int], list[int]]:
    """FFN neurons and heads that can change the output: those with a non-zero output column
    (W_out[:, j], or the head's out_proj columns); the others contribute exactly zero."""
    w_out = block.feed_forward.output_dense.weight.detach()
    neurons = torch.nonzero(w_out.ne(0).any(0)).reshape(-1).tolist()
    attention = block.attention
    if attention.num_heads == 0:
        return neurons, []
    out = attention.out_proj.weight.detach()
    per_head = out.reshape(out.shape[0], attention.num_heads, -1).ne(0).any(2).any(0)
    return neurons, torch.nonzero(per_head).reshape(-1).tolist()


def _shrink_block(block: Block, neurons: list[int], heads: list[int], parent: nn.Module) -> None:
    ff = block.feed_forward
    idx = torch.tensor(neurons, dtype=torch.long, device=ff.intermediate_dense.weight.device)
    ff.intermediate_dense = _sliced_linear(ff.intermediate_dense, rows=idx)
    ff.output_dense = _sliced_linear(ff.output_dense, cols=idx)
    attention, head_dim = block.attention, block.head_dim
    if not heads:
        weight = attention.out_proj.weight
        headless = HeadlessAttention(
            weight.shape[0],
            head_dim,
            attention.out_proj.bias is not None,
            weight.device,
            weight.dtype,
        )
        with torch.no_grad():
            if attention.out_proj.bias is not None:
                headless.out_proj.bias.copy_(attention.out_proj.bias)
        headless.train(attention.training)
        parent.attention = headless
        return
    rows = _head_rows(heads, head_dim, attention.q_proj.weight.device)
    for name in ("k_proj", "v_proj", "q_proj"):
        setattr(attention, name, _sliced_linear(getattr(attention, name), rows=rows))
    attention.out_proj = _sliced_linear(attention.out_proj, cols=rows)
    attention.num_heads = len(heads)


def shrink(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Remove the pruned FFN neurons and attention heads: smaller dense matrices, same outputs.

    A group is removed when its output columns are exactly zero (after hardening every
    parameter of a pruned group is), so the result computes what ``model`` computes. The
    per-block sizes go to ``model.config.pinchgate_structure`` (``save_shrunk`` writes it).
    """
    if _units_of(model) or any(_has_gate(m) for m in model.modules()):
        raise ValueError("gates are still attached: harden the model before shrinking it")
    target = model if inplace else copy.deepcopy(model)
    blocks = encoder_blocks(target)
    if not blocks:
        raise ValueError(f"no transformer blocks found in {type(model).__name__}")
    parents = dict(target.named_modules())
    previous = _structure_layers(getattr(target.config, STRUCTURE_KEY, None))
    layers = []
    for i, block in enumerate(blocks):
        neurons, heads = _kept_groups(block)
        _shrink_block(block, neurons, heads, parents[block.name])
        if previous is not None:  # shrinking a shrunken model: keep the original indices
            heads = [previous[i]["heads"][h] for h in heads]
        layers.append({"intermediate_size": len(neurons), "heads": heads})
    set_structure(target.config, layers, blocks[0].head_dim)
    return target


def set_structure(config, layers: list[dict], head_dim: int) -> None:
    setattr(
        config,
        STRUCTURE_KEY,
        {
            "format": STRUCTURE_FORMAT,
            "version": STRUCTURE_VERSION,
            "head_dim": head_dim,
            "layers": layers,
        },
    )


def _structure_layers(structure: dict | None) -> list[dict] | None:
    if structure is None:
        return None
    if not isinstance(structure, dict) or structure.get("format") != STRUCTURE_FORMAT:
        raise ValueError(f"{STRUCTURE_KEY}: not a {STRUCTURE_FORMAT} entry")
    if structure.get("version") != STRUCTURE_VERSION:
        raise ValueError(
            f"{STRUCTURE_KEY}: version {structure.get('version')}, this pinchgate reads "
            f"{STRUCTURE_VERSION}"
        )
    return structure["layers"]


def apply_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Resize a freshly built full-size model to a shrunken one's shapes (values: to load)."""
    layers = _structure_layers(structure)
    blocks = encoder_blocks(model)
    if len(layers) != len(blocks):
        raise ValueError(
            f"{STRUCTURE_KEY}: {len(layers)} layers, but the model has {len(blocks)} blocks"
        )
    parents = dict(model.named_modules())
    for i, (block, layer) in enumerate(zip(blocks, layers, strict=True)):
        try:
            n_neurons = int(layer["intermediate_size"])
            heads = [int(h) for h in layer["heads"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{STRUCTURE_KEY}: layer {i}: unreadable ({exc})") from None
        full_neurons = block.feed_forward.intermediate_dense.out_features
        full_heads = int(block.attention.num_heads)
        if not 0 <= n_neurons <= full_neurons:
            raise ValueError(f"{STRUCTURE_KEY}: layer {i}: {n_neurons} neurons of {full_neurons}")
        if heads != sorted(set(heads)) or any(not 0 <= h < full_heads for h in heads):
            raise ValueError(f"{STRUCTURE_KEY}: layer {i}: bad head indices {heads}")
        _shrink_block(block, list(range(n_neurons)), heads, parents[block.name])
    set_structure(model.config, layers, blocks[0].head_dim if blocks else 0)
    return model


def is_shrunk(config) -> bool:
    return getattr(config, STRUCTURE_KEY, None) is not None


def save_shrunk(model: nn.Module, path: str | Path, feature_extractor=None, tokenizer=None) -> Path:
    """A Hugging Face-style directory: config.json (with the structure) + model.safetensors,
    written under a temporary name and renamed. Read it back with ``load_shrunk``."""
    if not is_shrunk(model.config):
        raise ValueError("not a shrunken model: call shrink(model) first")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if feature_extractor is not None:
        feature_extractor.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_shrunk(path: str | Path) -> nn.Module:
    """A shrunken model directory: architecture rebuilt from config.json, weights loaded
    strictly (every tensor present, every shape as the structure says). Eval mode."""
    from pinchgate.export import _build_model, _load_config, _read_state_dict, _weight_files

    path = Path(path)
    config = _load_config(path)
    if not is_shrunk(config):
        raise PinchgateError(f"{path / 'config.json'}: no {STRUCTURE_KEY}: not a shrunken model")
    model = _build_model(config)  # applies the structure (export._build_model)
    state = _read_state_dict(_weight_files(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise PinchgateError(
            f"{path}: weights do not match config.json's structure ({' '.join(first[:3])})"
        ) from None
    return model.eval()


def shrink_dir(source: str | Path, out_dir: str | Path) -> dict:
    """Shrink a hardened model directory (or run directory) into ``out_dir``; returns sizes."""
    from pinchgate.export import _side_files, load_any, resolve_model_dir

    model_dir = resolve_model_dir(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PinchgateError(f"{out_dir}: already exists and is not empty; choose a new path")
    model = load_any(model_dir)
    try:
        shrunk = shrink(model, inplace=False)
    except ValueError as exc:
        raise PinchgateError(f"{model_dir}: {exc}") from None
    if out_dir.exists():
        out_dir.rmdir()
    save_shrunk(shrunk, out_dir)
    for side in _side_files(model_dir):
        if side.name != "config.json":
            shutil.copy2(side, out_dir / side.name)
    return {
        "params_before": count_parameters(model)["total"],
        "params_after": count_parameters(shrunk)["total"],
        "structure": getattr(shrunk.config, STRUCTURE_KEY),
    }


# --- the compression method ------------------------------------------------------------------


class StructuredGateMethod(GateMethod):
    """The compression hooks with FFN-neuron and attention-head gates instead of weight gates."""

    def attach(self, model: nn.Module) -> None:
        cfg = self.cfg
        self.total_params = count_parameters(model)["total"]
        gate_cfg = StructuredGateConfig(cfg.tau_rel, cfg.threshold_init_rel, cfg.tying)
        try:
            self.gates = attach_structured_gates(model, gate_cfg)
        except ValueError as exc:
            raise PinchgateError(f"--model {cfg.model}: {exc}") from None
        grouped = self.gates.numel
        if cfg.target_ratio is not None:
            try:
                self.target_sparsity = gated_sparsity_for_ratio(
                    cfg.target_ratio, self.total_params, grouped
                )
            except ValueError:
                highest = max_compression_ratio(self.total_params, grouped)
                raise PinchgateError(
                    f"--target-ratio {cfg.target_ratio}: unreachable with --granularity "
                    f"structured: only {grouped:,} of {self.total_params:,} parameters are in "
                    f"FFN neurons and attention heads; the highest reachable ratio is "
                    f"{highest:.4g}x (every group pruned)"
                ) from None
        else:
            self.target_sparsity = float(cfg.target_sparsity)
        self.controller = self.make_controller(next(model.parameters()).device)
        ratio = compression_ratio_for_gated_sparsity(
            self.target_sparsity, self.total_params, grouped
        )
        neurons = sum(u.n_groups for u in self.gates.units if u.kind == "ffn")
        heads = sum(u.n_groups for u in self.gates.units if u.kind == "heads")
        _say(
            f"structured gates on {neurons:,} FFN neurons and {heads} heads ({grouped:,} of "
            f"{self.total_params:,} parameters); target: {ratio:.2f}x = structured sparsity "
            f"{self.target_sparsity:.4f}"
        )

    def finalize(self, model: nn.Module) -> dict:
        gates = structured_gates_of(model)
        started = time.perf_counter()
        factor = self.fit_now_or_recall(gates)
        structure = gates.structure()
        hardened = gates.harden()
        result = self.summary(model, hardened, factor, started)
        result["compression"].update(
            granularity="structured",
            largest_group_params=max(s.group_size for s in hardened.layers),
            groups=structure,
        )
        return result


def export_shrunk_run(
    results: dict, run_dir: Path, batch_seconds: float, say: Callable[..., None]
) -> dict:
    """Shrink the hardened model of a finished run into ``run_dir/model-shrunk``, read it back
    from disk and score it on the run's sets; returns what report.json records."""
    from pinchgate.train import evaluate_sets

    hardened = results["model"]
    started = time.perf_counter()
    shrunk = shrink(hardened, inplace=False)
    path = save_shrunk(
        shrunk, run_dir / SHRUNK_DIR, results["feature_extractor"], results["tokenizer"]
    )
    seconds = time.perf_counter() - started
    del shrunk
    exported = load_shrunk(path).to(next(hardened.parameters()).device)
    difference = _max_logit_difference(hardened, exported, results, batch_seconds)
    say(
        f"shrunken model ({path}), as exported; max |logit difference| against the masked "
        f"model on {difference['utterances']} {difference['set']} utterances: "
        f"{difference['max_abs_diff']:.3g}"
    )
    scores = evaluate_sets(
        exported,
        results["feature_extractor"],
        results["tokenizer"],
        results["data"],
        run_dir / "shrunk",
        batch_seconds,
        say,
    )
    return {
        "dir": str(path),
        "params": count_parameters(exported)["total"],
        "structure": getattr(exported.config, STRUCTURE_KEY),
        "shrink_seconds": seconds,
        "logit_check": difference,
        "eval": scores,
    }


def _max_logit_difference(masked, shrunk, results: dict, batch_seconds: float) -> dict:
    """Largest |logit| difference between the masked and the shrunken model on the run's
    first evaluation set, in the batches evaluation uses (padding included)."""
    from pinchgate.data.audio import load_audio
    from pinchgate.data.batching import bucket_batches

    data = results["data"]
    sets = ([("dev", data.dev)] if data.dev else []) + list(data.tests.items())
    if not sets:
        return {"set": None, "utterances": 0, "max_abs_diff": float("nan")}
    name, utterances = sets[0]
    extractor = results["feature_extractor"]
    device = next(masked.parameters()).device
    worst, count = 0.0, 0
    durations = [u.duration or 0.0 for u in utterances]
    batches = bucket_batches(durations, batch_seconds, shuffle=False)
    for batch in batches[:2]:  # enough to show it; the WERs cover the rest
        audio = [load_audio(utterances[i].audio_path, extractor.sampling_rate) for i in batch]
        features = extractor(
            audio, sampling_rate=extractor.sampling_rate, padding=True, return_tensors="pt"
        )
        inputs = {k: v.to(device) for k, v in features.items()}
        with torch.no_grad():
            a = masked.eval()(**inputs).logits
            b = shrunk.eval()(**inputs).logits
        worst = max(worst, float((a - b).abs().max()))
        count += len(batch)
    return {
        "set": Path(name.replace("toy:", "toy-")).name,
        "utterances": count,
        "max_abs_diff": worst,
    }


def record_shrunk(run_dir: Path, results: dict, shrunk: dict) -> None:
    """Add the shrunken model's section to results.json (written before it existed)."""
    from pinchgate.checkpoint import atomic_write_text

    results["compression"]["shrunk"] = shrunk
    path = run_dir / "results.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        saved.setdefault("compression", {})["shrunk"] = shrunk
        atomic_write_text(path, json.dumps(saved, indent=1))

"""Structured gates as a compression method: whole FFN neurons and attention heads.

The gates' method (``methods/gates.py``) with ``pinchgate.structured_gates`` instead of
weight-level gates: the same controller, exact fit (to whole groups) and frozen stretch.
The run then also writes the physically smaller model (``compress.py``, with the family's
``shrink``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from pinchgate.console import say
from pinchgate.errors import PinchgateError
from pinchgate.families import count_parameters, family_for_model
from pinchgate.methods.base import CompressionSummary, compression_target
from pinchgate.methods.gates import GateMethod
from pinchgate.sparsity import max_compression_ratio
from pinchgate.structured_gates import (
    StructuredGateConfig,
    StructuredGates,
    attach_structured_gates,
    structured_gates_of,
)

UNIT_KINDS = ("ffn", "heads", "layers")
COSTS = ("params", "flops")


@dataclass
class StructuredOptions:
    """``structured:units=ffn`` gates only the kinds named (``+`` between several).
    ``layers`` (whole decoder layers, Whisper) gates the tensors the heads and neurons of
    those layers are cut from: with it, ``ffn`` and ``heads`` gate only the units outside
    the decoder layers (the encoder's)."""

    units: str = "ffn+heads"
    uniform: int = 0  # 1: the same number of groups kept in every layer of a stack
    cost: str = "params"  # what the target counts: params, or flops (multiply-adds per s)

    def kinds(self) -> list[str]:
        return [kind for kind in self.units.split("+") if kind]

    def check(self, spec: str, max_steps: int) -> None:
        kinds = self.kinds()
        unknown = [kind for kind in kinds if kind not in UNIT_KINDS]
        if unknown or not kinds:
            raise PinchgateError(
                f"--method {spec}: units={self.units!r}; choose from {', '.join(UNIT_KINDS)} "
                "joined by + (e.g. units=ffn, units=ffn+heads)"
            )
        if self.uniform not in (0, 1):
            raise PinchgateError(f"--method {spec}: uniform must be 0 or 1")
        if self.cost not in COSTS:
            raise PinchgateError(
                f"--method {spec}: cost={self.cost!r}; choose from {', '.join(COSTS)}"
            )
        if self.uniform and kinds != ["ffn"]:
            raise PinchgateError(
                f"--method {spec}: uniform=1 keeps feed-forward widths equal per stack; "
                "use it with units=ffn"
            )


def _without_overlap(units: list) -> list:
    """Whole-layer units first; a unit sharing a tensor with one of them is left out (its
    neurons or heads go with the layer)."""
    taken = set()
    for unit in units:
        if unit.kind == "layers":
            taken |= {(id(m.module), m.name) for m in [*unit.members, *unit.dead]}
    return [
        u
        for u in units
        if u.kind == "layers" or not any((id(m.module), m.name) in taken for m in u.members)
    ]


class StructuredGateMethod(GateMethod):
    """The compression hooks with group gates (FFN neurons, attention heads, or whole
    decoder layers) instead of weight gates."""

    name = "structured"

    def attach(self, model: nn.Module) -> None:
        cfg = self.cfg
        total = count_parameters(model)["total"]
        gate_cfg = StructuredGateConfig(cfg.tau_rel, cfg.threshold_init_rel, cfg.tying)
        options = self.options or StructuredOptions()
        kinds = options.kinds()
        by_cost = options.cost == "flops"
        if options.uniform and cfg.tying != "matrix":
            raise PinchgateError(
                f"--method {cfg.method}: uniform=1 sets each unit's threshold; it needs "
                f"--tying matrix, not {cfg.tying}"
            )
        try:
            family = family_for_model(model)
            units = _without_overlap([u for u in family.structured_units(model) if u.kind in kinds])
            if not units:
                raise ValueError(f"{family.name} models have no {'+'.join(kinds)} units")
            self.gates = attach_structured_gates(model, gate_cfg, units, cost=by_cost)
        except ValueError as exc:
            raise PinchgateError(f"--model {cfg.model}: {exc}") from None
        grouped = self.gates.numel
        try:
            self.target = compression_target(cfg, total, grouped)
        except ValueError:
            highest = max_compression_ratio(total, grouped)
            raise PinchgateError(
                f"--target-ratio {cfg.target_ratio}: unreachable with --method structured: "
                f"only {grouped:,} of {total:,} parameters are in its units "
                f"({'+'.join(kinds)}); the highest reachable ratio is {highest:.4g}x "
                "(every group pruned)"
            ) from None
        self.controller = self.make_controller(next(model.parameters()).device)
        counts = {
            kind: sum(u.n_groups for u in self.gates.units if u.kind == kind) for kind in kinds
        }
        names = {"ffn": "FFN neurons", "heads": "heads", "layers": "decoder layers"}
        t = self.target
        if by_cost:
            goal = (
                f"{self.gates.weight / 1e9:.3f} G multiply-adds per second of audio); target: "
                f"{t.sparsity:.4f} of them removed"
            )
        else:
            goal = f"target: {t.compression_ratio:.2f}x = structured sparsity {t.sparsity:.4f}"
        say(
            "structured gates on "
            + " and ".join(f"{counts[k]:,} {names[k]}" for k in kinds)
            + f" ({grouped:,} of {total:,} parameters"
            + (", " if by_cost else "); ")
            + goal
        )

    def fit_thresholds(self, gates: StructuredGates) -> float:
        if self.options is not None and self.options.uniform:
            return gates.fit_uniform(self.target.sparsity)
        return gates.fit_thresholds(self.target.sparsity)

    def freeze(self, gates: StructuredGates) -> tuple[int, int]:
        """Structured gates keep whole groups, so they land as close as groups allow.
        (kept, total) in what the target counts: parameters, or cost."""
        gates.freeze_masks()
        return round(gates.hard_kept_fraction() * gates.weight), round(gates.weight)

    def finalize(self, model: nn.Module) -> CompressionSummary:
        gates = structured_gates_of(model)
        started = time.perf_counter()
        factor = self.fit_now_or_recall(gates)
        structure = gates.structure()
        extra = {}
        if gates.counts_cost:  # the target was a share of the units' multiply-adds
            extra = {
                "cost": "flops",
                "cost_total": gates.weight,
                "cost_sparsity": 1.0 - gates.hard_kept_fraction(),
            }
        hardened = gates.harden()
        return self.summary(
            model,
            hardened,
            factor,
            started,
            granularity="structured",
            largest_group_params=max(s.group_size for s in hardened.layers),
            groups=structure,
            **extra,
        )

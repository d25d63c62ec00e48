"""Compression methods, one registry: `pinchgate compress --method NAME[:key=value,...]`.

Every method implements ``CompressionMethod`` (``base.py``) and runs in the same harness:
same data, model loading, training loop, export, evaluation and report; the same gated
weights and the same exact target count. Only the method differs:

    gates             self-pinching gates, the paper's method                      1 pass
    structured        self-pinching gates on whole FFN neurons and attention heads  1 pass
    dense             fine-tuning, nothing pruned (ratio 1)                         1 pass
    ump               dense, prune each matrix by the same proportion by |W|, fine-tune   2 passes
    global-magnitude  dense, prune once under one global |W| threshold, fine-tune    2 passes
    gmp               gradual magnitude pruning, Zhu & Gupta's cubic schedule       1 pass
    parp              dense, then prune-adjust-re-prune (Lai et al. 2021)          2 passes
    str               learned soft thresholds (Kusupati et al. 2020) + exact step   1 pass

``gmp-global`` is the deprecated name of ``global-magnitude`` (it is one-shot, not gradual)
and still works. A method's options ride in its name so that the saved config alone reruns
it: ``gmp:start=0.1,end=0.7,every=10,initial=0,allocation=uniform``, ``parp:every=50``,
``str:init=-5,lr=0.01,decay=1``, ``structured:units=ffn`` (feed-forward neurons only: all
heads kept, so CTranslate2 can hold the shrunk Whisper).

To add a method: subclass ``CompressionMethod`` (or ``BaselineMethod`` for a mask-based
baseline) in a module here, give it an options dataclass with ``check(spec, max_steps)``
if it takes options, and register it in METHODS.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from pinchgate.errors import PinchgateError
from pinchgate.methods.base import CompressionMethod, CompressionSummary
from pinchgate.methods.dense import DenseMethod
from pinchgate.methods.gates import GateMethod
from pinchgate.methods.gradual import GmpOptions, GradualMagnitude
from pinchgate.methods.magnitude import GlobalMagnitude, UniformMagnitude
from pinchgate.methods.parp import Parp, ParpOptions
from pinchgate.methods.soft_threshold import SoftThresholdMethod, StrOptions
from pinchgate.methods.structured import StructuredGateMethod, StructuredOptions

__all__ = [
    "ALIASES",
    "METHODS",
    "CompressionMethod",
    "CompressionSummary",
    "MethodSpec",
    "NoOptions",
    "canonical_name",
    "make_method",
    "parse_method",
]


@dataclass
class NoOptions:
    def check(self, spec: str, max_steps: int) -> None:
        pass


@dataclass(frozen=True)
class MethodSpec:
    """How the driver runs a method: its class, its options, its passes."""

    method: type[CompressionMethod]
    options: type = NoOptions
    passes: int = 1  # 2: dense fine-tuning first, the method starts from its model
    label: str = "prune + fine-tune"  # the method's pass in the report
    trains_dense_reference: bool = True  # may train the dense reference after it (one pass)


METHODS: dict[str, MethodSpec] = {
    "gates": MethodSpec(GateMethod, label="self-pinching gates"),
    "structured": MethodSpec(StructuredGateMethod, StructuredOptions, label="structured gates"),
    "dense": MethodSpec(DenseMethod, label="dense fine-tuning", trains_dense_reference=False),
    "ump": MethodSpec(UniformMagnitude, passes=2),
    "global-magnitude": MethodSpec(GlobalMagnitude, passes=2),
    "gmp": MethodSpec(GradualMagnitude, GmpOptions, label="gradual pruning"),
    "parp": MethodSpec(Parp, ParpOptions, passes=2),
    "str": MethodSpec(SoftThresholdMethod, StrOptions, label="STR"),
}
# Old names that still work (documented as deprecated).
ALIASES = {"gmp-global": "global-magnitude"}


def canonical_name(spec: str) -> str:
    """The method spec with a deprecated name replaced by the current one."""
    name, colon, rest = spec.partition(":")
    return ALIASES.get(name, name) + colon + rest


def parse_method(spec: str, max_steps: int):
    """``NAME[:key=value,...]`` -> (name, options); one-line errors naming the bad part."""
    name, colon, rest = canonical_name(spec).partition(":")
    if name not in METHODS:
        raise PinchgateError(
            f"--method {spec!r}: unknown method; choose one of {', '.join(METHODS)}"
        )
    options_class = METHODS[name].options
    hints = typing.get_type_hints(options_class)
    if colon and not hints:
        raise PinchgateError(f"--method {spec}: {name} takes no options")
    values = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, text = item.partition("=")
        if not eq or key not in hints:
            known = ", ".join(hints) or "none"
            raise PinchgateError(
                f"--method {spec}: bad option {item!r} (options of {name}: {known})"
            )
        kinds = typing.get_args(hints[key]) or (hints[key],)
        kind = int if int in kinds else float if float in kinds else str
        try:
            values[key] = kind(text)
        except ValueError:
            raise PinchgateError(
                f"--method {spec}: {key}={text!r} is not {kind.__name__}"
            ) from None
    options = options_class(**values)
    options.check(spec, max_steps)
    return name, options


def make_method(cfg, run_dir, name: str, options) -> CompressionMethod:
    return METHODS[name].method(cfg, run_dir, options)

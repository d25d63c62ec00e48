"""Baselines in the gates' harness: `pinchgate compress --method NAME[:key=value,...]`.

Same data, model loading, training loop (``train.run_finetune`` through ``TrainHooks``),
export, evaluation and report as the gates; the same gated matrices and the same exact
target count (``pruning.py``). Only the method differs:

    dense       fine-tuning, nothing pruned (ratio 1)                        1 pass
    ump         dense, prune each matrix by the same proportion by |W|, fine-tune   2 passes
    gmp-global  dense, prune under one global |W| threshold, fine-tune         2 passes
    gmp         gradual magnitude pruning, Zhu & Gupta's cubic schedule        1 pass
    parp        dense, then prune-adjust-re-prune (Lai et al. 2021)           2 passes
    str         learned soft thresholds (Kusupati et al. 2020) + exact step    1 pass

A method's options ride in its name so that the saved config alone reruns it:
``gmp:start=0.1,end=0.7,every=10,initial=0,allocation=uniform``, ``parp:every=50``,
``str:init=-5,lr=0.01,decay=1``. Each pass is its own run directory: the first (dense) pass
in ``OUTPUT/dense``, the last in ``OUTPUT`` (its model, report and layers.csv, as for the
gates); rerunning the same command resumes whichever pass was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from accelerate import PartialState

from pinchgate.baselines.dense import DenseMethod
from pinchgate.baselines.gradual import GmpSchedule, GradualMagnitude
from pinchgate.baselines.magnitude import GlobalMagnitude, UniformMagnitude
from pinchgate.baselines.parp import Parp
from pinchgate.baselines.pruning import ALLOCATIONS, exact_target, gated_layers
from pinchgate.baselines.soft_threshold import SoftThresholdMethod
from pinchgate.config import FinetuneConfig
from pinchgate.errors import PinchgateError

TWO_PASS = ("ump", "gmp-global", "parp")


@dataclass
class NoOptions:
    def check(self, spec: str, max_steps: int) -> None:
        pass


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
        _check_allocation(spec, self.allocation)
        schedule = GmpSchedule.for_run(self, max_steps)
        if schedule.end_step <= schedule.start_step:
            raise PinchgateError(
                f"--method {spec}: no pruning event fits between steps {schedule.start_step} "
                f"and {round(self.end * max_steps)} every {schedule.every} steps"
            )


@dataclass
class ParpOptions:
    every: int | None = None  # steps between re-prunes; default max_steps // 10
    allocation: str = "uniform"  # uniform | global

    def check(self, spec: str, max_steps: int) -> None:
        if self.every is not None and self.every < 1:
            raise PinchgateError(f"--method {spec}: every must be >= 1")
        _check_allocation(spec, self.allocation)


@dataclass
class StrOptions:
    init: float = -5.0  # s at the start: threshold = sigmoid(-5) x 4 RMS = 0.027 RMS
    lr: float | None = None  # learning rate of s; default 10 / max_steps
    decay: float | None = None  # weight decay of s; default from the target (see soft_threshold)

    def check(self, spec: str, max_steps: int) -> None:
        if self.lr is not None and not self.lr > 0:
            raise PinchgateError(f"--method {spec}: lr must be > 0")
        if self.decay is not None and not self.decay >= 0:
            raise PinchgateError(f"--method {spec}: decay must be >= 0")


def _check_allocation(spec: str, allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise PinchgateError(f"--method {spec}: allocation must be uniform or global")


# name: (options, method class); "gates" is the method itself (pinchgate.compress)
METHODS: dict[str, tuple[type, type | None]] = {
    "gates": (NoOptions, None),
    "dense": (NoOptions, DenseMethod),
    "ump": (NoOptions, UniformMagnitude),
    "gmp-global": (NoOptions, GlobalMagnitude),
    "gmp": (GmpOptions, GradualMagnitude),
    "parp": (ParpOptions, Parp),
    "str": (StrOptions, SoftThresholdMethod),
}


def parse_method(spec: str, max_steps: int):
    """``NAME[:key=value,...]`` -> (name, options); one-line errors naming the bad part."""
    name, colon, rest = spec.partition(":")
    if name not in METHODS:
        raise PinchgateError(
            f"--method {spec!r}: unknown method; choose one of {', '.join(METHODS)}"
        )
    options_class = METHODS[name][0]
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


def run_baseline(cfg, console=None) -> dict:
    """Every pass of the method in ``cfg.method``, then the report (as ``run_compress``)."""
    from pinchgate.report import write_report
    from pinchgate.train import run_finetune

    name, options = parse_method(cfg.method, cfg.max_steps)
    out = Path(cfg.output_dir)
    started = time.perf_counter()
    passes: list[dict] = []
    reference_dir = Path(cfg.dense_reference) if cfg.dense_reference else None
    if reference_dir is not None:
        _check_reference(cfg, reference_dir)
    final_cfg = cfg
    if name in TWO_PASS:  # pass 1: dense fine-tuning, unless a finished run is given
        if reference_dir is None:
            reference_dir = out / "dense"
            dense_cfg = cfg.finetune_config(str(reference_dir))
            if not _finished(dense_cfg):
                # The target is checked on the model pass 1 builds, before it trains.
                def check(model):
                    return exact_target(cfg, model, gated_layers(model, cfg))

                run_finetune(dense_cfg, build=check, console=console)
        dense = json.loads((reference_dir / "results.json").read_text())
        passes.append(_pass("dense fine-tuning", reference_dir, dense["train_seconds"]))
        passes[-1]["given"] = cfg.dense_reference is not None
        # Pass 2 starts from pass 1's exported model, with its vocabulary and CTC head.
        final_cfg = dataclasses.replace(
            cfg, model=str(reference_dir / "model"), vocab=None, new_head=False
        )
    method = METHODS[name][1](cfg, out, options)
    results = run_finetune(final_cfg, hooks=method.hooks(), build=method.attach, console=console)
    c = results["compression"]
    label = {"dense": "dense fine-tuning", "gmp": "gradual pruning", "str": "STR"}.get(
        name, "prune + fine-tune"
    )
    passes.append(
        _pass(label, out, results["train_seconds"], c["prune_seconds"] + c["harden_seconds"])
    )
    results["wall_seconds"] = time.perf_counter() - started
    results["method"], results["passes"] = name, passes
    # As for the gates, a one-pass method's reference is trained after it (errors first).
    reference_seconds = None
    if name in ("gmp", "str") and cfg.train_dense_reference and reference_dir is None:
        reference_dir = out / "dense"
        started = time.perf_counter()
        run_finetune(cfg.finetune_config(str(reference_dir)), console=console)
        reference_seconds = time.perf_counter() - started
    if name == "dense":
        reference_dir = None  # it is its own reference
    if PartialState().is_main_process:
        results["report"] = write_report(out, cfg, results, reference_dir, reference_seconds)
    return results


def _pass(label: str, run_dir: Path, train_seconds: float, extra_seconds: float = 0.0) -> dict:
    return {
        "name": label,
        "run_dir": str(run_dir),
        "train_seconds": train_seconds,
        "prune_seconds": extra_seconds,
        "seconds": train_seconds + extra_seconds,
    }


def _finished(cfg: FinetuneConfig) -> bool:
    """A finished run of this very configuration (else run_finetune trains, resumes or refuses)."""
    run_dir = Path(cfg.output_dir)
    if not (run_dir / "results.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    return not cfg.differences(FinetuneConfig.load(run_dir / "config.yaml"))


def _check_reference(cfg, reference_dir: Path) -> None:
    if not (reference_dir / "results.json").is_file() or not (reference_dir / "model").is_dir():
        raise PinchgateError(
            f"--dense-reference {reference_dir}: no results.json and model/ "
            "(not a finished finetune run)"
        )
    saved = reference_dir / "config.yaml"
    model = (yaml.safe_load(saved.read_text()) or {}).get("model") if saved.is_file() else None
    if model is not None and model != cfg.model:
        raise PinchgateError(
            f"--dense-reference {reference_dir}: fine-tuned from {model}, not from {cfg.model}"
        )

"""The one driver: any compression method, on any model family, through the training loop.

`run_compress` checks the configuration and the method, runs the method's passes (a
two-pass method fine-tunes the dense model first, or takes a finished `--dense-reference`
run), writes the physically smaller model for methods that remove whole groups, trains the
dense reference when asked (after compressing, so every error in the options shows before
any training), and writes the report.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console

from pinchgate.checkpoint import atomic_write_text, run_lock
from pinchgate.config import CompressConfig, FinetuneConfig
from pinchgate.console import is_main_process, say, stderr_console
from pinchgate.data.audio import load_audio
from pinchgate.data.batching import bucket_batches
from pinchgate.data.builtin import corpus_label
from pinchgate.errors import PinchgateError
from pinchgate.families import count_parameters, family_for
from pinchgate.methods import ALIASES, METHODS, make_method, parse_method
from pinchgate.methods.base import CompressionMethod, exact_target, gated_layers
from pinchgate.report import write_report
from pinchgate.train import evaluate_sets, evaluate_zero_shot, run_finetune

SHRUNK_DIR = "model-shrunk"  # beside model/ in a run of a method that removes whole groups
WEIGHT_LEVEL_OPTIONS = ("include_pos_conv", "include_feature_encoder")


def check_config(cfg: CompressConfig) -> tuple[str, object]:
    """Normalise deprecated names, check the options and the method; (name, options)."""
    if cfg.granularity == "structured":  # the old spelling of --method structured
        if cfg.method not in ("gates", "structured"):
            raise PinchgateError(
                f"--granularity structured: only with --method gates, not {cfg.method!r}"
            )
        cfg.method, cfg.granularity = "structured", "weight"
    old = cfg.method.partition(":")[0]
    if old in ALIASES:
        say(f"--method {old} is deprecated: it is now called {ALIASES[old]}")
        cfg.method = ALIASES[old] + cfg.method[len(old) :]
    cfg.validate()
    family_for(cfg.model).check_options(cfg)
    name, options = parse_method(cfg.method, cfg.max_steps)
    if name == "structured":
        for option in WEIGHT_LEVEL_OPTIONS:
            if getattr(cfg, option):
                raise PinchgateError(
                    f"--{option.replace('_', '-')}: a weight-level option, not for "
                    "--method structured"
                )
        if options.cost == "flops" and cfg.target_ratio is not None:
            raise PinchgateError(
                f"--method {cfg.method}: cost=flops counts multiply-adds, not parameters; give "
                "--target-sparsity (the share of the units' multiply-adds to remove), not "
                "--target-ratio"
            )
    return name, options


def run_compress(cfg: CompressConfig, console: Console | None = None) -> dict:
    """Every pass of the method in ``cfg.method``, then the report; the run directory is
    locked throughout (``checkpoint.run_lock``), not only while a pass trains."""
    name, options = check_config(cfg)
    with run_lock(Path(cfg.output_dir), hold=is_main_process()):
        return compress_passes(cfg, name, options, console)


def compress_passes(cfg: CompressConfig, name: str, options, console: Console | None) -> dict:
    spec = METHODS[name]
    out = Path(cfg.output_dir)
    main = is_main_process()
    reference_dir = Path(cfg.dense_reference) if cfg.dense_reference else None
    if reference_dir is not None:
        check_reference(cfg, reference_dir)
    zero_shot_dir = out / "zero-shot" if cfg.zero_shot else None
    if zero_shot_dir is not None and main:  # what fine-tuning starts from, on the test sets
        evaluate_zero_shot(cfg, zero_shot_dir, console)
    started = time.perf_counter()
    passes: list[dict] = []
    run_cfg = cfg
    if spec.passes == 2:  # pass 1: dense fine-tuning, unless a finished run is given
        if reference_dir is None:
            reference_dir = out / "dense"
            dense_cfg = cfg.finetune_config(str(reference_dir))
            if not finished(dense_cfg):
                # The target is checked on the model pass 1 builds, before it trains.
                run_finetune(dense_cfg, TargetCheck(cfg, reference_dir), console)
        dense = json.loads((reference_dir / "results.json").read_text())
        passes.append(pass_row("dense fine-tuning", reference_dir, dense["train_seconds"]))
        passes[-1]["given"] = cfg.dense_reference is not None
        # Pass 2 starts from pass 1's exported model, with its vocabulary and output head.
        run_cfg = dataclasses.replace(
            cfg, model=str(reference_dir / "model"), vocab=None, new_head=False
        )
    method = make_method(cfg, out, name, options)
    results = run_finetune(run_cfg, method, console)
    c = results["compression"]
    seconds = c["prune_seconds"] + c["harden_seconds"]
    passes.append(pass_row(spec.label, out, results["train_seconds"], seconds))
    if name == "structured" and main:
        print_line = (console or stderr_console()).print
        shrunk = export_shrunk(results, out, cfg.eval_batch_seconds, print_line)
        record_shrunk(out, results, shrunk)
    results["wall_seconds"] = time.perf_counter() - started
    results["method"], results["passes"] = name, passes
    reference_seconds = None
    trains_reference = spec.passes == 1 and spec.trains_dense_reference
    if trains_reference and cfg.train_dense_reference and reference_dir is None:
        reference_dir = out / "dense"
        started = time.perf_counter()
        run_finetune(cfg.finetune_config(str(reference_dir)), console=console)
        reference_seconds = time.perf_counter() - started
    if name == "dense":
        reference_dir = None  # it is its own reference
    if main:
        results["report"] = write_report(
            out, cfg, results, reference_dir, reference_seconds, zero_shot_dir
        )
    return results


class TargetCheck(CompressionMethod):
    """Pass 1 of a two-pass method: dense fine-tuning that refuses an unreachable target
    on the model it builds, before training; it prunes nothing."""

    name = "dense"

    def attach(self, model: torch.nn.Module) -> None:
        exact_target(self.cfg, model, gated_layers(model, self.cfg))

    def finalize(self, model: torch.nn.Module) -> None:
        return None


def pass_row(label: str, run_dir: Path, train_seconds: float, extra_seconds: float = 0.0) -> dict:
    return {
        "name": label,
        "run_dir": str(run_dir),
        "train_seconds": train_seconds,
        "prune_seconds": extra_seconds,
        "seconds": train_seconds + extra_seconds,
    }


def finished(cfg: FinetuneConfig) -> bool:
    """A finished run of this very configuration (else run_finetune trains, resumes or refuses)."""
    run_dir = Path(cfg.output_dir)
    if not (run_dir / "results.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    return not cfg.differences(FinetuneConfig.load(run_dir / "config.yaml"))


def check_reference(cfg: CompressConfig, reference_dir: Path) -> None:
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


# --- the physically smaller model of a structured run -----------------------------------------


def export_shrunk(results: dict, run_dir: Path, batch_seconds: float, print_line) -> dict:
    """Shrink the hardened model of a finished run into ``run_dir/model-shrunk``, read it back
    from disk and score it on the run's sets; returns what report.json records."""
    family, processor = results["family"], results["processor"]
    hardened = results["model"]
    started = time.perf_counter()
    shrunk = family.shrink(hardened)
    path = family.save(shrunk, processor, run_dir / SHRUNK_DIR)
    seconds = time.perf_counter() - started
    del shrunk
    exported = family.load(path).to(next(hardened.parameters()).device)
    difference = max_output_difference(hardened, exported, results, batch_seconds)
    print_line(
        f"shrunken model ({path}), as exported; max |logit difference| against the masked "
        f"model on {difference['utterances']} {difference['set']} utterances: "
        f"{difference['max_abs_diff']:.3g}"
    )
    scores = evaluate_sets(
        exported, family, processor, results["data"], run_dir / "shrunk", batch_seconds, print_line
    )
    return {
        "dir": str(path),
        "params": count_parameters(exported)["total"],
        "structure": getattr(exported.config, "pinchgate_structure", None),
        "shrink_seconds": seconds,
        "logit_check": difference,
        "eval": scores,
    }


def max_output_difference(masked, shrunk, results: dict, batch_seconds: float) -> dict:
    """Largest |logit| difference between the masked and the shrunken model on the run's
    first evaluation set, in the batches evaluation uses (padding included)."""
    family, processor, data = results["family"], results["processor"], results["data"]
    sets = ([("dev", data.dev)] if data.dev else []) + list(data.tests.items())
    if not sets:
        return {"set": None, "utterances": 0, "max_abs_diff": float("nan")}
    name, utterances = sets[0]
    rate = family.sampling_rate(processor)
    worst, count = 0.0, 0
    durations = [u.duration or 0.0 for u in utterances]
    for batch in bucket_batches(durations, batch_seconds, shuffle=False)[:2]:
        audio = [load_audio(utterances[i].audio_path, rate) for i in batch]
        with torch.no_grad():
            a = family.logits(masked.eval(), processor, audio)
            b = family.logits(shrunk.eval(), processor, audio)
        worst = max(worst, float((a - b).abs().max()))
        count += len(batch)
    return {"set": corpus_label(name), "utterances": count, "max_abs_diff": worst}


def record_shrunk(run_dir: Path, results: dict, shrunk: dict) -> None:
    """Add the shrunken model's section to results.json (written before it existed)."""
    results["compression"]["shrunk"] = shrunk
    path = run_dir / "results.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        saved.setdefault("compression", {})["shrunk"] = shrunk
        atomic_write_text(path, json.dumps(saved, indent=1))

"""Artifacts of a finished run, whatever the model family: load any saved form, export to ONNX
or CTranslate2 (through the family), check an export against PyTorch, shrink a structurally
pruned model, and cut a Whisper's vocabulary.

The packed format itself is `pinchgate.packing`; the model-specific parts (the ONNX graph,
the shrinking surgery) are the family's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pinchgate.data.audio import load_audio
from pinchgate.errors import PinchgateError
from pinchgate.evaluate import score, transcribe
from pinchgate.families import count_parameters, family_for, family_for_config
from pinchgate.modeldir import resolve_model_dir, side_files, weight_files
from pinchgate.packing import is_packed, load_packed


def load_any(source: str | Path) -> torch.nn.Module:
    """A model from a packed directory, a stock HF directory, a shrunken one or a run
    directory, in eval mode."""
    if is_packed(source):
        return load_packed(source)
    model_dir = resolve_model_dir(source)
    weight_files(model_dir)  # refuses pickle-only directories with a clear line
    return family_for(model_dir).load(model_dir).eval()


def load_with_processor(source: str | Path):
    """(model, family, processor, model directory) of any saved form."""
    source = Path(source)
    model_dir = source if is_packed(source) else resolve_model_dir(source)
    model = load_any(source)
    family = family_for_config(model.config)
    return model, family, family.load_processor(model_dir), model_dir


ONNX_OPSET = 18


def export_onnx(source: str | Path, out_path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Export a model (HF, run or packed directory) to ONNX through its family."""
    model, family, processor, _ = load_with_processor(source)
    try:
        return family.export_onnx(model, processor, Path(out_path), opset)
    except NotImplementedError as exc:
        raise PinchgateError(f"{source}: {exc}") from None


def decode_both(model, exported, label: str, family, processor, utterances, batch_seconds) -> dict:
    """Scores of the PyTorch model ("torch") and of its export (`label`) on `utterances`,
    and how many of their transcripts are identical."""
    references = [u.transcript for u in utterances]
    out: dict = {"utterances": len(utterances)}
    hypotheses = {}
    for key, candidate in (("torch", model), (label, exported)):
        hypotheses[key], seconds = transcribe(
            candidate, family, processor, utterances, batch_seconds
        )
        out[key] = {**score(references, hypotheses[key], family.normalizer(processor))}
        out[key]["decode_seconds"] = seconds
    pairs = zip(hypotheses["torch"], hypotheses[label], strict=True)
    out["same_hypotheses"] = sum(a == b for a, b in pairs)
    return out


def check_onnx_on_corpus(
    onnx_path: str | Path,
    source: str | Path,
    utterances: list,
    name: str,
    batch_seconds: float = 200.0,
) -> dict:
    """Decode `utterances` with the ONNX file and with the PyTorch model it came from.

    Returns {"torch": scores, "onnx": scores, "same_hypotheses": n, "utterances": n,
    "max_abs_diff": float}, scores as `pinchgate.evaluate.score` gives them plus
    decode_seconds; the logit difference is over the first 8 utterances as one padded batch
    (so attention masks are exercised).
    """
    model, family, processor, _ = load_with_processor(source)
    onnx_model = family.onnx_runtime_model(onnx_path, model)
    out = decode_both(model, onnx_model, "onnx", family, processor, utterances, batch_seconds)
    rate = family.sampling_rate(processor)
    audio = [load_audio(u.audio_path, rate) for u in utterances[:8]]
    with torch.no_grad():
        difference = family.logits(onnx_model, processor, audio) - family.logits(
            model, processor, audio
        )
    out["max_abs_diff"] = float(difference.abs().max())
    return out


def export_ct2(
    source: str | Path,
    out_dir: str | Path,
    quantization: str | None = None,
    window: int | None = None,
) -> Path:
    """Export a model (HF, run, packed or shrunk directory) to a CTranslate2 directory; with
    `window`, its encoder set to take that many seconds (30 for faster-whisper)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PinchgateError(f"{out_dir}: already exists and is not empty; choose a new path")
    model, family, processor, model_dir = load_with_processor(source)
    family.at_window(model, processor, window)
    try:
        return family.export_ct2(model, model_dir, out_dir, quantization)
    except NotImplementedError as exc:
        raise PinchgateError(f"{source}: {exc}") from None


def check_ct2_on_corpus(
    ct2_dir: str | Path,
    source: str | Path,
    utterances: list,
    name: str,
    compute_type: str = "float32",
    batch_seconds: float = 200.0,
    window: int | None = None,
) -> dict:
    """Decode `utterances` with the CTranslate2 directory and with the PyTorch model it came
    from: {"torch": scores, "ct2": scores, "same_hypotheses", "utterances",
    "encoder_max_abs_diff", "logits_max_abs_diff", "steps"} (the differences on the first 8
    utterances, the logits along the first one's greedy decoding). `window`: the one the
    directory was exported with, given to the PyTorch model too."""
    model, family, processor, _ = load_with_processor(source)
    model, processor = family.at_window(model, processor, window)
    runtime = family.ct2_runtime_model(Path(ct2_dir), compute_type)
    out = decode_both(model, runtime, "ct2", family, processor, utterances, batch_seconds)
    rate = family.sampling_rate(processor)
    audio = [load_audio(u.audio_path, rate) for u in utterances[:8]]
    out.update(family.ct2_parity(runtime, model, processor, audio))
    return out


def onnx_random_difference(onnx_path: str | Path, source: str | Path) -> float:
    """Largest output difference between onnxruntime and PyTorch on random inputs of shapes
    other than the export example's (the family chooses them)."""
    model = load_any(source)
    return family_for_config(model.config).onnx_parity(onnx_path, model)


def shrink_dir(source: str | Path, out_dir: str | Path) -> dict:
    """Shrink a hardened model directory (or run directory) into ``out_dir``; returns sizes."""
    model_dir = resolve_model_dir(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PinchgateError(f"{out_dir}: already exists and is not empty; choose a new path")
    model = load_any(model_dir)
    family = family_for_config(model.config)
    try:
        shrunk = family.shrink(model)
    except ValueError as exc:
        raise PinchgateError(f"{model_dir}: {exc}") from None
    if out_dir.exists():
        out_dir.rmdir()
    family.save(shrunk, None, out_dir)
    for side in side_files(model_dir):
        if side.name != "config.json":
            shutil.copy2(side, out_dir / side.name)
    return {
        "params_before": count_parameters(model)["total"],
        "params_after": count_parameters(shrunk)["total"],
        "structure": getattr(shrunk.config, "pinchgate_structure", None),
    }


def trim_vocab_dir(source: str | Path, out_dir: str | Path, keep: int) -> dict:
    """Cut the output vocabulary of a model (any saved form) to `keep` text tokens and the
    special ones (Whisper: `families/whisper_vocab.py`), saved with its tokenizer in
    ``out_dir``; returns sizes."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PinchgateError(f"{out_dir}: already exists and is not empty; choose a new path")
    model, family, processor, _ = load_with_processor(source)
    before = count_parameters(model)["total"]
    vocab_before = model.config.vocab_size
    try:
        kept = family.trim_vocabulary(model, processor, keep, out_dir)
    except (NotImplementedError, ValueError) as exc:  # not Whisper; a --keep it cannot take
        raise PinchgateError(f"{source}: {exc}") from None
    return {
        "vocab_before": vocab_before,
        "vocab_after": len(kept),
        "text_tokens": keep,
        "params_before": before,
        "params_after": count_parameters(model)["total"],
    }

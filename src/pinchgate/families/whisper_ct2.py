"""Whisper into CTranslate2 (faster-whisper's runtime) through CTranslate2's own converter,
and a runtime model that decodes with CTranslate2 exactly as pinchgate decodes with PyTorch.

The export hands the model pinchgate has in memory (dense, pruned, or shrunk to fewer
feed-forward neurons) to `ctranslate2.converters.TransformersConverter`, whose Whisper
loader reads every layer's weights from the module, so CTranslate2 writes what it would
write for the same weights on the hub. What its Whisper spec cannot say is refused before
anything is written: it has one head count per stack (encoder, decoder) and derives the head
size from it, so a model with pruned attention heads does not fit. Feed-forward sizes are
read from the weights, layer by layer, and may differ.

`Ct2Whisper` runs the exported directory (fp32, or int8 and the other compute types
CTranslate2 offers) behind `WhisperFamily.decode`: the same features (transformers' feature
extractor, the run's window), the same prompt (start of transcript, no timestamps), greedy
or beam search, the same new-token budget and runaway guard, the generation config's
suppressed tokens and the blank suppression at the first step that `generate` applies.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from torch import nn

from pinchgate.checkpoint import move_into_place
from pinchgate.errors import PinchgateError
from pinchgate.families.base import RuntimeModel

COMPUTE_TYPES = ("float32", "int8", "int8_float32", "int16", "float16", "bfloat16")
# Files a CTranslate2 Whisper directory carries beside model.bin for faster-whisper.
SIDE_FILES = ("tokenizer.json",)
WHISPER_TEXT_POSITIONS = 448
FRAMES_PER_SECOND = 100
# What pinchgate's decoding needs that CTranslate2's config.json does not record.
DECODING_FILE = "pinchgate_ct2.json"


def require_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise PinchgateError(
            "CTranslate2 export and decoding need ctranslate2: pip install 'pinchgate[ct2]'"
        ) from None
    return ctranslate2


def unfit_for_ct2(model: nn.Module) -> str | None:
    """Why CTranslate2's Whisper spec cannot hold this model, or None."""
    config = model.config
    for side in ("encoder", "decoder"):
        heads = getattr(config, f"{side}_attention_heads")
        for i, layer in enumerate(getattr(model.model, side).layers):
            for kind in ("self_attn", "encoder_attn") if side == "decoder" else ("self_attn",):
                kept = getattr(layer, kind).num_heads
                if kept != heads:
                    return (
                        f"{side} layer {i} {kind} keeps {kept} of {heads} attention heads, and "
                        "CTranslate2's Whisper spec has one head count per stack; use "
                        "--format onnx, or compress without head units"
                    )
    return None


def export_ct2(model: nn.Module, model_dir: Path, out: Path, quantization: str | None) -> Path:
    """Write `model` (its tokenizer and processor files from `model_dir`) as a CTranslate2
    Whisper directory at `out`, atomically; `quantization` as CTranslate2's converter takes it
    (None keeps float32)."""
    require_ctranslate2()
    from ctranslate2.converters import TransformersConverter

    problem = unfit_for_ct2(model)
    if problem is not None:
        raise PinchgateError(f"{model_dir}: {problem}")
    if quantization is not None and quantization not in COMPUTE_TYPES:
        raise PinchgateError(
            f"--quantization {quantization!r}: choose one of {', '.join(COMPUTE_TYPES)}"
        )
    model = model.eval()

    class _InMemory(TransformersConverter):
        """CTranslate2's converter on the model pinchgate loaded (shrunk models included)."""

        def load_model(self, model_class, model_name_or_path, **kwargs):
            return model

    side = [name for name in SIDE_FILES if (model_dir / name).is_file()]
    converter = _InMemory(str(model_dir), copy_files=side or None)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        converter.convert(str(tmp), quantization=quantization, force=True)
    except (ValueError, RuntimeError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PinchgateError(f"{model_dir}: CTranslate2 conversion failed ({exc})") from None
    # faster-whisper reads the mel count and the window from preprocessor_config.json
    # (transformers 5 writes the feature extractor into processor_config.json instead).
    window = int(model.config.max_source_positions) * 2 // FRAMES_PER_SECOND
    from transformers import WhisperFeatureExtractor

    stored = WhisperFeatureExtractor.from_pretrained(str(model_dir))
    WhisperFeatureExtractor(
        feature_size=stored.feature_size,
        sampling_rate=stored.sampling_rate,
        hop_length=stored.hop_length,
        chunk_length=window,
        n_fft=stored.n_fft,
        padding_value=stored.padding_value,
    ).save_pretrained(str(tmp))
    decoding = {
        "max_target_positions": int(model.config.max_target_positions),
        "window_seconds": window,
    }
    (tmp / DECODING_FILE).write_text(json.dumps(decoding, indent=1) + "\n")
    move_into_place(tmp, out)
    return out


class Ct2Whisper(RuntimeModel):
    """A CTranslate2 Whisper directory, run on the CPU, decoding through
    `WhisperFamily.decode` like the PyTorch model it came from."""

    def __init__(self, path: str | Path, compute_type: str = "float32", threads: int = 0):
        ctranslate2 = require_ctranslate2()
        self.path = Path(path)
        if not (self.path / "model.bin").is_file():
            raise PinchgateError(f"{self.path}: no model.bin: not a CTranslate2 directory")
        if compute_type not in COMPUTE_TYPES:
            raise PinchgateError(
                f"compute type {compute_type!r}: choose one of {', '.join(COMPUTE_TYPES)}"
            )
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        self.compute_type = compute_type
        self.model = ctranslate2.models.Whisper(
            str(self.path), device="cpu", compute_type=compute_type, intra_threads=threads
        )
        self._storage = ctranslate2.StorageView
        # What decoding reads from a transformers config (stock Whisper: 448 positions).
        positions = WHISPER_TEXT_POSITIONS
        saved = {}
        if (self.path / DECODING_FILE).is_file():
            saved = json.loads((self.path / DECODING_FILE).read_text())
            positions = int(saved.get("max_target_positions", positions))
        self.config = SimpleNamespace(max_target_positions=positions)
        # The encoder window it was exported with; from faster-whisper's file otherwise.
        self.window = int(saved.get("window_seconds", 0)) if saved else 0
        if not self.window:
            preprocessor = self.path / "preprocessor_config.json"
            stock = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
            self.window = int(stock.get("chunk_length", 30))

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Encoder output for log-mel features [batch, mels, frames] (float32)."""
        view = self._storage.from_array(np.ascontiguousarray(features, dtype=np.float32))
        return np.array(self.model.encode(view, to_cpu=True))

    def generate(
        self,
        features: np.ndarray,
        prompt: list[int],
        max_new_tokens: int,
        beam_size: int = 1,
    ) -> list[list[int]]:
        """Prompt plus generated token ids per clip (end of text excluded). Suppressed: the
        generation config's `suppress_tokens` (the converter wrote them into config.json) and,
        at the first step, blank and end of text, as `generate` does."""
        view = self._storage.from_array(np.ascontiguousarray(features, dtype=np.float32))
        results = self.model.generate(
            view,
            [list(prompt)] * features.shape[0],
            beam_size=beam_size,
            max_length=_max_length(len(prompt), max_new_tokens),
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        return [list(prompt) + list(r.sequences_ids[0])[:max_new_tokens] for r in results]

    def step_log_probs(self, features: np.ndarray, prompt: list[int], steps: int):
        """(token ids, log-probabilities over the vocabulary at each step) of the greedy
        continuation of one clip, for parity checks."""
        view = self._storage.from_array(np.ascontiguousarray(features[:1], dtype=np.float32))
        result = self.model.generate(
            view,
            [list(prompt)],
            beam_size=1,
            max_length=_max_length(len(prompt), steps),
            return_logits_vocab=True,
            suppress_blank=False,
            suppress_tokens=[],
        )[0]
        tokens = list(result.sequences_ids[0])[:steps]
        logits = np.stack([np.array(row) for row in result.logits[0]])[: len(tokens)]
        return tokens, logits


def _max_length(prompt_length: int, new_tokens: int) -> int:
    """CTranslate2's Whisper `max_length` for at least `new_tokens` new tokens: measured on
    4.8.5, it generates about half of `max_length` (OpenAI's `sample_len = n_ctx // 2`), so
    ask for twice the total and cut the result to `new_tokens` (for greedy search the cut is
    exactly what a budget of `new_tokens` gives; beam search may differ at the budget)."""
    return 2 * (prompt_length + new_tokens)

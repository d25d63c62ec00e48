"""What a model family is: the interface between pinchgate and one kind of model.

A family owns everything model-specific, so that the training loop, the compression
methods and the exporters never name a module of a particular architecture:

- loading and checking a model directory, building a model from its config;
- the processor (feature extractor + tokenizer), the labels, the collator and the loss;
- decoding (greedy, or a beam search) and the text normalisation used for scoring;
- which modules are gated by default, the structured units (heads, neurons) and how to
  remove them physically;
- export: the Hugging Face directory, the model a packed file describes, ONNX, CTranslate2.

`pinchgate.families` picks the family of a model from its config's `model_type`
(`family_for`); `ctc.py` is the CTC family (wav2vec2, HuBERT, WavLM, Data2VecAudio).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pinchgate.errors import PinchgateError


@dataclass
class Member:
    """One tensor of a structured unit: ``module.<name>``, its groups along rows (dim 0) or
    columns (dim 1)."""

    module: nn.Module
    name: str
    dim: int


@dataclass
class UnitSpec:
    """A set of prunable groups (the neurons of one feed-forward layer, the heads of one
    attention, a whole decoder layer): every member tensor is cut into ``n_groups`` equal
    slices along its dim; the gate reads and masks the members.

    ``dead``: tensors that go with a group without being gated (a pruned decoder layer's
    inputs to its zeroed outputs), zeroed when it is pruned; ``group_params``: parameters
    removed with each group, members and dead ones (default: the members' share); ``cost``:
    multiply-adds per second of audio that each group costs (``structured:cost=flops``)."""

    name: str
    kind: str  # "ffn", "heads" or "layers"
    members: list[Member]
    n_groups: int
    dead: list[Member] = field(default_factory=list)
    group_params: int | None = None
    cost: float | None = None  # per group: multiply-adds per second of audio, where known


class RuntimeModel:
    """A model run outside PyTorch (an ONNX or CTranslate2 export) that pinchgate's
    decoding and scoring take where they take an nn.Module (they switch it to eval)."""

    training = False

    def eval(self) -> RuntimeModel:
        return self

    def train(self, mode: bool = True) -> RuntimeModel:
        return self


class ModelFamily(ABC):
    """The model-specific half of pinchgate; see the module docstring for what it owns.

    A `processor` is whatever the family uses to turn audio into model input and text into
    labels and back (for CTC a feature extractor and a character tokenizer); it is saved
    with every model the family writes.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()

    # --- loading ------------------------------------------------------------------------------
    @abstractmethod
    def load_config(self, source: str | Path):
        """The checked config of a local directory or hub id (one-line errors)."""

    @abstractmethod
    def load(self, source: str | Path) -> nn.Module:
        """A saved model of this family, fp32, as exported (stock or shrunk)."""

    @abstractmethod
    def build_from_config(self, config) -> nn.Module:
        """A freshly initialised model of the architecture a config (and its recorded
        structure, for a shrunk model) describes: the shapes a packed file must match."""

    def check_options(self, cfg) -> None:  # noqa: B027 (most families accept everything)
        """Refuse, with one line, run options this family does not have."""

    # --- the run's processor, data and loss ---------------------------------------------------
    @abstractmethod
    def prepare_processor(self, cfg, run_dir: Path, train_transcripts: list[str]):
        """The run's processor and whether the model needs a new output head."""

    @abstractmethod
    def load_processor(self, model_dir: Path):
        """The processor saved in a model directory."""

    def allowed_characters(self, processor) -> set[str] | None:
        """Transcript characters the labels can spell (None: any)."""
        return None

    @abstractmethod
    def training_model(self, cfg, processor, new_head: bool) -> nn.Module:
        """The model a run starts from, fp32, ready to be trained (parts frozen as the
        configuration says)."""

    @abstractmethod
    def sampling_rate(self, processor) -> int:
        """Audio samples per second the processor expects."""

    @abstractmethod
    def labels(self, processor, utterance) -> list[int]:
        """Label ids of one utterance (its normalised transcript, or its written form)."""

    @abstractmethod
    def collate(self, processor, items: list[dict]) -> dict[str, torch.Tensor]:
        """A padded batch from dataset items (``audio``, ``index``, ``labels``)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task loss of one batch (the model computes it from ``labels``)."""
        return model(**batch).loss

    def teacher_model(self, source: str, processor, model: nn.Module) -> nn.Module:
        """The frozen teacher of `--distill-from` (families that support distillation)."""
        raise PinchgateError(f"--distill-from: not supported for {type(self).__name__} models")

    def distillation_loss(self, model, teacher, batch, weight: float, temperature: float):
        """The task loss mixed with a term pulling the model's outputs to the teacher's."""
        raise NotImplementedError

    # --- decoding and scoring -----------------------------------------------------------------
    @abstractmethod
    def decode(
        self, model: nn.Module, processor, audio: list[np.ndarray], decoder=None
    ) -> list[str]:
        """Hypotheses of one batch of audio, in order (greedy unless ``decoder`` is given)."""

    @abstractmethod
    def logits(self, model: nn.Module, processor, audio: list[np.ndarray]) -> torch.Tensor:
        """The model's output scores on a padded batch: what parity checks compare."""

    @abstractmethod
    def normalizer(self, processor) -> Callable[[str], str]:
        """The normalisation applied to references and hypotheses alike before scoring."""

    def beam_decoder(self, beam_size: int):
        """A beam-search decoder for ``decode`` (without a language model)."""
        raise PinchgateError(f"--beam-size: not available for {self.name} models")

    def max_input_seconds(self, processor) -> float | None:
        """The longest clip the model takes whole (None: any); longer ones are skipped."""
        return None

    def lm_decoder(
        self, processor, lm_path: Path, lm_weight: float, word_score: float, beam_size: int
    ):
        """A decoder that adds a word language model (for ``decode``)."""
        raise PinchgateError(f"--lm: LM decoding is for CTC models, not {self.name} models")

    # --- compression --------------------------------------------------------------------------
    @abstractmethod
    def gate_targets(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(include, exclude) regular expressions (full match on module names) of the
        weights gated by default."""

    def gate_extras(self) -> dict[str, str]:
        """Optional groups a user may gate too: name -> regular expression."""
        return {}

    @abstractmethod
    def structured_units(self, model: nn.Module) -> list[UnitSpec]:
        """The prunable groups of structured gates, in the model's order."""

    @abstractmethod
    def shrink(self, model: nn.Module) -> nn.Module:
        """A copy of a hardened model without its zeroed groups: same outputs, fewer
        parameters, its structure recorded in its config."""

    def trim_vocabulary(self, model: nn.Module, processor, keep: int, path: Path) -> list[int]:
        """Cut the output vocabulary to its `keep` most frequent text tokens and the special
        ones; save model and tokenizer at `path`; return the kept ids."""
        raise NotImplementedError(f"vocabulary trimming is not available for {self.name} models")

    # --- export -------------------------------------------------------------------------------
    @abstractmethod
    def save(self, model: nn.Module, processor, path: Path) -> Path:
        """The model and its processor as a directory the family (and, where the
        architecture allows, stock transformers) loads; written atomically."""

    def export_onnx(self, model: nn.Module, processor, path: Path, opset: int) -> Path:
        """The model as an ONNX file that onnxruntime runs (where the family can export)."""
        raise NotImplementedError(f"ONNX export is not available for {self.name} models")

    def onnx_runtime_model(self, onnx_path: Path, model: nn.Module) -> nn.Module:
        """The exported file behind the interface ``decode`` and ``logits`` use."""
        raise NotImplementedError(f"ONNX models are not available for {self.name} models")

    def onnx_parity(self, onnx_path: Path, model: nn.Module) -> float:
        """Largest output difference between the ONNX file and ``model`` on random inputs."""
        raise NotImplementedError(f"ONNX models are not available for {self.name} models")

    def at_window(self, model: nn.Module, processor, seconds: int | None):
        """(model, processor) set to take `seconds` of audio per input, for models with a
        fixed input window (Whisper); None leaves them as they are."""
        if seconds is not None:
            raise PinchgateError(f"--window: {self.name} models have no fixed input window")
        return model, processor

    def export_ct2(self, model: nn.Module, model_dir: Path, path: Path, quantization) -> Path:
        """The model as a CTranslate2 directory (where its converter covers the family)."""
        raise NotImplementedError(f"CTranslate2 export is not available for {self.name} models")

    def ct2_runtime_model(self, path: Path, compute_type: str):
        """A CTranslate2 directory behind the interface ``decode`` uses."""
        raise NotImplementedError(f"CTranslate2 models are not available for {self.name} models")

    def ct2_parity(self, runtime, model: nn.Module, processor, audio: list[np.ndarray]) -> dict:
        """Largest differences between the CTranslate2 model and ``model`` on ``audio``."""
        raise NotImplementedError(f"CTranslate2 models are not available for {self.name} models")

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "model_types": list(self.model_types)}


def count_parameters(model: nn.Module) -> dict:
    """Total parameters, split by module type and by top-level component.

    Parametrised weights (weight norm, gates) count once, under the module that owns them;
    a tensor shared by two modules (a tied embedding) counts once.
    """
    by_type: Counter[str] = Counter()
    by_component: Counter[str] = Counter()
    total = 0
    prefix = getattr(model, "base_model_prefix", "")
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if ".parametrizations." in name:
            owner = name.split(".parametrizations.")[0]
        else:
            owner = name.rpartition(".")[0]
        module = model.get_submodule(owner)
        by_type[type(module).__name__.removeprefix("Parametrized")] += n
        by_component[_component(name, prefix)] += n
    return {"total": total, "by_type": dict(by_type), "by_component": dict(by_component)}


def _component(name: str, base_prefix: str) -> str:
    parts = name.split(".")
    # Skip the base-model prefix (wav2vec2., hubert., model., ...) to name the real component.
    if base_prefix and parts[0] == base_prefix and len(parts) > 1:
        parts = parts[1:]
    return parts[0]

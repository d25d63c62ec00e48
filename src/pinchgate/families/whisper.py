"""The Whisper family: OpenAI Whisper encoder-decoder models (transformers'
`WhisperForConditionalGeneration`), English-only and multilingual.

What pinchgate knows about Whisper lives here:

- **Loading**: a local directory (or a hub id when online) with its tokenizer and feature
  extractor; a CTranslate2 directory is converted first (`pinchgate convert ct2`, `ct2.py`).
  The encoder's sinusoidal position table is frozen (transformers 5 leaves it trainable).
- **The window**: the encoder sees a fixed number of frames (30 s in stock Whisper). A run
  may cut it (`--window SECONDS`, default: the longest clip of the run's corpora, rounded up
  to whole seconds): `max_source_positions` becomes 50 x seconds, the position table keeps
  its first rows and the feature extractor's `chunk_length` matches, so stock transformers
  reloads the model as it was trained. Clips longer than the window are skipped and counted
  (a feature extractor would otherwise silently cut them).
- **Text**: training targets are the transcripts in a chosen style (`--text-style`,
  default `sentence`: "Hello there." from LibriSpeech-style "HELLO THERE"), with the
  model's prefix (start of transcript, language and task for multilingual models, no
  timestamps) and end of text; teacher-forced cross-entropy. Hypotheses and references are
  scored after Whisper's English normaliser (OpenAI's, with its spelling map) on both sides,
  so casing, punctuation, numbers ("nineteen sixty one" = "1961") and spelling variants do
  not count as errors.
- **Decoding**: batched `generate`, greedy or beam; at most `6 x seconds + 10` new tokens,
  and a sequence whose tail repeats itself (a phrase of 4-16 tokens twice in a row, or a
  shorter n-gram over 16 tokens) is stopped and cut back to one occurrence, so no clip can
  loop.
- **Gates**: every Linear of encoder and decoder (self-attention, cross-attention,
  feed-forward) and the token embedding, which is also the output projection: one tensor,
  gated once (one threshold, one mask, used in both places: `proj_out` follows the
  embedding through a parametrization while training). The conv front end and the
  position tables stay dense (`--include-feature-encoder` gates the two convolutions).
- **Structured units**: the heads of encoder self-attention, decoder self-attention and
  cross-attention, and the feed-forward neurons; shrinking cuts them out and records the
  per-layer sizes under `pinchgate_structure` in config.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pinchgate.checkpoint import move_into_place
from pinchgate.console import say
from pinchgate.errors import ModelLoadError, PinchgateError
from pinchgate.families.base import Member, ModelFamily, UnitSpec
from pinchgate.families.surgery import empty_linear, head_rows, sliced_linear
from pinchgate.families.whisper_ct2 import Ct2Whisper, export_ct2
from pinchgate.families.whisper_onnx import OnnxWhisper, export_whisper_onnx
from pinchgate.families.whisper_vocab import (
    kept_ids,
    renumbering,
    trim_model,
    trim_tokenizer_files,
)
from pinchgate.modeldir import (
    check_loading_info,
    check_model_dir,
    load_auto_config,
    read_config,
    read_state_dict,
    weight_files,
)

SAMPLING_RATE = 16000
# Runtimes other than PyTorch that decode through `WhisperFamily.decode`.
RUNTIME_MODELS = (Ct2Whisper, OnnxWhisper)
FRAMES_PER_SECOND = 100  # the feature extractor's hop is 10 ms
TOKENS_PER_SECOND = 6  # bound on new tokens per second of audio (speech is ~3-4)
TOKEN_MARGIN = 10
RUNAWAY_PERIOD = 16  # the longest repeated n-gram the guard looks for
RUNAWAY_TOKENS = 16  # how long a tail repeating a short n-gram must be to count as a loop
RUNAWAY_PHRASE = 4  # an n-gram this long or longer said twice in a row is a loop already
TEXT_STYLES = ("written", "sentence", "lower", "as-is")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
STRUCTURE_KEY = "pinchgate_structure"
STRUCTURE_FORMAT = "pinchgate-whisper-shrunk"
STRUCTURE_VERSION = 1
SPELLING_FILE = Path(__file__).resolve().parent / "data" / "whisper_english_spelling.json"

# Gate targets (full-match regular expressions on module names).
LINEARS = (
    r"model\.(?:encoder|decoder)\.layers\.\d+\."
    r"(?:(?:self_attn|encoder_attn)\.(?:q|k|v|out)_proj|fc1|fc2)"
)
EMBEDDING = r"model\.decoder\.embed_tokens"
OUTPUT_PROJECTION = r"proj_out"
FRONT_END = r"model\.encoder\.conv[12]"


# --- text -------------------------------------------------------------------------------------


def styled(text: str, style: str) -> str:
    """A LibriSpeech-style transcript ("HELLO THERE") as a training target (`written`, for
    an utterance without a written form: as `sentence`)."""
    if style == "as-is":
        return text
    text = text.lower()
    if style == "lower":
        return text
    text = text[:1].upper() + text[1:]
    return text + "." if text and text[-1] not in ".?!" else text


@cache
def english_normalizer():
    """OpenAI Whisper's English normaliser with its British-to-American spelling map."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(json.loads(SPELLING_FILE.read_text(encoding="utf-8")))


def normalize_english(text: str) -> str:
    return english_normalizer()(text)


# --- the processor ----------------------------------------------------------------------------


@dataclass
class WhisperRunProcessor:
    """Whisper's processor (feature extractor + tokenizer) with the run's text choices."""

    processor: object  # transformers.WhisperProcessor
    text_style: str = "written"
    language: str | None = None

    @property
    def feature_extractor(self):
        return self.processor.feature_extractor

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def window_seconds(self) -> float:
        return float(self.feature_extractor.chunk_length)

    def save_pretrained(self, path: str | Path) -> None:
        self.processor.save_pretrained(path)
        (Path(path) / "pinchgate_text.json").write_text(
            json.dumps({"text_style": self.text_style, "language": self.language}, indent=1)
        )


def load_processor(source: str | Path, text_style="written", language=None):
    from transformers import WhisperProcessor

    try:
        processor = WhisperProcessor.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{source}: cannot load the Whisper processor ({exc})") from None
    saved = Path(source) / "pinchgate_text.json"
    if saved.is_file():
        choices = json.loads(saved.read_text())
        text_style, language = choices.get("text_style", text_style), choices.get("language")
    if language is not None:
        processor.tokenizer.set_prefix_tokens(language=language, task="transcribe")
    return WhisperRunProcessor(processor, text_style, language)


def with_window(run: WhisperRunProcessor, seconds: int) -> WhisperRunProcessor:
    """The processor with its feature extractor cut (or kept) to a window of `seconds`."""
    from transformers import WhisperFeatureExtractor

    old = run.feature_extractor
    extractor = WhisperFeatureExtractor(
        feature_size=old.feature_size,
        sampling_rate=old.sampling_rate,
        hop_length=old.hop_length,
        chunk_length=int(seconds),
        n_fft=old.n_fft,
        padding_value=old.padding_value,
    )
    processor = copy.copy(run.processor)
    processor.feature_extractor = extractor
    return WhisperRunProcessor(processor, run.text_style, run.language)


# --- loading ----------------------------------------------------------------------------------


def check_whisper_dir(path: Path) -> None:
    check_model_dir(path)
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path}: no tokenizer files (tokenizer.json, or vocab.json and merges.txt): "
            "a Whisper directory needs its tokenizer"
        )


def load_config(source: str | Path):
    config = load_auto_config(source, check_whisper_dir)
    if config.model_type != "whisper":
        raise ModelLoadError(f"{source}: model type {config.model_type!r} is not whisper")
    return config


def freeze_position_table(model: nn.Module) -> None:
    """The encoder's sinusoidal positions are fixed in Whisper; transformers 5 leaves them
    trainable after from_pretrained."""
    model.model.encoder.embed_positions.requires_grad_(False)


def load_whisper(source: str | Path) -> nn.Module:
    """A Whisper model as saved (stock or shrunk), fp32, positions frozen, eval mode."""
    from transformers import WhisperForConditionalGeneration

    config = load_config(source)
    if getattr(config, STRUCTURE_KEY, None) is not None:
        model = load_shrunk(source)
    else:
        try:
            model, info = WhisperForConditionalGeneration.from_pretrained(
                str(source),
                dtype=torch.float32,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{source}: cannot load model weights ({exc})") from None
        check_loading_info(source, info)  # nothing initialised at random, nothing resized
    freeze_position_table(model)
    return model.float().eval()


def native_window(config) -> int:
    """The encoder window, in seconds, the model's position table allows."""
    return int(config.max_source_positions * 2 // FRAMES_PER_SECOND)


def cut_window(model: nn.Module, seconds: int) -> None:
    """Make the encoder take `seconds` of audio: its first 50 x seconds positions."""
    positions = int(seconds) * FRAMES_PER_SECOND // 2
    encoder = model.model.encoder
    table = encoder.embed_positions
    if positions > table.num_embeddings:
        raise PinchgateError(
            f"--window {seconds}: the model's encoder takes at most "
            f"{table.num_embeddings * 2 // FRAMES_PER_SECOND} s"
        )
    if positions == table.num_embeddings:
        return
    cut = nn.Embedding(positions, table.embedding_dim, device=table.weight.device)
    with torch.no_grad():
        cut.weight.copy_(table.weight[:positions])
    cut.requires_grad_(False)
    encoder.embed_positions = cut
    encoder.max_source_positions = positions
    model.config.max_source_positions = positions


SINUSOID_TOLERANCE = 1e-3  # float16 copies of Whisper's table are 3e-4 off the formula


def set_window(model: nn.Module, seconds: int) -> None:
    """Make the encoder take `seconds` of audio: cut its position table (`cut_window`), or
    extend it with Whisper's sinusoids, which its table is (checked: a learned table is
    refused), so a model trained on a cut window runs where 30 s is fixed (faster-whisper)."""
    from transformers.models.whisper.modeling_whisper import sinusoids

    positions = int(seconds) * FRAMES_PER_SECOND // 2
    encoder = model.model.encoder
    table = encoder.embed_positions
    if positions <= table.num_embeddings:
        cut_window(model, seconds)
        return
    fresh = sinusoids(positions, table.embedding_dim).to(table.weight)
    have = table.num_embeddings
    if not (fresh[:have] - table.weight.detach()).abs().max() <= SINUSOID_TOLERANCE:
        raise PinchgateError(
            f"--window {seconds}: the encoder's position table is not Whisper's sinusoids, "
            f"so it cannot be extended past {have * 2 // FRAMES_PER_SECOND} s"
        )
    longer = nn.Embedding(positions, table.embedding_dim, device=table.weight.device)
    with torch.no_grad():
        longer.weight.copy_(fresh)
        longer.weight[:have] = table.weight
    longer.requires_grad_(False)
    encoder.embed_positions = longer
    encoder.max_source_positions = positions
    model.config.max_source_positions = positions


# --- the tied output projection ---------------------------------------------------------------


class FollowWeight(nn.Module):
    """The parametrization of `proj_out.weight`: the token embedding's weight as computed now
    (through its gate or mask, when it has one), so the tied tensor is pruned once."""

    def __init__(self, leader: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_leader", leader)  # a reference, not a submodule

    def forward(self, weight: Tensor) -> Tensor:
        return self._leader.weight


def follow_embedding(model: nn.Module) -> None:
    """Let proj_out compute with the (possibly gated) embedding while training."""
    if not parametrize.is_parametrized(model.proj_out, "weight"):
        leader = model.model.decoder.embed_tokens
        parametrize.register_parametrization(model.proj_out, "weight", FollowWeight(leader))


def unfollow_embedding(model: nn.Module) -> None:
    """Back to a stock tie: proj_out.weight is the embedding's Parameter."""
    if parametrize.is_parametrized(model.proj_out, "weight"):
        parametrize.remove_parametrizations(model.proj_out, "weight", leave_parametrized=False)
        model.proj_out.weight = model.model.decoder.embed_tokens.weight


# --- decoding ---------------------------------------------------------------------------------


def runaway_start(tokens: list[int]) -> int | None:
    """Where the second occurrence begins of an n-gram the tail repeats: a phrase of 4 to 16
    tokens said twice in a row, or a shorter n-gram repeated over at least 16 tokens ("word
    word word" is speech; "press 0 for options press 0 for options" from one prompt is a
    loop). None when the tail does not repeat."""
    for period in range(1, RUNAWAY_PERIOD + 1):
        repeats = 2 if period >= RUNAWAY_PHRASE else math.ceil(RUNAWAY_TOKENS / period)
        span = period * repeats
        if len(tokens) < span:
            continue
        tail = tokens[-span:]
        if repeats == 2 and _periodic(tail[:period]):
            continue  # e.g. 8 equal tokens: a short n-gram, which needs RUNAWAY_TOKENS
        if all(tail[i] == tail[i % period] for i in range(span)):
            start = len(tokens) - span  # extend back as far as the pattern goes
            while start >= period and tokens[start - 1] == tokens[start - 1 + period]:
                start -= 1
            return start + period
    return None


def _stopped_at_runaway(row: list[int], prompt: int) -> list[int]:
    """The row as `generate` with the runaway stopping criterion would have ended it: at the
    first new token after which the tail repeats (for runtimes that decode to the budget)."""
    for end in range(prompt + 1, len(row) + 1):
        if runaway_start(row[:end]) is not None:
            return row[:end]
    return row


def _periodic(unit: list[int]) -> bool:
    """Whether the n-gram is itself a shorter n-gram repeated."""
    n = len(unit)
    return any(n % d == 0 and unit == unit[:d] * (n // d) for d in range(1, n))


def _stopping_criteria():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class RunawayStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            # The prompt's special tokens never repeat, so the whole row can be scanned.
            done = [runaway_start(row) is not None for row in input_ids.tolist()]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([RunawayStop()])


@dataclass
class BeamSearch:
    """Beam search for `decode` (greedy when no decoder is given)."""

    num_beams: int = 5


def max_new_tokens(seconds: float, config) -> int:
    budget = math.ceil(TOKENS_PER_SECOND * seconds) + TOKEN_MARGIN
    return max(1, min(budget, config.max_target_positions - 4))


# --- structured units -------------------------------------------------------------------------


def _attention_members(attention: nn.Module) -> list[Member]:
    members = [Member(getattr(attention, n), "weight", 0) for n in ("q_proj", "k_proj", "v_proj")]
    members += [
        Member(getattr(attention, n), "bias", 0)
        for n in ("q_proj", "k_proj", "v_proj")
        if getattr(attention, n).bias is not None
    ]
    members.append(Member(attention.out_proj, "weight", 1))
    return members


def _layers(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(name, layer, is_decoder) of every encoder then decoder layer."""
    out = []
    for side in ("encoder", "decoder"):
        stack = getattr(model.model, side).layers
        out += [
            (f"model.{side}.layers.{i}", layer, side == "decoder") for i, layer in enumerate(stack)
        ]
    return out


# What a second of audio costs, for structured:cost=flops: the encoder runs on 50 frames a
# second of its window; the decoder on about 4 tokens a second (target tokens per second of
# audio: 4.48 on embedded:train, 3.14 on embedded:real).
ENCODER_FRAMES_PER_SECOND = 50
DECODER_TOKENS_PER_SECOND = 4.0


def group_costs(model: nn.Module) -> dict[str, float]:
    """Multiply-adds per second of audio of one group of each kind: an encoder head (its
    q/k/v/out rows and its attention over the window's T frames), an encoder neuron, a
    decoder self-attention head (projections), a cross-attention head (q/out and attention
    over T frames per token, its keys and values once per frame), a decoder neuron."""
    config = model.config
    d = config.d_model
    enc, dec = d // config.encoder_attention_heads, d // config.decoder_attention_heads
    frames = config.max_source_positions  # T: the encoder window in frames
    f, t = ENCODER_FRAMES_PER_SECOND, DECODER_TOKENS_PER_SECOND
    return {
        "encoder.heads": f * (4 * d * enc + 2 * frames * enc),
        "encoder.ffn": f * 2 * d,
        "decoder.self_attn": t * 4 * d * dec,
        "decoder.encoder_attn": t * (2 * d * dec + 2 * frames * dec) + f * 2 * d * dec,
        "decoder.ffn": t * 2 * d,
    }


def structured_units(model: nn.Module) -> list[UnitSpec]:
    """Every attention's heads and every FFN's neurons, then every decoder layer whole;
    each with its cost in multiply-adds per second of audio (`group_costs`)."""
    costs = group_costs(model)
    units, layer_costs = [], {}
    for name, layer, is_decoder in _layers(model):
        for kind in ("self_attn", "encoder_attn") if is_decoder else ("self_attn",):
            attention = getattr(layer, kind)
            cost = costs[f"decoder.{kind}"] if is_decoder else costs["encoder.heads"]
            members = _attention_members(attention)
            units.append(
                UnitSpec(f"{name}.{kind}", "heads", members, attention.num_heads, cost=cost)
            )
        members = [Member(layer.fc1, "weight", 0), Member(layer.fc1, "bias", 0)]
        members.append(Member(layer.fc2, "weight", 1))
        cost = costs["decoder.ffn" if is_decoder else "encoder.ffn"]
        units.append(UnitSpec(f"{name}.ffn", "ffn", members, layer.fc1.out_features, cost=cost))
        # A whole layer costs what its heads and neurons cost.
        layer_costs[name] = sum(u.n_groups * u.cost for u in units if u.name.startswith(name + "."))
    for name, layer, is_decoder in _layers(model):
        if is_decoder:
            unit = _layer_unit(name, layer)
            units.append(dataclasses.replace(unit, cost=layer_costs[name]))
    return units


LAYER_OUTPUTS = (("self_attn", "out_proj"), ("encoder_attn", "out_proj"), (None, "fc2"))


def _layer_unit(name: str, layer: nn.Module) -> UnitSpec:
    """A whole decoder layer as one group. The gate reads and masks what the layer adds to
    the residual stream (both attentions' output projections and fc2, weights and biases):
    at mask 0 the layer is the identity, so it can be removed. Its other tensors die with
    it (zeroed when it is pruned) and all its parameters are counted."""
    members, dead = [], []
    for kind, linear in LAYER_OUTPUTS:
        module = getattr(getattr(layer, kind), linear) if kind else getattr(layer, linear)
        members += [
            Member(module, n, 0) for n in ("weight", "bias") if getattr(module, n) is not None
        ]
    outputs = {id(m.module) for m in members}
    for module in layer.modules():
        if id(module) in outputs or not list(module.parameters(recurse=False)):
            continue
        dead += [Member(module, n, 0) for n, _ in module.named_parameters(recurse=False)]
    params = sum(p.numel() for p in layer.parameters())
    return UnitSpec(f"{name}.layer", "layers", members, 1, dead=dead, group_params=params)


class HeadlessAttention(nn.Module):
    """An attention whose every head is pruned: it adds out_proj's bias, nothing else.

    Keeps zero-size q/k/v/out_proj Linears so the state dict has the usual names.
    """

    def __init__(self, hidden: int, head_dim: int, bias: bool, layer_idx, device=None, dtype=None):
        super().__init__()
        self.num_heads = 0
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.q_proj = empty_linear(hidden, 0, bias, device, dtype)
        self.k_proj = empty_linear(hidden, 0, False, device, dtype)
        self.v_proj = empty_linear(hidden, 0, bias, device, dtype)
        self.out_proj = empty_linear(0, hidden, bias, device, dtype)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> tuple[Tensor, None]:
        nothing = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        return self.out_proj(nothing), None


def _kept_heads(attention: nn.Module) -> list[int]:
    if attention.num_heads == 0:
        return []
    out = attention.out_proj.weight.detach()
    per_head = out.reshape(out.shape[0], attention.num_heads, -1).ne(0).any(2).any(0)
    return torch.nonzero(per_head).reshape(-1).tolist()


def _shrink_attention(layer: nn.Module, kind: str, heads: list[int]) -> None:
    attention = getattr(layer, kind)
    head_dim = attention.head_dim
    if not heads:
        weight = attention.out_proj.weight
        headless = HeadlessAttention(
            weight.shape[0],
            head_dim,
            attention.out_proj.bias is not None,
            getattr(attention, "layer_idx", None),
            weight.device,
            weight.dtype,
        )
        with torch.no_grad():
            if attention.out_proj.bias is not None:
                headless.out_proj.bias.copy_(attention.out_proj.bias)
        headless.train(attention.training)
        setattr(layer, kind, headless)
        return
    rows = head_rows(heads, head_dim, attention.q_proj.weight.device)
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attention, name, sliced_linear(getattr(attention, name), rows=rows))
    attention.out_proj = sliced_linear(attention.out_proj, cols=rows)
    attention.num_heads = len(heads)


def shrink_ffn(layer: nn.Module, neurons: list[int]) -> None:
    """Keep the feed-forward neurons `neurons` of an encoder or decoder layer."""
    idx = torch.tensor(neurons, dtype=torch.long, device=layer.fc1.weight.device)
    layer.fc1 = sliced_linear(layer.fc1, rows=idx)
    layer.fc2 = sliced_linear(layer.fc2, cols=idx)


def _is_identity(layer: nn.Module) -> bool:
    """Whether a decoder layer adds nothing to the residual stream (every output zero)."""
    for kind, linear in LAYER_OUTPUTS:
        module = getattr(getattr(layer, kind), linear) if kind else getattr(layer, linear)
        for tensor in (module.weight, module.bias):
            if tensor is not None and tensor.detach().ne(0).any():
                return False
    return True


def _drop_decoder_layers(model: nn.Module) -> list[int]:
    """Remove the decoder layers that are the identity; returns the indices kept."""
    decoder = model.model.decoder
    kept = [i for i, layer in enumerate(decoder.layers) if not _is_identity(layer)]
    if len(kept) < len(decoder.layers):
        keep_decoder_layers(model, kept)
    return kept


def keep_decoder_layers(model: nn.Module, kept: list[int]) -> None:
    """Keep only the decoder layers `kept` (in order), renumbering their cache indices."""
    decoder = model.model.decoder
    decoder.layers = nn.ModuleList([decoder.layers[i] for i in kept])
    for index, layer in enumerate(decoder.layers):  # the cache is indexed by layer
        for kind in ("self_attn", "encoder_attn"):
            getattr(layer, kind).layer_idx = index
    model.config.decoder_layers = len(kept)


def shrink(model: nn.Module) -> nn.Module:
    """A copy without the zeroed heads, neurons and decoder layers (same outputs). Removed
    layers change `decoder_layers` in the config; when every head is kept and each stack's
    layers keep the same number of neurons, the widths go into `encoder_ffn_dim` and
    `decoder_ffn_dim` (a stock model); otherwise the per-layer sizes are recorded under
    `pinchgate_structure`."""
    for unit in structured_units(model):
        if any(parametrize.is_parametrized(m.module, m.name) for m in unit.members):
            raise ValueError("gates are still attached: harden the model before shrinking it")
    target = copy.deepcopy(model)
    unfollow_embedding(target)
    previous = getattr(target.config, STRUCTURE_KEY, None)
    encoder_layers = len(target.model.encoder.layers)
    kept_decoder = _drop_decoder_layers(target)
    if previous is not None:  # the entries of the layers that stay
        entries = previous["layers"]
        previous = dict(previous)
        previous["layers"] = entries[:encoder_layers] + [
            entries[encoder_layers + i] for i in kept_decoder
        ]
    layers = []
    whole = previous is None  # every head kept: then uniform FFN widths make it stock
    widths: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
    for i, (_, layer, is_decoder) in enumerate(_layers(target)):
        entry = {}
        for kind in ("self_attn", "encoder_attn") if is_decoder else ("self_attn",):
            full = getattr(layer, kind).num_heads
            heads = _kept_heads(getattr(layer, kind))
            _shrink_attention(layer, kind, heads)
            if previous is not None:  # shrinking a shrunken model: keep the original indices
                heads = [previous["layers"][i][kind][h] for h in heads]
            whole = whole and len(heads) == full
            entry[kind] = heads
        neurons = torch.nonzero(layer.fc2.weight.detach().ne(0).any(0)).reshape(-1).tolist()
        shrink_ffn(layer, neurons)
        widths["decoder" if is_decoder else "encoder"].add(len(neurons))
        entry["ffn"] = len(neurons)
        layers.append(entry)
    if (
        whole
        and all(len(w) <= 1 for w in widths.values())
        and all(min(w, default=1) for w in widths.values())
    ):
        # One width per stack and every head: stock transformers config.
        for side, width in widths.items():
            if width:
                setattr(target.config, f"{side}_ffn_dim", width.pop())
        if hasattr(target.config, STRUCTURE_KEY):
            delattr(target.config, STRUCTURE_KEY)
    else:
        setattr(
            target.config,
            STRUCTURE_KEY,
            {"format": STRUCTURE_FORMAT, "version": STRUCTURE_VERSION, "layers": layers},
        )
    return target


def apply_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Resize a freshly built full-size model to a shrunken one's shapes (values: to load)."""
    if not isinstance(structure, dict) or structure.get("format") != STRUCTURE_FORMAT:
        raise ValueError(f"{STRUCTURE_KEY}: not a {STRUCTURE_FORMAT} entry")
    if structure.get("version") != STRUCTURE_VERSION:
        raise ValueError(f"{STRUCTURE_KEY}: version {structure.get('version')}, expected 1")
    layers = _layers(model)
    if len(structure["layers"]) != len(layers):
        raise ValueError(
            f"{STRUCTURE_KEY}: {len(structure['layers'])} layers, the model has {len(layers)}"
        )
    for i, ((_, layer, is_decoder), entry) in enumerate(
        zip(layers, structure["layers"], strict=True)
    ):
        try:
            for kind in ("self_attn", "encoder_attn") if is_decoder else ("self_attn",):
                heads = [int(h) for h in entry[kind]]
                full = getattr(layer, kind).num_heads
                if heads != sorted(set(heads)) or any(not 0 <= h < full for h in heads):
                    raise ValueError(f"bad head indices {heads}")
                _shrink_attention(layer, kind, heads)
            neurons = int(entry["ffn"])
            if not 0 <= neurons <= layer.fc1.out_features:
                raise ValueError(f"{neurons} neurons of {layer.fc1.out_features}")
            shrink_ffn(layer, list(range(neurons)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{STRUCTURE_KEY}: layer {i}: {exc}") from None
    setattr(model.config, STRUCTURE_KEY, structure)
    return model


def build_from_config(config) -> nn.Module:
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(config)
    structure = getattr(config, STRUCTURE_KEY, None)
    if structure is not None:
        try:
            apply_structure(model, structure)
        except ValueError as exc:
            raise PinchgateError(f"config.json: {exc}") from None
    return model


def load_shrunk(path: str | Path) -> nn.Module:
    path = Path(path)
    config = read_config(path)
    model = build_from_config(config)
    state = read_state_dict(weight_files(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "proj_out.weight"]:
        raise PinchgateError(
            f"{path}: weights do not match config.json's structure "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    model.tie_weights()
    if (path / "generation_config.json").is_file():
        # Built from config.json, the model has a default generation config: without the
        # saved one (no-timestamps token, suppressed tokens) `generate` decodes differently.
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model.eval()


# --- the family -------------------------------------------------------------------------------


class WhisperFamily(ModelFamily):
    name = "whisper"
    model_types = ("whisper",)

    def load_config(self, source):
        return load_config(source)

    def load(self, source):
        return load_whisper(source)

    def build_from_config(self, config):
        return build_from_config(config)

    def check_options(self, cfg) -> None:
        if cfg.text_style not in TEXT_STYLES:
            raise PinchgateError(
                f"--text-style {cfg.text_style!r}: must be one of {', '.join(TEXT_STYLES)}"
            )
        if cfg.window is not None and not 1 <= cfg.window <= 30:
            raise PinchgateError(f"--window {cfg.window}: must be between 1 and 30 seconds")

    def prepare_processor(self, cfg, run_dir, train_transcripts):
        config = load_config(cfg.model)
        if cfg.language is not None and not getattr(config, "vocab_size", 0) >= 51865:
            raise PinchgateError(f"--language {cfg.language}: {cfg.model} is English-only")
        processor = load_processor(cfg.model, cfg.text_style, cfg.language)
        window = cfg.window or window_for(cfg, native_window(config))
        return with_window(processor, window), False

    def load_processor(self, model_dir):
        check_whisper_dir(Path(model_dir))
        return load_processor(model_dir)

    def max_input_seconds(self, processor):
        return processor.window_seconds

    def training_model(self, cfg, processor, new_head):
        model = load_whisper(cfg.model)
        cut_window(model, int(processor.window_seconds))
        if cfg.freeze_feature_encoder:  # the convolution front end
            for conv in (model.model.encoder.conv1, model.model.encoder.conv2):
                conv.requires_grad_(False)
        if cfg.freeze_encoder:
            model.model.encoder.requires_grad_(False)
        if cfg.freeze_decoder:  # the decoder's language model as pretrained
            model.model.decoder.requires_grad_(False)
        follow_embedding(model)
        return model.train()

    def sampling_rate(self, processor):
        return processor.feature_extractor.sampling_rate

    def labels(self, processor, utterance):
        text = utterance.written if processor.text_style == "written" else None
        text = text or styled(utterance.transcript, processor.text_style)
        ids = processor.tokenizer(text).input_ids
        return ids[1:]  # the model prepends the start token itself (decoder_start_token_id)

    def collate(self, processor, items):
        extractor = processor.feature_extractor
        features = extractor(
            [item["audio"] for item in items],
            sampling_rate=extractor.sampling_rate,
            return_tensors="pt",
        )
        batch = {"input_features": features["input_features"]}
        batch["index"] = torch.tensor([item["index"] for item in items])
        if "labels" in items[0]:
            longest = max(len(item["labels"]) for item in items)
            labels = torch.full((len(items), longest), -100, dtype=torch.long)
            for row, item in enumerate(items):
                labels[row, : len(item["labels"])] = torch.tensor(item["labels"])
            batch["labels"] = labels
        return batch

    def loss(self, model, batch):
        # One gate computation for the tied embedding's two uses in the forward.
        with parametrize.cached():
            return model(**batch).loss

    def teacher_model(self, source, processor, model):
        """The frozen teacher of `--distill-from`, at the run's window; its vocabulary must
        be the model's, token for token."""
        teacher = load_whisper(source)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise PinchgateError(
                f"--distill-from {source}: a vocabulary of {teacher.config.vocab_size} tokens, "
                f"the model's has {model.config.vocab_size}"
            )
        cut_window(teacher, int(processor.window_seconds))
        return teacher.eval().requires_grad_(False)

    def distillation_loss(self, model, teacher, batch, weight, temperature):
        """(1 - weight) x cross-entropy + weight x T^2 x KL(teacher || model), the KL over
        the label positions, both distributions softened by T (Hinton et al., 2015)."""
        with parametrize.cached():
            out = model(**batch)
        with torch.no_grad():
            target = teacher(**batch).logits
        keep = batch["labels"] != -100
        student = torch.log_softmax(out.logits[keep].float() / temperature, dim=-1)
        teacher_p = torch.log_softmax(target[keep].float() / temperature, dim=-1)
        kl = torch.nn.functional.kl_div(student, teacher_p, log_target=True, reduction="batchmean")
        return (1 - weight) * out.loss + weight * temperature**2 * kl

    def features(self, model, processor, audio):
        runtime = isinstance(model, RUNTIME_MODELS)
        if runtime and model.window != processor.window_seconds:
            processor = with_window(processor, model.window)  # as exported (e.g. 30 s)
        extractor = processor.feature_extractor
        device = "cpu" if runtime else next(model.parameters()).device
        features = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt")
        return features["input_features"].to(device)

    def logits(self, model, processor, audio):
        """Logits of the decoder prompt (start of transcript ... no timestamps), teacher forced."""
        features = self.features(model, processor, audio)
        prompt = processor.tokenizer.prefix_tokens
        ids = torch.tensor([prompt] * len(audio), device=features.device)
        if isinstance(model, OnnxWhisper):
            return torch.from_numpy(model.logits(features.numpy(), ids.numpy()))
        with parametrize.cached():
            return model(input_features=features, decoder_input_ids=ids).logits

    def decode(self, model, processor, audio: list[np.ndarray], decoder=None):
        features = self.features(model, processor, audio)
        seconds = max(len(a) for a in audio) / processor.feature_extractor.sampling_rate
        if isinstance(model, RUNTIME_MODELS):
            sequences = model.generate(
                features.numpy(),
                processor.tokenizer.prefix_tokens,
                max_new_tokens(seconds, model.config),
                beam_size=decoder.num_beams if decoder is not None else 1,
            )
            prompt = len(processor.tokenizer.prefix_tokens)
            return self._texts(processor, [_stopped_at_runaway(r, prompt) for r in sequences])
        options = {"language": processor.language, "task": "transcribe"}
        if processor.language is None:
            options = {}
        with parametrize.cached():
            sequences = model.generate(
                features,
                max_new_tokens=max_new_tokens(seconds, model.config),
                num_beams=decoder.num_beams if decoder is not None else 1,
                do_sample=False,
                stopping_criteria=_stopping_criteria(),
                **options,
            )
        return self._texts(processor, sequences.tolist())

    def _texts(self, processor, sequences: list[list[int]]) -> list[str]:
        texts = []
        for row in sequences:
            start = runaway_start(row)
            if start is not None:
                row = row[:start]  # one occurrence of what the model repeated
            texts.append(processor.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def beam_decoder(self, beam_size: int):
        return BeamSearch(beam_size)

    def normalizer(self, processor):
        return normalize_english

    def gate_targets(self):
        return (LINEARS, EMBEDDING), (OUTPUT_PROJECTION,)

    def gate_extras(self):
        return {"feature_encoder": FRONT_END}

    def structured_units(self, model):
        return structured_units(model)

    def shrink(self, model):
        return shrink(model)

    def at_window(self, model, processor, seconds):
        if seconds is None:
            return model, processor
        native = native_window(model.config)
        if seconds > native:
            set_window(model, seconds)
        elif seconds < native:
            # Faster on short clips (docs/RESULTS.md), at the user's request; said, not silent.
            say(
                f"--window {seconds}: shorter than the model's own {native} s; a clip longer "
                f"than {seconds} s loses its end"
            )
            cut_window(model, seconds)
        return model, with_window(processor, seconds)

    def export_onnx(self, model, processor, path, opset):
        """A directory: encoder.onnx, decoder.onnx (key/value cache), pinchgate_onnx.json."""
        unfollow_embedding(model)
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise PinchgateError(f"{path}: already exists and is not empty; choose a new path")
        return export_whisper_onnx(model, path, opset)

    def onnx_runtime_model(self, onnx_path, model):
        return OnnxWhisper(onnx_path)

    def onnx_parity(self, onnx_path, model):
        """Largest logit difference, teacher forced, on random features and tokens for 3
        clips, and of the cached decoder continuing the same tokens in two calls."""
        runtime = OnnxWhisper(onnx_path)
        config = model.config
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(
            3, config.num_mel_bins, config.max_source_positions * 2, generator=generator
        )
        ids = torch.randint(0, config.vocab_size, (3, 7), generator=generator)
        with torch.no_grad(), parametrize.cached():
            reference = model(input_features=features, decoder_input_ids=ids).logits.numpy()
        whole = runtime.logits(features.numpy(), ids.numpy())
        return float(np.abs(whole - reference).max())

    def export_ct2(self, model, model_dir, path, quantization):
        unfollow_embedding(model)
        return export_ct2(model, Path(model_dir), Path(path), quantization)

    def ct2_runtime_model(self, path, compute_type):
        return Ct2Whisper(path, compute_type)

    def ct2_parity(self, runtime, model, processor, audio):
        """Encoder outputs on `audio`, and the vocabulary logits of every step of the
        CTranslate2 model's greedy continuation of the first clip against PyTorch's logits
        for the same tokens, teacher forced."""
        features = self.features(model, processor, audio)
        with torch.no_grad():
            reference = model.model.encoder(features).last_hidden_state.numpy()
        encoder = float(np.abs(runtime.encode(features.numpy()) - reference).max())
        prompt = list(processor.tokenizer.prefix_tokens)
        seconds = len(audio[0]) / processor.feature_extractor.sampling_rate
        steps = max_new_tokens(seconds, model.config)
        tokens, logits = runtime.step_log_probs(features[:1].numpy(), prompt, steps)
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad(), parametrize.cached():
            torch_logits = model(input_features=features[:1], decoder_input_ids=ids).logits[0]
        wanted = torch_logits[len(prompt) - 1 : len(prompt) - 1 + len(logits)].numpy()
        return {
            "encoder_max_abs_diff": encoder,
            "logits_max_abs_diff": float(np.abs(logits - wanted).max()),
            "steps": len(logits),
        }

    def trim_vocabulary(self, model, processor, keep, path):
        """Keep the first `keep` text tokens and every special one (`whisper_vocab.py`); save
        the model with its renumbered tokenizer at `path`. Returns the kept ids."""
        unfollow_embedding(model)
        kept = kept_ids(processor.tokenizer, model.config.vocab_size, keep)
        trim_model(model, kept)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.trim")
        shutil.rmtree(tmp, ignore_errors=True)
        self.save(model, processor, tmp)
        trim_tokenizer_files(tmp, kept)
        trimmed = load_processor(tmp, processor.text_style, processor.language)
        new_id = renumbering(kept)
        wanted = [new_id[i] for i in processor.tokenizer.prefix_tokens]
        if trimmed.tokenizer.prefix_tokens != wanted:  # the renumbering is the whole point
            raise PinchgateError(f"{tmp}: the trimmed tokenizer's prompt is not the model's")
        move_into_place(tmp, path)
        return kept

    def save(self, model, processor, path):
        unfollow_embedding(model)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return path


def window_for(cfg, native: int) -> int:
    """The shortest whole-second window that holds the longest clip of the run's corpora
    (at most the model's own window)."""
    from pinchgate.data.audio import audio_duration
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import read_corpus
    from pinchgate.errors import AudioError

    longest = 0.0
    for spec in [cfg.train, cfg.dev, *cfg.test]:
        if not spec:
            continue
        utterances, _ = read_corpus(resolve_corpus(spec))
        for utterance in utterances:
            try:
                longest = max(longest, utterance.duration or audio_duration(utterance.audio_path))
            except AudioError:
                continue  # reported (and skipped) when the corpus is loaded
    return int(min(native, max(1, math.ceil(longest + 1e-6))))

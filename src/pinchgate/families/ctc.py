"""The CTC family: wav2vec2, HuBERT, WavLM and Data2VecAudio encoders with a CTC head.

Everything pinchgate knows about these models lives here: loading (local directory or hub
id), the tiny random model of the tests and the toy case, the character vocabulary and the
feature extractor, the collator and loss, greedy (or lexicon + LM) CTC decoding, the
default gate targets, the structured units (FFN neurons, attention heads) and how to cut
them out, and saving. ONNX export is in `ctc_onnx.py`.
"""

from __future__ import annotations

import copy
import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import (
    AutoModelForCTC,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
)

from pinchgate.console import say
from pinchgate.data.text import normalize_transcript
from pinchgate.errors import ModelLoadError, PinchgateError
from pinchgate.families.base import Member, ModelFamily, UnitSpec
from pinchgate.families.ctc_vocab import (
    describe_left_out,
    load_tokenizer,
    save_vocab,
    vocab_characters,
    vocab_from_transcripts,
)
from pinchgate.families.surgery import empty_linear, head_rows, sliced_linear
from pinchgate.modeldir import (
    check_loading_info,
    is_local_model,
    load_auto_config,
    one_line,
    read_config,
    read_state_dict,
    weight_files,
)

SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")

# A ~50k-parameter wav2vec2 for tests and the built-in toy case: 320x downsampling
# (20 ms frames at 16 kHz) like the real models, everything else shrunk.
TINY_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (32, 32, 32),
    "conv_kernel": (10, 8, 4),
    "conv_stride": (10, 8, 4),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "feat_extract_norm": "group",
    "do_stable_layer_norm": False,
    "mask_time_prob": 0.0,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.0,
    "layerdrop": 0.0,
}

# Default gate targets (regular expressions matched against the whole dotted module name).
ENCODER_LAYERS = r"(?:.*\.)?encoder\.layers\.\d+\..+"
FEATURE_PROJECTION = r"(?:.*\.)?feature_projection\.projection"
POS_CONV = r"(?:.*\.)?encoder\.pos_conv_embed\.(?:conv|layers\.\d+\.conv)"
FEATURE_ENCODER = r"(?:.*\.)?feature_extractor\.conv_layers\.\d+\.conv"
CTC_HEAD = r"(?:.*\.)?lm_head"
GATE_EXTRAS = {"pos_conv": POS_CONV, "feature_encoder": FEATURE_ENCODER}

# The CTC head's tensors: the only ones a run may initialise fresh (with a new vocabulary).
CTC_HEAD_TENSORS = r"(?:.*\.)?lm_head\.(?:weight|bias)"
# Weights of a self-supervised checkpoint a CTC model has no place for (pretraining heads,
# SpecAugment's mask embedding when masking is off): left out when loading.
PRETRAINING_ONLY = (
    r"(?:.*\.)?(?:quantizer|project_q|project_hid|final_proj|label_embeddings_concat"
    r"|masked_spec_embed)(?:\..*)?"
)

# Run options that only Whisper models have, with the value that means "not used".
WHISPER_OPTIONS = {
    "window": None,
    "language": None,
    "freeze_encoder": False,
    "freeze_decoder": False,
    "distill_from": None,
}
STRUCTURE_KEY = "pinchgate_structure"  # the config.json entry of a shrunken model
STRUCTURE_FORMAT = "pinchgate-shrunk"
STRUCTURE_VERSION = 1
# WavLM-style attention carries per-head parameters beyond q/k/v/out: not handled here.
_PER_HEAD_EXTRAS = ("gru_rel_pos_const", "gru_rel_pos_linear", "rel_attn_embed")


@dataclass
class CTCProcessor:
    """A CTC model's feature extractor (raw audio in) and character tokenizer (text out)."""

    feature_extractor: Wav2Vec2FeatureExtractor
    tokenizer: Wav2Vec2CTCTokenizer

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    def save_pretrained(self, path: str | Path) -> None:
        self.feature_extractor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


# --- loading ----------------------------------------------------------------------------------


def load_config(source: str | Path) -> PretrainedConfig:
    config = load_auto_config(source)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: model type {config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return config


def load_ctc_model(
    source: str | Path,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    new_head: bool = False,
    **config_overrides,
) -> PreTrainedModel:
    """Any HF *ForCTC speech model, from a local directory or (online) a hub id.

    With `new_head` (or a `vocab_size` its head lacks) the CTC head is freshly initialised,
    as when fine-tuning a self-supervised checkpoint; nothing else may be: a config.json
    that does not match the weights (a tensor missing, unexpected or of another size) is
    refused with one line. Weights of a pretraining head the CTC model has no use for (quantizer,
    projections) are left out. CTC uses zero_infinity so one impossible alignment cannot
    turn the loss into inf.
    """
    config = load_config(source)
    if is_shrunk(config):
        # Physically shrunk (per-layer sizes): HF would re-initialise every resized tensor.
        if vocab_size is not None or new_head or config_overrides:
            raise ModelLoadError(f"{source}: a shrunk model cannot be given a new head or config")
        return load_shrunk(source).float()
    overrides = {"ctc_zero_infinity": True, "ctc_loss_reduction": "mean", **config_overrides}
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    if pad_token_id is not None:
        overrides["pad_token_id"] = pad_token_id
    for key, value in overrides.items():
        setattr(config, key, value)
    try:
        # fp32 master weights whatever the file holds (fp16 checkpoints included);
        # mixed precision is the trainer's business. Sizes that differ are reported in the
        # loading info and refused below, except a new head's.
        model, info = AutoModelForCTC.from_pretrained(
            str(source),
            config=config,
            ignore_mismatched_sizes=True,
            dtype=torch.float32,
            output_loading_info=True,
        )
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"{source}: cannot load model weights ({one_line(exc)})") from None
    # A head for the run's vocabulary: new when asked, resized or absent (a pretrained-only
    # checkpoint); loading a model as it is (no vocab_size) must find its head.
    fresh = CTC_HEAD_TENSORS if new_head or vocab_size is not None else None
    check_loading_info(source, info, fresh, PRETRAINING_ONLY)
    if new_head:
        model.lm_head.reset_parameters()
    return model


def build_model(
    vocab_size: int, pad_token_id: int = 0, seed: int = 0, **config_overrides
) -> Wav2Vec2ForCTC:
    """A randomly initialised tiny wav2vec2 CTC model (tests, the built-in toy case)."""
    config = tiny_config(vocab_size, pad_token_id, **config_overrides)
    torch.manual_seed(seed)
    return Wav2Vec2ForCTC(config)


def tiny_config(vocab_size: int, pad_token_id: int = 0, **config_overrides) -> Wav2Vec2Config:
    return Wav2Vec2Config(
        **{**TINY_CONFIG, **config_overrides},
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        ctc_zero_infinity=True,
        ctc_loss_reduction="mean",
    )


def feature_extractor_for(
    config: PretrainedConfig, source: str | Path | None = None
) -> Wav2Vec2FeatureExtractor:
    """The model's own preprocessor when it has one, else wav2vec2's standard settings:
    zero-mean unit-variance input, attention masks only for layer-norm feature encoders
    (group-norm models such as wav2vec2-base are trained without them)."""
    if source is not None and (Path(source) / "preprocessor_config.json").is_file():
        return Wav2Vec2FeatureExtractor.from_pretrained(str(source))
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=getattr(config, "feat_extract_norm", "group") == "layer",
    )


def prepare_tokenizer(cfg, run_dir: Path, train_transcripts: list[str]):
    """The run's vocabulary: kept from an earlier start of this run, else the one given,
    else the model's own, else built from the training transcripts. Returns
    (tokenizer, head_is_new)."""
    saved = run_dir / "vocab.json"
    model_vocab = (
        Path(cfg.model) / "vocab.json" if cfg.model != "toy" and is_local_model(cfg.model) else None
    )
    if saved.is_file():
        source = saved
    elif cfg.vocab:
        source = Path(cfg.vocab)
    elif model_vocab is not None and model_vocab.is_file():
        source = model_vocab
    else:
        vocab, left_out = vocab_from_transcripts(
            [normalize_transcript(t) for t in train_transcripts]
        )
        source = save_vocab(vocab, saved)
        say(
            f"vocabulary: {len(vocab)} tokens built from {len(train_transcripts)} training "
            "transcripts"
            + (
                f"; left out (not letters, or too rare): {describe_left_out(left_out)}: their "
                "utterances are skipped (out_of_vocabulary)"
                if left_out
                else ""
            )
        )
    tokenizer = load_tokenizer(source)
    if not saved.is_file():
        save_vocab(tokenizer.get_vocab(), saved)
    head_is_new = cfg.new_head or source != model_vocab
    return tokenizer, head_is_new


def greedy_ctc_text(tokenizer: Wav2Vec2CTCTokenizer, ids: list[int]) -> str:
    """The text of one utterance's best path: repeats merged, then blanks and every other
    special token (<s>, </s>, <unk>) dropped, word delimiters made spaces. (The tokenizer's
    own skip_special_tokens drops the blanks before merging, which merges real double
    letters: L <pad> L would become one L.)"""
    merged = [i for i, _ in itertools.groupby(ids)]
    special = set(tokenizer.all_special_ids) - {tokenizer.word_delimiter_token_id}
    kept = [i for i in merged if i not in special]
    return tokenizer.decode(kept, group_tokens=False)


# --- structured units -------------------------------------------------------------------------


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


def unit_members(block: Block, kind: str) -> list[Member]:
    """The tensors of a block's FFN neurons (rows of W_in and b_in, columns of W_out) or of
    its heads (rows of q/k/v and their biases, columns of out_proj)."""
    if kind == "ffn":
        fin, fout = block.feed_forward.intermediate_dense, block.feed_forward.output_dense
        candidates = [Member(fin, "weight", 0), Member(fin, "bias", 0), Member(fout, "weight", 1)]
    else:
        a = block.attention
        candidates = [Member(m, "weight", 0) for m in (a.q_proj, a.k_proj, a.v_proj)]
        candidates += [Member(m, "bias", 0) for m in (a.q_proj, a.k_proj, a.v_proj)]
        candidates.append(Member(a.out_proj, "weight", 1))
    return [m for m in candidates if getattr(m.module, m.name, None) is not None]


def structured_units(model: nn.Module) -> list[UnitSpec]:
    blocks = encoder_blocks(model)
    if not blocks:
        raise ValueError(
            f"no transformer blocks with attention (q/k/v/out_proj) and feed_forward "
            f"(intermediate_dense/output_dense) found in {type(model).__name__}"
        )
    units = []
    for block in blocks:
        heads = int(block.attention.num_heads)
        neurons = block.feed_forward.intermediate_dense.out_features
        for kind, suffix, n in (("heads", "attention", heads), ("ffn", "feed_forward", neurons)):
            name = f"{block.name}.{suffix}" if block.name else suffix
            units.append(UnitSpec(name, kind, unit_members(block, kind), n))
    return units


# --- shrinking --------------------------------------------------------------------------------


class HeadlessAttention(nn.Module):
    """An attention block with every head pruned: it adds out_proj's bias, nothing else.

    Keeps the zero-size q/k/v/out_proj Linears so the state dict has the usual names.
    """

    def __init__(self, hidden: int, head_dim: int, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.num_heads = 0
        self.head_dim = head_dim
        for name in ("k_proj", "v_proj", "q_proj"):
            setattr(self, name, empty_linear(hidden, 0, bias, device, dtype))
        self.out_proj = empty_linear(0, hidden, bias, device, dtype)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> tuple[Tensor, None]:
        nothing = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        return self.out_proj(nothing), None


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
    ff.intermediate_dense = sliced_linear(ff.intermediate_dense, rows=idx)
    ff.output_dense = sliced_linear(ff.output_dense, cols=idx)
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
    rows = head_rows(heads, head_dim, attention.q_proj.weight.device)
    for name in ("k_proj", "v_proj", "q_proj"):
        setattr(attention, name, sliced_linear(getattr(attention, name), rows=rows))
    attention.out_proj = sliced_linear(attention.out_proj, cols=rows)
    attention.num_heads = len(heads)


def shrink(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Remove the pruned FFN neurons and attention heads: smaller dense matrices, same outputs.

    A group is removed when its output columns are exactly zero (after hardening every
    parameter of a pruned group is), so the result computes what ``model`` computes. The
    per-block sizes go to ``model.config.pinchgate_structure`` (``save_shrunk`` writes it).
    """
    for unit in structured_units(model):
        if any(parametrize.is_parametrized(m.module, m.name) for m in unit.members):
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


def build_from_config(config) -> nn.Module:
    """The CTC class config.json names in `architectures`, else AutoModelForCTC's choice,
    with freshly initialised weights (on the current default device), resized to a
    shrunken model's recorded structure."""
    import transformers

    model = None
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None and name.endswith("ForCTC"):
            model = cls(config)
            break
    if model is None:
        model = transformers.AutoModelForCTC.from_config(config)
    structure = getattr(config, STRUCTURE_KEY, None)
    if structure is not None:  # a shrunken model: per-layer sizes
        try:
            apply_structure(model, structure)
        except ValueError as exc:
            raise PinchgateError(f"config.json: {exc}") from None
    return model


def save_shrunk(model: nn.Module, path: str | Path, processor=None) -> Path:
    """A Hugging Face-style directory: config.json (with the structure) + model.safetensors,
    written under a temporary name and renamed. Read it back with ``load_shrunk``."""
    if not is_shrunk(model.config):
        raise ValueError("not a shrunken model: call shrink(model) first")
    return save_model_dir(model, processor, Path(path))


def load_shrunk(path: str | Path) -> nn.Module:
    """A shrunken model directory: architecture rebuilt from config.json, weights loaded
    strictly (every tensor present, every shape as the structure says). Eval mode."""
    path = Path(path)
    config = read_config(path)
    if not is_shrunk(config):
        raise PinchgateError(f"{path / 'config.json'}: no {STRUCTURE_KEY}: not a shrunken model")
    model = build_from_config(config)
    state = read_state_dict(weight_files(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise PinchgateError(
            f"{path}: weights do not match config.json's structure ({' '.join(first[:3])})"
        ) from None
    return model.eval()


def save_model_dir(model, processor, path: Path) -> Path:
    """A Hugging Face directory (safetensors, config, and the processor's files), written
    under a temporary name and renamed so a half-written model never looks finished."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


# --- the family -------------------------------------------------------------------------------


class CTCFamily(ModelFamily):
    name = "ctc"
    model_types = SUPPORTED_MODEL_TYPES

    def load_config(self, source):
        if str(source) == "toy":
            return tiny_config(32)
        return load_config(source)

    def load(self, source):
        if str(source) == "toy":  # the built-in tiny model, random weights
            return build_model(32)
        return load_ctc_model(source)

    def build_from_config(self, config):
        return build_from_config(config)

    def prepare_processor(self, cfg, run_dir, train_transcripts):
        tokenizer, head_is_new = prepare_tokenizer(cfg, run_dir, train_transcripts)
        if cfg.model == "toy":
            config, source = tiny_config(len(tokenizer)), None
        else:
            config, source = load_config(cfg.model), cfg.model
        return CTCProcessor(feature_extractor_for(config, source), tokenizer), head_is_new

    def load_processor(self, model_dir):
        if not (Path(model_dir) / "vocab.json").is_file():
            raise PinchgateError(
                f"{model_dir}: no vocab.json: not a fine-tuned CTC model directory"
            )
        config = read_config(Path(model_dir))
        return CTCProcessor(feature_extractor_for(config, model_dir), load_tokenizer(model_dir))

    def allowed_characters(self, processor):
        return vocab_characters(processor.tokenizer)

    def training_model(self, cfg, processor, new_head):
        tokenizer = processor.tokenizer
        if cfg.model == "toy":
            model = build_model(len(tokenizer), tokenizer.pad_token_id, seed=cfg.seed)
        else:
            model = load_ctc_model(
                cfg.model, len(tokenizer), tokenizer.pad_token_id, new_head=new_head
            )
            if new_head:
                why = "--new-head" if cfg.new_head else "the run's vocabulary is not the model's"
                say(f"CTC head: new, {len(tokenizer)} outputs initialised at random ({why})")
        if cfg.freeze_feature_encoder:
            model.freeze_feature_encoder()
        return model

    def sampling_rate(self, processor):
        return processor.sampling_rate

    def labels(self, processor, utterance):
        return processor.tokenizer(utterance.transcript).input_ids

    def collate(self, processor, items):
        """Pads audio with the feature extractor and labels with -100 (ignored by CTC)."""
        extractor = processor.feature_extractor
        features = extractor(
            [item["audio"] for item in items],
            sampling_rate=extractor.sampling_rate,
            padding=True,
            return_tensors="pt",
        )
        batch = {"input_values": features["input_values"]}
        if "attention_mask" in features:
            batch["attention_mask"] = features["attention_mask"]
        batch["index"] = torch.tensor([item["index"] for item in items])
        if "labels" in items[0]:
            longest = max(len(item["labels"]) for item in items)
            labels = torch.full((len(items), longest), -100, dtype=torch.long)
            for row, item in enumerate(items):
                labels[row, : len(item["labels"])] = torch.tensor(item["labels"])
            batch["labels"] = labels
        return batch

    def logits(self, model, processor, audio):
        extractor = processor.feature_extractor
        device = next(model.parameters()).device
        features = extractor(
            audio, sampling_rate=extractor.sampling_rate, padding=True, return_tensors="pt"
        )
        return model(**{k: v.to(device) for k, v in features.items()}).logits

    def decode(self, model, processor, audio: list[np.ndarray], decoder=None) -> list[str]:
        """Greedy CTC, or `decoder.decode(log_probs)` per utterance (pinchgate.lm)."""
        logits = self.logits(model, processor, audio)
        frames = model._get_feat_extract_output_lengths(torch.tensor([len(a) for a in audio]))
        if decoder is None:
            ids = logits.argmax(dim=-1).cpu()
            # Padded frames are cut off so they cannot add characters to short utterances.
            return [
                greedy_ctc_text(processor.tokenizer, ids[row, : int(n)].tolist())
                for row, n in enumerate(frames)
            ]
        log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()
        return [decoder.decode(log_probs[row, : int(n)]) for row, n in enumerate(frames)]

    def normalizer(self, processor):
        return normalize_transcript

    def check_options(self, cfg):
        for name, default in WHISPER_OPTIONS.items():
            if getattr(cfg, name, default) != default:
                raise PinchgateError(
                    f"--{name.replace('_', '-')}: an option of Whisper models, not of CTC "
                    f"models ({cfg.model})"
                )

    def lm_decoder(self, processor, lm_path, lm_weight=1.0, word_score=0.0, beam_size=50):
        """A lexicon + word n-gram beam search over the CTC outputs (pinchgate.lm)."""
        from pinchgate.lm import LexiconDecoder

        tokenizer = processor.tokenizer
        vocab = tokenizer.get_vocab()
        return LexiconDecoder(
            sorted(vocab, key=vocab.get),
            lm_path,
            lm_weight=lm_weight,
            word_score=word_score,
            beam_size=beam_size,
            blank=tokenizer.pad_token,
            delimiter=tokenizer.word_delimiter_token,
        )

    def gate_targets(self):
        return (ENCODER_LAYERS, FEATURE_PROJECTION), (CTC_HEAD,)

    def gate_extras(self):
        return dict(GATE_EXTRAS)

    def structured_units(self, model):
        return structured_units(model)

    def shrink(self, model):
        return shrink(model, inplace=False)

    def save(self, model, processor, path):
        return save_model_dir(model, processor, Path(path))

    def export_onnx(self, model, processor, path, opset):
        from pinchgate.families.ctc_onnx import export_ctc_onnx

        mask = bool(processor.feature_extractor.return_attention_mask)
        return export_ctc_onnx(model, path, opset, attention_mask=mask)

    def onnx_runtime_model(self, onnx_path, model):
        from pinchgate.families.ctc_onnx import OnnxCTCModel

        return OnnxCTCModel(onnx_path, model.config)

    def onnx_parity(self, onnx_path, model):
        from pinchgate.families.ctc_onnx import random_audio_difference

        return random_audio_difference(onnx_path, model)

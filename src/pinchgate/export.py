"""Artifacts of a hardened model: a compact sparse file, its stock HF form, and ONNX.

The packed format is one safetensors file, `model.pinch.safetensors`, beside the model's
config.json and tokenizer / feature-extractor files. Each floating tensor is stored as

    plain    `NAME/values`, the tensor itself (no zeros worth skipping);
    bitmask  `NAME/values` (the kept values, flat) + `NAME/mask` (np.packbits of the
             non-zero pattern, row-major);
    indices  `NAME/values` + `NAME/indices` (flat positions of the kept values, int16
             when every position fits, else int32);

whichever is smallest for that tensor. With int8 values, `NAME/scales` holds the
per-output-channel (dim 0) scales. The header metadata says how each tensor is stored
(JSON under "pinchgate.tensors") and carries a SHA-256 of the stored bytes, so a damaged
file is refused instead of loading wrong weights. Nothing here reads or writes pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pinchgate.errors import PinchgateError

PACKED_FILE = "model.pinch.safetensors"
FORMAT_NAME = "pinchgate-sparse"
FORMAT_VERSION = 1
VALUE_FORMATS = ("fp32", "fp16", "int8")
# Below this share of exact zeros in the weight matrices a model was never hardened.
MIN_HARDENED_SPARSITY = 0.01
INT16_MAX_POSITIONS = 2**15  # flat positions 0..32767 fit int16
# Files of a model directory that are weights, not side files to carry along.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


@dataclass
class TensorReport:
    """How one tensor was stored: `kept` counts non-zero values, `stored_bytes` the bytes
    of all its parts in the file, `max_abs_error` the value-storage error (0 when exact)."""

    name: str
    shape: list[int]
    dtype: str
    encoding: str
    numel: int
    kept: int
    stored_bytes: int
    max_abs_error: float = 0.0


@dataclass
class PackReport:
    """Sizes before and after packing. `dense_bytes` is the source weight file(s) on disk,
    `packed_bytes` the packed file on disk, of which `header_bytes` is the safetensors
    header (tensor table and metadata)."""

    source: str
    packed_file: str
    values: str
    dense_bytes: int
    packed_bytes: int
    header_bytes: int
    tensors: list[TensorReport] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.packed_bytes

    @property
    def sparsity(self) -> float:
        """Share of exact zeros (pruned weights) over all floating tensors, before any
        quantisation: the pruning, not the value storage."""
        floating = [t for t in self.tensors if t.encoding != "raw"]
        total = sum(t.numel for t in floating)
        return 1.0 - sum(t.kept for t in floating) / total if total else 0.0

    @property
    def max_abs_error(self) -> float:
        """Largest change of any weight made by the value storage (fp16 / int8 rounding)."""
        return max((t.max_abs_error for t in self.tensors), default=0.0)

    def encodings(self) -> dict[str, int]:
        return dict(Counter(t.encoding for t in self.tensors))

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "ratio": self.ratio,
            "sparsity": self.sparsity,
            "max_abs_error": self.max_abs_error,
        }

    def table(self) -> str:
        rows = [
            ("dense (source weights)", self.dense_bytes),
            (f"packed ({PACKED_FILE})", self.packed_bytes),
            ("  of which header", self.header_bytes),
        ]
        lines = [f"{'':34} {'bytes':>14}"]
        lines += [f"{label:34} {n:>14,}" for label, n in rows]
        lines.append(f"{'ratio (dense / packed)':34} {self.ratio:>13.2f}x")
        lines.append(f"{'sparsity (exact zeros)':34} {100 * self.sparsity:>13.2f}%")
        lines.append(f"{'values':34} {self.values:>14}")
        if self.values != "fp32":
            label = f"max abs weight error ({self.values})"
            lines.append(f"{label:34} {self.max_abs_error:>14.3g}")
        encodings = ", ".join(f"{k} {n}" for k, n in sorted(self.encodings().items()))
        lines.append(f"{'tensors by encoding':34} {encodings}")
        return "\n".join(lines)


# --- locating models -------------------------------------------------------------------


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory whose `model/` holds one (compress, finetune)."""
    path = Path(path)
    if not path.exists():
        raise PinchgateError(f"{path}: does not exist")
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def is_packed(path: str | Path) -> bool:
    return (Path(path) / PACKED_FILE).is_file()


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding a model's weights (one, or the shards of an index)."""
    if not (model_dir / "config.json").is_file():
        raise PinchgateError(f"{model_dir}: no config.json: not a model directory")
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PinchgateError(f"{index}: unreadable shard index ({exc})") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / "pytorch_model.bin").is_file():
        raise PinchgateError(
            f"{model_dir / 'pytorch_model.bin'}: pickle weights are not read; re-save the "
            "model with save_pretrained(safe_serialization=True)"
        )
    raise PinchgateError(f"{model_dir}: no model.safetensors in the model directory")


def _read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise PinchgateError(f"{path}: unreadable weights ({_one_line(exc)})") from None
    return state


def _side_files(model_dir: Path) -> list[Path]:
    """config.json, tokenizer and feature-extractor files: everything but weights."""
    return sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(WEIGHT_SUFFIXES)
        and p.name not in WEIGHT_INDEX_FILES
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- pack ------------------------------------------------------------------------------


def pack(
    model_dir: str | Path,
    out_dir: str | Path,
    values: str = "fp32",
    allow_dense: bool = False,
) -> PackReport:
    """Write the compact sparse form of a hardened model (or run directory) to `out_dir`.

    values: "fp32" keeps every weight bit-exact (in the checkpoint's own dtype); "fp16"
    rounds floating tensors to half precision; "int8" quantises the kept values of every
    tensor of two or more dimensions symmetrically per output channel (dim 0) and keeps
    1-D tensors (biases, norms) exact.
    """
    if values not in VALUE_FORMATS:
        raise PinchgateError(f"values {values!r}: expected one of {', '.join(VALUE_FORMATS)}")
    model_dir = resolve_model_dir(model_dir)
    files = _weight_files(model_dir)
    state = _read_state_dict(files)
    zeros, matrix_numel = 0, 0
    for tensor in state.values():
        if tensor.is_floating_point() and tensor.dim() >= 2:
            matrix_numel += tensor.numel()
            zeros += tensor.numel() - int(torch.count_nonzero(tensor))
    sparsity = zeros / matrix_numel if matrix_numel else 0.0
    if sparsity < MIN_HARDENED_SPARSITY and not allow_dense:
        raise PinchgateError(
            f"{files[0]}: only {100 * sparsity:.2f}% of the weight-matrix values are exact "
            "zeros: not a hardened (pruned) model; pack it anyway with --allow-dense"
        )

    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    reports = []
    for name, tensor in state.items():
        parts, entry, report = _encode(name, tensor.contiguous(), values)
        stored.update(parts)
        entries[name] = entry
        reports.append(report)
    metadata = {
        "format": "pt",
        "pinchgate.format": FORMAT_NAME,
        "pinchgate.format_version": str(FORMAT_VERSION),
        "pinchgate.values": values,
        "pinchgate.tensors": json.dumps(entries, separators=(",", ":")),
        "pinchgate.sha256": _digest(stored),
    }

    out_dir = Path(out_dir)
    tmp = _fresh_tmp(out_dir)
    packed_file = tmp / PACKED_FILE
    save_file(stored, str(packed_file), metadata=metadata)
    for side in _side_files(model_dir):
        shutil.copy2(side, tmp / side.name)
    _move_into_place(tmp, out_dir)
    packed_file = out_dir / PACKED_FILE
    return PackReport(
        source=", ".join(str(f) for f in files),
        packed_file=str(packed_file),
        values=values,
        dense_bytes=sum(f.stat().st_size for f in files),
        packed_bytes=packed_file.stat().st_size,
        header_bytes=_header_bytes(packed_file),
        tensors=reports,
    )


def _encode(
    name: str, tensor: torch.Tensor, values: str
) -> tuple[dict[str, torch.Tensor], dict, TensorReport]:
    """One tensor's stored parts, its metadata entry, and what storing it cost."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    shape = list(tensor.shape)
    numel = tensor.numel()
    if not tensor.is_floating_point():  # integer buffers: stored as they are
        entry = {"encoding": "raw", "shape": shape, "dtype": dtype, "kept": numel}
        report = TensorReport(name, shape, dtype, "raw", numel, numel, tensor.nbytes)
        return {f"{name}/values": tensor}, entry, report

    flat = tensor.reshape(-1)
    keep = flat != 0
    kept = int(keep.sum())
    parts: dict[str, torch.Tensor] = {}
    entry: dict = {"shape": shape, "dtype": dtype, "kept": kept}
    quantised = values == "int8" and tensor.dim() >= 2
    if quantised:
        rows = tensor.reshape(shape[0], -1).float()
        amax = rows.abs().amax(dim=1)
        scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        codes = torch.round(rows / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        value_tensor = codes.reshape(-1)
        restored = (codes.float() * scales[:, None]).reshape(-1)
        parts[f"{name}/scales"] = scales
        entry["values"] = "int8"
    elif values == "fp16":
        value_tensor = flat.to(torch.float16)
        if not torch.isfinite(value_tensor[torch.isfinite(flat)]).all():
            raise PinchgateError(f"tensor {name!r}: values beyond the fp16 range; use fp32")
        restored = value_tensor.to(flat.dtype)
        entry["values"] = "float16"
    else:
        value_tensor = flat
        restored = flat
        entry["values"] = dtype
    error = float((restored.float() - flat.float()).abs().max()) if numel else 0.0

    value_bytes = value_tensor.element_size()
    index_dtype = torch.int16 if numel <= INT16_MAX_POSITIONS else torch.int32
    costs = {
        "plain": numel * value_bytes,
        "bitmask": kept * value_bytes + math.ceil(numel / 8),
        "indices": kept * value_bytes + kept * index_dtype.itemsize,
    }
    encoding = min(costs, key=lambda k: (costs[k], k != "plain"))  # ties stay plain
    entry["encoding"] = encoding
    if encoding == "plain":
        parts[f"{name}/values"] = value_tensor.reshape(shape)
    else:
        parts[f"{name}/values"] = value_tensor[keep].contiguous()
        if encoding == "bitmask":
            bits = np.packbits(keep.numpy())
            parts[f"{name}/mask"] = torch.from_numpy(bits)
        else:
            positions = torch.nonzero(keep).reshape(-1).to(index_dtype)
            parts[f"{name}/indices"] = positions
            entry["index_dtype"] = str(index_dtype).removeprefix("torch.")
    stored_bytes = sum(p.nbytes for p in parts.values())
    report = TensorReport(name, shape, dtype, encoding, numel, kept, stored_bytes, error)
    return parts, entry, report


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def _fresh_tmp(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PinchgateError(f"{out_dir}: already exists and is not empty; choose a new path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Renamed in one step, so a half-written directory never looks finished."""
    if out_dir.exists():
        out_dir.rmdir()  # checked empty by _fresh_tmp
    tmp.rename(out_dir)


# --- unpack / load ---------------------------------------------------------------------


def read_packed(packed_dir: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a packed model, checked against its file and config.json."""
    packed_dir = Path(packed_dir)
    path = packed_dir / PACKED_FILE
    if not path.is_file():
        raise PinchgateError(f"{path}: no packed model (expected {PACKED_FILE})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            stored = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        why = _one_line(exc)
        raise PinchgateError(f"{path}: corrupt or truncated packed file ({why})") from None
    if metadata.get("pinchgate.format") != FORMAT_NAME:
        raise PinchgateError(f"{path}: not a pinchgate packed file (no format metadata)")
    version = metadata.get("pinchgate.format_version")
    if version != str(FORMAT_VERSION):
        raise PinchgateError(
            f"{path}: packed format version {version}, this pinchgate reads {FORMAT_VERSION}"
        )
    if _digest(stored) != metadata.get("pinchgate.sha256"):
        raise PinchgateError(f"{path}: corrupt packed file (stored bytes fail their checksum)")
    try:
        entries = json.loads(metadata["pinchgate.tensors"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise PinchgateError(f"{path}: corrupt tensor table ({_one_line(exc)})") from None

    expected = expected_shapes(packed_dir)
    state = {}
    for name, entry in entries.items():
        state[name] = _decode(path, name, entry, stored)
    missing = [name for name in expected if name not in state]
    if missing:
        raise PinchgateError(f"{path}: tensor {missing[0]!r} of config.json is missing")
    for name, tensor in state.items():
        if name not in expected:
            raise PinchgateError(f"{path}: tensor {name!r} is not part of config.json's model")
        if list(tensor.shape) != expected[name]:
            raise PinchgateError(
                f"{path}: tensor {name!r} has shape {list(tensor.shape)} but config.json's "
                f"model expects {expected[name]}"
            )
    return state


def _decode(path: Path, name: str, entry: dict, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    where = f"{path}: tensor {name!r}"
    try:
        shape, dtype, encoding, kept = (
            [int(n) for n in entry["shape"]],
            DTYPES[entry["dtype"]],
            entry["encoding"],
            int(entry["kept"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PinchgateError(f"{where}: corrupt table entry ({_one_line(exc)})") from None
    numel = math.prod(shape)
    parts = {suffix: stored.get(f"{name}/{suffix}") for suffix in ("values", "mask", "indices")}
    if parts["values"] is None:
        raise PinchgateError(f"{where}: missing from the packed file")
    values = parts["values"].reshape(-1)
    if encoding in ("raw", "plain"):
        if values.numel() != numel:
            raise PinchgateError(f"{where}: {values.numel()} values stored for shape {shape}")
        dense = values
    elif encoding in ("bitmask", "indices"):
        if values.numel() != kept:
            raise PinchgateError(
                f"{where}: {values.numel()} values stored but the table says {kept} are kept"
            )
        if encoding == "bitmask":
            bits = parts["mask"]
            if bits is None or bits.numel() != math.ceil(numel / 8):
                raise PinchgateError(f"{where}: bit mask missing or of the wrong size")
            keep = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))
            if int(keep.sum()) != kept:
                raise PinchgateError(
                    f"{where}: the mask keeps {int(keep.sum())} values but {kept} are stored"
                )
        else:
            positions = parts["indices"]
            if positions is None or positions.numel() != kept:
                raise PinchgateError(f"{where}: index list missing or of the wrong length")
            positions = positions.long()
            if kept and (
                positions[0] < 0 or positions[-1] >= numel or (positions.diff() <= 0).any()
            ):
                raise PinchgateError(f"{where}: indices out of range or out of order")
            keep = torch.zeros(numel, dtype=torch.bool)
            keep[positions] = True
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[keep] = values
    else:
        raise PinchgateError(f"{where}: unknown encoding {encoding!r}")
    if entry.get("values") == "int8":
        scales = stored.get(f"{name}/scales")
        if scales is None or not shape or scales.numel() != shape[0]:
            raise PinchgateError(f"{where}: int8 scales missing or of the wrong size")
        dense = (dense.reshape(shape[0], -1).float() * scales[:, None]).reshape(-1)
    return dense.to(dtype).reshape(shape)


def expected_shapes(model_dir: str | Path) -> dict[str, list[int]]:
    """Every state-dict tensor's shape for the model config.json describes (built on the
    meta device: no memory, no initialisation)."""
    config = _load_config(Path(model_dir))
    with torch.device("meta"):
        model = _build_model(config)
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def _load_config(model_dir: Path):
    from transformers import AutoConfig

    path = model_dir / "config.json"
    if not path.is_file():
        raise PinchgateError(f"{path}: missing: a packed model needs its config.json")
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise PinchgateError(f"{path}: unreadable model config ({_one_line(exc)})") from None


def _build_model(config) -> torch.nn.Module:
    """The CTC class config.json names in `architectures`, else AutoModelForCTC's choice,
    with freshly initialised weights (on the current default device)."""
    import transformers

    model = None
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None and name.endswith("ForCTC"):
            model = cls(config)
            break
    if model is None:
        model = transformers.AutoModelForCTC.from_config(config)
    structure = getattr(config, "pinchgate_structure", None)
    if structure is not None:  # a shrunken model (pinchgate.structured): per-layer sizes
        from pinchgate.structured import apply_structure

        try:
            apply_structure(model, structure)
        except ValueError as exc:
            raise PinchgateError(f"config.json: {exc}") from None
    return model


def load(packed_dir: str | Path) -> torch.nn.Module:
    """The transformers CTC model of a packed directory, in eval mode."""
    packed_dir = Path(packed_dir)
    state = read_packed(packed_dir)
    config = _load_config(packed_dir)
    model = _build_model(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def unpack(packed_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a stock Hugging Face directory (model.safetensors and the side files)."""
    packed_dir = Path(packed_dir)
    state = read_packed(packed_dir)
    out_dir = Path(out_dir)
    tmp = _fresh_tmp(out_dir)
    weights = {name: tensor.contiguous() for name, tensor in state.items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for side in _side_files(packed_dir):
        shutil.copy2(side, tmp / side.name)
    _move_into_place(tmp, out_dir)
    return out_dir


def load_any(source: str | Path) -> torch.nn.Module:
    """A model from a packed directory, a stock HF directory, a shrunken one (see
    pinchgate.structured) or a run directory."""
    if is_packed(source):
        return load(source)
    from pinchgate.models import load_ctc_model

    model_dir = resolve_model_dir(source)
    _weight_files(model_dir)  # refuses pickle-only directories with a clear line
    if "pinchgate_structure" in json.loads((model_dir / "config.json").read_text()):
        from pinchgate.structured import load_shrunk  # stock loading would mis-size it

        return load_shrunk(model_dir)
    return load_ctc_model(model_dir).eval()


# --- ONNX ------------------------------------------------------------------------------

ONNX_OPSET = 18


class _LogitsOnly(torch.nn.Module):
    """input_values (+ attention_mask) -> logits, the graph ONNX runtimes see."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_values, attention_mask=None):
        return self.model(input_values, attention_mask=attention_mask).logits


def _uses_attention_mask(source: Path, config) -> bool:
    """As the model's feature extractor does: masks for layer-norm encoders only."""
    from pinchgate.models import feature_extractor_for

    model_dir = source if is_packed(source) else resolve_model_dir(source)
    return bool(feature_extractor_for(config, model_dir).return_attention_mask)


def export_onnx(
    source: str | Path,
    out_path: str | Path,
    opset: int = ONNX_OPSET,
    attention_mask: bool | None = None,
) -> Path:
    """Export a model (HF, run or packed directory) to ONNX with dynamic batch and length.

    Inputs: `input_values` float32 [batch, samples] and, when `attention_mask` (default:
    when the model's feature extractor returns one), `attention_mask` int64 [batch,
    samples]. Output: `logits` float32 [batch, frames, vocab]. Uses the torch.export-based
    exporter (needs onnxscript); the single file holds the weights.
    """
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; say so up front)
    except ImportError:
        raise PinchgateError(
            "ONNX export needs onnx and onnxscript: pip install 'pinchgate[onnx]'"
        ) from None
    source = Path(source)
    model = load_any(source)
    if attention_mask is None:
        attention_mask = _uses_attention_mask(source, model.config)
    wrapper = _LogitsOnly(model).eval()
    batch = torch.export.Dim("batch")
    samples = torch.export.Dim("samples", min=_receptive_field(model.config))
    example = (torch.randn(2, 16000),)
    dynamic_shapes: dict = {"input_values": {0: batch, 1: samples}}
    if attention_mask:
        mask = torch.ones(2, 16000, dtype=torch.long)
        mask[1, 12000:] = 0  # a padded row, so no branch specialises on "no padding"
        example += (mask,)
        dynamic_shapes["attention_mask"] = {0: batch, 1: samples}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # The protobuf of one file must stay under 2 GiB; larger models get external data.
    weight_bytes = sum(p.nbytes for p in model.state_dict().values())
    # The exporter's own notices (optional torchvision ops, deprecations inside torch) are
    # nothing a user can act on.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        program = torch.onnx.export(
            wrapper,
            example,
            dynamo=True,
            input_names=list(dynamic_shapes),
            output_names=["logits"],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            verbose=False,
        )
        program.save(str(out_path), external_data=weight_bytes > 1.5 * 2**30)
    return out_path


def _receptive_field(config) -> int:
    """Fewest samples that give one output frame of the CNN feature encoder."""
    field_, hop = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        field_ += (kernel - 1) * hop
        hop *= stride
    return field_


def onnx_session(onnx_path: str | Path):
    """An onnxruntime CPU session for the file, quiet unless something fails."""
    try:
        import onnxruntime
    except ImportError:
        raise PinchgateError(
            "running ONNX models needs onnxruntime: pip install 'pinchgate[onnx]'"
        ) from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def onnx_max_abs_diff(
    onnx_path: str | Path,
    model: torch.nn.Module | str | Path,
    input_values: torch.Tensor | np.ndarray,
    attention_mask: torch.Tensor | np.ndarray | None = None,
) -> float:
    """Largest |logit difference| between onnxruntime and PyTorch on the same inputs.

    Where the ONNX graph has no attention_mask input the mask is given to neither; where
    it has one and none is given, both get all ones (no padding).
    """
    session = onnx_session(onnx_path)
    if not isinstance(model, torch.nn.Module):
        model = load_any(model)
    names = {i.name for i in session.get_inputs()}
    x = torch.as_tensor(np.asarray(input_values, dtype=np.float32))
    feeds = {"input_values": x.numpy()}
    mask = None
    if "attention_mask" in names:
        if attention_mask is None:
            mask = torch.ones(x.shape, dtype=torch.long)
        else:
            mask = torch.as_tensor(np.asarray(attention_mask)).long()
        feeds["attention_mask"] = mask.numpy()
    (onnx_logits,) = session.run(["logits"], feeds)
    with torch.no_grad():
        torch_logits = model.eval()(x, attention_mask=mask).logits.numpy()
    if onnx_logits.shape != torch_logits.shape:
        raise PinchgateError(
            f"{onnx_path}: logits of shape {list(onnx_logits.shape)}, PyTorch gives "
            f"{list(torch_logits.shape)}"
        )
    return float(np.abs(onnx_logits - torch_logits).max())


class OnnxCTCModel(torch.nn.Module):
    """An exported ONNX file behind the PyTorch model interface that decoding uses.

    `model(input_values, attention_mask=...)` runs onnxruntime on CPU and returns an object
    with `.logits` (a tensor), so `pinchgate.evaluate.evaluate_corpus` scores the ONNX model
    exactly as it scores the PyTorch one. `config` is the exported model's config, for the
    CNN's output lengths.
    """

    def __init__(self, onnx_path: str | Path, config):
        super().__init__()
        self.session = onnx_session(onnx_path)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.config = config
        # No weights of its own: this only tells callers which device inputs go to.
        self.device_anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    def _get_feat_extract_output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for kernel, stride in zip(self.config.conv_kernel, self.config.conv_stride, strict=True):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        if getattr(self.config, "add_adapter", False):  # as transformers counts its adapter
            for _ in range(self.config.num_adapter_layers):
                lengths = torch.div(lengths - 1, self.config.adapter_stride, rounding_mode="floor")
                lengths = lengths + 1
        return lengths

    def forward(self, input_values, attention_mask=None):
        from types import SimpleNamespace

        feeds = {"input_values": input_values.detach().cpu().float().numpy()}
        if "attention_mask" in self.input_names:
            if attention_mask is None:
                attention_mask = torch.ones(input_values.shape, dtype=torch.long)
            feeds["attention_mask"] = attention_mask.detach().cpu().long().numpy()
        (logits,) = self.session.run(["logits"], feeds)
        return SimpleNamespace(logits=torch.from_numpy(logits))


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
    from pinchgate.data.audio import load_audio
    from pinchgate.data.vocab import load_tokenizer
    from pinchgate.evaluate import score, transcribe
    from pinchgate.models import feature_extractor_for

    source = Path(source)
    model_dir = source if is_packed(source) else resolve_model_dir(source)
    model = load_any(source)
    onnx_model = OnnxCTCModel(onnx_path, model.config)
    tokenizer = load_tokenizer(model_dir)
    extractor = feature_extractor_for(model.config, model_dir)
    references = [u.transcript for u in utterances]
    out: dict = {"utterances": len(utterances)}
    hypotheses = {}
    for label, candidate in (("torch", model), ("onnx", onnx_model)):
        hypotheses[label], seconds = transcribe(
            candidate, extractor, tokenizer, utterances, batch_seconds
        )
        out[label] = {**score(references, hypotheses[label]), "decode_seconds": seconds}
    pairs = zip(hypotheses["torch"], hypotheses["onnx"], strict=True)
    out["same_hypotheses"] = sum(a == b for a, b in pairs)
    audio = [load_audio(u.audio_path, extractor.sampling_rate) for u in utterances[:8]]
    features = extractor(
        audio, sampling_rate=extractor.sampling_rate, padding=True, return_tensors="pt"
    )
    out["max_abs_diff"] = onnx_max_abs_diff(
        onnx_path, model, features["input_values"], features.get("attention_mask")
    )
    return out

"""The packed format of a hardened model: a compact sparse file, and its stock HF form.

The packed format is one safetensors file, `model.pinch.safetensors`, beside the model's
config.json and tokenizer / feature-extractor files. Each floating tensor is stored as

    plain    `NAME/values`, the tensor itself (no zeros worth skipping);
    bitmask  `NAME/values` (the kept values, flat) + `NAME/mask` (np.packbits of the
             non-zero pattern, row-major);
    indices  `NAME/values` + `NAME/indices` (flat positions of the kept values, int16
             when every position fits, else int32);

whichever is smallest for that tensor. With int8 values, `NAME/scales` holds the
per-output-channel (dim 0) scales. The header metadata says how each tensor is stored
(JSON under "pinchgate.tensors") and carries a SHA-256 of the stored bytes and of that
metadata (the tensor table included), so a damaged or edited file is refused instead of
loading wrong weights. Nothing here reads or writes pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pinchgate.checkpoint import move_into_place
from pinchgate.errors import PinchgateError
from pinchgate.families import family_for_config
from pinchgate.modeldir import (
    one_line,
    read_config,
    read_state_dict,
    resolve_model_dir,
    side_files,
    weight_files,
)

PACKED_FILE = "model.pinch.safetensors"
FORMAT_NAME = "pinchgate-sparse"
FORMAT_VERSION = 2  # 2: the checksum covers the metadata (the tensor table), not only bytes
VALUE_FORMATS = ("fp32", "fp16", "int8")
# Below this share of exact zeros in the weight matrices a model was never hardened.
MIN_HARDENED_SPARSITY = 0.01
INT16_MAX_POSITIONS = 2**15  # flat positions 0..32767 fit int16
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


# --- locating models --------------------------------------------------------------------------


def is_packed(path: str | Path) -> bool:
    return (Path(path) / PACKED_FILE).is_file()


# --- pack -------------------------------------------------------------------------------------


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
    files = weight_files(model_dir)
    state = read_state_dict(files)
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
        parts, entry, report = encode_tensor(name, tensor.contiguous(), values)
        stored.update(parts)
        entries[name] = entry
        reports.append(report)
    metadata = {
        "format": "pt",
        "pinchgate.format": FORMAT_NAME,
        "pinchgate.format_version": str(FORMAT_VERSION),
        "pinchgate.values": values,
        "pinchgate.tensors": json.dumps(entries, separators=(",", ":")),
    }
    metadata["pinchgate.sha256"] = digest(stored, metadata)

    out_dir = Path(out_dir)
    tmp = _fresh_tmp(out_dir)
    packed_file = tmp / PACKED_FILE
    save_file(stored, str(packed_file), metadata=metadata)
    for side in side_files(model_dir):
        shutil.copy2(side, tmp / side.name)
    move_into_place(tmp, out_dir)
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


def encode_tensor(
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


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of every stored tensor (name and bytes) and of every metadata entry but the
    checksum itself: the tensor table says how the bytes are read (dtype, shape,
    encoding), so it is covered too."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(k for k in metadata if k != "pinchgate.sha256"):
        digest.update(json.dumps([key, metadata[key]]).encode())
    return digest.hexdigest()


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def _fresh_tmp(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PinchgateError(f"{out_dir}: already exists and is not empty; choose a new path")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise PinchgateError(f"{out_dir}: cannot create it ({exc.strerror or exc})") from None
    return tmp


# --- unpack / load ----------------------------------------------------------------------------


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
        why = one_line(exc)
        raise PinchgateError(f"{path}: corrupt or truncated packed file ({why})") from None
    if metadata.get("pinchgate.format") != FORMAT_NAME:
        raise PinchgateError(f"{path}: not a pinchgate packed file (no format metadata)")
    version = metadata.get("pinchgate.format_version")
    if version != str(FORMAT_VERSION):
        raise PinchgateError(
            f"{path}: packed format version {version}, this pinchgate reads {FORMAT_VERSION}"
        )
    if digest(stored, metadata) != metadata.get("pinchgate.sha256"):
        raise PinchgateError(
            f"{path}: corrupt packed file (stored bytes or tensor table fail their checksum)"
        )
    try:
        entries = json.loads(metadata["pinchgate.tensors"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise PinchgateError(f"{path}: corrupt tensor table ({one_line(exc)})") from None

    expected = expected_shapes(packed_dir)
    state = {}
    for name, entry in entries.items():
        state[name] = decode_tensor(path, name, entry, stored)
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


def decode_tensor(
    path: Path, name: str, entry: dict, stored: dict[str, torch.Tensor]
) -> torch.Tensor:
    where = f"{path}: tensor {name!r}"
    try:
        shape, dtype, encoding, kept = (
            [int(n) for n in entry["shape"]],
            DTYPES[entry["dtype"]],
            entry["encoding"],
            int(entry["kept"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PinchgateError(f"{where}: corrupt table entry ({one_line(exc)})") from None
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
    meta device: no memory, no initialisation). A tensor tied to an earlier one (Whisper's
    output projection is its token embedding) is saved once, under the earlier name."""
    config = read_config(Path(model_dir))
    with torch.device("meta"):
        model = family_for_config(config).build_from_config(config)
    shapes, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            shapes[name] = list(tensor.shape)
    return shapes


def load_packed(packed_dir: str | Path) -> torch.nn.Module:
    """The model of a packed directory (its family builds it from config.json), in eval mode."""
    packed_dir = Path(packed_dir)
    state = read_packed(packed_dir)
    config = read_config(packed_dir)
    model = family_for_config(config).build_from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(model.state_dict()) - set(expected_shapes(packed_dir))
    if unexpected or set(missing) - tied:  # read_packed checked the names: cannot happen
        raise PinchgateError(f"{packed_dir}: tensors do not match config.json's model")
    return model.eval()


def unpack(packed_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a stock Hugging Face directory (model.safetensors and the side files)."""
    packed_dir = Path(packed_dir)
    state = read_packed(packed_dir)
    out_dir = Path(out_dir)
    tmp = _fresh_tmp(out_dir)
    weights = {name: tensor.contiguous() for name, tensor in state.items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for side in side_files(packed_dir):
        shutil.copy2(side, tmp / side.name)
    move_into_place(tmp, out_dir)
    return out_dir

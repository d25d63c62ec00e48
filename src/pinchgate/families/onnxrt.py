"""ONNX plumbing every family's exporter shares: the exporter's checks and noise, and
onnxruntime sessions."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

from pinchgate.errors import PinchgateError


def require_exporter() -> None:
    """The torch.export-based exporter needs onnxscript: say so up front."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise PinchgateError(
            "ONNX export needs onnx and onnxscript: pip install 'pinchgate[onnx]'"
        ) from None


@contextlib.contextmanager
def quiet_export():
    """The exporter's own notices (optional torchvision ops, deprecations inside torch) are
    nothing a user can act on."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        yield


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

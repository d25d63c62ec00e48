"""ONNX for CTC models: input_values (+ attention_mask) -> logits, and the onnxruntime model
that decoding and the parity checks run like a PyTorch one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pinchgate.errors import PinchgateError
from pinchgate.families.onnxrt import onnx_session, quiet_export, require_exporter

ONNX_OPSET = 18


class _LogitsOnly(torch.nn.Module):
    """input_values (+ attention_mask) -> logits, the graph ONNX runtimes see."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_values, attention_mask=None):
        return self.model(input_values, attention_mask=attention_mask).logits


def export_ctc_onnx(
    model: torch.nn.Module, out_path: str | Path, opset: int = ONNX_OPSET, attention_mask=False
) -> Path:
    """Export with dynamic batch and length.

    Inputs: `input_values` float32 [batch, samples] and, with `attention_mask`,
    `attention_mask` int64 [batch, samples]. Output: `logits` float32 [batch, frames,
    vocab]. Uses the torch.export-based exporter; the single file holds the weights.
    """
    require_exporter()
    wrapper = _LogitsOnly(model).eval()
    batch = torch.export.Dim("batch")
    samples = torch.export.Dim("samples", min=receptive_field(model.config))
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
    with torch.no_grad(), quiet_export():
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


def receptive_field(config) -> int:
    """Fewest samples that give one output frame of the CNN feature encoder."""
    field_, hop = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        field_ += (kernel - 1) * hop
        hop *= stride
    return field_


def onnx_max_abs_diff(
    onnx_path: str | Path,
    model: torch.nn.Module,
    input_values: torch.Tensor | np.ndarray,
    attention_mask: torch.Tensor | np.ndarray | None = None,
) -> float:
    """Largest |logit difference| between onnxruntime and PyTorch on the same inputs.

    Where the ONNX graph has no attention_mask input the mask is given to neither; where
    it has one and none is given, both get all ones (no padding).
    """
    session = onnx_session(onnx_path)
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


def random_audio_difference(onnx_path: str | Path, model: torch.nn.Module) -> float:
    """Largest logit difference on random audio of shapes other than the export example's,
    a padded row included."""
    generator = torch.Generator().manual_seed(0)
    diffs = []
    for batch, samples in ((1, 20480), (3, 12345)):
        audio = torch.randn(batch, samples, generator=generator)
        mask = torch.ones(batch, samples, dtype=torch.long)
        mask[-1, samples * 3 // 4 :] = 0
        diffs.append(onnx_max_abs_diff(onnx_path, model, audio, mask))
    return max(diffs)


class OnnxCTCModel(torch.nn.Module):
    """An exported ONNX file behind the PyTorch model interface that decoding uses.

    `model(input_values, attention_mask=...)` runs onnxruntime on CPU and returns an object
    with `.logits` (a tensor), so evaluation scores the ONNX model exactly as it scores the
    PyTorch one. `config` is the exported model's config, for the CNN's output lengths.
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
        feeds = {"input_values": input_values.detach().cpu().float().numpy()}
        if "attention_mask" in self.input_names:
            if attention_mask is None:
                attention_mask = torch.ones(input_values.shape, dtype=torch.long)
            feeds["attention_mask"] = attention_mask.detach().cpu().long().numpy()
        (logits,) = self.session.run(["logits"], feeds)
        return SimpleNamespace(logits=torch.from_numpy(logits))

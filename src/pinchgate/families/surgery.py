"""Model surgery shared by the families: Linear layers cut to kept rows and columns."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn


def empty_linear(in_features: int, out_features: int, bias: bool, device, dtype) -> nn.Linear:
    """A Linear without initialisation (its values are copied or loaded next)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-element tensors: "init is a no-op"
        layer = nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=dtype)
    return layer.to_empty(device=device or "cpu")


def sliced_linear(layer: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None):
    """A copy of ``layer`` keeping only the given output rows and input columns."""
    weight = layer.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = layer.bias is not None
    new = empty_linear(weight.shape[1], weight.shape[0], bias, weight.device, weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias:
            new.bias.copy_(layer.bias.detach() if rows is None else layer.bias.detach()[rows])
    new.train(layer.training)
    return new


def head_rows(heads: list[int], head_dim: int, device) -> Tensor:
    """The row indices of the given attention heads in a q/k/v projection."""
    return torch.tensor(
        [h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long, device=device
    )

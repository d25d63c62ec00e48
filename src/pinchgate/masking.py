"""The masking plumbing every compression method shares.

Methods act on weights from outside, through ``torch.nn.utils.parametrize``: no model code
is edited, so any Hugging Face model (or plain ``nn.Module``) can be pruned. This module is
the one place that knows how:

* ``select_targets``: which modules' weights are pruned (regular expressions on names);
* ``attach``: register a parametrization, remembering the module's parameter order;
* ``weight_before``: the weight as the parametrizations before ours compute it (the raw
  parameter, or e.g. a weight-normed kernel): what a mask is computed from;
* ``detach``: remove our parametrization again, restoring the original Parameter object
  (optimisers keep it) and the parameter order (and so the state_dict order), optionally
  writing a new effective value (the hardened, masked weight) back.
"""

from __future__ import annotations

import re
import warnings

from torch import Tensor, nn
from torch.nn.utils import parametrize

# What a weight-level method can prune: matrices, convolution kernels, embeddings.
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Embedding)


def select_targets(
    model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...] = ()
) -> list[tuple[str, nn.Module]]:
    """The modules whose full dotted name matches an ``include`` pattern and no ``exclude``
    pattern (``re.fullmatch``), in the model's order. A weight shared by two selected
    modules is refused: it would be masked twice."""
    includes = [re.compile(p) for p in include]
    excludes = [re.compile(p) for p in exclude]
    targets: list[tuple[str, nn.Module]] = []
    seen: dict[int, str] = {}
    for name, module in model.named_modules():
        if not name or not isinstance(module, PRUNABLE_TYPES):
            continue
        if not any(p.fullmatch(name) for p in includes) or any(p.fullmatch(name) for p in excludes):
            continue
        if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
            # Hook-based torch.nn.utils.weight_norm recomputes .weight itself: cannot chain.
            warnings.warn(
                f"skipping {name}: it uses hook-based weight_norm (weight_g/weight_v); "
                "only parametrize-based weight_norm can be gated",
                stacklevel=3,
            )
            continue
        if parametrize.is_parametrized(module, "weight"):
            key = id(module.parametrizations.weight)
        else:
            key = id(module.weight)
        if key in seen:
            raise ValueError(
                f"{name} shares its weight with {seen[key]}: tied weights are not gated"
            )
        seen[key] = name
        targets.append((name, module))
    return targets


def attach(module: nn.Module, parametrization: nn.Module, tensor_name: str = "weight") -> None:
    """Register ``parametrization`` on ``module.<tensor_name>`` (last in its list), after
    recording the module's parameter order on it as ``param_order``."""
    parametrization.param_order = list(module._parameters.keys())
    parametrize.register_parametrization(module, tensor_name, parametrization)


def position(module: nn.Module, kind: type, tensor_name: str = "weight") -> int:
    """Index of the first parametrization of type ``kind`` on the tensor."""
    for i, p in enumerate(getattr(module.parametrizations, tensor_name)):
        if isinstance(p, kind):
            return i
    raise ValueError(f"{type(module).__name__} has no {kind.__name__} on its {tensor_name}")


def has(module: nn.Module, kind: type, tensor_name: str = "weight") -> bool:
    """Whether ``module.<tensor_name>`` carries a parametrization of type ``kind``."""
    return parametrize.is_parametrized(module, tensor_name) and any(
        isinstance(p, kind) for p in getattr(module.parametrizations, tensor_name)
    )


def originals(module: nn.Module, tensor_name: str = "weight") -> list[Tensor]:
    """The tensors a parametrized weight is computed from (the original, or g and v)."""
    plist = getattr(module.parametrizations, tensor_name)
    if plist.is_tensor:
        return [plist.original]
    return [getattr(plist, f"original{i}") for i in range(plist.ntensors)]


def weight_before(module: nn.Module, index: int, tensor_name: str = "weight") -> Tensor:
    """The tensor as parametrizations 0 .. index - 1 compute it (index 0: the original)."""
    plist = getattr(module.parametrizations, tensor_name)
    if plist.is_tensor:
        x = plist.original if index == 0 else plist[0](plist.original)
    else:
        x = plist[0](*originals(module, tensor_name))
    for i in range(1, index):
        x = plist[i](x)
    return x


def detach(
    module: nn.Module,
    index: int,
    order: list[str],
    effective: Tensor | None = None,
    tensor_name: str = "weight",
) -> None:
    """Remove parametrization ``index`` from the tensor.

    When it is the only one, the original Parameter object goes back (optimisers keep it)
    in the module's original parameter ``order``; otherwise the others stay. With
    ``effective``, that value becomes the tensor's (written back through the remaining
    parametrizations' right_inverse, e.g. weight norm's, where there are any).
    """
    plist = getattr(module.parametrizations, tensor_name)
    if len(plist) == 1:
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        if effective is not None:
            getattr(module, tensor_name).copy_(effective)
        params = module._parameters
        for key in order:  # the pre-attach order, and so the state_dict's
            if key in params:
                params[key] = params.pop(key)
    else:
        del plist[index]
        if effective is not None:
            setattr(module, tensor_name, effective)

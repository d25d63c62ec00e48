"""Model families: everything that is specific to one kind of model (see `base.py`).

`family_for(source)` gives the family of a model directory, hub id or built-in name;
`family_for_config(config)` and `family_for_model(model)` the family of a loaded config or
model. To add a family, implement `ModelFamily` in a module here and list it in FAMILIES.
"""

from __future__ import annotations

import json
from pathlib import Path

from pinchgate.errors import ModelLoadError
from pinchgate.families.base import Member, ModelFamily, UnitSpec, count_parameters
from pinchgate.families.builtin import BUILTIN_MODELS, resolve_model
from pinchgate.families.ctc import CTCFamily
from pinchgate.families.whisper import WhisperFamily
from pinchgate.modeldir import check_model_dir, hub_error

FAMILIES: tuple[ModelFamily, ...] = (CTCFamily(), WhisperFamily())

__all__ = [
    "BUILTIN_MODELS",
    "FAMILIES",
    "Member",
    "ModelFamily",
    "UnitSpec",
    "count_parameters",
    "family_for",
    "family_for_config",
    "family_for_model",
    "resolve_model",
]


def _by_type(model_type: str | None, source: str) -> ModelFamily:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ModelLoadError(
        f"{source}: model type {model_type!r} is not supported (supported: {supported})"
    )


def family_for_config(config) -> ModelFamily:
    return _by_type(getattr(config, "model_type", None), type(config).__name__)


def family_for_model(model) -> ModelFamily:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config: not a transformers model")
    return family_for_config(config)


def family_for(source: str | Path) -> ModelFamily:
    """The family of a built-in model (`families.builtin`), a local model directory (read
    from its config.json without loading anything) or a hub id (its config, when online)."""
    source = resolve_model(str(source))
    if source == "toy":
        return FAMILIES[0]
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get(
                "model_type"
            )
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelLoadError(
                f"{path / 'config.json'}: unreadable model config ({exc})"
            ) from None
        return _by_type(model_type, source)
    if path.exists():
        check_model_dir(path)  # the one-line error of what is missing
    try:  # a hub id: its config, when online
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        raise hub_error(source) from None
    return _by_type(config.model_type, source)

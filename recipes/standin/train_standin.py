"""Train the stand-in foundation model: a ~5M-parameter wav2vec2 encoder for the embedded default.

    python recipes/standin/train_standin.py [--pretrain-size 8000] [--out runs/standin]
                                            [--steps 6000] [--export src/pinchgate/embedded/standin]

1. Synthesises the `pretrain` split (pinchgate.data.synth, seed 0) with `--pretrain-size`
   utterances into `corpora/synth-pretrain<N>` unless it is there: only that split, with
   the sentences a full build deals it, so none of them is in the shipped corpus's train,
   dev or test splits (about 20 minutes for 8000 utterances, 8 h, on 2 cores).
2. Initialises the architecture of `standin_config.json` at random (seed 0).
3. Trains it with CTC on that split (`pinchgate finetune`'s loop: resumable, the same
   command continues a killed run), evaluating on the shipped `embedded:dev`, `test` and
   `test-unseen`.
4. Exports the encoder without its CTC head (a `Wav2Vec2Model` directory in fp16, like an
   SSL checkpoint), so compression starts from it with a fresh head as the paper does.

CTC pretraining is our stand-in for self-supervised pretraining, which would not fit the
time budget of this machine (2 CPU cores); the model card says so.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-size", type=int, default=8000)
    parser.add_argument("--pretrain-corpus", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/standin"))
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-seconds", type=float, default=32.0)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=150)
    parser.add_argument("--export", type=Path, default=None)
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    from pinchgate.config import FinetuneConfig
    from pinchgate.data.synth import DEFAULT_SIZES, build_corpus
    from pinchgate.train import run_finetune

    corpus = args.pretrain_corpus or Path(f"corpora/synth-pretrain{args.pretrain_size}")
    if not (corpus / "corpus.json").is_file():
        sizes = {**DEFAULT_SIZES, "pretrain": args.pretrain_size}
        build_corpus(corpus, seed=0, sizes=sizes, only=["pretrain"], overwrite=True)

    init_dir = args.out / "init"
    if not (init_dir / "model.safetensors").is_file():
        values = json.loads((HERE / "standin_config.json").read_text())
        values.pop("architectures", None)
        torch.manual_seed(0)
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**values))
        spectral_init(model.wav2vec2.feature_extractor.conv_layers[0].conv)
        model.save_pretrained(init_dir)

    cfg = FinetuneConfig(
        model=str(init_dir),
        train=str(corpus / "pretrain"),
        dev="embedded:dev",
        test=["embedded:test", "embedded:test-unseen"],
        output_dir=str(args.out / "pretrain"),
        new_head=True,
        freeze_feature_encoder=False,  # random CNN: it has to learn
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        scheduler="linear",
        batch_seconds=args.batch_seconds,
        max_duration=20.0,
        log_every=10,
        save_every=50,
        eval_every=200,
        eval_batch_seconds=200.0,
    )
    finished = args.out / "pretrain" / "results.json"
    if finished.is_file():  # trained before: export what that run measured
        results = json.loads(finished.read_text())
    else:
        results = run_finetune(cfg)
    if args.export is not None:
        export(args.out / "pretrain" / "model", args.export, results, corpus, args)


def spectral_init(conv: torch.nn.Conv1d) -> None:
    """Start the first convolution as a filterbank: Hann-windowed cosines and sines at
    mel-spaced frequencies, each with both signs, so after the GELU the next layers see
    rectified band energies from step 0. A random raw-waveform CNN spends its first
    hundreds of CTC steps learning this; here it only refines it."""
    kernel = conv.kernel_size[0]
    count = conv.out_channels // 4
    mel = torch.linspace(_mel(60.0), _mel(7600.0), count, dtype=torch.float64)
    freqs = 700.0 * (10 ** (mel / 2595.0) - 1)
    n = torch.arange(kernel, dtype=torch.float64)
    window = torch.hann_window(kernel, periodic=False, dtype=torch.float64)
    phase = 2 * torch.pi * freqs[:, None] * n[None, :] / 16000.0
    cos = window * torch.cos(phase)
    sin = window * torch.sin(phase)
    cos = cos / cos.norm(dim=1, keepdim=True)
    sin = sin / sin.norm(dim=1, keepdim=True)
    bank = torch.stack([cos, sin, -cos, -sin], dim=1).reshape(4 * count, kernel)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[: 4 * count, 0] = bank.to(conv.weight.dtype)
        if conv.bias is not None:
            conv.bias.zero_()


def _mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def export(model_dir: Path, out: Path, results: dict, corpus: Path, args) -> None:
    """The encoder alone, fp16, with a model card giving the data, steps, time and WER."""
    model = Wav2Vec2ForCTC.from_pretrained(model_dir, dtype=torch.float32)
    params = sum(p.numel() for p in model.wav2vec2.parameters())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder = model.wav2vec2.to(torch.float16)
    encoder.config.architectures = ["Wav2Vec2Model"]
    encoder.save_pretrained(tmp, safe_serialization=True)
    facts = {k: results[k] for k in ("steps", "train_seconds", "eval") if k in results}
    facts["encoder_parameters"] = params
    (tmp / "training_facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    summary = json.loads((corpus / "corpus.json").read_text())
    (tmp / "README.md").write_text(model_card(facts, summary, args))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def model_card(facts: dict, corpus: dict, args) -> str:
    pretrain = corpus["splits"]["pretrain"]
    epochs = facts["steps"] * args.batch_seconds / (3600 * pretrain["hours"])
    # Sets are named by their spec ("embedded:test") or folder ("test").
    test_wer = next((r["wer"] for k, r in facts["eval"].items() if k.split(":")[-1] == "test"), 1)
    quality = (
        "Not a good recogniser: its errors are mostly phonetically plausible misspellings."
        if test_wer > 0.3
        else "Not a strong recogniser: a greedy character model without a language model."
    )
    rows = "\n".join(
        f"| {name} | {100 * r['wer']:.2f}% | {100 * r['cer']:.2f}% | {r['utterances']} |"
        for name, r in facts["eval"].items()
    )
    return f"""# pinchgate stand-in wav2vec2 encoder

A small wav2vec 2.0 encoder ({facts["encoder_parameters"]:,} parameters, fp16 safetensors,
`Wav2Vec2Model`; architecture in `config.json`) that pinchgate ships as the model its
embedded default compresses. It stands in for wav2vec2-base, which cannot be downloaded on
the machines the project is built and tested on.

## What it is
- Trained from random initialisation with **CTC** (not self-supervised) on the `pretrain`
  split of pinchgate's synthetic corpus (`pinchgate data synth`, seed 0):
  {pretrain["utterances"]} utterances, {pretrain["hours"]:.2f} h of text-to-speech English (flite,
  festival, espeak-ng, piper voices with rate/pitch changes, noise and reverberation) reading
  public-domain Gutenberg sentences. Its CTC head is removed: compression starts from the
  encoder with a fresh head, as the paper starts from an SSL model.
- Front end: two convolutions (kernel 400 / stride 160, then 2 / 2: 25 ms windows, 20 ms
  frames) instead of wav2vec2's seven, the first initialised as a mel-spaced filterbank
  (`spectral_init` in the recipe) so that CTC from scratch does not first have to discover
  one; six pre-LN transformer layers of width 256.
- Recipe: `python recipes/standin/train_standin.py --pretrain-size {args.pretrain_size}
  --steps {args.steps} --batch-seconds
  {args.batch_seconds:g} --learning-rate {args.learning_rate:g} --export
  src/pinchgate/embedded/standin` ({facts["steps"]} steps, AdamW with linear warm-up and
  decay); {facts["train_seconds"] / 60:.0f} minutes of training on
  the 2-core CPU machine it was made on.
- WER of the CTC model it was taken from (greedy decoding, before its head was removed):

| set | WER | CER | utterances |
|---|---|---|---|
{rows}

## What it is not
- {quality} It made about {epochs:.0f} passes over its data; fine-tuning on the `train`
  split is what the embedded default does, and docs/RESULTS.md has those numbers.
- Not a speech foundation model: it has heard about {pretrain["hours"]:.1f} hours of synthetic
  speech from a dozen TTS voices, and it will not recognise real human speech well.
- Not a substitute for LibriSpeech results: numbers measured with it show that pinchgate's
  machinery works and how methods compare on a small task, not what wav2vec2-base reaches.
- Licence: the weights are pinchgate's own (Apache-2.0); the texts are public domain.
"""


if __name__ == "__main__":
    main()

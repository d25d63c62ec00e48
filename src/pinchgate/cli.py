"""The `pinchgate` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pinchgate.errors import PinchgateError

app = typer.Typer(
    help="Compress speech foundation models (wav2vec 2.0, HuBERT, WavLM) in one training pass.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make and inspect corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)


def user_errors(command):
    """Report PinchgateError as one line and exit 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return command(*args, **kwargs)
        except PinchgateError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("interrupted: the last checkpoint is kept; rerun to resume")
            raise typer.Exit(130) from None

    return wrapper


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


Opt = typer.Option


@app.command()
@user_errors
def finetune(
    config: Annotated[Path | None, Opt(help="YAML config; options given here override it.")] = None,
    model: Annotated[
        str | None, Opt(help="HF model directory or hub id; 'toy' for the built-in case.")
    ] = None,
    train: Annotated[
        str | None, Opt(help="Training corpus: LibriSpeech-layout dir or .tsv/.jsonl manifest.")
    ] = None,
    dev: Annotated[str | None, Opt(help="Development corpus, evaluated during training.")] = None,
    test: Annotated[list[str] | None, Opt(help="Test corpus (repeatable).")] = None,
    output_dir: Annotated[str | None, Opt(help="Run directory (resumed if it exists).")] = None,
    vocab: Annotated[
        str | None, Opt(help="vocab.json to use (default: model's, or built).")
    ] = None,
    max_steps: Annotated[int | None, Opt(help="Optimizer steps.")] = None,
    learning_rate: Annotated[float | None, Opt(help="Peak learning rate (AdamW).")] = None,
    warmup_steps: Annotated[int | None, Opt(help="Linear warm-up steps.")] = None,
    scheduler: Annotated[str | None, Opt(help="Decay schedule: linear, cosine, ...")] = None,
    batch_seconds: Annotated[
        float | None, Opt(help="Padded audio seconds per batch per process.")
    ] = None,
    grad_accum: Annotated[int | None, Opt(help="Gradient accumulation steps.")] = None,
    mixed_precision: Annotated[str | None, Opt(help="auto, no, fp16 or bf16.")] = None,
    max_duration: Annotated[float | None, Opt(help="Skip training clips longer (s).")] = None,
    freeze_feature_encoder: Annotated[
        bool | None, Opt(help="Freeze the CNN feature encoder (default: yes).")
    ] = None,
    seed: Annotated[int | None, Opt(help="Random seed.")] = None,
    save_every: Annotated[int | None, Opt(help="Steps between checkpoints.")] = None,
    log_every: Annotated[int | None, Opt(help="Steps between metric log lines.")] = None,
    eval_every: Annotated[int | None, Opt(help="Steps between dev evaluations (0: end).")] = None,
) -> None:
    """Dense CTC fine-tuning, the reference every compression is compared with.

    With no options it runs the built-in toy case (a tiny wav2vec2 on a generated tone
    corpus). Rerunning the same command resumes from the last checkpoint.
    """
    from pinchgate.config import FinetuneConfig
    from pinchgate.train import run_finetune

    if config is not None:
        cfg = FinetuneConfig.load(config)
    elif model in (None, "toy"):
        cfg = FinetuneConfig.toy()
    else:
        cfg = FinetuneConfig()
    overrides = {k: v for k, v in locals().items() if k not in ("config", "cfg") and v is not None}
    overrides.pop("FinetuneConfig", None)
    overrides.pop("run_finetune", None)
    for key, value in overrides.items():
        setattr(cfg, key, list(value) if key == "test" else value)
    run_finetune(cfg, console=console)


@app.command()
@user_errors
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="Fine-tuned HF model directory.")],
    data: Annotated[list[str], Opt(help="Corpus to score (repeatable); toy:<split> allowed.")],
    output_dir: Annotated[
        Path | None, Opt(help="Where per-utterance hypotheses and results.json go.")
    ] = None,
    batch_seconds: Annotated[float, Opt(help="Padded audio seconds per batch.")] = 200.0,
    device: Annotated[str, Opt(help="cpu, cuda, cuda:1, ...")] = "cpu",
) -> None:
    """Greedy CTC decoding with WER, CER and real-time factor; one JSON line per utterance."""
    from pinchgate.data.corpus import load_corpus
    from pinchgate.data.toy import resolve_corpus
    from pinchgate.data.vocab import load_tokenizer
    from pinchgate.evaluate import evaluate_corpus
    from pinchgate.models import feature_extractor_for, load_ctc_model

    if not (model_dir / "vocab.json").is_file():
        raise PinchgateError(f"{model_dir}: no vocab.json: not a fine-tuned CTC model directory")
    model = load_ctc_model(model_dir).to(device)
    tokenizer = load_tokenizer(model_dir)
    feature_extractor = feature_extractor_for(model.config, model_dir)
    output_dir = output_dir or model_dir.parent / "eval"
    results = {}
    for spec in data:
        utterances, report = load_corpus(resolve_corpus(spec))
        console.print(report.summary(), highlight=False)
        name = Path(spec.replace("toy:", "toy-")).name
        result = evaluate_corpus(
            model,
            feature_extractor,
            tokenizer,
            utterances,
            name,
            output_dir / f"{name}.jsonl",
            batch_seconds,
        )
        results[name] = result.to_dict()
        typer.echo(result.summary())
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    console.print(f"per-utterance hypotheses and results.json in {output_dir}", highlight=False)


@app.command()
@user_errors
def info(
    model: Annotated[str, typer.Argument(help="HF model directory or hub id; 'toy'.")],
) -> None:
    """Parameter counts of a model: total, by module type, by component."""
    from pinchgate.models import build_model, count_parameters, load_ctc_model

    loaded = build_model(32) if model == "toy" else load_ctc_model(model)
    counts = count_parameters(loaded)
    typer.echo(f"{model}: {counts['total']:,} parameters ({type(loaded).__name__})")
    for title in ("by_type", "by_component"):
        typer.echo(f"  {title.replace('_', ' ')}:")
        for name, n in sorted(counts[title].items(), key=lambda kv: -kv[1]):
            typer.echo(f"    {name:<32} {n:>14,}  {100 * n / counts['total']:5.1f}%")


@app.command()
@user_errors
def vocab(
    corpus: Annotated[str, typer.Argument(help="Corpus whose transcripts define the vocabulary.")],
    output: Annotated[Path, typer.Argument(help="vocab.json to write.")],
) -> None:
    """Build a character CTC vocabulary (Wav2Vec2CTCTokenizer vocab.json) from transcripts."""
    from pinchgate.data.corpus import read_corpus
    from pinchgate.data.text import normalize_transcript
    from pinchgate.data.toy import resolve_corpus
    from pinchgate.data.vocab import build_vocab, save_vocab

    utterances, _ = read_corpus(resolve_corpus(corpus))
    built = build_vocab(normalize_transcript(u.transcript) for u in utterances)
    save_vocab(built, output)
    typer.echo(f"{output}: {len(built)} tokens from {len(utterances)} transcripts")


@data_app.command("toy")
@user_errors
def data_toy(
    output: Annotated[Path, typer.Argument(help="Directory for the train/dev/test splits.")],
    seed: Annotated[int, Opt(help="Random seed.")] = 0,
) -> None:
    """Write the built-in tone-alphabet corpus (LibriSpeech layout)."""
    from pinchgate.data.toy import build_toy_corpus

    build_toy_corpus(output, seed)
    typer.echo(f"toy corpus in {output}/{{train,dev,test}}")


@data_app.command("check")
@user_errors
def data_check(
    corpus: Annotated[str, typer.Argument(help="LibriSpeech-layout dir or .tsv/.jsonl manifest.")],
    max_duration: Annotated[float | None, Opt(help="Clips longer than this are dropped.")] = None,
    vocab_file: Annotated[Path | None, Opt("--vocab", help="Check characters against it.")] = None,
) -> None:
    """Read a corpus and report what would be kept and skipped, one line per problem."""
    from pinchgate.data.corpus import load_corpus
    from pinchgate.data.toy import resolve_corpus
    from pinchgate.data.vocab import load_tokenizer, vocab_characters

    chars = vocab_characters(load_tokenizer(vocab_file)) if vocab_file else None
    _, report = load_corpus(resolve_corpus(corpus), chars, max_duration)
    for problem in report.problems:
        typer.echo(f"skipped {problem}")
    typer.echo(report.summary())


def main() -> None:  # pragma: no cover
    sys.exit(app())

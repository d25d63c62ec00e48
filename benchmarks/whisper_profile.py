"""Where a Whisper model's greedy decoding time goes, in PyTorch on the CPU.

    python benchmarks/whisper_profile.py [--model whisper-tiny.en | DIR] [--window 10]
        [--data embedded:test embedded:real] [--utterances 24] [--batch 1 8] [--threads 2]
        [--ct2 CT2_DIR [--ct2-compute-type int8]]

Decodes the first `--utterances` clips of each set exactly as `pinchgate evaluate` does
(`generate`, greedy, the run's window) in batches of `--batch`, with forward hooks that time
the encoder, each decoder block's self-attention, cross-attention and feed-forward, the
output projection (tied to the token embedding) and the decoder's embedding and norms;
"decoder: rest" is the decoder's time outside those (embedding, norms, residuals, cache
updates), "generate overhead" what is left of the wall time (search bookkeeping, logits
processing, Python). Hooks add a little time of their own, counted in the overhead. Prints
one markdown table per batch size: seconds and share of the total and the decoded tokens.
With `--ct2 DIR` (the same model exported by `pinchgate export --format ct2`, any
precision), the same clips through CTranslate2 too, split into features, encoder
(`encode`) and decoder (`generate` from the encoder output: every decoder step, the output
projection and the search), CTranslate2 having no per-module hooks. Numbers, not
assertions: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict


def attach_timers(model, totals: dict[str, float]):
    """Forward hooks adding each part's wall time to `totals`; returns the handles."""
    handles = []
    starts: dict[int, float] = {}

    def timed(module, label: str) -> None:
        def pre(mod, args, kwargs=None):
            starts[id(mod)] = time.perf_counter()

        def post(mod, args, output, kwargs=None):
            totals[label] += time.perf_counter() - starts.pop(id(mod))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    timed(model.model.encoder, "encoder")
    decoder = model.model.decoder
    for i, layer in enumerate(decoder.layers):
        timed(layer.self_attn, f"decoder {i} self-attention")
        timed(layer.encoder_attn, f"decoder {i} cross-attention")
        timed(layer.fc1, f"decoder {i} feed-forward")
        timed(layer.fc2, f"decoder {i} feed-forward")
    timed(decoder, "decoder (whole)")
    timed(model.proj_out, "output projection")
    return handles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--window", type=int, default=10, help="encoder window, seconds")
    parser.add_argument("--data", nargs="+", default=["embedded:test", "embedded:real"])
    parser.add_argument("--utterances", type=int, default=24, help="per set")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ct2", default=None, help="also profile this CTranslate2 export")
    parser.add_argument("--ct2-compute-type", default="float32", help="float32 or int8")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from pinchgate.data.audio import load_audio
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import read_corpus
    from pinchgate.families.builtin import resolve_model
    from pinchgate.families.whisper import (
        WhisperFamily,
        cut_window,
        load_processor,
        load_whisper,
        native_window,
        with_window,
    )

    source = resolve_model(args.model)
    model = load_whisper(source).eval()
    window = min(args.window, native_window(model.config))
    if window < native_window(model.config):
        cut_window(model, window)
    processor = with_window(load_processor(source), window)
    family = WhisperFamily()
    clips = []
    for spec in args.data:
        utterances, _ = read_corpus(resolve_corpus(spec))
        for u in utterances[: args.utterances]:
            audio = load_audio(u.audio_path, 16000)
            clips.append(audio[: window * 16000])
    audio_seconds = sum(len(c) for c in clips) / 16000
    print(
        f"model {args.model}, window {window} s, {len(clips)} clips ({audio_seconds:.1f} s of "
        f"audio) from {', '.join(args.data)}, {args.threads} threads, torch {torch.__version__}"
    )
    family.decode(model, processor, clips[:2])  # warm-up
    for batch in args.batch:
        totals: dict[str, float] = defaultdict(float)
        handles = attach_timers(model, totals)
        tokens = 0
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(clips), batch):
                chunk = clips[i : i + batch]
                texts = family.decode(model, processor, chunk)
                tokens += sum(len(processor.tokenizer(t).input_ids) for t in texts)
        wall = time.perf_counter() - start
        for h in handles:
            h.remove()
        decoder_total = totals.pop("decoder (whole)")
        merged: dict[str, float] = defaultdict(float)
        for label, seconds in totals.items():
            group = label
            if label.startswith("decoder "):
                group = "decoder blocks: " + label.split(maxsplit=2)[2]
            merged[group] += seconds
        blocks = sum(v for k, v in merged.items() if k.startswith("decoder blocks"))
        merged["decoder: rest"] = decoder_total - blocks
        merged["generate overhead"] = wall - totals["encoder"] - decoder_total
        merged["generate overhead"] -= totals["output projection"]
        print(
            f"\nbatch {batch}: {wall:.2f} s wall, RTF {wall / audio_seconds:.4f}, "
            f"{tokens} text tokens decoded"
        )
        print("| part | seconds | share |")
        print("|---|---:|---:|")
        for label, seconds in sorted(merged.items(), key=lambda kv: -kv[1]):
            print(f"| {label} | {seconds:.2f} | {100 * seconds / wall:.1f}% |")
    if args.ct2:
        profile_ct2(args, processor, clips, audio_seconds)
    return 0


def profile_ct2(args, processor, clips, audio_seconds: float) -> None:
    """Features, encoder and decoder time of the same clips in CTranslate2."""
    import numpy as np

    from pinchgate.families.whisper import max_new_tokens
    from pinchgate.families.whisper_ct2 import Ct2Whisper

    runtime = Ct2Whisper(args.ct2, args.ct2_compute_type, args.threads)
    extractor = processor.feature_extractor
    prompt = list(processor.tokenizer.prefix_tokens)
    storage = runtime._storage
    for batch in args.batch:
        parts = {"features": 0.0, "encoder": 0.0, "decoder (all steps)": 0.0}
        for i in range(0, len(clips), batch):
            chunk = clips[i : i + batch]
            t0 = time.perf_counter()
            features = extractor(chunk, sampling_rate=16000, return_tensors="np")
            view = storage.from_array(np.ascontiguousarray(features["input_features"]))
            t1 = time.perf_counter()
            encoded = runtime.model.encode(view, to_cpu=False)
            t2 = time.perf_counter()
            budget = max_new_tokens(max(len(c) for c in chunk) / 16000, runtime.config)
            runtime.model.generate(
                encoded, [prompt] * len(chunk), beam_size=1, max_length=2 * (len(prompt) + budget)
            )
            t3 = time.perf_counter()
            parts["features"] += t1 - t0
            parts["encoder"] += t2 - t1
            parts["decoder (all steps)"] += t3 - t2
        wall = sum(parts.values())
        print(
            f"\nCTranslate2 {runtime.compute_type}, batch {batch}: {wall:.2f} s, RTF "
            f"{wall / audio_seconds:.4f}"
        )
        print("| part | seconds | share |")
        print("|---|---:|---:|")
        for label, seconds in parts.items():
            print(f"| {label} | {seconds:.2f} | {100 * seconds / wall:.1f}% |")


if __name__ == "__main__":
    raise SystemExit(main())

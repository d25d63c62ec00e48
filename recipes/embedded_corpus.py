"""Make the corpus that ships inside the package: the embedded default's speech, in Opus.

    python recipes/embedded_corpus.py [--synth corpora/synth] [--out src/pinchgate/embedded/corpus]

Takes the `train`, `dev`, `test` and `test-unseen` splits of the seed-0 synthetic corpus
(`pinchgate data synth corpora/synth`, the build the stand-in model was pretrained from) and
re-encodes their FLAC as Ogg/Opus at about 20 kbit/s, which soundfile reads and which keeps the
whole corpus (1.4 h) near 13 MB. Layout, transcripts and speaker list stay LibriSpeech's, so
the normal reader serves. Shipping the audio makes the main job independent of the TTS engines
(no root, no build) and its test sets the same bytes on every machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import soundfile as sf

SPLITS = ("train", "dev", "test", "test-unseen")
# libsndfile maps Opus compression level to bit rate: 0.95 gives about 20 kbit/s on this speech.
OPUS_LEVEL = 0.95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth", type=Path, default=Path("corpora/synth"))
    parser.add_argument("--out", type=Path, default=Path("src/pinchgate/embedded/corpus"))
    args = parser.parse_args()

    source = json.loads((args.synth / "corpus.json").read_text())
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    summary = {k: v for k, v in source.items() if k != "splits"}
    summary["audio"] = f"Ogg/Opus, libsndfile compression level {OPUS_LEVEL} (about 20 kbit/s)"
    summary["splits"] = {}
    for split in SPLITS:
        seconds, utterances = 0.0, 0
        for trans in sorted((args.synth / split).rglob("*.trans.txt")):
            dest = tmp / split / trans.parent.relative_to(args.synth / split)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(trans, dest / trans.name)
            written = trans.with_name(trans.name.replace(".trans.txt", ".written.txt"))
            if written.is_file():
                shutil.copy2(written, dest / written.name)
            for flac in sorted(trans.parent.glob("*.flac")):
                audio, rate = sf.read(flac, dtype="float32")
                sf.write(
                    dest / (flac.stem + ".opus"),
                    audio,
                    rate,
                    format="OGG",
                    subtype="OPUS",
                    compression_level=OPUS_LEVEL,
                )
                seconds += len(audio) / rate
                utterances += 1
        entry = dict(source["splits"][split])
        entry.update(utterances=utterances, hours=round(seconds / 3600, 4))
        summary["splits"][split] = entry
        print(f"{split}: {utterances} utterances, {seconds / 3600:.2f} h")
    if (args.synth / "SPEAKERS.txt").is_file():
        shutil.copy2(args.synth / "SPEAKERS.txt", tmp / "SPEAKERS.txt")
    (tmp / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

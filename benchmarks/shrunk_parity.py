"""Largest logit difference between a structured run's masked and shrunken models.

    python benchmarks/shrunk_parity.py RUN_DIR [--data embedded:test] [--utterances 32]

Loads `RUN_DIR/model` (masked, stock Hugging Face) and `RUN_DIR/model-shrunk` with
`pinchgate.export.load_any`, runs both on the first utterances of the corpus in padded
batches of 8 and prints the largest |logit difference|. Runs made since the compression
loop records this itself (`shrunk.logit_check` in report.json) need it only for a check on
other data.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", default="embedded:test")
    parser.add_argument("--utterances", type=int, default=32)
    args = parser.parse_args()

    import transformers

    from pinchgate.data.audio import load_audio
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import load_corpus
    from pinchgate.export import load_any
    from pinchgate.families.ctc import feature_extractor_for

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    masked = load_any(f"{args.run_dir}/model")
    shrunk = load_any(f"{args.run_dir}/model-shrunk")
    extractor = feature_extractor_for(masked.config, f"{args.run_dir}/model")
    utterances, _ = load_corpus(resolve_corpus(args.data))
    utterances = utterances[: args.utterances]
    worst = 0.0
    for start in range(0, len(utterances), 8):
        audio = [
            load_audio(u.audio_path, extractor.sampling_rate) for u in utterances[start : start + 8]
        ]
        features = extractor(
            audio, sampling_rate=extractor.sampling_rate, padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            difference = masked(**features).logits - shrunk(**features).logits
        worst = max(worst, float(difference.abs().max()))
    print(
        f"{args.run_dir}: {len(utterances)} {args.data} utterances in padded batches of 8: "
        f"max |logit difference| masked vs shrunk {worst:.3g}"
    )


if __name__ == "__main__":
    main()

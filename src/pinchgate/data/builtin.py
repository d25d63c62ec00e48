"""Built-in corpora named by a spec instead of a path.

- `embedded:<split>`: the embedded default's speech, shipped inside the package
  (`pinchgate/embedded/corpus`, made by `recipes/embedded_corpus.py`): nothing to build.
  `embedded:real` is real recorded speech from package registries (a test set only;
  `recipes/real_speech.py`, sources and licences in `embedded/corpus/real/SOURCES.md`).
- `toy:<split>` and `synth:<split>`: generated on first use from a fixed seed into a cache
  directory (`$PINCHGATE_CACHE`, default `~/.cache/pinchgate`) and reused afterwards;
  `synth:` needs the text-to-speech engines (`scripts/install-tts.sh`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from pinchgate.errors import CorpusError

# The embedded default: the splits compression needs (the stand-in model was pretrained on
# the `pretrain` split of the same seed-0 build; texts and voices per split do not depend
# on the other splits' sizes).
SYNTH_SIZES = {"train": 800, "dev": 200, "test": 200, "test-unseen": 200}
EMBEDDED_SPLITS = (*SYNTH_SIZES, "real")
EMBEDDED_CORPUS = Path(__file__).resolve().parent.parent / "embedded" / "corpus"


def cache_dir() -> Path:
    return Path(os.environ.get("PINCHGATE_CACHE", Path.home() / ".cache" / "pinchgate"))


def corpus_label(spec: str) -> str:
    """The short name of a corpus in reports and file names: a path's last part, `toy-<split>`
    for the toy corpus (the spec itself for `embedded:` and `synth:`)."""
    return Path(spec.replace("toy:", "toy-")).name


def resolve_corpus(spec: str) -> Path:
    """A path for a corpus spec: built-in corpora are built on first use; else the path."""
    if spec.startswith("embedded:"):
        split = spec.split(":", 1)[1]
        if split not in EMBEDDED_SPLITS:
            raise CorpusError(f"{spec}: the embedded corpus has {', '.join(EMBEDDED_SPLITS)}")
        if not (EMBEDDED_CORPUS / "corpus.json").is_file():
            raise CorpusError(
                f"{spec}: {EMBEDDED_CORPUS} is missing; this checkout has no embedded corpus"
            )
        return EMBEDDED_CORPUS / split
    if spec.startswith("toy:"):
        from pinchgate.data.toy import build_toy_corpus

        return build_toy_corpus(cache_dir() / "toy-corpus-0") / spec.split(":", 1)[1]
    if spec.startswith("synth:"):
        split = spec.split(":", 1)[1]
        if split not in SYNTH_SIZES:
            raise CorpusError(f"{spec}: the built-in speech corpus has {', '.join(SYNTH_SIZES)}")
        return build_synth_corpus() / split
    return Path(spec)


def build_synth_corpus() -> Path:
    """The embedded default's speech corpus (seed 0), synthesised once with the TTS engines."""
    from pinchgate.data.synth import build_corpus

    root = cache_dir() / "synth-corpus-0"
    if not (root / "corpus.json").is_file():  # written last: its presence means complete
        print(f"building the embedded speech corpus in {root} (a few minutes, once)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                build_corpus(root, seed=0, sizes=SYNTH_SIZES, overwrite=True)
            except RuntimeError as exc:
                raise CorpusError(str(exc)) from None
    return root

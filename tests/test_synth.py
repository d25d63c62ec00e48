"""Synthetic TTS corpus: text cleaning, planning, layout, determinism, missing engines."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pinchgate.data import synth
from pinchgate.data.corpus import read_corpus
from pinchgate.data.synth import (
    ENGINES,
    SPLITS,
    VOICES,
    EngineMissingWarning,
    available_engines,
    build_corpus,
    plan_corpus,
    resolve_voices,
)
from pinchgate.data.texts import (
    MAX_WORDS,
    MIN_WORDS,
    Sentence,
    clean_sentence,
    extract_sentences,
    load_sentences,
    sentence_transcript,
    split_sentences,
)

INSTALLED = available_engines()
UTT_ID = re.compile(r"^(\d+)-(\d+)-(\d{4})$")


def needs(engine: str):
    return pytest.mark.skipif(
        engine not in INSTALLED, reason=f"{engine} not installed (scripts/install-tts.sh)"
    )


def tree_digest(root: Path) -> dict[str, str]:
    """md5 of every file a build writes, except corpus.json (it records the build time)."""
    return {
        p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "corpus.json"
    }


def fake_sentences(n: int) -> list[Sentence]:
    return [Sentence(f"Sentence number {w} is here.", f"SENTENCE {w}", "test") for w in range(n)]


# ---------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('Mr. Holmes said, "Don\'t go!"', "MISTER HOLMES SAID DON'T GO"),
        ("Mrs. Hudson came in -- quietly.", "MISSUS HUDSON CAME IN QUIETLY"),
        (
            "We'll drop this thing for to-day, and play.",
            "WE'LL DROP THIS THING FOR TO DAY AND PLAY",
        ),
        ("'Tain't fair, the boys' hats.", "TAIN'T FAIR THE BOYS HATS"),
        ("\u201cWhat,\u201d said he; \u2018yes\u2019.", "WHAT SAID HE YES"),
        ("  Spaces   everywhere  ", "SPACES EVERYWHERE"),
    ],
)
def test_sentence_transcript_is_librispeech_style(text, expected):
    assert sentence_transcript(text) == expected


@pytest.mark.parametrize("text", ["It cost 5 pounds.", "Salt & pepper.", "Caf\u00e9 au lait."])
def test_sentence_transcript_refuses_what_it_cannot_spell(text):
    with pytest.raises(ValueError, match="cannot spell"):
        sentence_transcript(text)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('"I think so," said Mr. Holmes.', "I think so, said Mister Holmes."),
        ("He ran--fast--down the lane.", "He ran, fast, down the lane."),
        ("It was in the year 1887 that it began.", None),  # digits
        ("The NASA men came home late.", None),  # acronym
        ("Chapter XII was the longest one.", None),  # roman numeral
        ("J. Smith was waiting outside for us.", None),  # initial
        ("Go now.", None),  # too short
        ("And then the men went down to the river", None),  # no final punctuation
        ("He (the old man) sat down by the fire.", None),  # brackets
        (" ".join(["word"] * (MAX_WORDS + 1)) + ".", None),  # too long
    ],
)
def test_clean_sentence(raw, expected):
    assert clean_sentence(raw) == expected


def test_split_sentences_keeps_abbreviations_and_quotes_together():
    book = 'Mr. Holmes sat down. "Is it you?" he asked.\nHe waited!\n\nA new paragraph starts here.'
    assert split_sentences(book) == [
        "Mister Holmes sat down.",
        '"Is it you?" he asked.',
        "He waited!",
        "A new paragraph starts here.",
    ]


def test_extract_sentences_drops_gutenberg_licence_and_duplicates():
    book = (
        "The Project Gutenberg EBook of Something\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\n\n"
        "The dog ran into the yard. The dog ran into the yard!\n\n"
        "She looked out of the window for a while.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\n\n"
        "Section one of the licence says many things about copying.\n"
    )
    assert extract_sentences(book) == [
        "The dog ran into the yard.",
        "She looked out of the window for a while.",
    ]


def test_packaged_sentences_are_clean_and_distinct():
    sentences = load_sentences()
    assert len(sentences) > 5000
    transcripts = [s.transcript for s in sentences]
    assert len(set(transcripts)) == len(transcripts)
    for s in sentences:
        assert re.fullmatch(r"[A-Z']+( [A-Z']+)*", s.transcript), s
        assert MIN_WORDS <= len(s.transcript.split()) <= MAX_WORDS, s
        assert clean_sentence(s.text) == s.text, s  # the file is already clean
        assert s.source in {"holmes", "sawyer", "moby"}


# ---------------------------------------------------------------- planning


def test_plan_keeps_texts_disjoint_and_unseen_voices_apart(tmp_path):
    sizes = {"pretrain": 60, "train": 40, "dev": 10, "test": 10, "test-unseen": 10}
    tasks = plan_corpus(tmp_path, VOICES, fake_sentences(200), sizes, seed=3)
    texts: dict[str, set[str]] = {split: set() for split in SPLITS}
    ids = set()
    for task in tasks:
        assert task.voice.held_out == (task.split == "test-unseen")
        assert 1 <= len(task.utterances) <= synth.CHAPTER_SIZE
        assert task.chapter_id // 1000 == synth.SPLIT_CODE[task.split]
        for plan in task.utterances:
            speaker, chapter, _ = UTT_ID.match(plan.utt_id).groups()
            assert (int(speaker), int(chapter)) == (task.voice.speaker_id, task.chapter_id)
            texts[task.split].add(plan.transcript)
            ids.add(plan.utt_id)
    assert {k: len(v) for k, v in texts.items()} == sizes
    assert len(ids) == sum(sizes.values())
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not texts[a] & texts[b], (a, b)


def test_plan_gives_each_engine_an_equal_share(tmp_path):
    tasks = plan_corpus(tmp_path, VOICES, fake_sentences(400), {"train": 400}, seed=0)
    per_engine: dict[str, int] = {}
    for task in tasks:
        per_engine[task.voice.engine] = per_engine.get(task.voice.engine, 0) + len(task.utterances)
    assert per_engine == {engine: 100 for engine in ENGINES}


def test_plan_is_seeded_and_eval_texts_do_not_move_when_train_grows(tmp_path):
    sentences = fake_sentences(300)

    def texts(seed, sizes):
        tasks = plan_corpus(tmp_path, VOICES, sentences, sizes, seed)
        return {(t.split, u.utt_id, u.transcript, u.rate) for t in tasks for u in t.utterances}

    small = {"train": 20, "dev": 10, "test": 10}
    assert texts(1, small) == texts(1, small)
    assert texts(1, small) != texts(2, small)
    grown = texts(1, {**small, "train": 200, "pretrain": 50})
    assert {x for x in texts(1, small) if x[0] != "train"} <= grown


def test_plan_refuses_more_utterances_than_sentences(tmp_path):
    with pytest.raises(ValueError, match="only 5 distinct sentences"):
        plan_corpus(tmp_path, VOICES, fake_sentences(5), {"train": 6}, seed=0)


def test_build_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="bad sizes"):
        build_corpus(tmp_path / "c", sizes={"validation": 3})
    with pytest.raises(ValueError, match="unknown TTS engine"):
        build_corpus(tmp_path / "c", sizes={"train": 1}, engines=["say"])


# ---------------------------------------------------------------- audio


def test_degrade_makes_16k_unclipped_audio_deterministically():
    rate = 22050
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    tone = np.concatenate([np.zeros(rate // 2, np.float32), tone, np.zeros(rate, np.float32)])
    a = synth.degrade(tone, rate, synth._rng(0, "x"))
    b = synth.degrade(tone, rate, synth._rng(0, "x"))
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert np.max(np.abs(a)) <= 0.98
    # One second of tone, trimmed of its 1.5 s of silence, padded 0.2-0.6 s, speed +-5 %.
    assert 0.95 / 1.05 + 0.2 <= len(a) / synth.SAMPLE_RATE <= 1 / 0.95 + 0.6
    assert not np.array_equal(a, synth.degrade(tone, rate, synth._rng(1, "x")))


# ---------------------------------------------------------------- building with engines


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_builds_a_librispeech_layout(engine, tmp_path):
    if engine not in INSTALLED:
        pytest.skip(f"{engine} not installed (scripts/install-tts.sh)")
    out = tmp_path / "corpus"
    has_unseen = any(v.engine == engine and v.held_out for v in VOICES)
    sizes = {"train": 2, "test": 1} | ({"test-unseen": 1} if has_unseen else {})
    summary = build_corpus(out, seed=0, sizes=sizes, engines=[engine], workers=1)

    assert summary.engines == [engine]
    for split in SPLITS:
        assert summary.splits[split].utterances == sizes.get(split, 0)
    for split, count in sizes.items():
        utterances, problems = read_corpus(out / split)  # the project's own reader
        assert not problems and len(utterances) == count
        for utt in utterances:
            speaker, chapter, _ = UTT_ID.match(utt.utt_id).groups()
            assert utt.audio_path == out / split / speaker / chapter / f"{utt.utt_id}.flac"
            assert re.fullmatch(r"[A-Z']+( [A-Z']+)*", utt.transcript)
            info = sf.info(str(utt.audio_path))
            assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
            assert info.duration > 0.5
            voice = next(v for v in VOICES if v.speaker_id == int(speaker))
            assert voice.engine == engine and voice.held_out == (split == "test-unseen")
    report = json.loads((out / "corpus.json").read_text())
    assert report["engines"] == [engine] and report["seed"] == 0
    assert report["splits"]["train"]["hours"] > 0
    assert "Gutenberg" in report["text_source"]
    speakers = (out / "SPEAKERS.txt").read_text()
    assert all(f"| {v.name}" in speakers for v in VOICES if v.engine == engine)


@needs("espeak-ng")
def test_same_seed_gives_identical_transcripts_and_audio(tmp_path):
    sizes = {"train": 6, "dev": 2}
    build_corpus(tmp_path / "a", seed=5, sizes=sizes, engines=["espeak-ng"], workers=1)
    build_corpus(tmp_path / "b", seed=5, sizes=sizes, engines=["espeak-ng"], workers=2)
    build_corpus(tmp_path / "c", seed=6, sizes=sizes, engines=["espeak-ng"], workers=1)
    a, b, c = (tree_digest(tmp_path / name) for name in "abc")
    assert len([k for k in a if k.endswith(".flac")]) == 8
    assert a == b  # and the number of worker processes does not matter
    assert a != c


@needs("espeak-ng")
def test_only_builds_the_named_splits_with_the_texts_a_full_build_deals(tmp_path):
    full = build_corpus(
        tmp_path / "a", seed=2, sizes={"train": 3, "dev": 2}, engines=["espeak-ng"], workers=1
    )
    # A bigger train split asked for, but only dev built: dev is the full build's dev.
    part = build_corpus(
        tmp_path / "b",
        seed=2,
        sizes={"train": 9, "dev": 2},
        engines=["espeak-ng"],
        workers=1,
        only=["dev"],
    )
    assert not (tmp_path / "b" / "train").exists()
    assert list(part.splits) == ["dev"] and part.splits["dev"] == full.splits["dev"]
    assert tree_digest(tmp_path / "b" / "dev") == tree_digest(tmp_path / "a" / "dev")
    with pytest.raises(ValueError, match="only \\['valid'\\]"):
        build_corpus(tmp_path / "c", sizes={"dev": 1}, only=["valid"])


@needs("piper")
def test_piper_is_reproducible_too(tmp_path):
    sizes = {"train": 2}
    for name in "ab":
        build_corpus(tmp_path / name, seed=1, sizes=sizes, engines=["piper"], workers=1)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


@needs("espeak-ng")
def test_existing_output_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "corpus"
    build_corpus(out, seed=0, sizes={"train": 1}, engines=["espeak-ng"], workers=1)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_corpus(out, seed=0, sizes={"dev": 1}, engines=["espeak-ng"], workers=1)
    build_corpus(out, seed=0, sizes={"dev": 1}, engines=["espeak-ng"], workers=1, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "train").exists() and (out / "dev").is_dir()


# ---------------------------------------------------------------- missing engines


@needs("espeak-ng")
def test_missing_engine_is_skipped_with_a_warning(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "espeak-ng").symlink_to(shutil.which("espeak-ng"))
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.warns(EngineMissingWarning, match="flite skipped: flite not on PATH"):
        voices = resolve_voices(["flite", "espeak-ng"])
    assert {v.engine for v in voices} == {"espeak-ng"}
    assert available_engines() == ["espeak-ng"] + (["piper"] if "piper" in INSTALLED else [])


def test_no_engine_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no binaries at all
    monkeypatch.setattr(synth, "PIPER_MODULES", ("pinchgate_no_such_module",))
    assert available_engines() == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineMissingWarning)
        with pytest.raises(RuntimeError) as error:
            build_corpus(tmp_path / "corpus", sizes={"train": 1})
    message = str(error.value)
    assert "\n" not in message
    assert all(engine in message for engine in ENGINES)
    assert "scripts/install-tts.sh" in message
    assert not (tmp_path / "corpus").exists()  # nothing written before the check

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from pinchgate.data.audio import load_audio
from pinchgate.data.batching import SpeechDataset, bucket_batches
from pinchgate.data.corpus import check_utterances, load_corpus, read_corpus, read_manifest
from pinchgate.data.text import normalize_transcript
from pinchgate.errors import AudioError, CorpusError, PinchgateError
from pinchgate.families.ctc import CTCFamily, CTCProcessor, feature_extractor_for
from pinchgate.families.ctc_vocab import build_vocab, load_tokenizer, save_vocab, vocab_characters


def write_clip(path, seconds=0.5, rate=16000, channels=1, value=0.1):
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = int(seconds * rate)
    audio = np.full((frames, channels), value, dtype=np.float32) if channels > 1 else None
    if audio is None:
        t = np.arange(frames) / rate
        audio = (value * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(path, audio, rate)
    return path


def librispeech_dir(root, lines: dict[str, str], make_audio=True):
    chapter = root / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198.trans.txt").write_text(
        "".join(f"{utt} {text}\n" for utt, text in lines.items())
    )
    if make_audio:
        for utt in lines:
            write_clip(chapter / f"{utt}.flac")
    return root


def test_librispeech_reader(toy_corpus):
    utterances, problems = read_corpus(toy_corpus / "train")
    assert len(utterances) == 24 and not problems
    first = utterances[0]
    assert first.audio_path.is_file() and first.audio_path.suffix == ".flac"
    assert first.utt_id == first.audio_path.stem and first.transcript


def test_tsv_and_jsonl_manifests(tmp_path):
    clip = write_clip(tmp_path / "audio" / "a.wav")
    (tmp_path / "m.tsv").write_text("path\ttext\tduration\naudio/a.wav\tHello, world!\t0.5\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": str(clip), "text": "hi there"}) + "\n")
    tsv, _ = read_manifest(tmp_path / "m.tsv")
    jsonl, _ = read_corpus(tmp_path / "m.jsonl")
    assert tsv[0].audio_path == clip and tsv[0].duration == 0.5 and tsv[0].utt_id == "a"
    assert jsonl[0].audio_path == clip and jsonl[0].transcript == "hi there"
    kept, report = load_corpus(tmp_path / "m.tsv")
    assert kept[0].transcript == "HELLO WORLD" and report.kept == 1


def test_bad_inputs_are_skipped_and_named(tmp_path):
    root = librispeech_dir(
        tmp_path / "corpus",
        {
            "19-198-0000": "GOOD ONE",
            "19-198-0001": "",
            "19-198-0002": "NUMBER 42",
            "19-198-0003": "TOO LONG",
            "19-198-0004": "EMPTY AUDIO",
            "19-198-0005": "BROKEN FILE",
            "19-198-0006": "NO AUDIO",
        },
    )
    chapter = root / "19" / "198"
    write_clip(chapter / "19-198-0003.flac", seconds=3.0)
    sf.write(chapter / "19-198-0004.wav", np.zeros(0, dtype=np.float32), 16000)
    (chapter / "19-198-0004.flac").unlink()
    (chapter / "19-198-0005.flac").write_bytes(b"not audio at all")
    (chapter / "19-198-0006.flac").unlink()
    vocab = set("GODNEUMBRTLAYIPFKWS'")
    kept, report = load_corpus(root, vocab=vocab, max_duration=2.0)
    assert [u.utt_id for u in kept] == ["19-198-0000"]
    assert report.dropped == {
        "empty_transcript": 1,
        "out_of_vocabulary": 1,
        "too_long": 1,
        "zero_length": 1,
        "unreadable_audio": 1,
        "missing_audio": 1,
    }
    lines = [str(p) for p in report.problems]
    assert any("19-198-0002.flac" in line and "'24'" in line for line in lines)
    assert any("19-198-0005.flac" in line and "cannot read audio" in line for line in lines)
    assert all("\n" not in line for line in lines)
    assert "skipped:" in report.summary()


def test_fatal_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no \\*.trans.txt"):
        read_corpus(tmp_path / "empty")
    root = librispeech_dir(tmp_path / "c", {"19-198-0000": ""})
    with pytest.raises(CorpusError, match="no usable utterances.*transcript is empty"):
        load_corpus(root)


def test_resampling_and_downmix(tmp_path):
    rate = 8000
    t = np.arange(rate) / rate
    left = 0.5 * np.sin(2 * np.pi * 300 * t)
    stereo = np.stack([left, np.zeros_like(left)], axis=1).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, rate)
    audio = load_audio(tmp_path / "s.wav", 16000)
    assert audio.ndim == 1 and audio.dtype == np.float32
    assert abs(len(audio) - 16000) <= 1
    assert np.abs(audio).max() == pytest.approx(0.25, abs=0.02)  # mean of the two channels
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) * 16000 / len(audio) == pytest.approx(300, abs=2)


def test_unreadable_audio_error_names_file(tmp_path):
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(AudioError, match="bad.flac: cannot read audio"):
        load_audio(bad, 16000)


def test_text_normalisation():
    assert normalize_transcript("  Don’t stop—it's 'fine'.  ") == "DON'T STOP IT'S 'FINE'"
    assert normalize_transcript("Café 42") == "CAFÉ 42"


def test_tokenizer_round_trip(tmp_path):
    texts = ["HELLO WORLD", "IT'S A TEST"]
    vocab = build_vocab(texts)
    assert list(vocab)[:5] == ["<pad>", "<s>", "</s>", "<unk>", "|"]
    tokenizer = load_tokenizer(save_vocab(vocab, tmp_path / "vocab.json"))
    for text in texts:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids, group_tokens=False) == text
    assert vocab_characters(tokenizer) == set("HELOWRDITSA'")
    with pytest.raises(PinchgateError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")


def test_bucket_batches_respect_padded_seconds():
    rng = np.random.default_rng(1)
    durations = rng.uniform(0.5, 8.0, size=200).tolist()
    batches = bucket_batches(durations, 30.0, seed=3, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200))
    for batch in batches:
        padded = max(durations[i] for i in batch) * len(batch)
        assert padded <= 30.0 or len(batch) == 1
    assert batches == bucket_batches(durations, 30.0, seed=3, epoch=0)
    assert batches != bucket_batches(durations, 30.0, seed=3, epoch=1)
    assert len(bucket_batches([40.0, 1.0], 30.0)) == 2  # an over-long clip is alone


def test_collator_pads_audio_and_labels(toy_corpus, tiny_model_dir):
    utterances, _ = load_corpus(toy_corpus / "train")
    tokenizer = load_tokenizer(tiny_model_dir)
    dataset = SpeechDataset(utterances[:3], 16000, lambda utt: tokenizer(utt.transcript).input_ids)
    from transformers import Wav2Vec2Config

    processor = CTCProcessor(feature_extractor_for(Wav2Vec2Config()), tokenizer)
    batch = CTCFamily().collate(processor, [dataset[i] for i in range(3)])
    longest = max(len(dataset[i]["audio"]) for i in range(3))
    assert batch["input_values"].shape == (3, longest)
    lengths = [len(dataset[i]["labels"]) for i in range(3)]
    assert batch["labels"].shape == (3, max(lengths))
    for row, n in enumerate(lengths):
        assert (batch["labels"][row, n:] == -100).all() and (batch["labels"][row, :n] >= 0).all()
    assert check_utterances(utterances[:1], vocab=set())[1][0].kind == "out_of_vocabulary"


def test_written_forms_ride_with_the_transcripts(tmp_path, toy_corpus):
    import shutil

    corpus = tmp_path / "c"
    shutil.copytree(toy_corpus / "dev", corpus)
    trans = sorted(corpus.rglob("*.trans.txt"))[0]
    first = trans.read_text().splitlines()[0].split(" ", 1)[0]
    trans.with_name(trans.name.replace(".trans.txt", ".written.txt")).write_text(
        f"{first} Ad, on!\n"
    )
    utterances, report = load_corpus(corpus)
    by_id = {u.utt_id: u for u in utterances}
    assert by_id[first].written == "Ad, on!"  # kept through the checks
    assert sum(u.written is not None for u in utterances) == 1 and report.problems == []


def test_the_embedded_corpus_has_its_written_forms():
    from pinchgate.data.builtin import resolve_corpus

    for split in ("train", "dev", "test", "test-unseen"):
        utterances, _ = read_corpus(resolve_corpus(f"embedded:{split}"))
        assert all(
            u.written and normalize_transcript(u.written) == u.transcript for u in utterances
        )

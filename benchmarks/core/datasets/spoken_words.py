"""Spoken words: one class per English word, one log-mel spectrogram per synthetic speaker.

Words come from Debian's ``wamerican`` list (SCOWL), pinned by version and ``.deb`` SHA-256;
speech from eSpeak NG, the formant synthesiser, as shipped with its voice data in the PyPI
wheel ``espeakng-loader`` (pinned; loaded with ctypes, no system install). A speaker is an
English accent (eight of eSpeak's: US, New York, RP, Scotland, Lancaster, West Midlands,
Caribbean, its default British), a voice variant (male and female formant sets, the Klatt
synthesiser, whisper, creak) and a speaking rate. Pins and the speaker pool:
``benchmarks/datasets_manifest/spoken_words.json``. Unlike the glyph and emoji datasets, the
images are time-frequency pictures of sound, and a class's instances differ by pitch, formants,
timing and, across accents, by the phonemes themselves.

Policy, also written into the manifest:

* Words: the list's entries of 4 to 10 lower-case ASCII letters, taken in the order of the
  seeded SHA-256 of the word; a word is skipped when eSpeak gives it the same US phonemes as
  an earlier one (homophones such as "right" and "write" would be one class).
* Speakers: each word gets ``speakers_per_class`` speakers of the pool, the first by the seeded
  SHA-256 of (word, speaker), so words are spoken by different speakers.
* Synthesis: eSpeak keeps state between utterances (pitch flutter and filter memories), so each
  utterance is synthesised in a fresh fork of a process that has loaded the library but spoken
  nothing, with eSpeak's and libc's random generators seeded: the same word and speaker give
  the same samples whatever else is built (POSIX only).
* Image: silence at both ends trimmed (below -40 dB of the peak), the word placed in a
  ``window`` seconds frame, off centre by up to ``jitter`` of the free time (0.5 by default:
  a word is not always in the middle of a clip; drawn from the seeded SHA-256 of (word,
  speaker); cut symmetrically when longer than the frame), power spectrum (Hann window of
  1024 samples at 22.05 kHz) on ``size`` frames, ``size`` mel bands from 50 Hz to 8 kHz,
  decibels down to 80 dB below the image's peak mapped to 0-255; low frequencies at the
  bottom, grey replicated to RGB.
* Split: class-disjoint halves (:func:`.common.split_halves` of the words).

Build: ``python -m benchmarks.build_dataset spoken_words [--out DIR] [--classes 800]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import debian, espeak_worker
from .common import seeded_order, split_halves
from .stored import (
    DEFAULT_SOURCES,
    BuildOptions,
    DatasetBuildError,
    SourceOptions,
    add_common_arguments,
    add_option_arguments,
    counts_line,
    hashed_uniforms,
    load_sources,
    option,
    options_from_arguments,
    read_manifest,
    split_counts,
    summary,
    write_build,
)

NAME = "spoken_words"
TITLE = "Spoken words"
WORD = re.compile(r"[a-z]{4,10}")
PHONEME_VOICE = "en-us"
# Spectrogram.
N_FFT = 1024
F_MIN, F_MAX = 50.0, 8000.0
TRIM_DB = 40.0
TOP_DB = 80.0


@dataclass(frozen=True)
class SpeechOptions(BuildOptions):
    """How many words and speakers, at what image size and window (see the module notes)."""

    size: int = 48
    classes: int = option(800, "words")
    speakers_per_class: int = option(12, "speakers saying each word")
    window: float = option(1.0, "seconds of sound per image")
    jitter: float = option(
        0.5, "placement jitter in [0, 1] (0: centred; 1: anywhere in the window)"
    )


@dataclass(frozen=True)
class Speaker:
    """An eSpeak voice (accent and variant) at a speaking rate in words per minute."""

    accent: str
    variant: str
    rate: int

    @property
    def voice(self) -> str:
        return f"{self.accent}+{self.variant}" if self.variant else self.accent

    @property
    def key(self) -> str:
        return f"{self.voice}@{self.rate}"


def speaker_pool(sources: dict[str, Any]) -> list[Speaker]:
    """Every (accent, variant, rate) of the sources, in their order."""
    return [
        Speaker(accent, variant, rate)
        for accent in sources["accents"]
        for variant in sources["variants"]
        for rate in sources["rates"]
    ]


class Synthesizer:
    """eSpeak NG, spoken by :mod:`.espeak_worker` in a subprocess (each utterance from a fresh
    fork, so it depends on nothing else that is built). Use as a context manager."""

    def __init__(self, pin: dict[str, str]) -> None:
        try:
            import espeakng_loader  # the synthesiser is only needed to build this dataset
        except ImportError as error:
            raise DatasetBuildError(
                f"building {NAME} needs eSpeak NG: pip install "
                f"{pin['distribution']}=={pin['version']}"
            ) from error
        installed = metadata.version(pin["distribution"])
        if installed != pin["version"]:
            raise DatasetBuildError(
                f"{pin['distribution']} {installed} is installed, but {NAME} is pinned to "
                f"{pin['version']} (pip install {pin['distribution']}=={pin['version']})"
            )
        if not hasattr(os, "fork"):
            raise DatasetBuildError(f"building {NAME} needs os.fork (Linux or macOS)")
        self.data_path = Path(espeakng_loader.get_data_path())
        worker = Path(espeak_worker.__file__)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-I",
                str(worker),
                espeakng_loader.get_library_path(),
                str(self.data_path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.sample_rate = self._read_int()
        if self.sample_rate <= 0:
            raise DatasetBuildError(f"eSpeak NG did not start (data: {self.data_path})")

    def __enter__(self) -> Synthesizer:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()

    def _read_int(self) -> int:
        assert self.process.stdout is not None
        raw = self.process.stdout.read(4)
        if len(raw) != 4:
            raise DatasetBuildError("the eSpeak NG worker stopped (see its error above)")
        return struct.unpack("<i", raw)[0]

    def _ask(self, **request: Any) -> bytes:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()
        length = self._read_int()
        if length == espeak_worker.FAILED:
            raise DatasetBuildError(f"eSpeak NG failed on {request} (see its error above)")
        return self.process.stdout.read(length)

    def check_voices(self, speakers: Sequence[Speaker]) -> None:
        """Every accent and variant exists (eSpeak silently ignores an unknown variant)."""
        accents = {p.name.lower() for p in (self.data_path / "lang").rglob("*") if p.is_file()}
        for speaker in speakers:
            if speaker.accent.lower() not in accents:
                raise DatasetBuildError(f"eSpeak NG has no accent {speaker.accent!r}")
            if (
                speaker.variant
                and not (self.data_path / "voices" / "!v" / speaker.variant).is_file()
            ):
                raise DatasetBuildError(f"eSpeak NG has no voice variant {speaker.variant!r}")

    def phonemes(self, word: str) -> str:
        """eSpeak's phoneme mnemonics of ``word`` in the US accent."""
        return self._ask(op="phonemes", voice=PHONEME_VOICE, text=word).decode()

    def speak(self, word: str, speaker: Speaker) -> np.ndarray:
        """int16 samples of ``word`` said by ``speaker``."""
        samples = self._ask(op="speak", voice=speaker.voice, rate=speaker.rate, text=word)
        if not samples:
            raise DatasetBuildError(f"eSpeak NG said nothing for {word!r} as {speaker.key}")
        return np.frombuffer(samples, dtype=np.int16)


def mel_filters(bands: int, sample_rate: int) -> np.ndarray:
    """(bands, N_FFT // 2 + 1) triangular filters evenly spaced on the HTK mel scale."""
    mel = np.linspace(_mel(F_MIN), _mel(F_MAX), bands + 2)
    edges = 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    bins = np.fft.rfftfreq(N_FFT, 1.0 / sample_rate)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def _mel(hertz: float) -> float:
    return 2595.0 * np.log10(1.0 + hertz / 700.0)


def spectrogram(
    samples: np.ndarray,
    sample_rate: int,
    size: int,
    window: float,
    filters: np.ndarray,
    offset: float = 0.0,
) -> tuple[np.ndarray, bool]:
    """A (size, size) uint8 log-mel image of a word (see the module notes), and whether the
    word was longer than the window. ``offset`` in [-0.5, 0.5] moves the word off centre by
    that fraction of the free time (-0.5: at the start)."""
    wave = samples.astype(np.float64) / 32768.0
    loud = np.flatnonzero(np.abs(wave) > np.abs(wave).max() * 10 ** (-TRIM_DB / 20))
    wave = wave[loud[0] : loud[-1] + 1]
    hop = round(window * sample_rate / size)
    span = hop * size
    clipped = len(wave) > span
    if clipped:
        start = (len(wave) - span) // 2
        wave = wave[start : start + span]
    before = round((span - len(wave)) * (0.5 + offset))
    padded = np.pad(wave, (before + N_FFT // 2, span - len(wave) - before + N_FFT // 2))
    starts = hop // 2 + hop * np.arange(size)
    frames = padded[starts[:, None] + np.arange(N_FFT)]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    power = np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2
    # einsum's own loop, not BLAS: threaded BLAS stalls on a product this small when cores are
    # busy, and its kernels (so the last bits) differ between machines.
    mel = np.einsum("mf,tf->mt", filters, power)
    decibels = 10 * np.log10(np.maximum(mel, 1e-12))
    floor = decibels.max() - TOP_DB
    scaled = np.round((np.maximum(decibels, floor) - floor) * (255 / TOP_DB))
    return scaled[::-1].astype(np.uint8), clipped


def choose_words(
    candidates: Sequence[str], classes: int, seed: int, synthesizer: Synthesizer
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The first ``classes`` words in seeded order whose US phonemes are new; their phonemes,
    and the skipped homophones (word: the earlier word it sounds like)."""
    words: list[str] = []
    phonemes: dict[str, str] = {}
    homophones: dict[str, str] = {}
    said_by: dict[str, str] = {}
    for index in seeded_order(candidates, seed):
        word = candidates[index]
        sound = synthesizer.phonemes(word)
        if sound in said_by:
            homophones[word] = said_by[sound]
            continue
        said_by[sound] = word
        words.append(word)
        phonemes[word] = sound
        if len(words) == classes:
            return sorted(words), phonemes, homophones
    raise DatasetBuildError(f"the word list has only {len(words)} usable words, not {classes}")


def read_words(
    word_file: Path,
    sources: dict[str, Any],
    package: debian.DebPackage,
    synthesizer: Synthesizer,
    options: SpeechOptions,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Synthesise the chosen words by their speakers into arrays (images, labels, speakers)
    and a manifest."""
    size, seed, window = options.size, options.seed, options.window
    speakers_per_class = options.speakers_per_class
    lines = word_file.read_text(encoding="utf-8").split("\n")
    candidates = sorted({line for line in lines if WORD.fullmatch(line)})
    pool = speaker_pool(sources)
    if not 0 < speakers_per_class <= len(pool):
        raise DatasetBuildError(f"speakers per class must be in 1..{len(pool)}")
    synthesizer.check_voices(pool)
    words, phonemes, homophones = choose_words(candidates, options.classes, seed, synthesizer)
    filters = mel_filters(size, synthesizer.sample_rate)
    images, labels, speaker_ids, clipped = [], [], [], Counter()
    for class_id, word in enumerate(words):
        order = seeded_order([s.key for s in pool], f"{seed}:{word}")
        for speaker_id in sorted(order[:speakers_per_class]):
            speaker = pool[speaker_id]
            (draw,) = hashed_uniforms(f"placement:{seed}:{word}:{speaker.key}", 1)
            image, was_clipped = spectrogram(
                synthesizer.speak(word, speaker),
                synthesizer.sample_rate,
                size,
                window,
                filters,
                options.jitter * (draw - 0.5),
            )
            clipped[pool[speaker_id].accent] += was_clipped
            images.append(image)
            labels.append(class_id)
            speaker_ids.append(speaker_id)
    gray = np.stack(images)
    arrays = {
        "images": np.repeat(gray[..., None], 3, axis=-1),
        "labels": np.array(labels, dtype=np.int64),
        "speakers": np.array(speaker_ids, dtype=np.int64),
    }
    train, test = split_halves(words, seed)
    per_speaker = np.bincount(arrays["speakers"], minlength=len(pool))
    manifest = {
        "format": 1,
        "name": NAME,
        "size": size,
        "image_pipeline": {
            "sample_rate": synthesizer.sample_rate,
            "trim": f"below -{TRIM_DB:g} dB of the peak, at both ends",
            "window_seconds": window,
            "placement": "off centre by up to jitter of the free time; draws from "
            "sha256(f'placement:{seed}:{word}:{speaker}')",
            "jitter": options.jitter,
            "hop_samples": round(window * synthesizer.sample_rate / size),
            "n_fft": N_FFT,
            "fft_window": "periodic Hann",
            "mel_bands": size,
            "mel_scale": "HTK",
            "f_min_hz": F_MIN,
            "f_max_hz": F_MAX,
            "decibel_range": TOP_DB,
            "layout": "rows: mel bands, high at the top; columns: frames; grey replicated to RGB",
            "clipped_words_per_accent": dict(sorted(clipped.items())),
        },
        "policy": {
            "words": f"{WORD.pattern} entries of the word list, ordered by "
            "sha256(f'{seed}:{word}'); homophones (same eSpeak phonemes in "
            f"{PHONEME_VOICE}) skipped",
            "speakers_per_class": speakers_per_class,
            "speaker_choice": "first speakers_per_class by sha256(f'{seed}:{word}:{speaker}')",
            "synthesis": "one fresh fork per utterance; eSpeak and libc generators seeded 1",
        },
        "sources": {
            "word_list": {**package.record(), "file": sources["word_list"]["file"]},
            "synthesizer": sources["synthesizer"],
        },
        "speakers": [
            {
                "id": i,
                "key": s.key,
                "accent": s.accent,
                "variant": s.variant,
                "rate": s.rate,
                "images": int(per_speaker[i]),
            }
            for i, s in enumerate(pool)
        ],
        "classes": [
            {
                "id": i,
                "word": word,
                "phonemes": phonemes[word],
                "short_name": word,
                "images": speakers_per_class,
            }
            for i, word in enumerate(words)
        ],
        "skipped_homophones": dict(sorted(homophones.items())),
        "split": {
            "method": "class-disjoint halves ordered by sha256(f'{seed}:{word}')",
            "seed": seed,
            "train": train,
            "test": test,
        },
        "counts": split_counts(arrays["labels"], train, test),
        "tools": {
            "numpy": np.__version__,
            sources["synthesizer"]["distribution"]: metadata.version(
                sources["synthesizer"]["distribution"]
            ),
        },
    }
    return arrays, manifest


def build(
    root: Path,
    options: SpeechOptions = SpeechOptions(),
    sources_from: SourceOptions = DEFAULT_SOURCES,
) -> Path:
    """Fetch the pinned word list, synthesise, write into ``root``; return the npz's path."""
    sources = load_sources(NAME, sources_from.sources_path)
    package = debian.DebPackage.from_dict(sources["word_list"]["package"])
    folder = debian.fetch([package], sources_from.cache_dir, sources_from.debs_dir)[package.name]
    with Synthesizer(sources["synthesizer"]) as synthesizer:
        arrays, manifest = read_words(
            folder / sources["word_list"]["file"], sources, package, synthesizer, options
        )
    write_build(root, NAME, arrays, manifest)
    return root / f"{NAME}.npz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The builder's options."""
    add_common_arguments(parser, NAME, SpeechOptions.size)
    add_option_arguments(parser, SpeechOptions)


def build_from_arguments(args: argparse.Namespace) -> str:
    """Build as ``args`` say; a summary of the build."""
    manifest = read_manifest(build(args.out, *options_from_arguments(SpeechOptions, args)).parent)
    clipped = manifest["image_pipeline"]["clipped_words_per_accent"]
    return summary(
        args,
        NAME,
        [
            counts_line(manifest),
            f"{len(manifest['speakers'])} speakers in the pool; "
            f"{len(manifest['skipped_homophones'])} homophones skipped; "
            f"images longer than the window: {sum(clipped.values())}",
        ],
    )

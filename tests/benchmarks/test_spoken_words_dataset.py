"""Spoken-word dataset builder on a tiny word list with eSpeak NG (the pinned PyPI wheel), plus
one slow test that fetches the real word list with apt-get."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import build_dataset
from benchmarks.core.datasets import DATASETS, common, debian, spoken_words, stored
from benchmarks.core.datasets.stored import SourceOptions

SIZE = 24
WORDS = ["right", "write", "mountain", "people", "garden", "river", "stone"]
NOT_WORDS = ["Apple", "it's", "abc", "extraordinarily", "two words"]
PACKAGE = {"name": "words-test", "version": "1", "sha256": "a" * 64, "licence": "public-domain"}


@pytest.fixture()
def sources(tmp_path: Path) -> Path:
    """Sources naming a small speaker pool, and the word list already in the package cache."""
    pinned = stored.load_sources("spoken_words")
    data = {
        "word_list": {"package": PACKAGE, "file": "usr/share/dict/words"},
        "synthesizer": pinned["synthesizer"],
        "accents": ["en-us", "en-gb-scotland"],
        "variants": ["", "f2", "klatt"],
        "rates": [150, 200],
    }
    folder = debian.DebPackage.from_dict(PACKAGE).folder(tmp_path / "cache")
    (folder / "usr/share/dict").mkdir(parents=True)
    (folder / "usr/share/dict/words").write_text("\n".join(WORDS + NOT_WORDS) + "\n")
    (folder / debian.SOURCE_RECORD).write_text(PACKAGE["sha256"] + "\n")
    path = tmp_path / "sources.json"
    path.write_text(json.dumps(data))
    return path


def _build(sources: Path, out: Path, **options) -> Path:
    options = {"size": SIZE, "classes": 6, "speakers_per_class": 3, **options}
    return spoken_words.build(
        out,
        spoken_words.SpeechOptions(**options),
        SourceOptions(sources.parent / "cache", sources_path=sources),
    )


def test_build_skips_homophones_and_gives_each_word_its_speakers(sources, tmp_path):
    npz = _build(sources, tmp_path / "out")
    arrays, manifest = stored.read_build(npz.parent, "spoken_words")
    # "right" and "write" sound alike: whichever comes second in seeded order is skipped, and
    # the other six words are all needed.
    assert len(manifest["skipped_homophones"]) == 1
    ((skipped, kept),) = manifest["skipped_homophones"].items()
    assert {skipped, kept} == {"right", "write"}
    words = [c["word"] for c in manifest["classes"]]
    assert words == sorted(set(WORDS) - {skipped})
    assert arrays["images"].shape == (18, SIZE, SIZE, 3) and arrays["images"].dtype == np.uint8
    assert np.bincount(arrays["labels"]).tolist() == [3] * 6
    for label in range(6):  # three different speakers per word
        assert len(set(arrays["speakers"][arrays["labels"] == label])) == 3
    assert len(manifest["speakers"]) == 12 and manifest["speakers"][0]["key"] == "en-us@150"
    assert manifest["sources"]["word_list"]["sha256"] == PACKAGE["sha256"]
    assert manifest["sources"]["synthesizer"]["distribution"] == "espeakng-loader"
    # Each image spans the 80 dB range: its peak is white and silence black.
    assert (arrays["images"].reshape(18, -1).max(axis=1) == 255).all()
    assert (arrays["images"].reshape(18, -1).min(axis=1) == 0).all()
    train, test = manifest["split"]["train"], manifest["split"]["test"]
    assert (train, test) == common.split_halves(words, 0)


def test_rebuild_gives_identical_bytes(sources, tmp_path):
    first = _build(sources, tmp_path / "one")
    second = _build(sources, tmp_path / "two")
    assert first.read_bytes() == second.read_bytes()


def test_an_utterance_does_not_depend_on_what_was_said_before(sources):
    pin = stored.load_sources("spoken_words", sources)["synthesizer"]
    speaker = spoken_words.Speaker("en-us", "klatt", 175)
    with spoken_words.Synthesizer(pin) as synthesizer:
        first = synthesizer.speak("garden", speaker)
        for word in ("river", "stone", "people"):
            synthesizer.speak(word, spoken_words.Speaker("en-gb-scotland", "f2", 150))
        again = synthesizer.speak("garden", speaker)
        assert len(first) > synthesizer.sample_rate // 10
        assert np.array_equal(first, again)
        assert synthesizer.phonemes("right") == synthesizer.phonemes("write")
        assert synthesizer.phonemes("river") != synthesizer.phonemes("stone")


def test_spectrogram_puts_a_tone_in_its_mel_band_and_centres_the_sound():
    rate, size = 22050, 32
    filters = spoken_words.mel_filters(size, rate)
    t = np.arange(int(0.3 * rate)) / rate
    tone = (8000 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.int16)
    silence = np.zeros(rate // 5, dtype=np.int16)
    image, clipped = spoken_words.spectrogram(
        np.concatenate([silence, tone, silence]), rate, size, 1.0, filters
    )
    assert not clipped and image.shape == (size, size)
    band = size - 1 - int(np.argmax(image.sum(axis=1)))  # rows run from high to low
    assert int(np.argmax(filters[:, round(1000.0 * spoken_words.N_FFT / rate)])) == band
    loud_columns = np.flatnonzero(image.max(axis=0) > 128)
    assert abs((loud_columns[0] + loud_columns[-1]) / 2 - (size - 1) / 2) <= 1.5
    assert 0.2 * size < len(loud_columns) < 0.45 * size  # 0.3 s of a 1 s window
    for offset, edge in ((-0.5, 0), (0.5, size - 1)):  # the word moved to either end
        moved, _ = spoken_words.spectrogram(tone, rate, size, 1.0, filters, offset)
        assert edge in np.flatnonzero(moved.max(axis=0) > 128)
    long_tone = np.tile(tone, 5)
    assert spoken_words.spectrogram(long_tone, rate, size, 1.0, filters)[1]


def test_mel_filters_cover_the_band_without_empty_filters():
    filters = spoken_words.mel_filters(48, 22050)
    assert filters.shape == (48, spoken_words.N_FFT // 2 + 1)
    assert (filters.max(axis=1) > 0.5).all()  # each band reaches at least one bin
    peaks = filters.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all()
    bins = np.fft.rfftfreq(spoken_words.N_FFT, 1 / 22050)
    assert filters[:, bins > spoken_words.F_MAX].max() == 0


def test_pins_and_voices_are_checked(sources, tmp_path, monkeypatch):
    data = json.loads(sources.read_text())
    data["variants"] = ["", "no-such-variant"]
    bad_variant = tmp_path / "bad_variant.json"
    bad_variant.write_text(json.dumps(data))
    with pytest.raises(stored.DatasetBuildError, match="no voice variant 'no-such-variant'"):
        _build(bad_variant, tmp_path / "out")
    data = json.loads(sources.read_text())
    data["synthesizer"]["version"] = "0.0.1"
    bad_pin = tmp_path / "bad_pin.json"
    bad_pin.write_text(json.dumps(data))
    with pytest.raises(stored.DatasetBuildError, match=r"pinned to 0\.0\.1"):
        _build(bad_pin, tmp_path / "out")
    with pytest.raises(stored.DatasetBuildError, match="only 6 usable words"):
        _build(sources, tmp_path / "out", classes=7)


def test_cli_builds_and_prints_its_counts(sources, tmp_path, capsys):
    code = build_dataset.main(
        [
            "spoken_words",
            "--out", str(tmp_path / "out"),
            "--cache", str(sources.parent / "cache"),
            "--sources", str(sources),
            "--size", str(SIZE),
            "--classes", "6",
            "--speakers-per-class", "3",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "6 classes, 18 images of 24x24" in out and "1 homophones skipped" in out
    missing = str(tmp_path / "no-sources.json")
    with pytest.raises(SystemExit, match=r"^error: cannot read the sources .*no-sources\.json"):
        build_dataset.main(["spoken_words", "--out", str(tmp_path / "x"), "--sources", missing])


def test_a_build_opens_for_a_run_as_its_manifests_split(sources, tmp_path):
    npz = _build(sources, tmp_path / "out")
    manifest = stored.read_manifest(npz.parent)
    splits = DATASETS["spoken_words"](None, npz.parent, False)
    train_words = [manifest["classes"][i]["short_name"] for i in manifest["split"]["train"]]
    assert splits.train.class_names == train_words
    assert len(splits.train) + len(splits.eval) == manifest["counts"]["images"]
    assert splits.eval.image(0).shape == (3, SIZE, SIZE)
    assert splits.info["title"] == "Spoken words"


@pytest.mark.slow
def test_real_build_from_the_pinned_word_list(tmp_path):
    """Fetches wamerican (about 0.2 MB) with apt-get."""
    npz = spoken_words.build(
        tmp_path / "out",
        spoken_words.SpeechOptions(classes=6, speakers_per_class=4),
        SourceOptions(tmp_path / "cache"),
    )
    arrays, manifest = stored.read_build(npz.parent, "spoken_words")
    assert manifest["counts"] == {
        "classes": 6,
        "images": 24,
        "train_classes": 3,
        "test_classes": 3,
        "train_images": 12,
        "test_images": 12,
    }
    pinned = stored.load_sources("spoken_words")["word_list"]["package"]
    assert manifest["sources"]["word_list"]["sha256"] == pinned["sha256"]
    assert len(manifest["speakers"]) == 8 * 19 * 3 and arrays["images"].shape[1:] == (48, 48, 3)

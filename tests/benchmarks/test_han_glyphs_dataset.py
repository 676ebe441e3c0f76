"""Han glyph dataset builder on tiny synthetic fonts packed in synthetic .deb files (no network),
plus one slow test that fetches two small real font packages with apt-get."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen
from fontTools.ttLib import TTCollection, TTFont
from PIL import Image, ImageDraw

from benchmarks import build_dataset, run
from benchmarks.core.datasets import DATASETS, common, debian, han_glyphs, stored
from benchmarks.core.datasets.stored import SourceOptions
from benchmarks.core.errors import DataError

SIZE = 16
CLASSES = [0x4E00 + 7 * i for i in range(8)]  # eight Han code points
EMPTY, TWIN_A, TWIN_B = CLASSES[5], CLASSES[3], CLASSES[4]
MISSING = CLASSES[6:]


def _bars(code_point: int, thickness: int, stem: int) -> TTGlyphPen:
    """A glyph of horizontal bars (the code point's bits) and one vertical stem."""
    pen = TTGlyphPen(None)
    boxes = [(stem, 50, stem + thickness, 850)]
    pattern = CLASSES.index(code_point) + 1 if code_point in CLASSES else 15
    boxes += [
        (100, 120 + 180 * bit, 900, 120 + 180 * bit + thickness)
        for bit in range(4)
        if pattern >> bit & 1
    ]
    for x0, y0, x1, y1 in boxes:
        pen.moveTo((x0, y0))
        pen.lineTo((x0, y1))
        pen.lineTo((x1, y1))
        pen.lineTo((x1, y0))
        pen.closePath()
    return pen


def make_font(name: str, thickness: int, stem: int, variant: str = "full") -> TTFont:
    """A TrueType face drawing each class with bars; ``variant`` "gaps" leaves two code points
    unmapped, draws one empty glyph and draws two classes with the same glyph."""
    code_points = [c for c in CLASSES if variant == "full" or c not in MISSING]
    glyph_names = [".notdef", *(f"uni{c:04X}" for c in code_points)]
    glyphs = {".notdef": _bars(0, 40, 40).glyph()}
    for code_point in code_points:
        drawn = TWIN_A if variant == "gaps" and code_point == TWIN_B else code_point
        glyph = _bars(drawn, thickness, stem).glyph()
        if variant == "gaps" and code_point == EMPTY:
            glyph = TTGlyphPen(None).glyph()
        glyphs[f"uni{code_point:04X}"] = glyph
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(glyph_names)
    builder.setupCharacterMap({c: f"uni{c:04X}" for c in code_points})
    builder.setupGlyf(glyphs)
    builder.setupHorizontalMetrics({g: (1000, 0) for g in glyph_names})
    builder.setupHorizontalHeader(ascent=880, descent=-120)
    builder.setupNameTable({"familyName": name, "styleName": "Regular", "fullName": name})
    builder.setupOS2(sTypoAscender=880, sTypoDescender=-120, usWinAscent=880, usWinDescent=120)
    builder.setupPost()
    return builder.font


def _font_bytes(font: TTFont) -> bytes:
    buffer = io.BytesIO()
    font.save(buffer)
    return buffer.getvalue()


def _collection_bytes(fonts: list[TTFont]) -> bytes:
    collection = TTCollection()
    collection.fonts = fonts
    buffer = io.BytesIO()
    collection.save(buffer)
    return buffer.getvalue()


def make_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal .deb (ar archive: debian-binary, control and data tarballs), as dpkg-deb
    writes one."""

    def tar_xz(members: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
            for name, content in sorted(members.items()):
                info = tarfile.TarInfo(f"./{name}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        return buffer.getvalue()

    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", tar_xz({"control": b"Package: test\n"})),
        ("data.tar.xz", tar_xz(files)),
    ]
    with open(path, "wb") as out:
        out.write(b"!<arch>\n")
        for name, content in members:
            header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(content):<10}`\n"
            out.write(header.encode("ascii") + content + b"\n" * (len(content) % 2))
    return path


FONT_DIR = "usr/share/fonts/truetype/test"
FACES = [
    # key, full name, package, file, index in the file
    ("bars-thin", "Bars Thin", "fonts-test-a", f"{FONT_DIR}/thin.ttf", 0),
    ("bars-bold", "Bars Bold", "fonts-test-a", f"{FONT_DIR}/pair.ttc", 1),
    ("bars-offset", "Bars Offset", "fonts-test-a", f"{FONT_DIR}/pair.ttc", 0),
    ("bars-copy", "Bars Copy", "fonts-test-b", f"{FONT_DIR}/copy.ttf", 0),
    ("bars-gaps", "Bars Gaps", "fonts-test-b", f"{FONT_DIR}/gaps.ttf", 0),
]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two .deb packages of five faces (one a copy of another's outlines under another name,
    one with gaps), and a sources JSON pinning them."""
    root = tmp_path_factory.mktemp("glyph-fixture")
    debs = root / "debs"
    debs.mkdir()
    offset = make_font("Bars Offset", 90, 600)
    make_deb(
        debs / "fonts-test-a_1.0-1_all.deb",
        {
            f"{FONT_DIR}/thin.ttf": _font_bytes(make_font("Bars Thin", 50, 150)),
            f"{FONT_DIR}/pair.ttc": _collection_bytes([offset, make_font("Bars Bold", 140, 150)]),
            "usr/share/doc/fonts-test-a/copyright": b"License: OFL-1.1\n",
        },
    )
    make_deb(
        debs / "fonts-test-b_2.0-1_all.deb",
        {
            f"{FONT_DIR}/copy.ttf": _font_bytes(make_font("Bars Copy", 50, 150)),
            f"{FONT_DIR}/gaps.ttf": _font_bytes(make_font("Bars Gaps", 70, 400, "gaps")),
        },
    )
    sources = {
        "packages": [
            {
                "name": name,
                "version": version,
                "sha256": debian.sha256_of(debs / f"{name}_{version}_all.deb"),
                "licence": "OFL-1.1",
            }
            for name, version in (("fonts-test-a", "1.0-1"), ("fonts-test-b", "2.0-1"))
        ],
        "faces": [
            {"key": k, "name": n, "package": p, "file": f, "index": i} for k, n, p, f, i in FACES
        ],
    }
    (root / "sources.json").write_text(json.dumps(sources))
    return {"debs": debs, "sources": root / "sources.json", "root": root}


def _sources(fixture: dict[str, Path], cache: Path, path: Path | None = None) -> SourceOptions:
    return SourceOptions(cache, fixture["debs"], path or fixture["sources"])


def _build(fixture: dict[str, Path], out: Path, cache: Path, **options) -> Path:
    options = {"size": SIZE, "classes": len(CLASSES), "faces_per_class": 0, **options}
    return han_glyphs.build(out, han_glyphs.GlyphOptions(**options), _sources(fixture, cache))


def test_build_writes_every_distinct_image_and_says_why_the_rest_is_missing(fixture, tmp_path):
    npz = _build(fixture, tmp_path / "out", tmp_path / "cache")
    arrays, manifest = stored.read_build(npz.parent, "han_glyphs")
    skipped = manifest["skipped"]
    # The copy draws every class exactly as bars-thin does: all of its images are dropped.
    assert skipped["bars-copy"] == {"same_as_other_face": len(CLASSES)}
    # The gappy face: two classes unmapped, one empty glyph, two classes drawn alike.
    assert skipped["bars-gaps"] == {"not_mapped": 2, "empty_glyph": 1, "same_as_other_class": 2}
    assert skipped["bars-thin"] == skipped["bars-bold"] == skipped["bars-offset"] == {}
    per_face = {face["key"]: face["images"] for face in manifest["faces"]}
    assert per_face == {
        "bars-thin": 8,
        "bars-bold": 8,
        "bars-offset": 8,
        "bars-copy": 0,
        "bars-gaps": 3,
    }
    assert arrays["images"].shape == (27, SIZE, SIZE, 3) and arrays["images"].dtype == np.uint8
    assert np.array_equal(arrays["images"][..., 0], arrays["images"][..., 2])  # grey as RGB
    assert manifest["counts"]["images"] == 27 and manifest["counts"]["classes"] == 8
    assert [c["code_point"] for c in manifest["classes"]] == [f"U+{c:04X}" for c in CLASSES]
    assert {f["licence"] for f in manifest["faces"]} == {"OFL-1.1"}
    assert [p["name"] for p in manifest["packages"]] == ["fonts-test-a", "fonts-test-b"]
    # The face index of a collection is honoured: .ttc index 1 is "Bars Bold".
    bold = arrays["images"][arrays["faces"] == 1][..., 0]
    offset = arrays["images"][arrays["faces"] == 2][..., 0]
    assert (bold < 128).sum() > (offset < 128).sum()


def test_split_is_class_disjoint_halves_recorded_in_the_manifest(fixture, tmp_path):
    npz = _build(fixture, tmp_path / "out", tmp_path / "cache", seed=3)
    arrays, manifest = stored.read_build(npz.parent, "han_glyphs")
    train, test = manifest["split"]["train"], manifest["split"]["test"]
    assert sorted(train + test) == list(range(8)) and len(train) == len(test) == 4
    keys = [c["code_point"] for c in manifest["classes"]]
    assert (train, test) == common.split_halves(keys, 3)
    counts = manifest["counts"]
    assert counts["train_images"] == np.isin(arrays["labels"], train).sum()
    assert counts["train_images"] + counts["test_images"] == counts["images"]


def test_rebuild_gives_identical_bytes_and_reuses_the_unpacked_packages(
    fixture, tmp_path, monkeypatch
):
    first = _build(fixture, tmp_path / "one", tmp_path / "cache", faces_per_class=2)
    # Cached packages are not fetched again (nothing is read from --debs, no apt).
    monkeypatch.setattr(debian, "unpack", lambda *a: pytest.fail("unpacked twice"))
    second = _build(fixture, tmp_path / "two", tmp_path / "cache", faces_per_class=2)
    assert first.read_bytes() == second.read_bytes()
    assert (first.parent / "manifest.json").read_bytes() == (
        second.parent / "manifest.json"
    ).read_bytes()


def test_faces_per_class_keeps_that_many_faces_chosen_by_the_seed(fixture, tmp_path):
    chosen = []
    for seed in range(4):
        npz = _build(
            fixture, tmp_path / f"s{seed}", tmp_path / "cache", faces_per_class=2, seed=seed
        )
        arrays = stored.read_build(npz.parent, "han_glyphs")[0]
        assert np.bincount(arrays["labels"]).tolist() == [2] * 8
        chosen.append(tuple(arrays["faces"]))
    assert len(set(chosen)) > 1  # the seed changes which faces each class keeps


def test_classes_are_those_most_faces_map(fixture, tmp_path):
    npz = _build(fixture, tmp_path / "out", tmp_path / "cache", classes=6)
    manifest = stored.read_manifest(npz.parent)
    # The two code points bars-gaps lacks are mapped by fewer faces, so they go first.
    assert [c["code_point"] for c in manifest["classes"]] == [f"U+{c:04X}" for c in CLASSES[:6]]
    with pytest.raises(stored.DatasetBuildError, match="only 8 Han characters"):
        _build(fixture, tmp_path / "out", tmp_path / "cache", classes=9)


def test_placement_jitter_moves_turns_and_shrinks_without_cutting_ink():
    glyph = Image.new("L", (40, 60), 0)
    ImageDraw.Draw(glyph).rectangle((0, 0, 39, 59), fill=255)
    centred = han_glyphs.place(glyph, SIZE, 0.0, (0.0, 0.5, 0.5, 0.5))
    rows, cols = np.nonzero(centred < 128)
    assert abs((rows.min() + rows.max()) / 2 - (SIZE - 1) / 2) <= 0.5
    assert abs((cols.min() + cols.max()) / 2 - (SIZE - 1) / 2) <= 0.5
    # Full jitter, extreme draws: smallest, turned, pushed into the top-left corner.
    corner = han_glyphs.place(glyph, SIZE, 1.0, (1.0, 1.0, 0.0, 0.0))
    rows, cols = np.nonzero(corner < 250)
    assert rows.min() == 0 and cols.min() == 0
    assert (corner < 128).sum() < (centred < 128).sum()  # shrunk by up to 40%
    assert (corner < 128).sum() > 0.3 * (centred < 128).sum()  # but not cut away
    far = han_glyphs.place(glyph, SIZE, 1.0, (0.0, 0.5, 1.0, 1.0))
    rows, cols = np.nonzero(far < 250)
    assert rows.max() == SIZE - 1 and cols.max() == SIZE - 1
    draws = han_glyphs.placement_draws(0, 0x4E00, "a")
    assert (
        draws
        == han_glyphs.placement_draws(0, 0x4E00, "a")
        != han_glyphs.placement_draws(1, 0x4E00, "a")
    )
    assert all(0 <= d < 1 for d in draws)


def test_pins_and_names_are_checked(fixture, tmp_path):
    sources = json.loads(fixture["sources"].read_text())
    sources["packages"][0]["sha256"] = "0" * 64
    bad_pin = tmp_path / "bad_pin.json"
    bad_pin.write_text(json.dumps(sources))
    with pytest.raises(stored.DatasetBuildError, match=r"no \.deb of fonts-test-a=1\.0-1"):
        han_glyphs.build(tmp_path / "o", sources_from=_sources(fixture, tmp_path / "c", bad_pin))
    sources = json.loads(fixture["sources"].read_text())
    sources["faces"][0]["name"] = "Something Else"
    bad_name = tmp_path / "bad_name.json"
    bad_name.write_text(json.dumps(sources))
    with pytest.raises(stored.DatasetBuildError, match="pinned as 'Something Else'"):
        han_glyphs.build(tmp_path / "o", sources_from=_sources(fixture, tmp_path / "c", bad_name))
    with pytest.raises(stored.DatasetBuildError, match="unknown faces"):
        han_glyphs.sources(["no-such-face"])


def test_unpack_checks_the_hash_and_refuses_unsafe_paths(tmp_path):
    deb = make_deb(tmp_path / "evil_1_all.deb", {"../escape.txt": b"x"})
    package = debian.DebPackage("evil", "1", debian.sha256_of(deb), "none")
    with pytest.raises(DataError, match="unsafe path"):
        debian.unpack(deb, package, tmp_path / "evil")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "evil").exists()
    wrong = debian.DebPackage("evil", "1", hashlib.sha256(b"other").hexdigest(), "none")
    with pytest.raises(stored.DatasetBuildError, match="is pinned to"):
        debian.unpack(deb, wrong, tmp_path / "evil")


def test_cli_builds_and_prints_its_counts(fixture, tmp_path, capsys):
    code = build_dataset.main(
        [
            "han_glyphs",
            "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"),
            "--debs", str(fixture["debs"]),
            "--sources", str(fixture["sources"]),
            "--size", str(SIZE),
            "--classes", "8",
            "--faces-per-class", "0",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "8 classes, 27 images of 16x16" in out
    with pytest.raises(SystemExit, match=r"^error: unknown faces \['no-such-face'\]"):
        build_dataset.main(["han_glyphs", "--out", str(tmp_path / "x"), "--faces", "no-such-face"])


def test_a_build_opens_for_a_run_as_its_manifests_split(fixture, tmp_path):
    npz = _build(fixture, tmp_path / "out", tmp_path / "cache")
    manifest = stored.read_manifest(npz.parent)
    splits = DATASETS["han_glyphs"](None, npz.parent, False)
    counts = manifest["counts"]
    assert splits.describe()["train"] == {
        "classes": counts["train_classes"],
        "images": counts["train_images"],
    }
    assert splits.describe()["test"] == {
        "classes": counts["test_classes"],
        "images": counts["test_images"],
    }
    test_names = [manifest["classes"][i]["code_point"] for i in manifest["split"]["test"]]
    assert splits.eval.class_names == test_names
    assert splits.train.image(0).shape == (3, SIZE, SIZE)
    assert splits.info["npz_sha256"] == manifest["npz"]["sha256"]


def test_a_run_without_a_build_says_how_to_build_it_and_builds_nothing(tmp_path):
    with pytest.raises(
        SystemExit, match=r"^error: no han_glyphs dataset in .*build_dataset han_glyphs --out"
    ):
        run.main(["--recipe", "han_glyphs", "--data-root", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()


def test_build_errors_are_the_runners_one_line_data_errors():
    assert issubclass(stored.DatasetBuildError, DataError)


def test_pinned_sources_are_consistent():
    packages, faces = han_glyphs.sources()
    assert len(faces) == len({f.key for f in faces}) >= 60
    assert {f.package for f in faces} == {p.name for p in packages}
    assert all(len(p.sha256) == 64 and p.licence for p in packages)


@pytest.mark.slow
def test_real_build_from_two_small_debian_font_packages(tmp_path):
    """Fetches fonts-sawarabi-gothic and fonts-sawarabi-mincho (about 2 MB) with apt-get."""
    npz = han_glyphs.build(
        tmp_path / "out",
        han_glyphs.GlyphOptions(classes=20, faces_per_class=0),
        SourceOptions(tmp_path / "cache"),
        faces=["sawarabi-gothic", "sawarabi-mincho-medium"],
    )
    arrays, manifest = stored.read_build(npz.parent, "han_glyphs")
    assert manifest["counts"]["classes"] == 20 and len(arrays["labels"]) == 40
    pinned = {p.name: p.sha256 for p in han_glyphs.sources()[0]}
    for package in manifest["packages"]:
        assert package["sha256"] == pinned[package["name"]]
        folder = debian.DebPackage.from_dict(package).folder(tmp_path / "cache")
        assert (folder / debian.SOURCE_RECORD).read_text().strip() == package["sha256"]

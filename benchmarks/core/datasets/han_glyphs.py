"""Han glyphs: one class per Han character, one image per font face that draws it.

The faces are the distinct designs in Debian 12's CJK font packages (Chinese Ming/Song, Kai,
Hei and FangSong; Japanese Mincho, Gothic, brush and handwriting; Korean hanja faces), pinned by
version and ``.deb`` SHA-256 in ``benchmarks/datasets_manifest/han_glyphs.json`` with their
licences, fetched with ``apt-get download`` and unpacked in Python (:mod:`.debian`). Many images
per class, as in CUB-200 and Cars-196: a font face plays the part of a photograph.

Policy, also written into the manifest:

* Class pool: code points of the CJK Unified Ideographs block (U+4E00-U+9FFF) in a face's
  character map (read with fontTools). Classes are the ``classes`` code points mapped by the
  most faces, ties broken by the seeded SHA-256 of the code point.
* Rendering (Pillow's FreeType, basic layout, so no shaping library is involved): at four times
  the output size with the em at 7/8 of the side, cropped to the ink, then placed as a glyph
  in a photograph or a scan would be: shrunk by up to 40%, turned by up to 15 degrees and moved
  anywhere in the free margin, each scaled by ``jitter`` (1 by default; 0 centres every glyph)
  and drawn from the seeded SHA-256 of (code point, face). A glyph larger than the side is
  shrunk to fit; the image is reduced by area averaging, black ink on white, grey replicated to
  RGB. Relative size is kept (口 and 囗 differ). Without the jitter, raw pixels already find a
  same-character neighbour for 89% of the queries (Recall@1), which leaves a benchmark little
  to measure; at 0.5 they find one for 46%, at 1 for 10%. At 0.5 a small CNN trained for a few
  epochs already reaches Recall@1 0.97, so the default is 1.
* A face that maps a character but draws nothing (some Korean fonts map hanja to empty glyphs)
  is skipped for it. So is an image whose centred version is identical to an earlier face's of
  the same class (two packages sharing outlines), and both images when one face draws two
  classes identically.
* Each class then keeps ``faces_per_class`` of its remaining faces, chosen by the seeded
  SHA-256 of the face key (0: all), so classes see different subsets of faces.
* Split: class-disjoint halves (:func:`.common.split_halves` of the code points).

Build: ``python -m benchmarks.build_dataset han_glyphs [--out DIR] [--classes 500]``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont, features

from . import debian
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

NAME = "han_glyphs"
TITLE = "Han glyphs"
HAN_BLOCK = range(0x4E00, 0xA000)
RENDER_SCALE = 4
EM_FRACTION = 7 / 8
# Placement at jitter 1: up to 40% smaller, turned up to 15 degrees, anywhere in the margin.
MAX_SHRINK = 0.4
MAX_TURN = 15.0


@dataclass(frozen=True)
class GlyphOptions(BuildOptions):
    """How many classes and faces, at what size and placement jitter (see the module notes)."""

    size: int = 32
    classes: int = option(500, "Han characters")
    faces_per_class: int = option(32, "faces kept per class (0: all)")
    jitter: float = option(
        1.0,
        "placement jitter in [0, 1] (0: centred; 1: up to 40%% smaller, turned up to 15 "
        "degrees, anywhere in the margin)",
    )
    min_images: int = option(2, "fewest images per class")


@dataclass(frozen=True)
class Face:
    """One font face: a file of a pinned package, its index in a collection, its full name."""

    key: str
    name: str
    package: str
    file: str
    index: int = 0


@dataclass
class OpenedFace:
    face: Face
    path: Path
    characters: frozenset[int]


def sources(
    selected: Sequence[str] | None = None, path: Path | None = None
) -> tuple[list[debian.DebPackage], list[Face]]:
    """The pinned packages and faces of ``path`` (default: this dataset's pinned sources),
    only the ``selected`` face keys when given."""
    data = load_sources(NAME, path)
    faces = [Face(**face) for face in data["faces"]]
    if selected is not None:
        unknown = sorted(set(selected) - {face.key for face in faces})
        if unknown:
            raise DatasetBuildError(f"unknown faces {unknown}; the sources list their keys")
        faces = [face for face in faces if face.key in selected]
    used = {face.package for face in faces}
    packages = [debian.DebPackage.from_dict(p) for p in data["packages"] if p["name"] in used]
    missing = sorted(used - {package.name for package in packages})
    if missing:
        raise DatasetBuildError(f"faces name packages the sources do not pin: {missing}")
    return packages, faces


def open_faces(faces: Sequence[Face], folders: dict[str, Path]) -> list[OpenedFace]:
    """Each face's file and Han code points, checking that the file holds the pinned face."""
    opened = []
    # fontTools warns about fonts whose 'post' table lacks glyph names; they are not needed.
    fonttools_log = logging.getLogger("fontTools")
    level = fonttools_log.level
    fonttools_log.setLevel(logging.ERROR)
    try:
        for face in faces:
            path = folders[face.package] / face.file
            if not path.is_file():
                raise DatasetBuildError(f"{face.package} has no {face.file} (face {face.key})")
            with TTFont(path, fontNumber=face.index, lazy=True) as font:
                name = font["name"].getDebugName(4)
                characters = frozenset(c for c in font.getBestCmap() or {} if c in HAN_BLOCK)
            if name != face.name:
                raise DatasetBuildError(
                    f"{face.file}#{face.index} is {name!r}, but face {face.key} is pinned as "
                    f"{face.name!r}"
                )
            opened.append(OpenedFace(face, path, characters))
    finally:
        fonttools_log.setLevel(level)
    return opened


def choose_classes(faces: Sequence[OpenedFace], classes: int, seed: int) -> list[int]:
    """The ``classes`` code points mapped by the most faces (ties: seeded hash), sorted."""
    coverage = Counter(c for face in faces for c in face.characters)

    def rank(code_point: int) -> tuple[int, str]:
        return -coverage[code_point], hashlib.sha256(f"{seed}:{code_point}".encode()).hexdigest()

    chosen = sorted(coverage, key=rank)[:classes]
    if len(chosen) < classes:
        raise DatasetBuildError(f"the faces map only {len(chosen)} Han characters, not {classes}")
    return sorted(chosen)


def draw_ink(font: ImageFont.FreeTypeFont, character: str) -> Image.Image | None:
    """The ink of ``character`` (white on black, cropped to it); None when the face draws
    nothing for it."""
    left, top, right, bottom = font.getbbox(character)
    margin = font.size  # room for ink outside the advance box (slanted, overhanging faces)
    canvas = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), 0)
    ImageDraw.Draw(canvas).text((margin - left, margin - top), character, font=font, fill=255)
    ink = canvas.getbbox()
    return None if ink is None else canvas.crop(ink)


def _scaled(image: Image.Image, scale: float) -> Image.Image:
    width = max(1, round(image.width * scale))
    return image.resize((width, max(1, round(image.height * scale))), Image.Resampling.BOX)


def placement_draws(seed: int, code_point: int, face_key: str) -> tuple[float, ...]:
    """The four uniforms of one image's placement."""
    return hashed_uniforms(f"placement:{seed}:{code_point}:{face_key}", 4)


def place(ink: Image.Image, size: int, jitter: float, draws: Sequence[float]) -> np.ndarray:
    """A (size, size) uint8 image of ``ink``: black on white, at its em scale, shrunk by up
    to ``MAX_SHRINK * jitter``, turned by up to ``MAX_TURN * jitter`` degrees, and moved off
    centre by up to ``jitter`` of the free margin (``draws``: four uniforms)."""
    side = RENDER_SCALE * size
    shrink, turn, dx, dy = draws
    glyph = _scaled(ink, 1 - MAX_SHRINK * jitter * shrink)
    if jitter:
        angle = MAX_TURN * jitter * (2 * turn - 1)
        glyph = glyph.rotate(angle, Image.Resampling.BICUBIC, expand=True)
        glyph = glyph.crop(glyph.getbbox())
    if max(glyph.size) > side:  # larger than the em box: fit it
        glyph = _scaled(glyph, side / max(glyph.size))
    free_x, free_y = side - glyph.width, side - glyph.height
    x = round(free_x / 2 + (dx - 0.5) * jitter * free_x)
    y = round(free_y / 2 + (dy - 0.5) * jitter * free_y)
    square = Image.new("L", (side, side), 0)
    square.paste(glyph, (x, y))
    return 255 - np.asarray(square.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def render_faces(
    faces: Sequence[OpenedFace], code_points: Sequence[int], size: int, jitter: float, seed: int
) -> tuple[dict[tuple[int, int], tuple[np.ndarray, np.ndarray]], dict[str, Counter[str]]]:
    """By (class id, face id), for every face that draws a class: its centred image (to find
    indistinct ones) and its placed one; and what was skipped, per face key."""
    images: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    skipped: dict[str, Counter[str]] = {}
    font_size = round(RENDER_SCALE * size * EM_FRACTION)
    for face_id, face in enumerate(faces):
        counts: Counter[str] = Counter()
        font = ImageFont.truetype(
            str(face.path), font_size, index=face.face.index, layout_engine=ImageFont.Layout.BASIC
        )
        for class_id, code_point in enumerate(code_points):
            if code_point not in face.characters:
                counts["not_mapped"] += 1
                continue
            try:
                ink = draw_ink(font, chr(code_point))
            except OSError:  # FreeType rejects the glyph's hinting program
                counts["render_error"] += 1
                continue
            if ink is None:
                counts["empty_glyph"] += 1
                continue
            centred = place(ink, size, 0.0, (0.0, 0.5, 0.5, 0.5))
            draws = placement_draws(seed, code_point, face.face.key)
            images[class_id, face_id] = (centred, place(ink, size, jitter, draws))
        skipped[face.face.key] = counts
    return images, skipped


def drop_indistinct(
    images: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]], faces: Sequence[OpenedFace]
) -> dict[str, Counter[str]]:
    """Remove (in place) images whose centred version equals an earlier face's of the same
    class, then those a face draws identically for two classes; counts per face key."""
    dropped: dict[str, Counter[str]] = defaultdict(Counter)
    first_face: dict[tuple[int, bytes], int] = {}
    for class_id, face_id in sorted(images):
        key = (class_id, images[class_id, face_id][0].tobytes())
        if key in first_face:
            del images[class_id, face_id]
            dropped[faces[face_id].face.key]["same_as_other_face"] += 1
        else:
            first_face[key] = face_id
    classes_drawn: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    for (class_id, face_id), (centred, _) in images.items():
        classes_drawn[face_id, centred.tobytes()].append(class_id)
    for (face_id, _), class_ids in classes_drawn.items():
        if len(class_ids) > 1:
            for class_id in class_ids:
                del images[class_id, face_id]
            dropped[faces[face_id].face.key]["same_as_other_class"] += len(class_ids)
    return dropped


def read_faces(
    faces: Sequence[OpenedFace], packages: Sequence[debian.DebPackage], options: GlyphOptions
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Render the chosen classes in every face into arrays (images, labels, faces) and a
    manifest."""
    size, seed, min_images = options.size, options.seed, options.min_images
    code_points = choose_classes(faces, options.classes, seed)
    images, skipped = render_faces(faces, code_points, size, options.jitter, seed)
    for key, counts in drop_indistinct(images, faces).items():
        skipped[key].update(counts)

    kept_faces: dict[int, list[int]] = {}
    for class_id, code_point in enumerate(code_points):
        drawn = [f for f in range(len(faces)) if (class_id, f) in images]
        order = seeded_order([faces[f].face.key for f in drawn], f"{seed}:{code_point}")
        chosen = [drawn[i] for i in order[: options.faces_per_class or None]]
        if len(chosen) >= min_images:
            kept_faces[class_id] = sorted(chosen)
    kept = sorted(kept_faces)
    if len(kept) < 2:
        raise DatasetBuildError(f"fewer than two classes have {min_images} distinct images")
    rows = [(new_id, f, images[c, f][1]) for new_id, c in enumerate(kept) for f in kept_faces[c]]
    gray = np.stack([image for _, _, image in rows])
    arrays = {
        "images": np.repeat(gray[..., None], 3, axis=-1),
        "labels": np.array([new_id for new_id, _, _ in rows], dtype=np.int64),
        "faces": np.array([f for _, f, _ in rows], dtype=np.int64),
    }
    class_keys = [f"U+{code_points[c]:04X}" for c in kept]
    train, test = split_halves(class_keys, seed)
    per_face = np.bincount(arrays["faces"], minlength=len(faces))
    licences = {package.name: package.licence for package in packages}
    manifest = {
        "format": 1,
        "name": NAME,
        "size": size,
        "image_pipeline": {
            "renderer": "Pillow FreeType, basic layout",
            "render_side": RENDER_SCALE * size,
            "em_fraction_of_side": EM_FRACTION,
            "placement": "cropped to ink at the em scale, shrunk by up to MAX_SHRINK * jitter, "
            "turned by up to MAX_TURN * jitter degrees (bicubic), shrunk to fit the side if "
            "larger, moved off centre by up to jitter of the free margin; draws from "
            "sha256(f'placement:{seed}:{code_point}:{face_key}')",
            "jitter": options.jitter,
            "max_shrink": MAX_SHRINK,
            "max_turn_degrees": MAX_TURN,
            "reduction": "area average (BOX)",
            "colours": "black ink on white, grey replicated to RGB",
        },
        "policy": {
            "class_pool": "code points U+4E00-U+9FFF in a face's cmap (fontTools)",
            "classes": f"the {options.classes} code points mapped by the most faces; ties by "
            "sha256(f'{seed}:{code_point}')",
            "skipped_images": "faces drawing nothing; images equal to an earlier face's of the "
            "same class; images a face draws identically for two classes",
            "faces_per_class": options.faces_per_class,
            "face_choice": "first faces_per_class by sha256(f'{seed}:{code_point}:{face_key}')",
            "min_images_per_class": min_images,
        },
        "packages": [package.record() for package in packages],
        "faces": [
            {
                "id": i,
                **vars(face.face),
                "licence": licences[face.face.package],
                "images": int(per_face[i]),
            }
            for i, face in enumerate(faces)
        ],
        "classes": [
            {
                "id": new_id,
                "code_point": class_keys[new_id],
                "character": chr(code_points[c]),
                "short_name": class_keys[new_id],
                "images": len(kept_faces[c]),
            }
            for new_id, c in enumerate(kept)
        ],
        "dropped_classes": {
            f"fewer_than_{min_images}_images": [
                f"U+{code_points[c]:04X}" for c in range(len(code_points)) if c not in kept_faces
            ]
        },
        "split": {
            "method": "class-disjoint halves ordered by sha256(f'{seed}:{code_point}')",
            "seed": seed,
            "train": train,
            "test": test,
        },
        "counts": split_counts(arrays["labels"], train, test),
        "skipped": {key: dict(sorted(counts.items())) for key, counts in skipped.items()},
        "tools": {
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "freetype": features.version("freetype2"),
            "fonttools": metadata.version("fonttools"),
        },
    }
    return arrays, manifest


def build(
    root: Path,
    options: GlyphOptions = GlyphOptions(),
    sources_from: SourceOptions = DEFAULT_SOURCES,
    faces: Sequence[str] | None = None,
) -> Path:
    """Fetch the pinned packages, render, write into ``root``; return the npz's path.
    ``faces`` keeps only those face keys."""
    packages, selected = sources(faces, sources_from.sources_path)
    folders = debian.fetch(packages, sources_from.cache_dir, sources_from.debs_dir)
    arrays, manifest = read_faces(open_faces(selected, folders), packages, options)
    write_build(root, NAME, arrays, manifest)
    return root / f"{NAME}.npz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The builder's options."""
    add_common_arguments(parser, NAME, GlyphOptions.size)
    add_option_arguments(parser, GlyphOptions)
    parser.add_argument("--faces", help="comma-separated face keys (default: all pinned faces)")


def build_from_arguments(args: argparse.Namespace) -> str:
    """Build as ``args`` say; a summary of the build."""
    options, sources_from = options_from_arguments(GlyphOptions, args)
    faces = args.faces.split(",") if args.faces else None
    manifest = read_manifest(build(args.out, options, sources_from, faces).parent)
    skipped: Counter[str] = Counter()
    for counts in manifest["skipped"].values():
        skipped.update(counts)
    return summary(
        args,
        NAME,
        [
            counts_line(manifest),
            f"{len(manifest['faces'])} faces from {len(manifest['packages'])} packages",
            f"skipped (class, face) pairs: {dict(sorted(skipped.items()))}",
        ],
    )

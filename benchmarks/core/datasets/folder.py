"""The user's own images: a folder with one sub-folder per class.

Two layouts:

* ``DIR/<class>/<image>``: the classes are split class-disjoint into train and test by a
  seeded permutation (:func:`.common.class_split` of the class names; ``test_fraction`` of
  the classes are tested, ``split_seed`` picks which), the usual zero-shot retrieval protocol;
* ``DIR/train/<class>/<image>`` and ``DIR/test/<class>/<image>``: the split as given.

Images are the files with a usual image extension (``IMAGE_EXTENSIONS``, any case; hidden
files and other files are skipped). A missing folder, a folder without classes, a class
without images and a file that is not a readable image are :class:`DataError` naming the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from .. import report
from ..errors import DataError
from .common import IMAGE_EXTENSIONS, FileImages, Splits, class_split, held_out_count

LAYOUT = "one sub-folder per class, or train/ and test/ sub-folders each with one per class"


def _visible_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_header(path: Path) -> None:
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many kinds for a file that is not an image
        raise DataError(f"{report.relative(path)} is not a readable image ({error})") from None


def scan(folder: Path) -> FileImages:
    """Every class folder of ``folder`` and its images, checked; labels in class-name order."""
    classes = _visible_folders(folder)
    if not classes:
        raise DataError(f"{report.relative(folder)} has no class folders (expected {LAYOUT})")
    paths, labels = [], []
    for label, class_folder in enumerate(classes):
        images = sorted(
            p
            for p in class_folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            raise DataError(
                f"class folder {report.relative(class_folder)} has no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        for path in images:
            _check_header(path)
        paths += images
        labels += [label] * len(images)
    return FileImages(paths, labels, [c.name for c in classes])


def open_splits(config: Any, data_root: Path | None, download: bool = False) -> Splits:
    """Train and test classes of the folder ``data_root`` (see the module docstring)."""
    if data_root is None:
        raise DataError(f"the folder recipe needs --data-root DIR ({LAYOUT})")
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"data root {report.relative(root)} is not a folder")
    info: dict[str, Any] = {
        "name": "folder",
        "title": root.resolve().name,
        "root": report.relative(root),
    }
    if (root / "train").is_dir() and (root / "test").is_dir():
        info["split"] = "train/ and test/ folders"
        return Splits(scan(root / "train"), scan(root / "test"), info)
    everything = scan(root)
    if everything.num_classes < 2:
        raise DataError(f"{report.relative(root)} has one class; retrieval needs at least two")
    held = held_out_count(everything.num_classes, config.test_fraction)
    train, test = class_split(everything.class_names, held, config.split_seed)
    info["split"] = (
        f"class-disjoint: {held} of {everything.num_classes} classes tested, "
        f"sha256 order with seed {config.split_seed}"
    )
    return Splits(everything.select(train), everything.select(test), info)

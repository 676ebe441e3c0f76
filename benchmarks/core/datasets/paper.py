"""The paper's datasets (CUB-200-2011, Cars196, Stanford Online Products) through PML's loaders,
and miniature fakes of them for tests.

:func:`open_splits` reads the standard zero-shot splits with PML's ``datasets.CUB``,
``datasets.Cars196`` or ``datasets.StanfordOnlineProducts`` (CUB classes 1-100 train, 101-200
test; Cars 1-98 / 99-196; SOP 11,318 / 11,316 classes), labels remapped to ``0..C-1`` per split
(sorted original ids). A missing dataset is a :class:`DataError` naming the folder layout PML
expects; PML downloads only when asked (``--download``) and only into a missing or empty folder.
:func:`write_fake_dataset` writes a miniature dataset in each layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pytorch_metric_learning import datasets
from pytorch_metric_learning.datasets.base_dataset import BaseDataset

from .. import report
from ..errors import DataError
from .common import FileImages, Splits

# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetInfo:
    """A paper dataset: PML's loader, the files it reads and the standard split sizes."""

    title: str
    loader: type[BaseDataset]
    required: tuple[str, ...]  # relative to the data root
    layout: str
    train_classes: int
    test_classes: int


DATASETS: dict[str, DatasetInfo] = {
    "cub": DatasetInfo(
        "CUB-200-2011",
        datasets.CUB,
        (
            "CUB_200_2011/images.txt",
            "CUB_200_2011/image_class_labels.txt",
            "CUB_200_2011/images",
        ),
        "<root>/CUB_200_2011/{images.txt, image_class_labels.txt, images/<class>/<image>.jpg} "
        "(the extracted CUB_200_2011.tgz)",
        100,
        100,
    ),
    "cars": DatasetInfo(
        "Cars196",
        datasets.Cars196,
        ("names.csv", "anno_train.csv", "anno_test.csv", "car_data/car_data"),
        "<root>/{names.csv, anno_train.csv, anno_test.csv, "
        "car_data/car_data/{train,test}/<class name>/<image>.jpg} "
        "(the Kaggle 'stanford-car-dataset-by-classes-folder' archive, extracted)",
        98,
        98,
    ),
    "sop": DatasetInfo(
        "Stanford Online Products",
        datasets.StanfordOnlineProducts,
        (
            "Stanford_Online_Products/Ebay_train.txt",
            "Stanford_Online_Products/Ebay_test.txt",
        ),
        "<root>/Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, "
        "<category>_final/<image>.JPG} (the extracted Stanford_Online_Products.zip)",
        11318,
        11316,
    ),
}


def check_layout(name: str, root: Path) -> None:
    """Raise :class:`DataError` unless ``root`` holds ``name`` in PML's layout."""
    info = DATASETS[name]
    missing = [path for path in info.required if not (root / path).exists()]
    if missing:
        raise DataError(
            f"{info.title} not found in {report.relative(root)} (missing: {', '.join(missing)}). "
            f"Expected layout: {info.layout}. Download it with --download (PML's "
            f"datasets.{info.loader.__name__}(root, download=True), which only downloads into a "
            f"missing or empty folder), or point --data-root at an existing copy."
        )


def load_split(name: str, root: Path, split: str) -> FileImages:
    """``split`` (``"train"`` or ``"test"``) of dataset ``name``, labels remapped to 0..C-1."""
    source = DATASETS[name].loader(str(root), split=split)
    classes, labels = np.unique(np.asarray(source.labels), return_inverse=True)
    return FileImages(source.paths, labels, [str(c) for c in classes])


def open_splits(config: Any, data_root: Path | None, download: bool = False) -> Splits:
    """The train and test splits of the paper dataset ``config.name`` in ``data_root``."""
    info = DATASETS[config.name]
    if data_root is None:
        raise DataError(f"{info.title} needs --data-root DIR (expected layout: {info.layout})")
    root = Path(data_root)
    if download and not (root.is_dir() and any(root.iterdir())):
        info.loader(str(root), split="train", download=True)
    check_layout(config.name, root)
    facts = {"name": config.name, "title": info.title, "root": report.relative(root)}
    return Splits(
        load_split(config.name, root, "train"), load_split(config.name, root, "test"), facts
    )


# ----------------------------------------------------------------------------- fake data

# Class ids of each fake split: the first ids of each standard split, so remapping is exercised.
FAKE_FIRST_IDS: dict[str, tuple[int, int]] = {"cub": (1, 101), "cars": (1, 99), "sop": (1, 11319)}


def _fake_class_images(per_class: int, rng: np.random.Generator) -> list[Image.Image]:
    """One class: a base colour plus noise, in a few sizes; the last image is grayscale
    (mode ``L``), as a few real CUB and Cars images are."""
    base = rng.integers(0, 256, 3)
    images = []
    for i in range(per_class):
        height, width = 20 + 4 * (i % 2), 28 - 4 * (i % 3)
        noise = rng.integers(-30, 31, (height, width, 3))
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
        images.append(image.convert("L") if i == per_class - 1 else image)
    return images


def write_fake_dataset(
    name: str, root: str | Path, classes: int = 3, per_class: int = 4, seed: int = 0
) -> Path:
    """A miniature ``name`` dataset in PML's folder layout under ``root``: ``classes`` classes
    per split, ``per_class`` small JPEG images each. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    records = []  # (split, class id, index within the class, image)
    for split, first in zip(("train", "test"), FAKE_FIRST_IDS[name]):
        for class_id in range(first, first + classes):
            for i, image in enumerate(_fake_class_images(per_class, rng)):
                records.append((split, class_id, i, image))
    if name == "cub":
        base = root / "CUB_200_2011"
        lines_images, lines_labels = [], []
        for n, (_, class_id, i, image) in enumerate(records, start=1):
            path = f"{class_id:03d}.Fake_bird_{class_id}/img_{i}.jpg"
            (base / "images" / path).parent.mkdir(parents=True, exist_ok=True)
            image.save(base / "images" / path)
            lines_images.append(f"{n} {path}")
            lines_labels.append(f"{n} {class_id}")
        (base / "images.txt").write_text("\n".join(lines_images) + "\n")
        (base / "image_class_labels.txt").write_text("\n".join(lines_labels) + "\n")
    elif name == "cars":
        # A "/" in a class name becomes "-" in its folder name, as in the real archive.
        names = [f"Fake/Car {n} 2012" for n in range(1, 197)]
        root.mkdir(parents=True, exist_ok=True)
        (root / "names.csv").write_text("\n".join(names) + "\n")
        annotations: dict[str, list[str]] = {"train": [], "test": []}
        for n, (split, class_id, _, image) in enumerate(records, start=1):
            file_name = f"{n:05d}.jpg"
            folder = root / "car_data" / "car_data" / split / names[class_id - 1].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / file_name)
            annotations[split].append(f"{file_name},0,0,{image.width},{image.height},{class_id}")
        for split, lines in annotations.items():
            (root / f"anno_{split}.csv").write_text("\n".join(lines) + "\n")
    else:
        base = root / "Stanford_Online_Products"
        header = "image_id class_id super_class_id path"
        lines_by_split: dict[str, list[str]] = {"train": [header], "test": [header]}
        for n, (split, class_id, i, image) in enumerate(records, start=1):
            path = f"bicycle_final/{class_id}_{i}.JPG"
            (base / path).parent.mkdir(parents=True, exist_ok=True)
            image.save(base / path, format="JPEG")
            lines_by_split[split].append(f"{n} {class_id} 1 {path}")
        for split, lines in lines_by_split.items():
            (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return root

"""The paper's datasets through PML's loaders, the official transforms, and fake datasets.

* :func:`load_split`: PML's ``datasets.CUB``, ``datasets.Cars196`` or
  ``datasets.StanfordOnlineProducts`` (standard zero-shot splits: CUB classes 1-100 train,
  101-200 test; Cars 1-98 / 99-196; SOP 11,318 / 11,316 classes), wrapped in
  :class:`PaperDataset`: labels remapped to ``0..C-1`` per split, images converted to RGB, then
  transformed. A missing dataset raises :class:`DatasetNotFoundError` naming the folder layout
  PML expects and the download flag.
* :class:`TrainTransform` / :class:`EvalTransform`: the official transforms without
  torchvision: RandomResizedCrop(224) (scale 0.08-1, ratio 3/4-4/3) + horizontal flip for
  training; Resize(256) (short side) + CenterCrop(224) for evaluation; then the backbone's
  pixel convention (:class:`PixelSpec`): BGR 0-255 minus (104, 117, 128) for BN-Inception,
  RGB ImageNet mean/std for torchvision's ResNet-50. Randomness comes from torch's global RNG,
  which the training harness seeds (and the DataLoader seeds per worker).
* :func:`write_fake_dataset`: a miniature dataset in each PML layout, for tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_metric_learning import datasets
from pytorch_metric_learning.datasets.base_dataset import BaseDataset

# ----------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class PixelSpec:
    """How a backbone wants its pixels: channel order, range and per-channel mean/std."""

    bgr: bool
    scale: float  # pixel values are 0..scale before the mean/std normalisation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Caffe-converted BN-Inception: BGR, 0-255, mean subtraction only (the official transform).
CAFFE_BGR = PixelSpec(True, 255.0, (104.0, 117.0, 128.0), (1.0, 1.0, 1.0))
IMAGENET_RGB = PixelSpec(False, 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def to_tensor(image: Image.Image, pixels: PixelSpec) -> torch.Tensor:
    """An RGB PIL image as a normalised ``(3, H, W)`` float32 tensor."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) * (pixels.scale / 255.0)
    if pixels.bgr:
        array = array[:, :, ::-1]
    array = (array - np.asarray(pixels.mean, np.float32)) / np.asarray(pixels.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def random_resized_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a random crop covering ``scale`` of the area with aspect ratio
    in ``ratio`` (log-uniform); after 10 failed draws, the largest central crop whose ratio is
    within bounds (torchvision's RandomResizedCrop rule)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()).item())
            left = int(torch.randint(0, width - w + 1, ()).item())
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class TrainTransform:
    """Random resized crop to ``crop`` x ``crop``, horizontal flip with probability ``flip``."""

    pixels: PixelSpec
    crop: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        left, top, w, h = random_resized_box(*image.size, self.scale, self.ratio)
        image = image.resize(
            (self.crop, self.crop), Image.BILINEAR, box=(left, top, left + w, top + h)
        )
        if torch.rand(()).item() < self.flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(image, self.pixels)


@dataclass(frozen=True)
class EvalTransform:
    """Short side resized to ``resize`` (bilinear), then the central ``crop`` x ``crop``."""

    pixels: PixelSpec
    resize: int = 256
    crop: int = 224

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        width, height = image.size
        if width <= height:
            size = (self.resize, int(self.resize * height / width))
        else:
            size = (int(self.resize * width / height), self.resize)
        image = image.resize(size, Image.BILINEAR)
        left = round((size[0] - self.crop) / 2)
        top = round((size[1] - self.crop) / 2)
        return to_tensor(image.crop((left, top, left + self.crop, top + self.crop)), self.pixels)


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


class DatasetNotFoundError(FileNotFoundError):
    """A paper dataset is not where the command was told to look."""


def check_layout(name: str, root: Path) -> None:
    """Raise :class:`DatasetNotFoundError` unless ``root`` holds ``name`` in PML's layout."""
    info = DATASETS[name]
    missing = [path for path in info.required if not (root / path).exists()]
    if missing:
        raise DatasetNotFoundError(
            f"{info.title} not found in {root} (missing: {', '.join(missing)}). Expected "
            f"layout: {info.layout}. Download it with --download (PML's "
            f"datasets.{info.loader.__name__}(root, download=True), which only downloads into a "
            f"missing or empty folder), or point --data-root at an existing copy."
        )


class PaperDataset(torch.utils.data.Dataset):
    """A PML dataset split with labels remapped to ``0..C-1`` (sorted original ids).

    ``labels`` (remapped, numpy) and ``classes`` (original ids) as the training harness
    expects; items are ``(transform(RGB image), label)``.
    """

    def __init__(self, source: BaseDataset, transform: Any) -> None:
        self.source = source
        self.transform = transform
        self.classes, inverse = np.unique(np.asarray(source.labels), return_inverse=True)
        self.labels = inverse.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        image, _ = self.source[idx]  # PML opens the file; the transform converts to RGB
        return self.transform(image), int(self.labels[idx])


def load_split(
    name: str, root: str | Path, split: str, transform: Any, download: bool = False
) -> PaperDataset:
    """``split`` (``"train"`` or ``"test"``) of dataset ``name`` (``cub``, ``cars``, ``sop``)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    root = Path(root)
    loader = DATASETS[name].loader
    if download and not (root.is_dir() and any(root.iterdir())):
        loader(str(root), split=split, download=True)  # PML downloads into a new/empty folder
    check_layout(name, root)
    return PaperDataset(loader(str(root), split=split), transform)


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
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
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

"""What every dataset shares: image sources, the one class split, and the PML-style dataset.

An :class:`ImageSource` holds a split's images (files or an in-memory uint8 array) with labels
``0..C-1`` and class names; :class:`ImageDataset` turns one into ``(tensor, label)`` items for
PML's trainer and tester, through a crop (:mod:`..transforms`) and the backbone's pixel
normalisation. :class:`Splits` is what opening a dataset gives: train and evaluation sources and
the facts a results file records about them.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from .. import report
from ..errors import DataError
from ..transforms import (
    CenterCrop,
    Picture,
    PixelSpec,
    RandomResizedCrop,
    item_generator,
)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DISPLAY_SIDE = 128


def seeded_order(keys: Sequence[Any], seed: Any) -> list[int]:
    """Indices of ``keys`` ordered by the SHA-256 of ``f"{seed}:{key}"``: a seeded permutation
    that depends on no RNG's version, and in which a key keeps its rank among the others when
    keys are added."""
    return sorted(
        range(len(keys)), key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).hexdigest()
    )


def class_split(keys: Sequence[Any], held_out: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Sorted class indices ``(kept, held)``: the first ``held_out`` classes of the
    :func:`seeded_order` are held out. ``keys`` name the classes (names, code points, ids) so
    that a class keeps its side when others are added.
    """
    if not 0 < held_out < len(keys):
        raise ValueError(f"cannot hold out {held_out} of {len(keys)} classes")
    order = seeded_order(keys, seed)
    return sorted(order[held_out:]), sorted(order[:held_out])


def split_halves(keys: Sequence[Any], seed: int) -> tuple[list[int], list[int]]:
    """The built datasets' split: class-disjoint ``(train, test)`` sorted class ids, train
    the smaller half (the rest of a :func:`class_split` holding out half, rounded down)."""
    test, train = class_split(keys, len(keys) // 2, seed)
    return train, test


def extract_tar(
    archive: bytes, dest: Path, what: str, strip: int = 0, stamps: Mapping[str, str] | None = None
) -> None:
    """Extract the regular files of a tar ``archive`` into ``dest``, dropping the first
    ``strip`` folders of each path, plus the text files ``stamps`` (name to content).

    Links and devices are never needed (and could point outside ``dest``); an absolute path or
    ``..`` is refused. The files go to a folder beside ``dest`` renamed at the end, so a broken
    extraction never looks like a complete one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                path = PurePosixPath(member.name)
                parts = path.parts[strip:]
                if not parts or path.is_absolute() or ".." in path.parts:
                    raise DataError(f"unsafe path {member.name!r} in {what}")
                target = tmp.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # regular files always have data
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
        for name, text in (stamps or {}).items():
            (tmp / name).write_text(text)
        tmp.chmod(0o755)  # mkdtemp makes it private
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def held_out_count(classes: int, fraction: float) -> int:
    """About ``fraction`` of ``classes``, at least one and leaving at least one."""
    if not 0 < fraction < 1:
        raise ValueError(f"a class fraction must be in (0, 1), got {fraction!r}")
    return max(1, min(classes - 1, round(fraction * classes)))


class ImageSource:
    """A split's images with labels ``0..C-1`` (``labels``) and ``class_names[label]``."""

    def __init__(self, labels: Sequence[int] | np.ndarray, class_names: Sequence[str]) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image(self, index: int) -> Picture:
        raise NotImplementedError

    def display(self, index: int) -> np.ndarray:
        """Item ``index`` as an (H, W, 3) uint8 array for a figure."""
        image = self.image(index)
        if isinstance(image, torch.Tensor):
            return image.permute(1, 2, 0).numpy()
        image = image.convert("RGB")
        image.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
        return np.asarray(image)

    def take(self, indices: np.ndarray) -> ImageSource:
        """The items at ``indices``, with their labels."""
        raise NotImplementedError

    def select(self, classes: Sequence[int]) -> ImageSource:
        """The items of ``classes``, relabelled ``0..len(classes)-1`` in sorted class order."""
        classes = np.sort(np.asarray(classes, dtype=np.int64))
        indices = np.flatnonzero(np.isin(self.labels, classes))
        subset = self.take(indices)
        subset.labels = np.searchsorted(classes, self.labels[indices])
        subset.class_names = [self.class_names[c] for c in classes]
        return subset

    def summary(self) -> dict[str, int]:
        return {"classes": self.num_classes, "images": len(self)}


class TensorImages(ImageSource):
    """Images held in memory as a ``(N, 3, H, W)`` uint8 tensor."""

    def __init__(self, images: torch.Tensor, labels: Any, class_names: Sequence[str]) -> None:
        super().__init__(labels, class_names)
        self.images = images

    def image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def take(self, indices: np.ndarray) -> TensorImages:
        images = self.images[torch.from_numpy(indices)]
        return TensorImages(images, self.labels[indices], self.class_names)


class FileImages(ImageSource):
    """Image files, opened with PIL when an item is read."""

    def __init__(self, paths: Sequence[Path], labels: Any, class_names: Sequence[str]) -> None:
        super().__init__(labels, class_names)
        self.paths = [Path(p) for p in paths]

    def image(self, index: int) -> Image.Image:
        return open_image(self.paths[index])

    def take(self, indices: np.ndarray) -> FileImages:
        paths = [self.paths[i] for i in indices]
        return FileImages(paths, self.labels[indices], self.class_names)


def open_image(path: Path) -> Image.Image:
    """The image at ``path``, decoded, or a :class:`DataError` naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {report.relative(path)} ({error})") from None


Crop = Union[RandomResizedCrop, CenterCrop]


class ImageDataset(torch.utils.data.Dataset):
    """PML-style items ``(image tensor, label)`` of a source, with ``labels`` and
    ``set_epoch``; a random crop is drawn per (``seed``, epoch, item)."""

    def __init__(self, source: ImageSource, crop: Crop, pixels: PixelSpec, seed: int = 0) -> None:
        self.source = source
        self.labels = source.labels
        self.crop = crop
        self.pixels = pixels
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.source.image(index)
        if isinstance(self.crop, RandomResizedCrop):
            tensor = self.crop(image, item_generator(self.seed, self.epoch, index))
        else:
            tensor = self.crop(image)
        return self.pixels(tensor), int(self.labels[index])


@dataclass
class Splits:
    """An opened dataset: what trains, what is evaluated (under ``eval_name``), and facts
    for the results (``info``: name, title, root relative to the repository, counts)."""

    train: ImageSource
    eval: ImageSource
    info: dict[str, Any]
    eval_name: str = "test"

    def hold_out_validation(self, fraction: float, seed: int) -> Splits:
        """Train on some training classes and evaluate on the others; the test classes stay
        unseen (for tuning)."""
        keys = list(range(self.train.num_classes))
        kept, held = class_split(keys, held_out_count(len(keys), fraction), seed)
        split = {"fraction": fraction, "seed": seed, "classes": held}
        info = {**self.info, "validation_split": split}
        return Splits(self.train.select(kept), self.train.select(held), info, "validation")

    def datasets(
        self, data: Any, pixels: PixelSpec, seed: int
    ) -> tuple[ImageDataset, ImageDataset]:
        """Training (augmented with ``seed``) and evaluation datasets for a recipe's ``data``."""
        crop = RandomResizedCrop(
            data.crop, tuple(data.crop_scale), tuple(data.crop_ratio), data.flip
        )
        train = ImageDataset(self.train, crop, pixels, seed)
        return train, ImageDataset(self.eval, CenterCrop(data.resize, data.crop), pixels)

    def describe(self) -> dict[str, Any]:
        return {
            **self.info,
            "train": self.train.summary(),
            self.eval_name: self.eval.summary(),
        }

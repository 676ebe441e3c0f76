"""Datasets of the runner: the one class split, the one crop, pixel conventions, the user's
folder, the paper datasets through PML (fake copies), validation splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.core import recipes
from benchmarks.core.datasets import common, folder, open_splits, paper
from benchmarks.core.errors import DataError
from benchmarks.core.transforms import (
    CAFFE_BGR,
    IMAGENET_RGB,
    CenterCrop,
    RandomResizedCrop,
    item_generator,
)

from .fakes import write_image_folder


def test_class_split_is_seeded_stable_and_disjoint() -> None:
    keys = [f"class_{i}" for i in range(10)]
    kept, held = common.class_split(keys, 3, seed=1)
    assert len(held) == 3 and len(kept) == 7 and sorted([*kept, *held]) == list(range(10))
    assert (kept, held) == common.class_split(keys, 3, seed=1)
    assert held != common.class_split(keys, 3, seed=2)[1]
    # A class keeps its side when classes are added (the order is by each key's hash).
    _, more_held = common.class_split([*keys, "class_x"], 4, seed=1)
    assert set(held) <= set(more_held)
    assert common.held_out_count(10, 0.25) == 2 and common.held_out_count(3, 0.01) == 1
    with pytest.raises(ValueError, match="cannot hold out 10 of 10"):
        common.class_split(keys, 10)


def test_random_resized_crop_stays_inside_and_is_seeded() -> None:
    crop = RandomResizedCrop(8, (0.08, 1.0), (3 / 4, 4 / 3), flip=0.5)
    for index in range(200):
        width, height, cx, cy = crop.box(item_generator(0, 1, index))
        assert 0 < width <= 1 and 0 < height <= 1
        assert cx - width >= -1 and cx + width <= 1 and cy - height >= -1 and cy + height <= 1
    tensor = torch.rand(3, 20, 30)
    picture = Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    for image in ((tensor * 255).to(torch.uint8), picture):
        first = crop(image, item_generator(0, 1, 7))
        assert first.shape == (3, 8, 8) and first.min() >= 0 and first.max() <= 1
        assert torch.equal(first, crop(image, item_generator(0, 1, 7)))
        assert not torch.equal(first, crop(image, item_generator(0, 2, 7)))


def test_the_whole_box_and_a_flip() -> None:
    """Area 1 and aspect 1: the crop is the image itself, resampled to the same size."""
    image = (torch.rand(3, 6, 6) * 255).to(torch.uint8)
    whole = RandomResizedCrop(6, (1.0, 1.0), (1.0, 1.0))(image, item_generator(0, 0, 0))
    torch.testing.assert_close(whole, image.float() / 255)
    flipped = RandomResizedCrop(6, (1.0, 1.0), (1.0, 1.0), flip=1.0)(image, item_generator(0, 0, 0))
    torch.testing.assert_close(flipped, whole.flip(2))


def test_pixel_conventions_and_centre_crop() -> None:
    image = Image.new("RGB", (40, 30), (10, 20, 30))
    caffe = CAFFE_BGR(CenterCrop(20, 16)(image))
    assert caffe.shape == (3, 16, 16)
    # BGR order, 0-255, minus the BGR means (104, 117, 128).
    torch.testing.assert_close(caffe[:, 5, 7], torch.tensor([30 - 104, 20 - 117, 10 - 128.0]))
    gray = Image.new("L", (9, 50), 51)  # converted to RGB (51, 51, 51) = 0.2
    rgb = IMAGENET_RGB(CenterCrop(12, 12)(gray))
    mean, std = torch.tensor(IMAGENET_RGB.mean), torch.tensor(IMAGENET_RGB.std)
    assert rgb.shape == (3, 12, 12)
    torch.testing.assert_close(rgb[:, 3, 4], (0.2 - mean) / std)
    tensor = torch.full((3, 24, 12), 200, dtype=torch.uint8)
    assert CenterCrop(6, 6)(tensor).shape == (3, 6, 6)


def test_folder_split_is_class_disjoint(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pictures", classes=6, per_class=3)
    (root / "class_00" / "README.txt").write_text("not an image, skipped")
    (root / ".hidden").mkdir()
    config = recipes.load_recipe("folder").dataset
    splits = folder.open_splits(config, root)
    train, test = set(splits.train.class_names), set(splits.eval.class_names)
    assert len(train) == len(test) == 3 and not train & test
    assert train | test == {f"class_{i:02d}" for i in range(6)}
    assert len(splits.train) == 9 and splits.train.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert splits.info["title"] == "pictures" and not splits.info["root"].startswith("/")
    assert folder.open_splits(config, root).train.class_names == splits.train.class_names


def test_validation_holds_out_training_classes(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pictures", classes=8, per_class=2)
    config = recipes.load_recipe("folder", ["dataset.validation_fraction=0.5"]).dataset
    plain = folder.open_splits(recipes.load_recipe("folder").dataset, root)
    splits = open_splits(config, root)
    assert splits.eval_name == "validation"
    assert set(splits.train.class_names) | set(splits.eval.class_names) == set(
        plain.train.class_names
    )
    assert not set(splits.eval.class_names) & set(plain.eval.class_names)  # tests stay unseen
    assert splits.describe()["validation"] == {"classes": 2, "images": 4}


@pytest.mark.parametrize("dataset", ["cub", "cars", "sop"])
def test_fake_paper_splits_through_pml_are_remapped(dataset: str, tmp_path: Path) -> None:
    root = paper.write_fake_dataset(dataset, tmp_path, classes=3, per_class=4)
    config = recipes.load_recipe(f"{dataset}_512").dataset
    splits = paper.open_splits(config, root)
    for source, first in zip((splits.train, splits.eval), paper.FAKE_FIRST_IDS[dataset]):
        assert source.class_names == [str(first + i) for i in range(3)]  # PML's 1-based ids
        assert source.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert source.image(3).mode == "L"  # each class's last image is grayscale
    assert splits.info["title"] == paper.DATASETS[dataset].title


def test_missing_paper_dataset_names_the_layout_and_the_download_flag(tmp_path: Path) -> None:
    (tmp_path / "cub").mkdir()
    config = recipes.load_recipe("cub_512").dataset
    with pytest.raises(DataError) as error:
        paper.open_splits(config, tmp_path / "cub")
    assert "CUB_200_2011/images.txt" in str(error.value) and "--download" in str(error.value)
    with pytest.raises(DataError, match="needs --data-root"):
        paper.open_splits(config, None)

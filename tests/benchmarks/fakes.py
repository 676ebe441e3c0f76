"""Tiny datasets and recipe overrides for the benchmark tests (no network, seconds to train)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.core.datasets import stored

EMOJI_SIZE = 12
# The emoji recipe shrunk: 12-pixel images, batches of 4, an 8-d embedding; r=0.5 so that
# 4 classes leave negatives in ProxyGML's softmax.
TINY_EMOJI = (
    "data.resize=12",
    "data.crop=12",
    "train.batch_size=4",
    "model.embedding_size=8",
    "losses.proxygml.settings.r=0.5",
)
# The paper recipes shrunk: a tiny backbone on 16-pixel crops; r=0.5 so that 3 fake classes
# leave negatives in ProxyGML's softmax.
TINY_PAPER = (
    "model.backbone=tiny",
    "model.pretrained=false",
    "data.resize=18",
    "data.crop=16",
    "train.batch_size=4",
    "train.num_workers=0",
    "train.eval_batch_size=8",
)
TINY_FOLDER = (
    "data.resize=18",
    "data.crop=16",
    "train.batch_size=4",
    "model.embedding_size=8",
    "losses.proxygml.settings.r=0.5",
)


def write_fake_emoji(out: Path, classes: int = 8, per_class: int = 3) -> Path:
    """A built-dataset folder like the builder's: one random design per class plus noise;
    even class ids train, odd ones test."""
    rng = np.random.default_rng(0)
    size = EMOJI_SIZE
    designs = rng.integers(0, 256, (classes, 1, size, size, 3))
    noise = rng.integers(-20, 21, (classes, per_class, size, size, 3))
    arrays = {
        "images": np.clip(designs + noise, 0, 255).astype(np.uint8).reshape(-1, size, size, 3),
        "labels": np.repeat(np.arange(classes), per_class),
        "vendors": np.tile(np.arange(per_class), classes),
    }
    manifest = {
        "split": {"train": list(range(0, classes, 2)), "test": list(range(1, classes, 2))},
        "classes": [{"id": i, "short_name": f"class_{i}"} for i in range(classes)],
    }
    stored.write_build(out, "emoji", arrays, manifest)
    return out


def write_image_folder(
    root: Path, classes: int = 10, per_class: int = 6, size: tuple[int, int] = (20, 24)
) -> Path:
    """``root/<class>/<n>.png``: each class a base colour plus noise, images of a few sizes."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            shape = (size[0] + 2 * (i % 2), size[1] - 2 * (i % 3), 3)
            pixels = np.clip(base + rng.integers(-30, 31, shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root

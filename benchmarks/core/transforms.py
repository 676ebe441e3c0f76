"""Image transforms of every recipe: one random resized crop, one evaluation resize, one
pixel normalisation, without torchvision.

Images arrive as PIL images (files) or as ``(3, H, W)`` uint8 tensors (datasets held in
memory, such as emoji); both leave as normalised ``(3, crop, crop)`` float32 tensors. Random
draws come from a generator seeded per (seed, epoch, item) (:func:`item_generator`), so
augmentation depends neither on DataLoader workers nor on the order items are read, and a
resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Picture = Union[Image.Image, torch.Tensor]


@dataclass(frozen=True)
class PixelSpec:
    """How a backbone wants its pixels: channel order, range and per-channel mean/std."""

    bgr: bool
    scale: float  # pixel values are 0..scale before the mean/std normalisation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """A ``(3, H, W)`` RGB float tensor in [0, 1], normalised for the backbone."""
        if self.scale != 1.0:
            image = image * self.scale
        if self.bgr:
            image = image.flip(0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        return (image - mean) / torch.tensor(self.std).view(3, 1, 1)


# Caffe-converted BN-Inception: BGR, 0-255, mean subtraction only (the official transform).
CAFFE_BGR = PixelSpec(True, 255.0, (104.0, 117.0, 128.0), (1.0, 1.0, 1.0))
IMAGENET_RGB = PixelSpec(False, 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random source of one item's augmentation in one epoch."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1)
    return torch.Generator().manual_seed(int(state[0]))


def to_unit_tensor(image: Picture) -> torch.Tensor:
    """A PIL image or a uint8 ``(3, H, W)`` tensor as RGB float32 in [0, 1]."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    return image.float() / 255.0


@dataclass(frozen=True)
class RandomResizedCrop:
    """A random box covering ``scale`` of the image's area with aspect ratio in ``ratio``
    (log-uniform), resized to ``size`` x ``size``, then a horizontal flip with probability
    ``flip``.

    The box is drawn in relative coordinates and always lies inside the image: a side that
    would stick out is cut to the image's (torchvision instead draws again). Tensors are
    resampled bilinearly with an affine sampling grid, PIL images with PIL's (antialiased)
    bilinear resize of the box.
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip: float = 0.0

    def box(self, generator: torch.Generator) -> tuple[float, float, float, float]:
        """``(width, height, cx, cy)``: relative size and centre in [-1, 1] coordinates."""
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        ratio = self.ratio
        aspect = math.exp(math.log(ratio[0]) + math.log(ratio[1] / ratio[0]) * u[1])
        width = min(1.0, math.sqrt(area * aspect))
        height = min(1.0, math.sqrt(area / aspect))
        return (
            width,
            height,
            (1.0 - width) * (2.0 * u[2] - 1.0),
            (1.0 - height) * (2.0 * u[3] - 1.0),
        )

    def __call__(self, image: Picture, generator: torch.Generator) -> torch.Tensor:
        """The crop of ``image`` as an RGB float tensor in [0, 1]."""
        width, height, cx, cy = self.box(generator)
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
            w, h = image.size
            box = (
                (cx - width + 1) / 2 * w,
                (cy - height + 1) / 2 * h,
                (cx + width + 1) / 2 * w,
                (cy + height + 1) / 2 * h,
            )
            crop = to_unit_tensor(image.resize((self.size, self.size), Image.BILINEAR, box=box))
        else:
            image = to_unit_tensor(image)
            theta = torch.tensor([[[width, 0.0, cx], [0.0, height, cy]]], dtype=image.dtype)
            grid = F.affine_grid(theta, [1, 3, self.size, self.size], align_corners=False)
            crop = F.grid_sample(image[None], grid, mode="bilinear", align_corners=False)[0]
        if self.flip and torch.rand(1, generator=generator).item() < self.flip:
            crop = crop.flip(2)
        return crop


@dataclass(frozen=True)
class CenterCrop:
    """Short side resized to ``resize`` (bilinear, antialiased), then the central ``crop``."""

    resize: int
    crop: int

    def __call__(self, image: Picture) -> torch.Tensor:
        """The crop of ``image`` as an RGB float tensor in [0, 1]."""
        width, height = image.size if isinstance(image, Image.Image) else image.shape[:0:-1]
        short = min(width, height)
        size = (round(self.resize * width / short), round(self.resize * height / short))
        if size == (width, height) == (self.crop, self.crop):
            return to_unit_tensor(image)
        if isinstance(image, Image.Image):
            tensor = to_unit_tensor(image.convert("RGB").resize(size, Image.BILINEAR))
        else:
            tensor = F.interpolate(
                to_unit_tensor(image)[None], size=size[::-1], mode="bilinear", antialias=True
            )[0]
        top, left = (size[1] - self.crop) // 2, (size[0] - self.crop) // 2
        return tensor[:, top : top + self.crop, left : left + self.crop]

"""Backbones, the pooling trunk and the embedding head, for every recipe.

* ``bn_inception``: BN-Inception (Ioffe & Szegedy, 2015) as converted from Caffe by the
  ``pretrainedmodels`` project, the backbone of the ProxyGML and Proxy-Anchor papers. The layer
  names follow that conversion (``conv1_7x7_s2``, ``inception_3a_1x1_bn``, ...) so that its
  ImageNet weights (``BN_INCEPTION_URL``, BGR 0-255 input) load as they are. The weights are
  downloaded on first use and cached by ``torch.hub`` (never at import, never in tests).
* ``resnet50``: torchvision's ImageNet ResNet-50, a modern alternative (torchvision is an
  optional dependency, imported only when this backbone is asked for).
* ``small_cnn``: four Conv3x3-BN-ReLU stages with max-pooling between them, trained from
  scratch (the emoji recipes).
* ``tiny``: two strided convolutions, a stand-in for tests (no pretrained weights).

A model is a :class:`Trunk` (backbone feature maps, global pooling, optional autocast) and an
:class:`EmbeddingHead` (``Linear(features, dim)``, then L2 normalisation unless switched off),
the ``trunk`` and ``embedder`` of PML's trainers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .transforms import CAFFE_BGR, IMAGENET_RGB, PixelSpec

LOGGER = logging.getLogger(__name__)

BN_INCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "off": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
# float16 gradients of a batch-mean loss fall below float16's smallest normal number (6e-5) in
# the early layers; PML's trainer has no GradScaler hook, so fp16 scales them by a constant.
FP16_GRAD_SCALE = 2.0**10


# ----------------------------------------------------------------------------- BN-Inception


class InceptionSpec(NamedTuple):
    """One inception block: branch widths (0: branch absent) and its pooling branch."""

    name: str
    in_channels: int
    n1x1: int
    n3x3_reduce: int
    n3x3: int
    double_reduce: int
    double_3x3: int
    pool: str  # "avg" or "max"
    pool_proj: int  # 0: the pooled input passes through unchanged
    stride: int  # 2 in the grid-reduction blocks 3c and 4e


# The Caffe model's widths; they differ from the paper's Figure 5 in places (4c-4e).
INCEPTION_BLOCKS: tuple[InceptionSpec, ...] = (
    InceptionSpec("3a", 192, 64, 64, 64, 64, 96, "avg", 32, 1),
    InceptionSpec("3b", 256, 64, 64, 96, 64, 96, "avg", 64, 1),
    InceptionSpec("3c", 320, 0, 128, 160, 64, 96, "max", 0, 2),
    InceptionSpec("4a", 576, 224, 64, 96, 96, 128, "avg", 128, 1),
    InceptionSpec("4b", 576, 192, 96, 128, 96, 128, "avg", 128, 1),
    InceptionSpec("4c", 576, 160, 128, 160, 128, 160, "avg", 128, 1),
    InceptionSpec("4d", 608, 96, 128, 192, 160, 192, "avg", 128, 1),
    InceptionSpec("4e", 608, 0, 128, 192, 192, 256, "max", 0, 2),
    InceptionSpec("5a", 1056, 352, 192, 320, 160, 224, "avg", 128, 1),
    InceptionSpec("5b", 1024, 352, 192, 320, 192, 224, "max", 128, 1),
)


class BNInception(nn.Module):
    """BN-Inception feature extractor: ``(B, 3, H, W)`` -> ``(B, 1024, H/32, W/32)``.

    Every convolution (with bias, as in Caffe) is followed by BatchNorm and ReLU. Modules are
    flat attributes named as in the converted Caffe model: ``<conv>`` and ``<conv>_bn``.
    """

    num_features = 1024

    def __init__(self) -> None:
        super().__init__()
        self._add("conv1_7x7_s2", 3, 64, 7, stride=2, padding=3)
        self._add("conv2_3x3_reduce", 64, 64, 1)
        self._add("conv2_3x3", 64, 192, 3, padding=1)
        for spec in INCEPTION_BLOCKS:
            p, c = f"inception_{spec.name}", spec.in_channels
            if spec.n1x1:
                self._add(f"{p}_1x1", c, spec.n1x1, 1)
            self._add(f"{p}_3x3_reduce", c, spec.n3x3_reduce, 1)
            self._add(f"{p}_3x3", spec.n3x3_reduce, spec.n3x3, 3, spec.stride, 1)
            self._add(f"{p}_double_3x3_reduce", c, spec.double_reduce, 1)
            self._add(f"{p}_double_3x3_1", spec.double_reduce, spec.double_3x3, 3, padding=1)
            self._add(f"{p}_double_3x3_2", spec.double_3x3, spec.double_3x3, 3, spec.stride, 1)
            if spec.pool_proj:
                self._add(f"{p}_pool_proj", c, spec.pool_proj, 1)

    def _add(
        self, name: str, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0
    ) -> None:
        self.add_module(name, nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding))
        self.add_module(f"{name}_bn", nn.BatchNorm2d(cout))

    def _unit(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.relu(getattr(self, f"{name}_bn")(getattr(self, name)(x)))

    def _block(self, spec: InceptionSpec, x: torch.Tensor) -> torch.Tensor:
        p = f"inception_{spec.name}"
        branches = [self._unit(f"{p}_1x1", x)] if spec.n1x1 else []
        branches.append(self._unit(f"{p}_3x3", self._unit(f"{p}_3x3_reduce", x)))
        double = self._unit(f"{p}_double_3x3_reduce", x)
        branches.append(self._unit(f"{p}_double_3x3_2", self._unit(f"{p}_double_3x3_1", double)))
        if spec.pool == "avg":
            pooled = F.avg_pool2d(x, 3, 1, 1, ceil_mode=True, count_include_pad=True)
        else:  # Caffe's ceil-mode pooling; padded only when it keeps the resolution
            pad = 1 if spec.stride == 1 else 0
            pooled = F.max_pool2d(x, 3, spec.stride, pad, ceil_mode=True)
        branches.append(self._unit(f"{p}_pool_proj", pooled) if spec.pool_proj else pooled)
        return torch.cat(branches, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self._unit("conv1_7x7_s2", x), 3, 2, ceil_mode=True)
        x = self._unit("conv2_3x3", self._unit("conv2_3x3_reduce", x))
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        for spec in INCEPTION_BLOCKS:
            x = self._block(spec, x)
        return x


def adapt_pretrained_state(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The ImageNet state dict ready for ``model``: classifier dropped, shapes checked.

    The converted file stores BatchNorm vectors as ``(1, C)``: tensors whose shape differs from
    the model's but whose size matches are reshaped. Raises ``ValueError`` on any missing,
    unexpected or incompatible tensor (a wrong or truncated file).
    """
    expected = model.state_dict()
    # last_linear is the 1000-way ImageNet classifier; num_batches_tracked is newer than the file.
    state = {k: v for k, v in state.items() if not k.startswith("last_linear.")}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"not a BN-Inception state dict: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    adapted = {}
    for key, value in state.items():
        shape = expected[key].shape
        if value.shape != shape:
            if value.numel() != expected[key].numel():
                raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {tuple(shape)}")
            value = value.reshape(shape)
        adapted[key] = value
    return adapted


def bn_inception(pretrained: bool = True, weights: str | Path | None = None) -> BNInception:
    """BN-Inception, with ImageNet weights from ``weights`` (a local file) or, by default,
    downloaded once from ``BN_INCEPTION_URL`` into torch.hub's cache."""
    model = BNInception()
    if pretrained:
        if weights is None:
            state = torch.hub.load_state_dict_from_url(
                BN_INCEPTION_URL, map_location="cpu", progress=True, weights_only=True
            )
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(adapt_pretrained_state(model, state), strict=False)
    return model


# ----------------------------------------------------------------------------- others


def resnet50(pretrained: bool = True, weights: str | Path | None = None) -> nn.Module:
    """torchvision's ResNet-50 up to its last convolutional stage (2048 channels)."""
    try:
        import torchvision
    except Exception as error:  # also a torchvision built for another torch fails to import
        raise ImportError(
            "the resnet50 backbone needs torchvision built for your torch "
            f"(pip install torchvision); import failed with: {error!r}. "
            "The bn_inception backbone (the paper's) does not need it."
        ) from error
    default = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    model = torchvision.models.resnet50(weights=default if pretrained and weights is None else None)
    if pretrained and weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return nn.Sequential(*list(model.children())[:-2])  # without its pooling and classifier


class TinyBackbone(nn.Sequential):
    """Two stride-2 Conv-BN-ReLU stages (16 channels): a fast stand-in for tests."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, self.num_features, 3, stride=2, padding=1),
            nn.BatchNorm2d(self.num_features),
            nn.ReLU(),
        )


class SmallCNN(nn.Sequential):
    """Conv3x3-BN-ReLU stages with 2x2 max-pooling between them; feature maps out.

    With the default widths a 48x48 image is seen at 48, 24, 12 and 6 pixels; about 34M
    multiply-adds per image.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        super().__init__(*layers)
        self.num_features = channels


def _from_scratch(module: type[nn.Module]) -> Callable[[bool, Any], nn.Module]:
    def build(pretrained: bool = False, weights: str | Path | None = None) -> nn.Module:
        if pretrained or weights is not None:
            raise ValueError(
                f"{module.__name__} has no pretrained weights: set model.pretrained=false"
            )
        return module()

    return build


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone, its number of output channels and the pixels it expects."""

    build: Callable[[bool, Any], nn.Module]  # (pretrained, weights file or None)
    num_features: int
    pixels: PixelSpec


BACKBONES: dict[str, BackboneSpec] = {
    "bn_inception": BackboneSpec(bn_inception, BNInception.num_features, CAFFE_BGR),
    "resnet50": BackboneSpec(resnet50, 2048, IMAGENET_RGB),
    "small_cnn": BackboneSpec(_from_scratch(SmallCNN), 256, IMAGENET_RGB),
    "tiny": BackboneSpec(_from_scratch(TinyBackbone), TinyBackbone.num_features, CAFFE_BGR),
}


# ----------------------------------------------------------------------------- trunk and head


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class Trunk(nn.Module):
    """Backbone feature maps, global pooling, then ``(B, num_features)`` float32 features.

    Args:
        features: the backbone (image -> feature maps).
        num_features: its number of output channels.
        pooling: ``"avg"`` (ProxyGML) or ``"avg+max"`` (Proxy-Anchor: the sum of both).
        amp: ``"off"``, ``"bf16"`` or ``"fp16"``: autocast of the backbone only; pooling, the
            head and the loss stay float32. ``"fp16"`` multiplies the gradient entering the
            backbone by ``FP16_GRAD_SCALE`` and divides the backbone's parameter gradients by
            it (a static loss scale); ``"bf16"`` needs no scaling. Not part of the state dict.
    """

    def __init__(
        self, features: nn.Module, num_features: int, pooling: str = "avg", amp: str = "off"
    ) -> None:
        super().__init__()
        if pooling not in ("avg", "avg+max"):
            raise ValueError(f"pooling must be 'avg' or 'avg+max', got {pooling!r}")
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        self.features = features
        self.num_features = num_features
        self.pooling = pooling
        self.amp = amp
        self.grad_scale = FP16_GRAD_SCALE if amp == "fp16" else 1.0
        if self.grad_scale != 1.0:
            for param in features.parameters():
                param.register_hook(lambda grad: grad / self.grad_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = AMP_DTYPES[self.amp]
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            maps = self.features(x)
        maps = maps.float()
        if self.grad_scale != 1.0 and maps.requires_grad:
            maps = _ScaleGradient.apply(maps, self.grad_scale)
        pooled = maps.mean(dim=(2, 3))
        if self.pooling == "avg+max":
            pooled = pooled + maps.amax(dim=(2, 3))
        return pooled


class EmbeddingHead(nn.Module):
    """``Linear(num_features, dim)``, then L2 normalisation if ``normalize``.

    ``init``: ``"pytorch"`` (ProxyGML: PyTorch's default Linear init) or
    ``"kaiming_fan_out"`` (Proxy-Anchor: Kaiming-normal weights, fan-out mode, zero bias).
    Without normalisation the losses and the evaluation normalise (cosine similarity).
    """

    def __init__(
        self, num_features: int, dim: int, init: str = "pytorch", normalize: bool = True
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, dim)
        self.normalize = normalize
        if init == "kaiming_fan_out":
            nn.init.kaiming_normal_(self.linear.weight, mode="fan_out")
            nn.init.zeros_(self.linear.bias)
        elif init != "pytorch":
            raise ValueError(f"init must be 'pytorch' or 'kaiming_fan_out', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embeddings = self.linear(x)
        return F.normalize(embeddings, p=2, dim=1) if self.normalize else embeddings


def build_models(
    backbone: str,
    embedding_size: int,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    pooling: str = "avg",
    embedding_init: str = "pytorch",
    normalize_embeddings: bool = True,
    amp: str = "off",
) -> tuple[Trunk, EmbeddingHead]:
    """The ``(trunk, embedder)`` pair for PML's trainers (the fields of a recipe's ``model``)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
    spec = BACKBONES[backbone]
    trunk = Trunk(spec.build(pretrained, weights), spec.num_features, pooling, amp)
    head = EmbeddingHead(spec.num_features, embedding_size, embedding_init, normalize_embeddings)
    return trunk, head

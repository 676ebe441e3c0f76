"""Backbones, trunk and embedding head: BN-Inception's layout against its ImageNet file,
shapes, local weights, mixed precision, and the emoji recipe's small CNN."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from benchmarks.core import models as backbones

STEM = {"conv1_7x7_s2": (3, 64, 7), "conv2_3x3_reduce": (64, 64, 1), "conv2_3x3": (64, 192, 3)}
# The Caffe BN-Inception's widths per block: 1x1, 3x3 reduce, 3x3, double-3x3 reduce, double
# 3x3, pool projection (0: no such conv; without a projection the pooled input passes through).
WIDTHS = {
    "3a": (64, 64, 64, 64, 96, 32),
    "3b": (64, 64, 96, 64, 96, 64),
    "3c": (0, 128, 160, 64, 96, 0),
    "4a": (224, 64, 96, 96, 128, 128),
    "4b": (192, 96, 128, 96, 128, 128),
    "4c": (160, 128, 160, 128, 160, 128),
    "4d": (96, 128, 192, 160, 192, 128),
    "4e": (0, 128, 192, 192, 256, 0),
    "5a": (352, 192, 320, 160, 224, 128),
    "5b": (352, 192, 320, 192, 224, 128),
}


def pretrained_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the ImageNet file ``bn_inception-52deb4733.pth`` and its shape, derived
    from the architecture: each conv has a weight and a bias and is followed by ``<conv>_bn``
    (weight, bias, running mean and variance); ``last_linear`` is the 1000-way classifier."""
    convs = dict(STEM)
    channels = 192
    for block, (n1, r3, n3, rd, nd, proj) in WIDTHS.items():
        p = f"inception_{block}"
        branch = {
            f"{p}_1x1": (channels, n1, 1),
            f"{p}_3x3_reduce": (channels, r3, 1),
            f"{p}_3x3": (r3, n3, 3),
            f"{p}_double_3x3_reduce": (channels, rd, 1),
            f"{p}_double_3x3_1": (rd, nd, 3),
            f"{p}_double_3x3_2": (nd, nd, 3),
            f"{p}_pool_proj": (channels, proj, 1),
        }
        convs.update({name: spec for name, spec in branch.items() if spec[1]})
        channels = n1 + n3 + nd + (proj or channels)
    assert channels == 1024
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (cin, cout, k) in convs.items():
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)
        for tensor in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}_bn.{tensor}"] = (cout,)
    shapes["last_linear.weight"], shapes["last_linear.bias"] = (1000, 1024), (1000,)
    return shapes


@pytest.fixture(scope="module")
def bn_inception() -> backbones.BNInception:
    torch.manual_seed(0)
    return backbones.bn_inception(pretrained=False)


def test_bn_inception_matches_the_pretrained_key_set(bn_inception: backbones.BNInception) -> None:
    expected = pretrained_shapes()
    assert len(expected) == 69 * 6 + 2
    state = {k: tuple(v.shape) for k, v in bn_inception.state_dict().items()}
    assert {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")} == {
        k: v for k, v in expected.items() if not k.startswith("last_linear.")
    }
    # 10.3M parameters, the published 11.3M less the 1.0M of the ImageNet classifier.
    assert sum(p.numel() for p in bn_inception.parameters()) == 10_270_240


def test_bn_inception_forward_shapes(bn_inception: backbones.BNInception) -> None:
    trunk = backbones.Trunk(bn_inception, bn_inception.num_features)
    head = backbones.EmbeddingHead(bn_inception.num_features, 512)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert bn_inception(x).shape == (2, 1024, 2, 2)  # stride 32
        embeddings = head(trunk(x))
    assert embeddings.shape == (2, 512)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))


def test_pretrained_weights_load_from_a_local_file(
    bn_inception: backbones.BNInception, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    # BatchNorm vectors stored as (1, C), as in the converted file.
    state = {k: torch.randn((1, *s) if "_bn." in k else s) for k, s in pretrained_shapes().items()}
    torch.save(state, tmp_path / "bn_inception.pth")
    model = backbones.bn_inception(weights=tmp_path / "bn_inception.pth")
    loaded = model.state_dict()
    for key in ("conv1_7x7_s2.weight", "inception_5b_pool_proj_bn.running_var"):
        torch.testing.assert_close(loaded[key], state[key].reshape(loaded[key].shape))
    del state["inception_3a_1x1.bias"]
    torch.save(state, tmp_path / "truncated.pth")
    with pytest.raises(ValueError, match="1 missing keys"):
        backbones.bn_inception(weights=tmp_path / "truncated.pth")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="has torchvision")
def test_resnet50_without_torchvision_says_what_to_install() -> None:
    with pytest.raises(ImportError, match="pip install torchvision"):
        backbones.build_models("resnet50", 512, pretrained=False)


def test_mixed_precision_trunk_gradients_match_float32() -> None:
    x = torch.randn(4, 3, 32, 32)
    grads = {}
    for amp in ("off", "bf16", "fp16"):
        torch.manual_seed(0)
        trunk, head = backbones.build_models("tiny", 8, pretrained=False, amp=amp)
        out = head(trunk(x))
        assert out.dtype == torch.float32
        out[:, 0].sum().backward()
        grads[amp] = trunk.features[0].weight.grad
    for amp, tolerance in (("bf16", 0.3), ("fp16", 0.02)):  # fp16: scaled, then unscaled
        error = (grads[amp] - grads["off"]).norm() / grads["off"].norm()
        assert error < tolerance, amp


def test_small_cnn_trunk_and_unnormalised_head() -> None:
    torch.manual_seed(0)
    trunk, head = backbones.build_models("small_cnn", 16, normalize_embeddings=False)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        maps = trunk.features(x)
        assert maps.shape == (2, 256, 6, 6)  # 48, 24, 12, 6 pixels
        embeddings = head(trunk(x))
    assert embeddings.shape == (2, 16)
    assert not torch.allclose(embeddings.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="no pretrained weights"):
        backbones.build_models("small_cnn", 16, pretrained=True)

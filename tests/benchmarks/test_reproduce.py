"""The paper-reproduction kit on tiny fake data: recipes, data, backbones, the full command with
resume, the results table and the throughput mode. (Recall@K and NMI themselves are checked
against independent computations in tests/test_evaluation.py.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import backbones, paper_data, reproduce, training

DATASETS = ("cub", "cars", "sop")
# A tiny backbone on 16-pixel crops, 4 epochs: evaluated after 1 and 4 (and 2, where the
# warm-up freezing of epoch 2 ends); r=0.5 so that 3 fake classes leave negatives in the softmax.
TINY = (
    "model.backbone=tiny",
    "model.pretrained=false",
    "data.resize=18",
    "data.crop=16",
    "train.batch_size=4",
    "train.num_workers=0",
    "train.eval_batch_size=8",
    "train.milestones=[2]",
    "train.eval_epochs=1,4",
    "train.frozen_trunk_epochs=2",
    "losses.proxygml.r=0.5",
)


def command(dataset: str, data: Path, results: Path, epochs: int, *extra: str) -> list[str]:
    return [
        *("--dataset", dataset, "--dim", "64", "--loss", "proxygml"),
        *("--data-root", str(data), "--results-dir", str(results), *extra),
        *("--set", *TINY, f"train.epochs={epochs}"),
    ]


def checkpoint_of(results: Path, dataset: str) -> dict[str, Any]:
    path = results / "runs" / f"{dataset}_64" / "proxygml_seed0" / "checkpoints" / "checkpoint.pt"
    return training.load_checkpoint(path)


def parameters(checkpoint: dict[str, Any], model: str) -> dict[str, torch.Tensor]:
    state = checkpoint["models"][model]
    return {k: v for k, v in state.items() if "running" not in k and "batches" not in k}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- recipes


def test_recipes_hold_the_official_values() -> None:
    names = sorted(p.stem for p in reproduce.RECIPES_DIR.glob("*.json"))
    expected = [f"{d}_{n}" for d in ("cars", "cub") for n in (384, 512, 64)]
    expected += [f"proxyanchor_{d}_512" for d in ("cars", "cub", "sop")]
    assert names == sorted([*expected, "sop_384", "sop_512", "sop_64"])
    for name in names:
        assert reproduce.load_recipe(name).name == name

    cub = reproduce.load_recipe("cub_512")
    assert (cub.model.backbone, cub.model.pooling, cub.model.embedding_size) == (
        "bn_inception",
        "avg",
        512,
    )
    assert cub.losses["proxygml"] == {"proxies_per_class": 12, "r": 0.05, "weight_lambda": 0.3}
    t = cub.train
    assert (t.epochs, t.batch_size, t.milestones, t.gamma) == (50, 32, (19, 39), 0.1)
    assert t.backbone_optimizer == {"name": "adam", "lr": 1e-4, "weight_decay": 1e-4, "eps": 0.01}
    assert t.loss_optimizer == {"name": "adam", "lr": 0.03, "weight_decay": 1e-4, "eps": 0.01}
    assert t.freeze_trunk_batchnorm
    assert reproduce.parse_epochs(t.frozen_trunk_epochs) == (2,)
    assert reproduce.parse_epochs(t.eval_epochs) == (1, 2, *range(35, 51))
    assert (cub.data.resize, cub.data.crop, cub.data.flip) == (256, 224, 0.5)

    sop = reproduce.load_recipe("sop_512")
    assert sop.losses["proxygml"] == {"proxies_per_class": 1, "r": 0.05, "weight_lambda": 0.0}
    assert sop.train.loss_optimizer["lr"] == 0.3 and not sop.train.freeze_trunk_batchnorm
    assert (reproduce.load_recipe("cars_512").train_classes, sop.train_classes) == (98, 11318)

    # 64 and 384 dimensions: the 512-d recipe with another embedding size.
    for dim in (64, 384):
        other = reproduce.load_recipe(f"cub_{dim}")
        assert other.model.embedding_size == dim
        assert (other.train, other.data, other.losses) == (cub.train, cub.data, cub.losses)

    anchor = reproduce.load_recipe("proxyanchor_cub_512")
    assert anchor.losses == {"proxyanchor": {"margin": 0.1, "alpha": 32}}
    assert (anchor.model.pooling, anchor.train.batch_size, anchor.train.epochs) == (
        "avg+max",
        180,
        60,
    )
    assert anchor.train.loss_optimizer["lr"] == pytest.approx(100 * 1e-4)


def test_overrides_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    reproduce.main(
        [
            *("--dataset", "cub", "--dim", "512", "--show", "--seed", "3", "--set"),
            *("train.epochs=30", "losses.proxygml.r=0.1", "train.gamma=1"),
            *("model.weights=/tmp/bn.pth", "train.eval_epochs=5", "losses.proxyanchor.alpha=16"),
        ]
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["epochs"] == 30 and shown["train"]["seed"] == 3
    assert shown["train"]["gamma"] == 1.0 and shown["train"]["eval_epochs"] == "5"
    assert shown["losses"]["proxygml"]["r"] == 0.1
    assert shown["losses"]["proxyanchor"]["alpha"] == 16
    assert shown["model"]["weights"] == "/tmp/bn.pth"

    bad = {
        "train.epoch=3": "unknown key 'epoch'",
        "trian.epochs=3": "no 'trian'",
        "train.epochs=many": "not a JSON value",
        "train.epochs=2.5": "expected a int",
        "model.pretrained=1": "expected a bool",
        "train.eval_epochs=3-1": "bad epoch range",
        "model.backbone=vgg": "model.backbone must be one of",
        "train": "expected KEY=VALUE",
    }
    for override, message in bad.items():
        with pytest.raises(ValueError, match=message):
            reproduce.load_recipe("cub_512", [override])
    with pytest.raises(FileNotFoundError, match="known recipes: cars_384"):
        reproduce.load_recipe("cub_1024")
    with pytest.raises(ValueError, match="no settings for loss 'proxygml'"):
        reproduce.main(["--recipe", "proxyanchor_cub_512", "--loss", "proxygml", "--show"])
    with pytest.raises(ValueError, match="is for cub, 512-d"):
        reproduce.main(["--recipe", "cub_512", "--dim", "64", "--show"])


def test_plan_segments_evaluates_and_freezes_where_asked() -> None:
    S = reproduce.Segment
    official = reproduce.plan_segments(50, (1, 2, *range(35, 51)), (2,))
    assert official == [
        S(1, True, False),
        S(2, True, True),
        S(35, False, False),
        S(50, True, False),
    ]
    # The harness evaluates every epoch of an eval_all segment and only the last otherwise.
    evaluated, frozen, previous = [], [], 0
    for segment in official:
        epochs = range(previous + 1, segment.last + 1)
        evaluated += list(epochs) if segment.eval_all else [segment.last]
        frozen += list(epochs) if segment.frozen else []
        previous = segment.last
    assert evaluated == [1, 2, *range(35, 51)] and frozen == [2]
    assert reproduce.plan_segments(60, range(1, 61), (1,)) == [S(1, True, True), S(60, True, False)]
    assert reproduce.plan_segments(5, (), ()) == [S(5, False, False)]
    assert reproduce.parse_epochs(" 3, 1-2 ,") == (1, 2, 3) and reproduce.parse_epochs("") == ()


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("dataset", DATASETS)
def test_fake_splits_through_pml_are_remapped(dataset: str, tmp_path: Path) -> None:
    root = paper_data.write_fake_dataset(dataset, tmp_path, classes=3, per_class=4)
    first_ids = paper_data.FAKE_FIRST_IDS[dataset]
    transform = paper_data.EvalTransform(paper_data.CAFFE_BGR, resize=18, crop=16)
    for split, first in zip(("train", "test"), first_ids):
        data = paper_data.load_split(dataset, root, split, transform)
        assert list(data.classes) == [first, first + 1, first + 2]  # PML's 1-based ids
        assert data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        image, label = data[3]  # each class's last image is grayscale
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 0


def test_missing_dataset_names_the_layout_and_the_download_flag(tmp_path: Path) -> None:
    (tmp_path / "cub").mkdir()
    with pytest.raises(paper_data.DatasetNotFoundError) as error:
        paper_data.load_split("cub", tmp_path / "cub", "train", lambda image: image)
    message = str(error.value)
    assert "CUB_200_2011/images.txt" in message and "--download" in message
    with pytest.raises(paper_data.DatasetNotFoundError, match=r"Ebay_train\.txt"):
        reproduce.main(command("sop", tmp_path / "nowhere", tmp_path / "results", 1))
    assert not (tmp_path / "results" / "runs").exists()  # a failed start leaves no run folder


def test_transforms_follow_the_pixel_conventions() -> None:
    image = Image.new("RGB", (40, 30), (10, 20, 30))
    caffe = paper_data.EvalTransform(paper_data.CAFFE_BGR, resize=20, crop=16)(image)
    assert caffe.shape == (3, 16, 16)
    # BGR order, 0-255, minus the BGR means (104, 117, 128).
    torch.testing.assert_close(caffe[:, 5, 7], torch.tensor([30 - 104, 20 - 117, 10 - 128.0]))
    gray = Image.new("L", (9, 50), 51)  # converted to RGB (51, 51, 51) = 0.2
    rgb = paper_data.TrainTransform(paper_data.IMAGENET_RGB, crop=12)(gray)
    assert rgb.shape == (3, 12, 12)
    mean, std = (
        torch.tensor(paper_data.IMAGENET_RGB.mean),
        torch.tensor(paper_data.IMAGENET_RGB.std),
    )
    torch.testing.assert_close(rgb[:, 3, 4], (0.2 - mean) / std)

    torch.manual_seed(0)
    for width, height in ((40, 30), (9, 50), (300, 20)):
        for _ in range(50):
            left, top, w, h = paper_data.random_resized_box(
                width, height, (0.08, 1), (3 / 4, 4 / 3)
            )
            assert 0 <= left <= width - w and 0 <= top <= height - h and w > 0 and h > 0


# ----------------------------------------------------------------------------- backbones

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


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("dataset", DATASETS)
def test_full_command_trains_evaluates_and_resumes(dataset: str, tmp_path: Path) -> None:
    data = paper_data.write_fake_dataset(dataset, tmp_path / "data")
    results = tmp_path / "results"
    amp = ("--amp", "bf16") if dataset == "cars" else ()

    reproduce.main(command(dataset, data, results, 1, *amp))
    after_1 = checkpoint_of(results, dataset)
    reproduce.main(command(dataset, data, results, 2, *amp))  # resumes; epoch 2 is warm-up
    after_2 = checkpoint_of(results, dataset)
    entry = reproduce.main(command(dataset, data, results, 4, *amp))
    after_4 = checkpoint_of(results, dataset)
    assert entry is not None and entry["finished"] and entry["epochs_done"] == 4

    # Warm-up: epoch 2 leaves the trunk's parameters alone and trains the head.
    assert same(parameters(after_1, "trunk"), parameters(after_2, "trunk"))
    assert not same(parameters(after_1, "embedder"), parameters(after_2, "embedder"))
    assert not same(parameters(after_2, "trunk"), parameters(after_4, "trunk"))
    bn_mean = after_4["models"]["trunk"]["features.1.running_mean"]
    assert torch.equal(bn_mean, torch.zeros(8)) == (dataset != "sop")  # frozen BN but on SOP
    assert after_4["schedulers"]["trunk_scheduler_by_epoch"]["last_epoch"] == 4

    # Evaluated after epochs 1 and 4, and 2 (where the warm-up ends), not 3.
    run_dir = results / "runs" / f"{dataset}_64" / "proxygml_seed0"
    rows = json.loads((run_dir / training.RESULTS_JSON).read_text())["rows"]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert [row["epoch"] for row in rows if "recall_at_1" in row] == [1, 2, 4]
    ks = (1, 10, 100, 1000) if dataset == "sop" else (1, 2, 4, 8)
    metrics = {f"recall_at_{k}" for k in ks} | {"NMI", "mean_average_precision_at_r"}
    assert metrics <= entry["final"].keys() and entry["final"]["epoch"] == 4
    assert [e["epoch"] for e in entry["evaluations"]] == [1, 2, 4]
    assert all(0 <= entry["final"][m] <= 1 for m in metrics)
    log = (run_dir / reproduce.LOG_NAME).read_text()
    assert "resuming after epoch 2" in log and "(trunk frozen)" in log
    assert (run_dir / "checkpoints" / ".gitignore").read_text() == "*\n"

    # One entry per run in the results file (replaced on resume), with the environment.
    saved = json.loads((results / f"{dataset}_64_proxygml.json").read_text())["runs"]
    assert len(saved) == 1 and saved[0]["final"] == entry["final"]
    assert saved[0]["config"]["amp"] == ("bf16" if amp else "off")
    assert {"torch", "git_commit", "machine"} <= saved[0]["environment"].keys()
    assert saved[0]["config"]["recipe"]["train"]["epochs"] == 4

    # A finished run is skipped; other settings in the same folder are refused.
    assert reproduce.main(command(dataset, data, results, 4, *amp))["final"] == entry["final"]
    with pytest.raises(ValueError, match="other settings"):
        reproduce.main(command(dataset, data, results, 4, *amp, "--seed", "0", "--amp", "fp16"))

    if dataset == "cub":  # resuming reproduces an uninterrupted run bit for bit (CPU)
        straight = reproduce.main(command(dataset, data, tmp_path / "straight", 4))
        again = checkpoint_of(tmp_path / "straight", dataset)
        assert straight is not None and straight["final"] == entry["final"]
        for model in ("trunk", "embedder"):
            assert same(again["models"][model], after_4["models"][model])
        assert torch.equal(again["loss"]["proxies"], after_4["loss"]["proxies"])


def test_proxyanchor_paper_recipe_runs(tmp_path: Path) -> None:
    data = paper_data.write_fake_dataset("cub", tmp_path / "data")
    tiny = [o for o in TINY if not o.startswith(("losses.", "train.eval", "train.frozen"))]
    entry = reproduce.main(
        [
            *("--recipe", "proxyanchor_cub_512", "--loss", "proxyanchor"),
            *("--data-root", str(data), "--results-dir", str(tmp_path / "results")),
            *("--set", *tiny, "train.epochs=2"),
        ]
    )
    assert entry is not None and entry["finished"] and entry["recipe"] == "proxyanchor_cub_512"
    assert [e["epoch"] for e in entry["evaluations"]] == [1, 2]  # every epoch, as its code
    assert (tmp_path / "results" / "cub_512_proxyanchor.json").exists()


def test_results_table(tmp_path: Path) -> None:
    def run(recipe: str, r1: float, finished: bool = True, run_dir: str = "a") -> dict[str, Any]:
        metrics = {"NMI": 0.7, "recall_at_1": r1, "recall_at_2": 0.8, "recall_at_4": 0.9}
        return {
            "recipe": recipe,
            "seed": 0,
            "finished": finished,
            "run_dir": run_dir,
            "final": {"epoch": 50, **metrics},
            "best": {"epoch": 41, **metrics, "recall_at_1": r1 + 0.01},
        }

    gml = reproduce.results_file(tmp_path, "cub", 512, "proxygml")
    reproduce.record_run(gml, run("cub_512", 0.5))
    reproduce.record_run(gml, run("cub_512", 0.6))  # the same run again: replaced
    reproduce.record_run(gml, run("cub_512", 0.1, finished=False, run_dir="b"))  # not shown
    anchor = reproduce.results_file(tmp_path, "cub", 512, "proxyanchor")
    reproduce.record_run(anchor, run("proxyanchor_cub_512", 0.65))
    assert len(json.loads(gml.read_text())["runs"]) == 2

    table = reproduce.results_table(tmp_path)
    lines = table.splitlines()
    assert lines[0] == "### CUB-200-2011"
    assert "| Dim | Method | Source | NMI | R@1 | R@2 | R@4 |" in lines
    assert "| 512 | ProxyGML | paper | 69.8 | 66.6 | 77.6 | 86.4 |" in lines
    ours = next(line for line in lines if "recipe `cub_512`, seed 0" in line)
    assert ours.startswith("| 512 | ProxyGML |") and "| 60.0 / 61.0 |" in ours
    assert "| 512 | ProxyAnchor | paper | — | 68.4 | — | — |" in lines
    assert any("`proxyanchor_cub_512`, seed 0" in line and "65.0 / 66.0" in line for line in lines)
    assert "| 512 | ProxyAnchor | ours, recipe `cub_512`: not run yet | — | — | — | — |" in lines
    assert "| 64 | ProxyGML | paper | 89.8 | 76.2 | 89.4 | 95.4 |" in lines  # SOP
    assert "| NMI | R@1 | R@10 | R@100 |" in table


def test_synthetic_throughput(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reproduce.main(
        [
            *("--synthetic", "--dataset", "cub", "--dim", "512", "--results-dir", str(tmp_path)),
            *("--iterations", "2", "--warmup", "1", "--set", *TINY[:6]),
        ]
    )
    saved = json.loads((tmp_path / "throughput_cub_512_off.json").read_text())
    assert [row["loss"] for row in saved["rows"]] == ["proxygml", "proxyanchor"]
    for row in saved["rows"]:
        assert row["images_per_second"] > 0 and row["batch_size"] == 4
        assert row["classes"] == 100 and row["peak_gpu_memory_gib"] is None
    assert "| proxygml | 4 | 100 |" in capsys.readouterr().out
    assert np.isfinite([row["seconds_per_iteration"] for row in saved["rows"]]).all()

"""The training harness on a tiny fake emoji dataset: results, checkpoints, resume, refusal of
corrupt and foreign checkpoints, schedule (evaluation and frozen-trunk epochs) in one call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses
from torch import nn

from benchmarks.core import harness
from benchmarks.core.datasets import emoji
from benchmarks.core.datasets.common import ImageDataset
from benchmarks.core.errors import CheckpointError
from benchmarks.core.transforms import IMAGENET_RGB, CenterCrop, RandomResizedCrop

from .fakes import EMOJI_SIZE, write_fake_emoji

EMBEDDING = 6
METRICS = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "NMI")
METRICS = (*METRICS, "mean_average_precision_at_r")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_emoji(tmp_path_factory.mktemp("emoji"))


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C in the middle of an epoch."""


class CountingDataset(torch.utils.data.Dataset):
    """Counts item reads; raises ``Interrupted`` at read number ``fail_at``."""

    def __init__(self, dataset: ImageDataset, fail_at: int | None = None) -> None:
        self.dataset = dataset
        self.labels = dataset.labels
        self.fail_at = fail_at
        self.reads = 0

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        if self.reads == self.fail_at:
            raise Interrupted
        return self.dataset[idx]


def splits(data: Path) -> tuple[ImageDataset, ImageDataset]:
    opened = emoji.open_splits(None, data)
    crop = RandomResizedCrop(EMOJI_SIZE, (0.8, 1.0), (3 / 4, 4 / 3))
    train = ImageDataset(opened.train, crop, IMAGENET_RGB, seed=3)
    return train, ImageDataset(opened.eval, CenterCrop(EMOJI_SIZE, EMOJI_SIZE), IMAGENET_RGB)


def plan(epochs: int = 2, lr: float = 1e-2, **changes: object) -> harness.TrainPlan:
    settings = {
        "epochs": epochs,
        "batch_size": 4,
        "backbone_optimizer": harness.OptimizerSpec("adam", lr, weight_decay=1e-4),
        "loss_optimizer": harness.OptimizerSpec("adam", 100 * lr, weight_decay=1e-4, eps=0.01),
        "milestones": (1,),
        "seed": 3,
        "eval_epochs": tuple(range(1, epochs + 1)),
        **changes,
    }
    return harness.TrainPlan(**settings)


def models(embedding: int = EMBEDDING) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return trunk, nn.Linear(4, embedding)


def run(
    data: Path,
    out: Path,
    fail_at: int | None = None,
    identity: dict | None = None,
    embedding: int = EMBEDDING,
    **plan_changes: object,
) -> tuple[harness.RunResult, CountingDataset]:
    """Build everything as a caller does (seeded) and train; returns the result and the
    training set, whose ``reads`` counts the items this call trained on."""
    trunk, embedder = models(embedding)
    train, test = splits(data)
    train_set = CountingDataset(train, fail_at)
    loss = losses.ProxyAnchorLoss(train.source.num_classes, embedding)
    result = harness.train_and_evaluate(
        trunk,
        embedder,
        loss,
        train_set,
        test,
        plan(**plan_changes),
        out,
        identity=identity or {"loss": "proxyanchor"},
        info={"loss": "proxyanchor"},
    )
    return result, train_set


def weights(out: Path) -> dict[str, torch.Tensor]:
    checkpoint = harness.load_checkpoint(out / harness.CHECKPOINT_NAME)
    flat = {f"loss.{k}": v for k, v in checkpoint["loss"].items()}
    for model, state in checkpoint["models"].items():
        flat.update({f"{model}.{k}": v for k, v in state.items()})
    return flat


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> harness.RunResult:
    return run(data, tmp_path_factory.mktemp("uninterrupted"))[0]


def test_results_and_checkpoint(uninterrupted: harness.RunResult) -> None:
    out = uninterrupted.out_dir
    assert uninterrupted.trained_epochs == [1, 2]
    saved = json.loads((out / harness.RESULTS_JSON).read_text())
    assert {"environment", "run", "plan", "epochs_done", "finished", "rows"} <= saved.keys()
    assert saved["finished"] is True and saved["epochs_done"] == 2
    assert saved["run"] == {"loss": "proxyanchor"}
    assert harness.TrainPlan.from_dict(saved["plan"]) == plan()
    assert [row["epoch"] for row in saved["rows"]] == [1, 2]
    for row in saved["rows"]:
        assert {*harness.RUN_COLUMNS, *METRICS} <= row.keys()
        assert all(0 <= row[m] <= 1 for m in METRICS)
        assert row["train_seconds"] > 0 and row["eval_seconds"] > 0
        assert row["load_average"] >= 0
    first, second = saved["rows"]
    assert second["cumulative_seconds"] == pytest.approx(
        first["train_seconds"] + second["train_seconds"]
    )
    # The lr in force during each epoch: milestone 1 decays it after the first.
    assert (first["lr"], second["lr"]) == pytest.approx((1e-2, 1e-3))
    header = (out / harness.RESULTS_CSV).read_text().splitlines()[0].split(",")
    assert header == [*harness.RUN_COLUMNS, *METRICS]

    checkpoint = harness.load_checkpoint(out / harness.CHECKPOINT_NAME)
    assert checkpoint["epoch"] == 2 and checkpoint["format"] == harness.CHECKPOINT_FORMAT
    assert checkpoint["identity"] == {"loss": "proxyanchor"}
    assert checkpoint["models"].keys() == {"trunk", "embedder"}
    assert "proxies" in checkpoint["loss"]
    assert checkpoint["optimizers"].keys() == {
        "trunk_optimizer",
        "embedder_optimizer",
        "metric_loss_optimizer",
    }
    assert checkpoint["schedulers"]["metric_loss_scheduler_by_epoch"]["last_epoch"] == 2
    assert {"python", "numpy", "torch"} <= checkpoint["rng"].keys()
    assert checkpoint["rows"] == saved["rows"]


def test_extending_a_finished_run_trains_only_the_new_epoch(
    data: Path, tmp_path: Path, uninterrupted: harness.RunResult
) -> None:
    first, _ = run(data, tmp_path, epochs=1)
    assert first.trained_epochs == [1]
    second, train_set = run(data, tmp_path, epochs=2)
    assert second.resumed_from == 1 and second.trained_epochs == [2]
    # One epoch of reads: full batches of 4 out of 12 training images.
    assert train_set.reads == len(train_set) // 4 * 4
    assert second.rows[0] == first.rows[0]
    # CPU training is deterministic for a fixed thread count, so resuming reproduces the
    # uninterrupted run bit for bit: weights, proxies and the metrics of epoch 2.
    assert_same_weights(tmp_path, uninterrupted.out_dir)
    for metric in METRICS:
        assert second.final[metric] == uninterrupted.final[metric]


def test_resume_after_a_crash_in_the_middle_of_an_epoch(
    data: Path, tmp_path: Path, uninterrupted: harness.RunResult
) -> None:
    # 12 training images: reads 1-12 are epoch 1, the crash comes in epoch 2.
    with pytest.raises(Interrupted):
        run(data, tmp_path, fail_at=12 + 3)
    assert harness.load_checkpoint(tmp_path / harness.CHECKPOINT_NAME)["epoch"] == 1
    resumed, _ = run(data, tmp_path)
    assert resumed.resumed_from == 1 and resumed.trained_epochs == [2]
    assert_same_weights(tmp_path, uninterrupted.out_dir)


def test_finished_run_is_skipped(data: Path, tmp_path: Path) -> None:
    first, _ = run(data, tmp_path, epochs=1)
    files = [tmp_path / harness.CHECKPOINT_NAME, tmp_path / harness.RESULTS_JSON]
    before = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    again, train_set = run(data, tmp_path, epochs=1)
    assert again.trained_epochs == [] and train_set.reads == 0
    assert again.rows == first.rows
    assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before


def test_finished_run_repairs_results_a_crash_left_behind(data: Path, tmp_path: Path) -> None:
    first, _ = run(data, tmp_path, epochs=1)
    (tmp_path / harness.RESULTS_JSON).unlink()  # killed after the checkpoint, before results
    _, train_set = run(data, tmp_path, epochs=1)
    assert train_set.reads == 0
    saved = json.loads((tmp_path / harness.RESULTS_JSON).read_text())
    assert saved["rows"] == first.rows and saved["finished"] is True


def test_another_plan_is_refused(data: Path, tmp_path: Path) -> None:
    run(data, tmp_path, epochs=1)
    with pytest.raises(CheckpointError, match="backbone_optimizer"):
        run(data, tmp_path, epochs=2, lr=1e-3)
    with pytest.raises(CheckpointError, match="epoch 1 was evaluated"):
        run(data, tmp_path, epochs=2, eval_epochs=(2,))


def test_corrupt_checkpoint_is_refused(data: Path, tmp_path: Path) -> None:
    run(data, tmp_path, epochs=1)
    checkpoint = tmp_path / harness.CHECKPOINT_NAME
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # a torn copy
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        run(data, tmp_path, epochs=2)
    torch.save({"epoch": 1}, checkpoint)
    with pytest.raises(CheckpointError, match="not a checkpoint of this harness"):
        run(data, tmp_path, epochs=2)
    malformed = dict.fromkeys(harness.CHECKPOINT_KEYS, 0) | {"format": harness.CHECKPOINT_FORMAT}
    torch.save(malformed, checkpoint)
    with pytest.raises(CheckpointError, match="is malformed"):
        run(data, tmp_path, epochs=2)


def test_foreign_checkpoint_is_refused_before_anything_loads(data: Path, tmp_path: Path) -> None:
    run(data, tmp_path, epochs=1)
    with pytest.raises(CheckpointError, match="loss: saved 'proxyanchor', now 'proxygml'"):
        run(data, tmp_path, epochs=2, identity={"loss": "proxygml"})
    with pytest.raises(CheckpointError, match="seed: saved 3, now 4"):
        run(data, tmp_path, epochs=2, seed=4)
    # Same identity, other layout: the embedder (and the proxies) have another size. The
    # trunk fits, but nothing may be loaded into it before the refusal.
    trunk, embedder = models(embedding=EMBEDDING + 1)
    fresh = {k: v.clone() for k, v in trunk.state_dict().items()}
    train, test = splits(data)
    with pytest.raises(
        CheckpointError, match=r"embedder\.weight: saved \(6, 4\), expected \(7, 4\)"
    ):
        harness.train_and_evaluate(
            trunk,
            embedder,
            losses.ProxyAnchorLoss(train.source.num_classes, EMBEDDING + 1),
            train,
            test,
            plan(epochs=2),
            tmp_path,
            identity={"loss": "proxyanchor"},
        )
    assert all(torch.equal(fresh[k], v) for k, v in trunk.state_dict().items())


def test_frozen_trunk_and_evaluation_epochs_in_one_call(data: Path, tmp_path: Path) -> None:
    one, _ = run(data, tmp_path / "one", epochs=1)
    result, _ = run(data, tmp_path / "three", epochs=3, eval_epochs=(1,), frozen_trunk_epochs=(2,))
    assert result.trained_epochs == [1, 2, 3]
    assert [row["epoch"] for row in result.rows if "recall_at_1" in row] == [1, 3]
    # The trunk's parameters after the frozen epoch 2 equal those after epoch 1; the
    # embedder trained.
    saved = harness.load_checkpoint(tmp_path / "one" / harness.CHECKPOINT_NAME)
    frozen_plan = plan(epochs=2, eval_epochs=(1,), frozen_trunk_epochs=(2,))
    trunk, embedder = models()
    train, test = splits(data)
    harness.train_and_evaluate(
        trunk,
        embedder,
        losses.ProxyAnchorLoss(train.source.num_classes, EMBEDDING),
        train,
        test,
        frozen_plan,
        tmp_path / "two",
        identity={"loss": "proxyanchor"},
    )
    after = harness.load_checkpoint(tmp_path / "two" / harness.CHECKPOINT_NAME)
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.equal(after["models"]["trunk"][name], saved["models"]["trunk"][name])
    assert not torch.equal(
        after["models"]["embedder"]["weight"], saved["models"]["embedder"]["weight"]
    )
    assert one.rows[0]["recall_at_1"] == result.rows[0]["recall_at_1"]


def test_loss_with_parameters_needs_a_loss_optimizer(data: Path, tmp_path: Path) -> None:
    train, test = splits(data)
    with pytest.raises(ValueError, match="loss optimizer"):
        harness.train_and_evaluate(
            nn.Flatten(),
            nn.Linear(3 * EMOJI_SIZE * EMOJI_SIZE, EMBEDDING),
            losses.ProxyAnchorLoss(4, EMBEDDING),
            train,
            test,
            plan(loss_optimizer=None),
            tmp_path,
        )


def test_m_per_class_sampler_gives_about_one_pass_per_epoch(data: Path, tmp_path: Path) -> None:
    train, test = splits(data)
    train_set = CountingDataset(train)
    result = harness.train_and_evaluate(
        nn.Flatten(),
        nn.Linear(3 * EMOJI_SIZE * EMOJI_SIZE, EMBEDDING),
        losses.TripletMarginLoss(),  # no parameters: no loss optimizer needed
        train_set,
        test,
        plan(epochs=1, sampler="m_per_class", m_per_class=2, loss_optimizer=None),
        tmp_path,
    )
    assert result.trained_epochs == [1]
    assert train_set.reads == 12


def test_augmentation_is_seeded_per_item_and_epoch(data: Path) -> None:
    train, _ = splits(data)
    first = train[2][0]
    assert torch.equal(first, splits(data)[0][2][0])  # same seed, epoch and item
    train.set_epoch(1)
    assert not torch.equal(first, train[2][0])
    assert np.array_equal(train.labels, np.repeat(np.arange(4), 3))

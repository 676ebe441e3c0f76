"""The shared training harness on a tiny fake emoji dataset: results, checkpoints, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses
from torch import nn

from benchmarks import training
from benchmarks.datasets import emoji

CLASSES = 8
PER_CLASS = 3
SIZE = 12
EMBEDDING = 6


def write_fake_emoji(out: Path, classes: int = CLASSES, per_class: int = PER_CLASS) -> Path:
    """A built-dataset folder like the builder's: one random design per class plus noise;
    even class ids train, odd ones test."""
    rng = np.random.default_rng(0)
    designs = rng.integers(0, 256, (classes, 1, SIZE, SIZE, 3))
    noise = rng.integers(-20, 21, (classes, per_class, SIZE, SIZE, 3))
    arrays = {
        "images": np.clip(designs + noise, 0, 255).astype(np.uint8).reshape(-1, SIZE, SIZE, 3),
        "labels": np.repeat(np.arange(classes), per_class),
        "vendors": np.tile(np.arange(per_class), classes),
    }
    manifest = {
        "split": {"train": list(range(0, classes, 2)), "test": list(range(1, classes, 2))},
        "classes": [{"id": i, "short_name": f"class_{i}"} for i in range(classes)],
    }
    emoji.write_dataset(arrays, manifest, out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_emoji(tmp_path_factory.mktemp("emoji"))


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C in the middle of an epoch."""


class CountingDataset(torch.utils.data.Dataset):
    """Counts item reads; raises ``Interrupted`` at read number ``fail_at``."""

    def __init__(self, dataset: emoji.EmojiDataset, fail_at: int | None = None) -> None:
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


def recipe(epochs: int = 2, lr: float = 1e-2) -> training.Recipe:
    return training.Recipe(
        epochs=epochs,
        batch_size=4,
        backbone=training.OptimizerSpec("adam", lr, weight_decay=1e-4),
        loss=training.OptimizerSpec("adam", 100 * lr, weight_decay=1e-4, eps=0.01),
        milestones=(1,),
        seed=3,
    )


def run(
    data: Path, out: Path, epochs: int = 2, lr: float = 1e-2, fail_at: int | None = None
) -> tuple[training.RunResult, CountingDataset]:
    """Build everything as a caller does (seeded) and train; returns the result and the
    training set, whose ``reads`` counts the items this call trained on."""
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    embedder = nn.Linear(4, EMBEDDING)
    train_set = CountingDataset(emoji.EmojiDataset(data, "train", augment=True), fail_at)
    loss = losses.ProxyAnchorLoss(training.num_classes(train_set), EMBEDDING)
    result = training.train_and_evaluate(
        trunk,
        embedder,
        loss,
        train_set,
        emoji.EmojiDataset(data, "test"),
        recipe(epochs, lr),
        out,
        info={"loss": "proxyanchor"},
    )
    return result, train_set


def weights(out: Path) -> dict[str, torch.Tensor]:
    checkpoint = training.load_checkpoint(out / training.CHECKPOINT_NAME)
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
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> training.RunResult:
    return run(data, tmp_path_factory.mktemp("uninterrupted"))[0]


def test_results_and_checkpoint(uninterrupted: training.RunResult) -> None:
    out = uninterrupted.out_dir
    assert uninterrupted.trained_epochs == [1, 2]
    saved = json.loads((out / training.RESULTS_JSON).read_text())
    assert {"environment", "run", "recipe", "epochs_done", "finished", "rows"} <= saved.keys()
    assert saved["finished"] is True and saved["epochs_done"] == 2
    assert saved["run"] == {"loss": "proxyanchor"}
    assert training.Recipe.from_dict(saved["recipe"]) == recipe()
    assert [row["epoch"] for row in saved["rows"]] == [1, 2]
    for row in saved["rows"]:
        assert {*training.RUN_COLUMNS, *training.METRICS} <= row.keys()
        assert all(0 <= row[m] <= 1 for m in training.METRICS)
        assert row["train_seconds"] > 0 and row["eval_seconds"] > 0
        assert row["load_average"] >= 0
    first, second = saved["rows"]
    assert second["cumulative_seconds"] == pytest.approx(
        first["train_seconds"] + second["train_seconds"]
    )
    # The lr in force during each epoch: milestone 1 decays it after the first.
    assert (first["lr"], second["lr"]) == pytest.approx((1e-2, 1e-3))
    header = (out / training.RESULTS_CSV).read_text().splitlines()[0].split(",")
    assert header == [*training.RUN_COLUMNS, *training.METRICS]

    checkpoint = training.load_checkpoint(out / training.CHECKPOINT_NAME)
    assert checkpoint["epoch"] == 2
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
    data: Path, tmp_path: Path, uninterrupted: training.RunResult
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
    for metric in training.METRICS:
        assert second.final[metric] == uninterrupted.final[metric]


def test_resume_after_a_crash_in_the_middle_of_an_epoch(
    data: Path, tmp_path: Path, uninterrupted: training.RunResult
) -> None:
    # 12 training images: reads 1-12 are epoch 1, the crash comes in epoch 2.
    with pytest.raises(Interrupted):
        run(data, tmp_path, fail_at=len(emoji.EmojiDataset(data, "train")) + 3)
    assert training.load_checkpoint(tmp_path / training.CHECKPOINT_NAME)["epoch"] == 1
    resumed, _ = run(data, tmp_path)
    assert resumed.resumed_from == 1 and resumed.trained_epochs == [2]
    assert_same_weights(tmp_path, uninterrupted.out_dir)


def test_finished_run_is_skipped(data: Path, tmp_path: Path) -> None:
    first, _ = run(data, tmp_path, epochs=1)
    files = [tmp_path / training.CHECKPOINT_NAME, tmp_path / training.RESULTS_JSON]
    before = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    again, train_set = run(data, tmp_path, epochs=1)
    assert again.trained_epochs == [] and train_set.reads == 0
    assert again.rows == first.rows
    assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before


def test_changed_recipe_is_refused(data: Path, tmp_path: Path) -> None:
    run(data, tmp_path, epochs=1)
    with pytest.raises(ValueError, match="backbone"):
        run(data, tmp_path, epochs=2, lr=1e-3)


def test_loss_with_parameters_needs_a_loss_optimizer(data: Path, tmp_path: Path) -> None:
    no_loss_optimizer = training.Recipe(epochs=1, batch_size=4, backbone=recipe().backbone)
    with pytest.raises(ValueError, match="loss optimizer"):
        training.train_and_evaluate(
            nn.Flatten(),
            nn.Linear(3 * SIZE * SIZE, EMBEDDING),
            losses.ProxyAnchorLoss(4, EMBEDDING),
            emoji.EmojiDataset(data, "train"),
            emoji.EmojiDataset(data, "test"),
            no_loss_optimizer,
            tmp_path,
        )


def test_m_per_class_sampler_gives_about_one_pass_per_epoch(data: Path, tmp_path: Path) -> None:
    train_set = CountingDataset(emoji.EmojiDataset(data, "train"))
    result = training.train_and_evaluate(
        nn.Flatten(),
        nn.Linear(3 * SIZE * SIZE, EMBEDDING),
        losses.TripletMarginLoss(),  # no parameters: no loss optimizer needed
        train_set,
        emoji.EmojiDataset(data, "test"),
        training.Recipe(
            epochs=1, batch_size=4, backbone=recipe().backbone, sampler="m_per_class", m_per_class=2
        ),
        tmp_path,
    )
    assert result.trained_epochs == [1]
    assert train_set.reads == 12


def test_class_disjoint_split_and_subset(data: Path) -> None:
    labels = np.repeat(np.arange(10), 2)
    kept, held = training.class_disjoint_split(labels, 0.3, seed=1)
    assert len(held) == 3 and len(kept) == 7
    assert sorted([*kept, *held]) == list(range(10))
    assert np.array_equal(kept, training.class_disjoint_split(labels, 0.3, seed=1)[0])

    train_set = emoji.EmojiDataset(data, "train")
    subset = training.ClassSubset(train_set, [1, 3])
    assert len(subset) == 2 * PER_CLASS
    assert list(subset.labels) == [0] * PER_CLASS + [1] * PER_CLASS
    image, label = subset[PER_CLASS]
    original = int(np.flatnonzero(train_set.labels == 3)[0])
    assert label == 1 and torch.equal(image, train_set[original][0])

"""Swap ProxyAnchorLoss for ProxyGMLLoss in an existing PML pipeline: one line changes.

A classic pytorch-metric-learning setup (trunk + embedder, ``trainers.MetricLossOnly``,
``testers.GlobalEmbeddingSpaceTester``, ``AccuracyCalculator``) on scikit-learn's bundled
digits, so nothing is downloaded. The split is class-disjoint (train on digits 0-4, retrieve
among digits 5-9), and every 8x8 digit sits at a random place on a 16x16 canvas: nearest
neighbours in pixel space suffer from the shifts, a small CNN learns to ignore them.
Run: ``python examples/drop_in_swap.py`` (under two minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse

import torch
from pytorch_metric_learning import losses, testers, trainers
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.datasets import load_digits

import pml_proxygml  # noqa: F401  (registers losses.ProxyGMLLoss)

EMBEDDING_SIZE = 32
TRAIN_CLASSES = 5
CANVAS = 16


def make_loss(name: str) -> losses.BaseMetricLossFunction:
    if name == "proxyanchor":
        return losses.ProxyAnchorLoss(TRAIN_CLASSES, EMBEDDING_SIZE)
    # The one line that changes. With only 5 classes, keep half of the 5 * 4 proxies so each
    # sample's sub-graph holds its 4 positives and 6 hard negatives (r=0.05 needs ~40 classes).
    return losses.ProxyGMLLoss(TRAIN_CLASSES, EMBEDDING_SIZE, proxies_per_class=4, r=0.5)


class ShiftedDigits(torch.utils.data.Dataset):
    """Digits of the given classes (labels remapped to 0..), each at a fixed random shift."""

    def __init__(self, classes: range, seed: int = 0):
        digits = load_digits()
        keep = [i for i, label in enumerate(digits.target) if label in classes]
        small = torch.tensor(digits.images[keep] / 16.0, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.randint(0, CANVAS - 8 + 1, (len(keep), 2), generator=generator)
        self.images = torch.zeros(len(keep), 1, CANVAS, CANVAS)
        for image, digit, (row, col) in zip(self.images, small, offsets.tolist()):
            image[0, row : row + 8, col : col + 8] = digit
        self.labels = torch.tensor(digits.target[keep] - classes.start)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def small_cnn() -> torch.nn.Sequential:
    """The trunk: two 3x3 conv layers and a global max-pool, 64 features."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveMaxPool2d(1),
        torch.nn.Flatten(),
    )


def recall_at_1(tester, dataset, trunk, embedder) -> float:
    accuracies = tester.test({"test": dataset}, 0, trunk, embedder)
    return accuracies["test"]["precision_at_1_level0"]


def train_and_test(loss_name: str, epochs: int, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    train_set, test_set = ShiftedDigits(range(0, 5)), ShiftedDigits(range(5, 10))
    trunk = small_cnn()
    embedder = torch.nn.Linear(64, EMBEDDING_SIZE)
    loss = make_loss(loss_name)
    tester = testers.GlobalEmbeddingSpaceTester(
        accuracy_calculator=AccuracyCalculator(include=("precision_at_1",), k=1),
        dataloader_num_workers=0,
        batch_size=256,
    )
    before = recall_at_1(tester, test_set, trunk, embedder)
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={
            "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=1e-3),
            "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=1e-3),
            # Proxies learn ~100x faster than the network, as in both papers' recipes.
            "metric_loss_optimizer": torch.optim.Adam(loss.parameters(), lr=0.1),
        },
        batch_size=32,
        loss_funcs={"metric_loss": loss},
        dataset=train_set,
        dataloader_num_workers=0,
    )
    trainer.train(num_epochs=epochs)
    return {"before": before, "after": recall_at_1(tester, test_set, trunk, embedder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    results = {name: train_and_test(name, args.epochs) for name in ("proxyanchor", "proxygml")}
    print(f"\nRecall@1 on unseen digits 5-9 (chance ~{1 / 5:.0%}), {args.epochs} epochs:")
    print("| loss | untrained | trained |\n|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['before']:.3f} | {result['after']:.3f} |")


if __name__ == "__main__":
    main()

"""The default k trains at any number of classes; an explicit r or top_k is kept exactly."""

import math

import pytest
import torch
from pytorch_metric_learning import losses, trainers

from pml_proxygml import ProxyGMLLoss  # and registers losses.ProxyGMLLoss

CUB_CARS_SOP = [(100, 12), (98, 12), (11318, 1)]


@pytest.mark.parametrize(
    ("num_classes", "proxies_per_class", "official_k"),
    [(100, 12, 60), (98, 12, 59), (11318, 1, 566), (5, 12, 3), (20, 1, 1)],
    ids=["cub", "cars", "sop", "5_classes", "20_classes_N1"],
)
def test_explicit_r_keeps_the_official_rounding(num_classes, proxies_per_class, official_k):
    assert official_k == math.ceil(0.05 * num_classes * proxies_per_class)
    explicit = ProxyGMLLoss(num_classes, 8, proxies_per_class, r=0.05, weight_lambda=0)
    assert explicit.top_k == official_k
    assert ProxyGMLLoss(num_classes, 8, proxies_per_class, top_k=3, weight_lambda=0).top_k == 3


def test_default_k_keeps_other_classes_and_is_official_from_40_classes():
    for per_class in (1, 2, 3, 12):
        for classes in range(1, 200):
            k = ProxyGMLLoss(classes, 4, per_class, weight_lambda=0).top_k
            official = math.ceil(0.05 * classes * per_class)
            assert k == min(max(official, 2 * per_class), classes * per_class)
            if classes >= 2:
                assert k > per_class  # some proxy of another class is kept
            if classes >= 40:
                assert k == official
    # CUB, Cars and SOP get their official k by default too.
    assert [ProxyGMLLoss(c, 8, n, weight_lambda=0).top_k for c, n in CUB_CARS_SOP] == [60, 59, 566]
    assert ProxyGMLLoss(5, 8).top_k == 24


def test_default_k_does_not_warn_from_two_classes(recwarn):
    for num_classes in (2, 5, 10, 39):
        ProxyGMLLoss(num_classes, 8)
    assert not [w for w in recwarn if "no proxy of another class" in str(w.message)]


# The literal swap in PML's pipeline, with 5 training classes: a class-disjoint task whose
# classes differ in 4 input dimensions hidden among 28 dimensions of noise. An untrained
# network mixes the noise in; a trained one learns to ignore it, on unseen classes too.
SIGNAL, NOISE, PER_CLASS = 4, 28, 40


def synthetic_classes(num_classes: int, generator: torch.Generator):
    centers = 3 * torch.randn(num_classes, SIGNAL, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(PER_CLASS)
    signal = centers[labels] + 0.5 * torch.randn(len(labels), SIGNAL, generator=generator)
    noise = 3 * torch.randn(len(labels), NOISE, generator=generator)
    return torch.cat([signal, noise], dim=1), labels


def recall_at_1(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    similarities = unit @ unit.T
    similarities.fill_diagonal_(float("-inf"))
    return (labels[similarities.argmax(dim=1)] == labels).float().mean().item()


def test_literal_swap_learns_with_five_classes_in_pmls_trainer():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train_data, train_labels = synthetic_classes(5, generator)
    test_data, test_labels = synthetic_classes(5, generator)  # 5 other, unseen classes
    num_classes, embedding_size = 5, 16
    trunk = torch.nn.Linear(SIGNAL + NOISE, SIGNAL + NOISE)
    embedder = torch.nn.Linear(SIGNAL + NOISE, embedding_size)

    def held_out_recall() -> float:
        with torch.no_grad():
            return recall_at_1(embedder(trunk(test_data)), test_labels)

    loss_func = losses.ProxyGMLLoss(num_classes, embedding_size)  # the literal swap
    untrained = held_out_recall()
    step_losses, epoch_ends = [], [0]

    def end_of_epoch(trainer) -> bool:
        epoch_ends.append(len(step_losses))
        return True  # go on

    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={
            "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=3e-3),
            "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=3e-3),
            "metric_loss_optimizer": torch.optim.Adam(loss_func.parameters(), lr=1e-2),
        },
        batch_size=32,
        loss_funcs={"metric_loss": loss_func},
        dataset=torch.utils.data.TensorDataset(train_data, train_labels),
        dataloader_num_workers=0,
        end_of_iteration_hook=lambda t: step_losses.append(t.losses["metric_loss"].item()),
        end_of_epoch_hook=end_of_epoch,
    )
    trainer.train(num_epochs=20)
    trained = held_out_recall()

    first, last = (
        sum(step_losses[start:stop]) / (stop - start)
        for start, stop in (epoch_ends[:2], epoch_ends[-2:])
    )
    # lambda * L^p alone is below 0.3 * log(5) = 0.48: the classification loss is not ~0.
    assert first > 1.0, first
    assert last < 0.5 * first
    assert trained > untrained + 0.2, (untrained, trained)

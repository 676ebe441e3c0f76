"""Bad arguments and bad inputs raise a ValueError naming them, and change nothing."""

import pytest
import torch

from pml_proxygml import ProxyGMLLoss


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_classes=0), "num_classes must be a positive integer, got 0"),
        (dict(num_classes=2.5), "num_classes must be a positive integer, got 2.5"),
        (dict(embedding_size=-3), "embedding_size must be a positive integer, got -3"),
        (dict(proxies_per_class=0), "proxies_per_class must be a positive integer, got 0"),
        (dict(r=0.0), r"r must be in \(0, 1\], got 0.0"),
        (dict(r=1.5), r"r must be in \(0, 1\], got 1.5"),
        (dict(r=float("nan")), r"r must be in \(0, 1\], got nan"),
        (dict(top_k=0), "top_k must be a positive integer, got 0"),
        (dict(top_k=True), "top_k must be a positive integer, got True"),
        (dict(weight_lambda=-0.1), "weight_lambda must be >= 0, got -0.1"),
        (dict(regularizer_samples=0), "regularizer_samples must be a positive integer, got 0"),
        (dict(selection_block_bytes=0), "selection_block_bytes must be a positive integer, got 0"),
        (dict(distance=None), None),
    ],
)
def test_constructor_arguments(kwargs, message):
    arguments = dict(num_classes=10, embedding_size=8, proxies_per_class=2, r=0.3)
    arguments.update(kwargs)
    if message is None:  # a valid control: must construct
        ProxyGMLLoss(**arguments)
        return
    with pytest.raises(ValueError, match=message):
        ProxyGMLLoss(**arguments)


def test_distance_must_be_a_dot_product_similarity():
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

    with pytest.raises(ValueError, match="distance"):
        ProxyGMLLoss(10, 8, distance=LpDistance())
    with pytest.raises(ValueError, match="distance"):
        ProxyGMLLoss(10, 8, distance=CosineSimilarity(power=2))


def good_batch():
    return torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 9])


def with_nan(embeddings):
    embeddings = embeddings.clone()
    embeddings[2, 3] = float("nan")
    return embeddings


def with_inf(embeddings):
    embeddings = embeddings.clone()
    embeddings[4, 0] = float("-inf")
    return embeddings


BAD_INPUTS = {
    "label_too_large": (lambda e, y: (e, torch.tensor([0, 1, 2, 3, 4, 10])), r"labels.*\[10\]"),
    "negative_label": (lambda e, y: (e, torch.tensor([0, -1, 2, 3, 4, 5])), r"labels.*\[-1\]"),
    "float_labels": (lambda e, y: (e, y.float()), "labels must be an integer tensor"),
    "bool_labels": (lambda e, y: (e, y > 2), "labels must be an integer tensor"),
    "2d_labels": (lambda e, y: (e, y.view(6, 1)), "labels must be a 1D tensor"),
    "fewer_labels": (lambda e, y: (e, y[:5]), "Number of embeddings must equal number of labels"),
    "empty_batch": (lambda e, y: (e[:0], y[:0]), "empty batch"),
    "nan_embedding": (lambda e, y: (with_nan(e), y), r"NaN or Inf in rows \[2\]"),
    "inf_embedding": (lambda e, y: (with_inf(e), y), r"NaN or Inf in rows \[4\]"),
    "wrong_embedding_size": (lambda e, y: (e[:, :7], y), r"shape \(batch_size, 8\), got \(6, 7\)"),
    "3d_embeddings": (lambda e, y: (e.view(6, 2, 4), y), r"got \(6, 2, 4\)"),
    "integer_embeddings": (lambda e, y: (e.long(), y), "embeddings must be floating point"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_forward_inputs_raise_and_change_nothing(name):
    make_bad, message = BAD_INPUTS[name]
    loss_fn = ProxyGMLLoss(10, 8, proxies_per_class=2, r=0.3)
    before = loss_fn.proxies.detach().clone()
    embeddings, labels = make_bad(*good_batch())
    with pytest.raises(ValueError, match=message):
        loss_fn(embeddings, labels)
    assert torch.equal(loss_fn.proxies, before) and loss_fn.proxies.grad is None
    loss_fn(*good_batch()).backward()  # and the loss still works afterwards
    assert loss_fn.proxies.grad is not None

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
        (dict(r=True), r"r must be in \(0, 1\], got True"),
        (dict(r="0.1"), r"r must be in \(0, 1\], got '0.1'"),
        (dict(r=None), None),
        (dict(weight_lambda=-0.1), "weight_lambda must be a finite number >= 0, got -0.1"),
        (dict(weight_lambda=float("inf")), "weight_lambda must be a finite number >= 0, got inf"),
        (dict(weight_lambda=float("nan")), "weight_lambda must be a finite number >= 0, got nan"),
        (dict(weight_lambda=True), "weight_lambda must be a finite number >= 0, got True"),
        (dict(embedding_size=True), "embedding_size must be a positive integer, got True"),
        (dict(sparse_proxy_grad="no"), "sparse_proxy_grad must be True or False, got 'no'"),
        (dict(sparse_proxy_grad=0), "sparse_proxy_grad must be True or False, got 0"),
        (dict(check_inputs="no"), "check_inputs must be True or False, got 'no'"),
        (dict(check_inputs=None), "check_inputs must be True or False, got None"),
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
    "0d_labels": (lambda e, y: (e, y[0]), r"labels must be a 1D tensor .*got shape \(\)"),
    "fewer_labels": (lambda e, y: (e, y[:5]), "Number of embeddings must equal number of labels"),
    "empty_batch": (lambda e, y: (e[:0], y[:0]), "empty batch"),
    "nan_embedding": (lambda e, y: (with_nan(e), y), r"NaN or Inf in rows \[2\]"),
    "inf_embedding": (lambda e, y: (with_inf(e), y), r"NaN or Inf in rows \[4\]"),
    "wrong_embedding_size": (lambda e, y: (e[:, :7], y), r"shape \(batch_size, 8\), got \(6, 7\)"),
    "3d_embeddings": (lambda e, y: (e.view(6, 2, 4), y), r"got \(6, 2, 4\)"),
    "integer_embeddings": (lambda e, y: (e.long(), y), "embeddings must be floating point"),
}


@pytest.mark.parametrize(
    ("make_labels", "type_name"),
    [(lambda y: y.tolist(), "list"), (lambda y: y.numpy(), "ndarray"), (lambda y: None, None)],
    ids=["list", "numpy", "none"],
)
def test_labels_that_are_not_tensors_raise_a_type_error_naming_labels(make_labels, type_name):
    loss_fn = ProxyGMLLoss(10, 8, proxies_per_class=2, r=0.3)
    embeddings, labels = good_batch()
    if type_name is None:  # PML's own message
        with pytest.raises(ValueError, match="labels are required for this loss function"):
            loss_fn(embeddings, make_labels(labels))
        return
    with pytest.raises(TypeError, match=rf"labels must be a torch\.Tensor .*got {type_name}"):
        loss_fn(embeddings, make_labels(labels))
    with pytest.raises(TypeError, match=r"embeddings must be a torch\.Tensor, got list"):
        loss_fn(embeddings.tolist(), labels)


@pytest.mark.parametrize("bad_label", [-1, 10])
def test_unchecked_labels_out_of_range_still_stop_the_step(bad_label):
    """check_inputs=False: no host sync, but label -1 must not index class C - 1's proxies.

    Without a device the assert is immediate; on CUDA it is an asynchronous device assert.
    """
    loss_fn = ProxyGMLLoss(10, 8, proxies_per_class=2, r=0.3, check_inputs=False)
    embeddings, labels = good_batch()
    labels[1] = bad_label
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, num_classes=10\)"):
        loss_fn(embeddings, labels)


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

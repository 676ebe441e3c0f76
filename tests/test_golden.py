"""ProxyGMLLoss against numbers produced by the official ProxyGML code."""

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.reducers import DoNothingReducer

from pml_proxygml import functional as gml
from tests.golden import CASE_IDS, CASES, loss_for_case, tensor

# (rtol, atol) per quantity; float64 is the faithful implementation, float32 the
# golden README's tolerances for inputs cast to float32.
TOLERANCES = {
    torch.float64: {"loss": (1e-9, 1e-12), "grad": (1e-8, 1e-12), "values": (0, 1e-12)},
    torch.float32: {"loss": (1e-5, 2e-6), "grad": (1e-4, 2e-6), "values": (0, 5e-6)},
}


def assert_close(actual, expected, tolerance):
    rtol, atol = tolerance
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual.detach(), expected, rtol=rtol, atol=atol)


def labels_of(case):
    return torch.as_tensor(case["labels"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loss_and_gradients_from_raw_embeddings(case, dtype):
    """The PML way: raw network outputs in, normalised by the loss's CosineSimilarity."""
    tol = TOLERANCES[dtype]
    loss_fn = loss_for_case(case, dtype)
    embeddings = tensor(case, "embeddings_raw", dtype).requires_grad_()
    loss = loss_fn(embeddings, labels_of(case))
    loss.backward()
    assert loss.dtype == dtype
    assert_close(loss, case["loss_total"], tol["loss"])
    assert_close(embeddings.grad, case["grad_embeddings_raw"], tol["grad"])
    assert_close(loss_fn.proxies.grad, case["grad_proxies"].T, tol["grad"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_official_input_convention(case):
    """Embeddings already unit-norm and not normalised again, as the official loss takes them."""
    loss_fn = loss_for_case(case, distance=DotProductSimilarity(normalize_embeddings=False))
    embeddings = tensor(case, "embeddings").requires_grad_()
    loss_fn(embeddings, labels_of(case)).backward()
    assert_close(embeddings.grad, case["grad_embeddings"], TOLERANCES[torch.float64]["grad"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sub_losses(case):
    """The two sub-losses PML sees: per-sample classification loss and lambda * L^p."""
    loss_fn = loss_for_case(case, reducer=DoNothingReducer())
    sub_losses = loss_fn(tensor(case, "embeddings_raw"), labels_of(case))
    tol = TOLERANCES[torch.float64]["loss"]
    assert_close(sub_losses["loss"]["losses"].mean(), case["loss_cls"], tol)
    reg = sub_losses["proxy_reg_loss"]["losses"]
    weight_lambda = float(case["weight_lambda"])
    if weight_lambda > 0:
        assert_close(reg, weight_lambda * case["loss_reg"], tol)
    else:
        assert reg == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_selection_logits_and_probabilities(case, dtype):
    tol = TOLERANCES[dtype]["values"]
    labels = labels_of(case)
    num_classes, proxies_per_class = int(case["C"]), int(case["N"])
    k = gml.num_selected(float(case["r"]), num_classes, proxies_per_class)
    assert k == int(case["k"])
    proxies = tensor(case, "proxies", dtype).T
    embeddings = tensor(case, "embeddings", dtype)

    kept, values = gml.select_topk(embeddings, proxies, labels, proxies_per_class, k)
    assert torch.equal(kept.sort(dim=1).values, torch.as_tensor(case["topk_indices"]))

    logits, classes, present = gml.class_logits(
        values, kept // proxies_per_class, classes_are_distinct=proxies_per_class == 1
    )
    mask = present & (logits != 0)
    probabilities = gml.masked_softmax(logits, mask)
    dense = torch.zeros(len(labels), num_classes + 1, dtype=dtype)  # column C collects empty slots
    slot_class = torch.where(present, classes, num_classes)
    assert_close(dense.scatter(1, slot_class, logits)[:, :-1], case["logits"], tol)
    assert_close(dense.scatter(1, slot_class, mask.to(dtype))[:, :-1], case["logits_mask"], tol)
    assert_close(dense.scatter(1, slot_class, probabilities)[:, :-1], case["prob"], tol)


@pytest.mark.parametrize("block_elements", [gml.DEFAULT_REGULARIZER_BLOCK_ELEMENTS, 7])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_proxy_regularizer(case, block_elements):
    """L^p in one block and in many checkpointed blocks, with its gradient when lambda > 0."""
    raw = tensor(case, "proxies").T.clone().requires_grad_()
    reg = gml.proxy_regularizer(F.normalize(raw, dim=1), int(case["N"]), block_elements)
    assert_close(reg, case["loss_reg"], TOLERANCES[torch.float64]["loss"])
    weight_lambda = float(case["weight_lambda"])
    if weight_lambda > 0:
        reg.backward()
        expected = (case["grad_proxies"] - case["grad_proxies_cls"]).T / weight_lambda
        assert_close(raw.grad, expected, TOLERANCES[torch.float64]["grad"])

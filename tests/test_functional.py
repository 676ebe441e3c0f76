"""Each pure function, and the whole loss, against the dense float64 reference."""

import math
import time
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from pml_proxygml import ProxyGMLLoss
from pml_proxygml import functional as gml
from tests.reference import dense_official_loss, dense_proxy_regularizer


@pytest.mark.parametrize(
    ("r", "num_classes", "proxies_per_class", "top_k", "expected"),
    [
        (0.2, 24, 5, None, 25),  # 0.2 * 24 * 5 = 24.000000000000004: ceil gives 25
        (0.05, 12, 10, None, 7),
        (0.2, 3, 10, None, 7),
        (0.05, 100, 12, None, 60),
        (0.05, 98, 12, None, 59),
        (0.05, 11318, 1, None, 566),
        (1.0, 3, 1, None, 3),
        (0.05, 1_000_000, 1, 1000, 1000),  # top_k overrides r
        (0.05, 10, 2, 50, 20),  # and is capped at C * N
    ],
)
def test_num_selected_rounds_like_the_official_code(
    r, num_classes, proxies_per_class, top_k, expected
):
    assert gml.num_selected(r, num_classes, proxies_per_class, top_k) == expected


def test_select_topk_positives_first():
    similarities = torch.tensor(
        [
            # classes (N=2): 0 0 | 1 1 | 2 2
            [0.9, 0.8, -0.5, -0.6, 0.7, 0.1],
            [0.9, 0.8, -0.5, -0.6, 0.7, 0.1],
        ]
    )
    labels = torch.tensor([1, 2])
    proxies = torch.eye(6) * 3  # unit after normalisation: S = embeddings
    for block_bytes in (4, 8 * 4, 10**6):  # 1, 4 and all 6 proxies per block

        def kept(k, labels=labels, block_bytes=block_bytes):
            indices, values = gml.select_topk(similarities, proxies, labels, 2, k, block_bytes)
            torch.testing.assert_close(values, similarities.gather(1, indices))
            return indices.sort(dim=1).values.tolist()

        # Both positives even though they are the least similar, then the best negative.
        assert kept(3) == [[0, 2, 3], [0, 4, 5]]
        assert kept(1) == [[2], [4]]  # k < N: the best positive only
        assert kept(2) == [[2, 3], [4, 5]]  # k = N: exactly the positives
        assert kept(6) == [list(range(6))] * 2  # k = CN
        assert kept(3, labels=None) == [[0, 1, 4]] * 2  # no labels: a plain top-k


def test_class_logits_segment_sums():
    kept_similarities = torch.tensor([[0.5, 0.25, -0.125, 1.0], [0.1, 0.2, 0.3, 0.4]])
    kept_classes = torch.tensor([[4, 1, 4, 7], [2, 2, 2, 2]])
    logits, classes, present = gml.class_logits(kept_similarities, kept_classes)
    assert classes.tolist() == [[1, 4, 7, -1], [2, -1, -1, -1]]
    assert present.tolist() == [[True, True, True, False], [True, False, False, False]]
    torch.testing.assert_close(logits[0, :3], torch.tensor([0.25, 0.375, 1.0]))
    torch.testing.assert_close(logits[1, 0], torch.tensor(1.0))


def test_class_logits_of_distinct_classes_skip_the_sort():
    """The N=1 shortcut returns the same class sums as the segment sums, unsorted."""
    kept_similarities = torch.tensor([[0.5, 0.25, -0.125], [0.0, 0.2, 0.3]])
    kept_classes = torch.tensor([[4, 1, 7], [2, 0, 5]])
    dense = []
    for distinct in (False, True):
        logits, classes, present = gml.class_logits(kept_similarities, kept_classes, distinct)
        assert present.all()
        dense.append(torch.zeros(2, 8).scatter(1, classes, logits))
    torch.testing.assert_close(dense[0], dense[1], rtol=0, atol=0)


def official_masked_softmax(logits, mask):
    exp = torch.exp(logits) * mask
    return exp / (1e-8 + exp.sum(dim=1, keepdim=True))


def test_masked_softmax_equals_official_formula():
    torch.manual_seed(0)
    logits = (torch.randn(6, 9, dtype=torch.float64) * 3).requires_grad_()
    mask = torch.rand(6, 9) < 0.6
    mask[0] = False  # an empty row gives zeros, as the official code does
    mask[1] = False
    mask[1, 3] = True  # a single class: the 1e-8 is all that keeps P below 1
    ours = gml.masked_softmax(logits, mask)
    official = official_masked_softmax(logits, mask)
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-15)
    assert ours[0].abs().sum() == 0 and ours[1, 3] < 1
    weights = torch.randn(6, 9, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (grad_official,) = torch.autograd.grad((official * weights).sum(), logits)
    torch.testing.assert_close(grad_ours, grad_official, rtol=1e-10, atol=1e-15)


def test_masked_softmax_does_not_overflow():
    """Neither on the mask nor off it, where any finite logit is ignored."""
    logits = torch.tensor([[1000.0, 999.0, -5.0, 3e38, -3e38]], requires_grad=True)
    mask = torch.tensor([[True, True, False, False, False]])
    probabilities = gml.masked_softmax(logits, mask)
    probabilities[0, 0].backward()
    expected = torch.tensor([1, math.exp(-1), 0, 0, 0]) / (1 + math.exp(-1))
    torch.testing.assert_close(probabilities.detach()[0], expected)
    assert torch.isfinite(logits.grad).all()


def test_classification_loss_of_a_missing_target_is_the_official_46():
    probabilities = torch.tensor([[0.0, 0.0], [0.25, 0.75]], dtype=torch.float64)
    is_target = torch.tensor([[True, False], [False, True]])
    expected = torch.tensor([-math.log(1e-20), -math.log(0.75 + 1e-20)], dtype=torch.float64)
    torch.testing.assert_close(gml.classification_loss(probabilities, is_target), expected)


def plain_subgraph_loss(kept_similarities, kept_classes, labels, classes_are_distinct=False):
    """The sub-graph loss by autograd through its parts, as the closed form's reference."""
    logits, classes, present = gml.class_logits(
        kept_similarities, kept_classes, classes_are_distinct
    )
    probabilities = gml.masked_softmax(logits, present & (logits != 0))
    return gml.classification_loss(probabilities, classes == labels.unsqueeze(1))


def subgraph_case():
    """Rows with repeated classes, a zero class sum (masked out), a missing target, a
    sure target (P_y ~ 1) and a target whose probability underflows to 0."""
    generator = torch.Generator().manual_seed(11)
    similarities = torch.randn(6, 7, generator=generator, dtype=torch.float64)
    classes = torch.randint(0, 4, (6, 7), generator=generator)
    labels = classes[:, 0].clone()
    similarities[1, :2], classes[1, :2] = torch.tensor([0.5, -0.5]), 9  # class 9 sums to 0
    labels[2] = 5  # not kept at all
    similarities[3], classes[3] = torch.tensor([40.0, 0, 0, 0, 0, 0, 0]), 3
    classes[3, 0], labels[3] = 1, 1
    similarities[4] = 0.0  # every class sums to 0: an empty mask
    similarities[5], classes[5] = torch.tensor([-400.0, 0, 0, 0, 0, 0, 1]), 2
    classes[5, 0], labels[5] = 0, 0
    return similarities.requires_grad_(), classes, labels


@pytest.mark.parametrize("num_classes", [None, 10], ids=["segment sums", "dense (B, C)"])
def test_subgraph_loss_gradients_in_closed_form_equal_autograd_of_its_parts(num_classes):
    """Value, gradient and Hessian-vector product against the plain composition, on the
    edge cases of the official epsilons, with the class logits in either layout; and
    gradgradcheck of the Function itself."""
    similarities, classes, labels = subgraph_case()
    weights = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    vector = torch.randn_like(similarities)

    def first_and_second(function):
        loss = (weights * function(similarities, classes, labels)).sum()
        (grad,) = torch.autograd.grad(loss, similarities, create_graph=True)
        (second,) = torch.autograd.grad((grad * vector).sum(), similarities)
        return loss, grad, second

    def closed_form(*inputs):
        return gml.subgraph_loss(*inputs, num_classes=num_classes)

    ours, expected = first_and_second(closed_form), first_and_second(plain_subgraph_loss)
    assert ours[1][4].abs().sum() == 0 and ours[2].abs().sum() > 0
    for actual, wanted in zip(ours, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-12, atol=1e-14)
    # Finite differences need a smooth point: no logit at 0, no extreme probability.
    smooth = torch.randn(6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for distinct, kept_classes in ((False, classes), (True, torch.arange(7).repeat(6, 1))):
        torch.autograd.gradgradcheck(
            lambda s, c=kept_classes, d=distinct: gml.subgraph_loss(s, c, labels, d, num_classes),
            (smooth.requires_grad_(),),
        )


@pytest.mark.parametrize("num_classes", [None, 10], ids=["segment sums", "dense (B, C)"])
def test_subgraph_loss_takes_the_saved_slope_unless_the_backward_is_recorded(num_classes):
    similarities, classes, labels = subgraph_case()
    slope = mock.patch.object(gml, "_subgraph_loss_and_slope", wraps=gml._subgraph_loss_and_slope)
    with slope as calls:
        gml.subgraph_loss(similarities, classes, labels, num_classes=num_classes).sum().backward()
        assert calls.call_count == 1
        loss = gml.subgraph_loss(similarities, classes, labels, num_classes=num_classes).sum()
        torch.autograd.grad(loss, similarities, create_graph=True)
        assert calls.call_count == 3


@pytest.mark.parametrize("proxies_per_class", [1, 4])
def test_subgraph_loss_layouts_agree_and_the_size_picks_one(proxies_per_class):
    """Dense (B, C) class logits up to DENSE_CLASS_LOGITS_MAX_ELEMENTS, segment sums beyond
    (or without num_classes), the kept entries as they are with one proxy per class: the
    same losses and gradients (fp32: the order of each class's additions may differ)."""
    generator = torch.Generator().manual_seed(5)
    num_classes, batch_size = 50, 16
    embeddings = F.normalize(torch.randn(batch_size, 32, generator=generator), dim=1)
    proxies = torch.randn(num_classes * proxies_per_class, 32, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    indices, values = gml.select_topk(embeddings, proxies, labels, proxies_per_class, 30)
    kept_classes = indices // proxies_per_class
    distinct = proxies_per_class == 1
    results = []
    segment_sums = mock.patch.object(gml, "_class_sums", wraps=gml._class_sums)
    for threshold, dense in (
        (batch_size * num_classes, True),
        (batch_size * num_classes - 1, False),
    ):
        similarities = values.clone().requires_grad_()
        with (
            mock.patch.object(gml, "DENSE_CLASS_LOGITS_MAX_ELEMENTS", threshold),
            segment_sums as sums,
        ):
            loss = gml.subgraph_loss(similarities, kept_classes, labels, distinct, num_classes)
        assert sums.called == (distinct or not dense)  # N = 1: no sums to form
        loss.sum().backward()
        results.append((loss, similarities.grad))
    without_num_classes = values.clone().requires_grad_()
    unsized = gml.subgraph_loss(without_num_classes, kept_classes, labels, distinct)
    unsized.sum().backward()
    for loss, grad in (results[1], (unsized, without_num_classes.grad)):
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


def test_classes_per_subgraph_counts_distinct_kept_classes():
    kept_classes = torch.tensor([[4, 1, 4, 7], [2, 2, 2, 2], [0, 1, 2, 3]])
    assert gml.classes_per_subgraph(kept_classes).tolist() == [3, 1, 4]


# Shapes the golden files' hidden set covers, checked here against the dense reference.
REFERENCE_CONFIGS = {
    "batch_of_one": dict(C=20, N=3, r=0.2, lam=0.3, B=1),
    "k_below_N": dict(C=5, N=12, r=0.05, lam=0.3, B=8),
    "k_is_1": dict(C=10, N=1, r=0.1, lam=0.0, B=6),
    "one_proxy_per_class": dict(C=300, N=1, r=0.05, lam=0.0, B=16),
    "r1_N12": dict(C=4, N=12, r=1.0, lam=0.3, B=8),
    "same_label": dict(C=30, N=2, r=0.1, lam=0.3, B=10, same_label=True),
    "C1000_N2": dict(C=1000, N=2, r=0.05, lam=0.3, B=12),
    "C1000_N12": dict(C=1000, N=12, r=0.05, lam=0.0, B=6),
    "rounding_changes_k": dict(C=24, N=5, r=0.2, lam=0.3, B=7),
}


def random_case(C, N, r, lam, B, same_label=False, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    proxies = torch.rand(C * N, dim, generator=generator, dtype=torch.float64) * 2 - 1
    labels = torch.zeros(B, dtype=torch.long)
    if not same_label:
        labels = torch.randint(0, C, (B,), generator=generator)
    # Near one own-class proxy, so that positives are genuinely similar.
    own = proxies[labels * N + torch.randint(0, N, (B,), generator=generator)]
    noise = torch.randn(B, dim, generator=generator, dtype=torch.float64)
    embeddings = F.normalize(own, dim=1) * 3 + noise
    return proxies, embeddings, labels


# One-shot selection, and blocks of 7 proxies (7 divides no C * N above) per row of 8 bytes.
BLOCK_BYTES = {"one_shot": gml.DEFAULT_SELECTION_BLOCK_BYTES, "streamed": 7 * 8}


@pytest.mark.parametrize("block", list(BLOCK_BYTES))
@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_loss_matches_dense_reference(name, block):
    config = REFERENCE_CONFIGS[name]
    proxies, embeddings, labels = random_case(**config)
    C, N = config["C"], config["N"]
    loss_fn = ProxyGMLLoss(
        C,
        16,
        proxies_per_class=N,
        r=config["r"],
        weight_lambda=config["lam"],
        selection_block_bytes=BLOCK_BYTES[block] * config["B"],
    )
    loss_fn = loss_fn.double()
    with torch.no_grad():
        loss_fn.proxies.copy_(proxies)
    x = embeddings.clone().requires_grad_()
    ours = loss_fn(x, labels)
    ours.backward()

    x_ref = embeddings.clone().requires_grad_()
    proxies_ref = proxies.clone().requires_grad_()
    reference = dense_official_loss(
        F.normalize(x_ref, dim=1), proxies_ref, labels, N, loss_fn.top_k, config["lam"]
    )
    reference["loss_total"].backward()

    torch.testing.assert_close(ours, reference["loss_total"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(loss_fn.proxies.grad, proxies_ref.grad, rtol=1e-8, atol=1e-12)

    kept, _ = gml.select_topk(
        F.normalize(embeddings, dim=1),
        proxies,
        labels,
        N,
        loss_fn.top_k,
        loss_fn.selection_block_bytes,
    )
    assert torch.equal(kept.sort(dim=1).values, reference["topk_indices"])


def test_proxy_regularizer_equals_dense_cross_entropy():
    proxies = F.normalize(torch.randn(3 * 4, 5, dtype=torch.float64), dim=1)
    classes = torch.arange(12) // 4
    one_hot = F.one_hot(classes, 3).to(torch.float64)
    expected = F.cross_entropy(proxies @ proxies.T @ one_hot, classes)
    for block_elements in (1, 5, 36, 10**6):
        actual = gml.proxy_regularizer(proxies, 4, block_elements)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("block_elements", [1, 12, 10**6])
@pytest.mark.parametrize("proxies_per_class", [1, 4])
def test_exact_regularizer_of_raw_proxies_equals_the_dense_reference(
    proxies_per_class, block_elements
):
    """Value and gradient with respect to the raw proxies, through their normalisation
    (a zero proxy included: F.normalize's clamp, no radial term), against float64 autograd
    of the dense cross-entropy."""
    generator = torch.Generator().manual_seed(4)
    raw = torch.randn(3 * proxies_per_class, 5, dtype=torch.float64, generator=generator)
    raw[1] = 0
    raw.requires_grad_()
    expected = dense_proxy_regularizer(F.normalize(raw, dim=1), proxies_per_class)
    (expected_grad,) = torch.autograd.grad(expected, raw)
    actual = gml.exact_regularizer(raw, proxies_per_class, block_elements)
    (actual_grad,) = torch.autograd.grad(actual, raw)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-10, atol=1e-14)
    with torch.no_grad():
        value_only = gml.exact_regularizer(raw, proxies_per_class, block_elements)
    torch.testing.assert_close(value_only, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("block_elements", [1, 9, 16, 99, 10**6])  # tiles of 1, 3, 4, 9, all
def test_one_proxy_per_class_regularizer_through_the_gram_matrix(block_elements):
    """N = 1: the symmetric-Gram path against the dense cross-entropy (value and gradient)
    and against the general anchors-and-class-sums path, ragged last tiles included."""
    raw = torch.randn(10, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    proxies = F.normalize(raw, dim=1).requires_grad_()
    classes = torch.arange(10)
    expected = F.cross_entropy(proxies @ proxies.T, classes)
    (expected_grad,) = torch.autograd.grad(expected, proxies)
    actual = gml.proxy_regularizer(proxies, 1, block_elements)
    (actual_grad,) = torch.autograd.grad(actual, proxies)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-10, atol=1e-14)
    general = gml.regularizer_sum(proxies, proxies, classes, block_elements) / 10
    torch.testing.assert_close(actual, general, rtol=1e-12, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(gml.proxy_regularizer(proxies, 1, block_elements), expected)


@pytest.mark.parametrize("labelled", [True, False])
def test_streamed_selection_equals_one_shot(labelled):
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(9, 12, generator=generator, dtype=torch.float64)
    proxies = torch.randn(50 * 3, 12, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 50, (9,), generator=generator) if labelled else None
    expected, expected_values = gml.select_topk(embeddings, proxies, labels, 3, 20)
    order = expected.argsort(dim=1)
    for rows in (1, 4, 13, 149, 150):  # 13 does not divide 150; 149 leaves a block of 1
        indices, values = gml.select_topk(embeddings, proxies, labels, 3, 20, rows * 9 * 8)
        indices_order = indices.argsort(dim=1)
        assert torch.equal(indices.gather(1, indices_order), expected.gather(1, order))
        torch.testing.assert_close(
            values.gather(1, indices_order), expected_values.gather(1, order)
        )


@pytest.fixture
def orientation_measured_from_any_size(monkeypatch):
    """Every CPU similarity block measured for its orientation, from an empty record."""
    monkeypatch.setattr(gml, "ORIENTATION_MIN_MULTIPLY_ADDS", 0)
    monkeypatch.setattr(gml, "_TRANSPOSED_PRODUCT", {})


def slowed(product):
    """``product`` made slower than any other: the measurement prefers the other one."""

    def slow(embeddings, rows):
        time.sleep(0.005)
        return product(embeddings, rows)

    return slow


@pytest.mark.parametrize("slice_rows", [7, 2048])
@pytest.mark.usefixtures("orientation_measured_from_any_size")
def test_the_selection_never_depends_on_the_gemm_orientation(monkeypatch, slice_rows):
    """The transposed product preferred by its timing, in slices of 7 proxies (whose GEMMs
    may round otherwise than one over the whole block: then it must be refused) or of 2048
    (one slice): the blocks and the selection are bit for bit the plain product's."""
    monkeypatch.setattr(gml, "_plain_product", slowed(gml._plain_product))
    monkeypatch.setattr(gml, "TRANSPOSED_PRODUCT_ROWS", slice_rows)
    generator = torch.Generator().manual_seed(8)
    embeddings = F.normalize(torch.randn(9, 12, generator=generator), dim=1)
    proxies = torch.randn(40 * 3, 12, generator=generator)
    block = gml._similarity_block(embeddings, proxies)
    assert block.is_contiguous() and torch.equal(block, embeddings @ proxies.T)
    labels = torch.randint(0, 40, (9,), generator=generator)
    found = gml.select_topk(embeddings, proxies, labels, 3, 20, 9 * 4 * 50)
    monkeypatch.setattr(gml, "ORIENTATION_MIN_MULTIPLY_ADDS", 1 << 62)  # never measured
    for ours, plain in zip(found, gml.select_topk(embeddings, proxies, labels, 3, 20, 9 * 4 * 50)):
        assert torch.equal(ours, plain)


def test_the_transposed_product_assembles_its_slices():
    generator = torch.Generator().manual_seed(4)
    embeddings = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    proxies = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    with mock.patch.object(gml, "TRANSPOSED_PRODUCT_ROWS", 7):  # 4 slices, the last of 2
        block = gml._transposed_product(embeddings, proxies)
    assert block.is_contiguous()
    torch.testing.assert_close(block, embeddings @ proxies.T, rtol=1e-14, atol=0)


@pytest.mark.usefixtures("orientation_measured_from_any_size")
def test_the_gemm_orientation_is_measured_once_per_shape_and_only_large_ones(monkeypatch):
    measured = mock.patch.object(gml, "_transposed_is_faster", wraps=gml._transposed_is_faster)
    embeddings, proxies = torch.randn(8, 16), torch.randn(60, 16)
    monkeypatch.setattr(gml, "ORIENTATION_MIN_MULTIPLY_ADDS", 8 * 50 * 16)
    with measured as calls:
        for rows in (50, 50, 60, 60, 49):  # 49 rows: below the threshold
            gml._similarity_block(embeddings, proxies[:rows])
        assert calls.call_count == 2
        gml._similarity_block(embeddings.double(), proxies[:50].double())
        assert calls.call_count == 3
        with torch.device("meta"):
            gml._similarity_block(torch.empty(8, 16), torch.empty(50, 16))
        assert calls.call_count == 3


@pytest.mark.parametrize("same_bits", [True, False])
def test_the_transposed_product_is_taken_only_faster_and_with_the_same_bits(monkeypatch, same_bits):
    """The plain product slowed down, the transposed one perturbed by an ulp or not."""
    plain, transposed = gml._plain_product, gml._transposed_product

    def perturbed(embeddings, rows):
        block = transposed(embeddings, rows)
        return block if same_bits else torch.nextafter(block, torch.tensor(math.inf))

    monkeypatch.setattr(gml, "_plain_product", slowed(plain))
    monkeypatch.setattr(gml, "_transposed_product", perturbed)
    embeddings, proxies = torch.randn(8, 16), torch.randn(50, 16)
    agree = torch.equal(plain(embeddings, proxies), transposed(embeddings, proxies))
    assert gml._transposed_is_faster(embeddings, proxies) == (same_bits and agree)
    monkeypatch.setattr(gml, "_plain_product", plain)
    monkeypatch.setattr(gml, "_transposed_product", slowed(plain))
    assert not gml._transposed_is_faster(embeddings, proxies)  # the same bits, slower


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("chunk_elements", "threads", "parallel_from"),
    [(1 << 16, 1, 0), (40, 1, 0), (40, 2, 0), (40, 2, 1 << 21)],
    ids=["one chunk", "chunks", "pooled chunks", "chunks of a small block"],
)
def test_cpu_largest_equals_torch_topk(monkeypatch, dtype, chunk_elements, threads, parallel_from):
    """numpy's argpartition path: the same sets as torch.topk, in one chunk or in many
    chunks of rows (one row per chunk with 40 elements) on one thread or on a pool (the
    last only for blocks of ``PARTITION_PARALLEL_MIN_ELEMENTS``)."""
    monkeypatch.setattr(gml, "PARTITION_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(gml, "PARTITION_PARALLEL_MIN_ELEMENTS", parallel_from)
    pool = mock.patch.object(gml, "_partition_pool", wraps=gml._partition_pool)
    generator = torch.Generator().manual_seed(5)
    block = torch.randn(7, 33, generator=generator, dtype=dtype)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pool as pooled:
            for count in (1, 5, 32, 33):
                values, columns = gml._largest(block, count)
                expected = block.topk(count, dim=1).indices
                assert torch.equal(columns.sort(dim=1).values, expected.sort(dim=1).values)
                assert torch.equal(values, block.gather(1, columns))
        # count = 33 is the whole row: torch.topk; the pool runs for the others if asked.
        assert pooled.call_count == (3 if threads > 1 and parallel_from == 0 else 0)
    finally:
        torch.set_num_threads(previous_threads)


@pytest.mark.parametrize("high", [1, 7, 1 << 16, 1 << 40])
@pytest.mark.parametrize("shape", [(0,), (1,), (500,), (6, 97)])
def test_cpu_stable_argsort_equals_torch_stable_argsort(high, shape):
    """The radix passes over 16-bit digits (one, two or three of them), with many ties."""
    keys = torch.randint(0, high, shape, generator=torch.Generator().manual_seed(high))
    assert torch.equal(gml._stable_argsort(keys), keys.argsort(dim=-1, stable=True))


def test_selection_with_ties():
    """Tied similarities: still k distinct proxies, positives first, the k largest values."""
    base = torch.randn(6, 8, dtype=torch.float64)
    proxies = base.repeat_interleave(4, dim=0)  # 6 classes x 4 identical proxies: 4-way ties
    embeddings = torch.randn(5, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 5])
    similarities = F.normalize(embeddings, dim=1) @ F.normalize(proxies, dim=1).T
    negatives = similarities.scatter(1, gml.positive_proxy_indices(labels, 4), float("-inf"))
    for rows in (3, 24):
        indices, values = gml.select_topk(
            F.normalize(embeddings, dim=1), proxies, labels, 4, 10, rows * 5 * 8
        )
        assert all(len(set(row)) == 10 for row in indices.tolist())
        assert torch.equal(indices[:, :4] // 4, labels.unsqueeze(1).expand(-1, 4))
        best_negatives = negatives.topk(6, dim=1).values
        torch.testing.assert_close(
            values[:, 4:].sort(dim=1).values, best_negatives.sort(dim=1).values
        )


# Block budgets that send the proxies' gradient through the (B, CN) weights' GEMM, or
# through the entries sorted by proxy (a budget under one (B, CN) block).
PROXY_PRODUCTS = {"dense weights": gml.DEFAULT_SELECTION_BLOCK_BYTES, "sorted bags": 1}


@pytest.mark.parametrize("block_bytes", PROXY_PRODUCTS.values(), ids=PROXY_PRODUCTS.keys())
@pytest.mark.parametrize("with_zero_proxy", [False, True])
def test_sparse_backward_passes_gradcheck(with_zero_proxy, block_bytes):
    generator = torch.Generator().manual_seed(5)
    embeddings = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    proxies = torch.randn(15, 6, generator=generator, dtype=torch.float64)
    if with_zero_proxy:
        proxies[7] = 0  # below F.normalize's clamp, the map is linear: p / 1e-12
    indices, _ = gml.select_topk(embeddings, proxies, torch.tensor([0, 1, 2, 4]), 3, 7)
    if with_zero_proxy:
        indices[:, -1] = 7
    embeddings.requires_grad_()
    proxies.requires_grad_()

    def kept(x, p):
        # As in the loss: forward values come from the (re-run) selection, without gradient.
        values = (F.normalize(p, dim=1)[indices] * x.unsqueeze(1)).sum(-1).detach()
        return gml.kept_similarities(x, p, indices, values, block_bytes=block_bytes)

    if with_zero_proxy:  # gradcheck's finite differences cannot step over the clamp's kink
        expected = torch.autograd.grad((kept(embeddings, proxies) ** 2).sum(), proxies)[0][7]
        reference = (F.normalize(proxies, dim=1)[indices] * embeddings.unsqueeze(1)).sum(-1)
        torch.testing.assert_close(
            expected, torch.autograd.grad((reference**2).sum(), proxies)[0][7]
        )
    else:
        assert torch.autograd.gradcheck(kept, (embeddings, proxies))


def test_both_proxy_products_give_the_same_gradients():
    """Every proxy kept by many samples (sums of up to 40 terms), and the sharded loss's
    padding: repeated entries of one proxy in a row, with a zero incoming gradient."""
    generator = torch.Generator().manual_seed(9)
    embeddings = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    proxies = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    indices = torch.stack([torch.randperm(12, generator=generator)[:9] for _ in range(40)])
    indices[:5, -2:] = indices[:5, :1]  # each of these rows holds its first proxy 3 times
    incoming = torch.randn(40, 9, generator=generator, dtype=torch.float64)
    incoming[:5, -2:] = 0
    gradients = []
    for block_bytes in PROXY_PRODUCTS.values():
        x, p = embeddings.clone().requires_grad_(), proxies.clone().requires_grad_()
        values = (F.normalize(p, dim=1)[indices] * x.unsqueeze(1)).sum(-1).detach()
        kept = gml.kept_similarities(x, p, indices, values, block_bytes=block_bytes)
        gradients.append(torch.autograd.grad(kept, (x, p), incoming))
        # The selection's norms, handed over, are the ones the backward would compute.
        kept = gml.kept_similarities(
            x, p, indices, values, block_bytes=block_bytes, norms=gml.proxy_norms(p.detach())
        )
        for given, own in zip(torch.autograd.grad(kept, (x, p), incoming), gradients[-1]):
            torch.testing.assert_close(given, own, rtol=0, atol=0)
    for dense, sorted_bags in zip(*gradients):
        torch.testing.assert_close(dense, sorted_bags, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("selection_precision", ["fp32", "bf16"])
@pytest.mark.parametrize("sparse_proxy_grad", [False, True])
def test_a_step_reads_the_proxies_norms_once(selection_precision, sparse_proxy_grad):
    """The selection and the backward share one pass over the proxies for their norms."""
    loss_fn = ProxyGMLLoss(
        30,
        16,
        proxies_per_class=3,
        weight_lambda=0.0,
        selection_precision=selection_precision,
        sparse_proxy_grad=sparse_proxy_grad,
    )
    embeddings = torch.randn(8, 16, requires_grad=True)
    with mock.patch.object(gml, "proxy_norms", wraps=gml.proxy_norms) as norms:
        loss_fn(embeddings, torch.randint(0, 30, (8,))).backward()
    assert norms.call_count == 1


def test_sampled_regularizer_is_the_mean_over_the_sampled_rows():
    proxies = F.normalize(torch.randn(10 * 3, 6, dtype=torch.float64), dim=1)
    classes = torch.arange(30) // 3
    per_proxy = F.cross_entropy(
        proxies @ proxies.view(10, 3, 6).sum(1).T, classes, reduction="none"
    )
    rows = torch.tensor([4, 17, 29, 0])
    for block_elements in (10, 10**6):
        sampled = gml.proxy_regularizer(proxies, 3, block_elements, rows)
        torch.testing.assert_close(sampled, per_proxy[rows].mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sampled", [False, True])
def test_regularizer_gradient_passes_gradcheck(sampled):
    proxies = torch.randn(5 * 3, 4, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([1, 7, 8, 14]) if sampled else None
    for block_elements in (5, 10**6):  # one proxy per block, and all at once

        def regularizer(p, block_elements=block_elements):
            return gml.proxy_regularizer(F.normalize(p, dim=1), 3, block_elements, rows)

        assert torch.autograd.gradcheck(regularizer, (proxies,))

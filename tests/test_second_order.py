"""Second derivatives (double backward) and ``torch.func`` transforms of the loss.

The custom autograd Functions must be differentiable twice, as plain autograd is: checked by
``gradgradcheck`` (finite differences of the first derivatives), against plain autograd of
the same functions, and, for the whole loss, against the dense float64 reference.
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from pml_proxygml import ProxyGMLLoss
from pml_proxygml import functional as gml
from tests.reference import dense_official_loss, normalize_rows

# The issue's case: 3 classes x 2 proxies, d = 4, k = 3 (both positives and one negative).
NUM_CLASSES, DIM, PROXIES_PER_CLASS, TOP_K = 3, 4, 2, 3
LABELS = torch.tensor([0, 1, 2, 0, 1])
# (weight_lambda, sparse_proxy_grad): the sparse gradient excludes the regulariser.
MODES = [(0.0, False), (0.3, False), (0.0, True)]
MODE_IDS = ["lambda0", "lambda0.3", "sparse"]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def issue_case(weight_lambda, sparse_proxy_grad, seed=0, **kwargs):
    """``(loss_fn, x, p)``: the issue's float64 loss, its proxies ``p`` and embeddings ``x``."""
    loss_fn = ProxyGMLLoss(
        NUM_CLASSES,
        DIM,
        proxies_per_class=PROXIES_PER_CLASS,
        top_k=TOP_K,
        weight_lambda=weight_lambda,
        sparse_proxy_grad=sparse_proxy_grad,
        **kwargs,
    ).double()
    x = torch.randn(len(LABELS), DIM, generator=generator(seed), dtype=torch.float64)
    p = torch.randn(
        NUM_CLASSES * PROXIES_PER_CLASS, DIM, generator=generator(seed + 1), dtype=torch.float64
    )
    return loss_fn, x.requires_grad_(), p.requires_grad_()


def loss_of(loss_fn, labels=LABELS):
    """The loss as a function of ``(embeddings, proxies)``."""
    return lambda x, p: torch.func.functional_call(loss_fn, {"proxies": p}, (x, labels))


def reference_loss_of(loss_fn, labels=LABELS):
    """The dense float64 reference of ``loss_fn`` as a function of ``(embeddings, proxies)``."""

    def reference(x, p):
        return dense_official_loss(
            F.normalize(x, dim=1),
            p,
            labels,
            loss_fn.proxies_per_class,
            loss_fn.top_k,
            loss_fn.weight_lambda,
        )["loss_total"]

    return reference


def first_derivatives(function):
    """``inputs -> d/d inputs sum(w * function(inputs))``, recorded and made dense.

    Its ``gradcheck`` checks second derivatives along w (fixed random weights) like
    ``gradgradcheck``, which takes no sparse gradient.
    """

    def derivatives(*inputs):
        output = function(*inputs)
        weights = torch.randn(output.shape, generator=generator(7), dtype=output.dtype)
        grads = torch.autograd.grad((output * weights).sum(), inputs, create_graph=True)
        return tuple(grad.to_dense() for grad in grads)

    return derivatives


def assert_second_derivatives_pass_gradcheck(function, inputs, sparse_proxy_grad):
    if sparse_proxy_grad:
        # The undefined-gradient probe compares with ``eq``, which sparse gradients lack.
        assert torch.autograd.gradcheck(
            first_derivatives(function), inputs, check_undefined_grad=False
        )
    else:
        assert torch.autograd.gradgradcheck(function, inputs)


def hessian_vector_products(function, inputs, vectors):
    """d/d inputs of <d function / d inputs, vectors>, by double backward."""
    grads = torch.autograd.grad(function(*inputs), inputs, create_graph=True)
    directional = sum((grad.to_dense() * vector).sum() for grad, vector in zip(grads, vectors))
    return torch.autograd.grad(directional, inputs)


def hessian(function, inputs):
    """The dense Hessian of a scalar function over all its inputs' entries, row by row."""
    grads = torch.autograd.grad(function(*inputs), inputs, create_graph=True)
    flat = torch.cat([grad.to_dense().reshape(-1) for grad in grads])
    rows = []
    for entry in flat:
        second = torch.autograd.grad(entry, inputs, retain_graph=True, materialize_grads=True)
        rows.append(torch.cat([grad.reshape(-1) for grad in second]))
    return torch.stack(rows)


def plain_kept_similarities(x, p, indices):
    """The kept similarities by plain autograd ops, as the Function's reference."""
    return (normalize_rows(p)[indices] * x.unsqueeze(1)).sum(-1)


def kept_case(with_zero_proxy=False):
    embeddings = torch.randn(4, 6, generator=generator(5), dtype=torch.float64)
    proxies = torch.randn(15, 6, generator=generator(6), dtype=torch.float64)
    indices, _ = gml.select_topk(embeddings, proxies, torch.tensor([0, 1, 2, 4]), 3, 7)
    if with_zero_proxy:  # below F.normalize's clamp the map is linear, p / 1e-12
        proxies[7] = 0
        indices[:, -1] = 7
    return embeddings.requires_grad_(), proxies.requires_grad_(), indices


def kept_function(indices, sparse_proxy_grad):
    def kept(x, p):
        # As in the loss: the forward values come from the selection, without a gradient.
        values = plain_kept_similarities(x, p, indices).detach()
        return gml.kept_similarities(x, p, indices, values, sparse_proxy_grad)

    return kept


@pytest.mark.parametrize("sparse_proxy_grad", [False, True])
def test_kept_similarities_pass_gradgradcheck(sparse_proxy_grad):
    x, p, indices = kept_case()
    kept = kept_function(indices, sparse_proxy_grad)
    assert_second_derivatives_pass_gradcheck(kept, (x, p), sparse_proxy_grad)


@pytest.mark.parametrize("with_zero_proxy", [False, True])
@pytest.mark.parametrize("sparse_proxy_grad", [False, True])
def test_kept_similarities_second_derivatives_equal_plain_autograd(
    sparse_proxy_grad, with_zero_proxy
):
    """A nonlinear function of S, so that the incoming gradient itself depends on x and p."""
    x, p, indices = kept_case(with_zero_proxy)
    weights = torch.randn(indices.shape, generator=generator(8), dtype=torch.float64)
    vectors = torch.randn_like(x), torch.randn_like(p)
    kept = kept_function(indices, sparse_proxy_grad)

    def objective(similarities):
        return (weights * torch.sin(3 * similarities)).sum()

    ours = hessian_vector_products(lambda x, p: objective(kept(x, p)), (x, p), vectors)
    plain = hessian_vector_products(
        lambda x, p: objective(plain_kept_similarities(x, p, indices)), (x, p), vectors
    )
    for actual, expected in zip(ours, plain):
        assert actual.abs().sum() > 0
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def regularizer_case(sampled):
    proxies = torch.randn(5 * 3, 4, generator=generator(9), dtype=torch.float64)
    rows = torch.tensor([1, 7, 8, 14]) if sampled else None
    return proxies.requires_grad_(), rows


@pytest.mark.parametrize("block_elements", [5, 10**6])  # one proxy per block, and all at once
@pytest.mark.parametrize("sampled", [False, True])
def test_proxy_regularizer_passes_gradgradcheck(sampled, block_elements):
    proxies, rows = regularizer_case(sampled)

    def regularizer(p):
        return gml.proxy_regularizer(F.normalize(p, dim=1), 3, block_elements, rows)

    assert torch.autograd.gradgradcheck(regularizer, (proxies,))


@pytest.mark.parametrize("proxies_per_class", [1, 3])
def test_exact_regularizer_of_raw_proxies_passes_gradgradcheck(proxies_per_class):
    """The fused backward of ``exact_regularizer`` gives way to a differentiable one."""
    proxies = torch.randn(5 * proxies_per_class, 4, generator=generator(13), dtype=torch.float64)

    def regularizer(p):
        return gml.exact_regularizer(p, proxies_per_class, 7)

    assert torch.autograd.gradgradcheck(regularizer, (proxies.requires_grad_(),))


@pytest.mark.parametrize("block_elements", [4, 10**6])  # tiles of 2 (ragged) and one tile
def test_one_proxy_per_class_regularizer_passes_gradgradcheck(block_elements):
    """The symmetric-Gram path (N = 1, every proxy an anchor) is twice differentiable."""
    proxies = torch.randn(5, 4, generator=generator(12), dtype=torch.float64).requires_grad_()

    def regularizer(p):
        return gml.proxy_regularizer(F.normalize(p, dim=1), 1, block_elements)

    assert torch.autograd.gradgradcheck(regularizer, (proxies,))


@pytest.mark.parametrize("block_elements", [3, 10**6])
def test_regularizer_sum_second_derivatives(block_elements):
    """Anchors and class sums as independent inputs: gradgradcheck and plain autograd."""
    anchors = torch.randn(7, 4, generator=generator(10), dtype=torch.float64)
    class_sums = torch.randn(3, 4, generator=generator(11), dtype=torch.float64)
    inputs = anchors.requires_grad_(), class_sums.requires_grad_()
    classes = torch.tensor([0, 0, 1, 2, 2, 1, 0])

    def ours(a, u):
        return gml.regularizer_sum(a, u, classes, block_elements)

    def plain(a, u):
        return F.cross_entropy(a @ u.T, classes, reduction="sum")

    assert torch.autograd.gradgradcheck(ours, inputs)
    vectors = torch.randn_like(anchors), torch.randn_like(class_sums)
    for actual, expected in zip(
        hessian_vector_products(ours, inputs, vectors),
        hessian_vector_products(plain, inputs, vectors),
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("weight_lambda", "sparse_proxy_grad"), MODES, ids=MODE_IDS)
def test_loss_passes_gradgradcheck(weight_lambda, sparse_proxy_grad):
    """The issue's case: gradgradcheck over (embeddings, proxies) via functional_call."""
    loss_fn, x, p = issue_case(weight_lambda, sparse_proxy_grad)
    assert_second_derivatives_pass_gradcheck(loss_of(loss_fn), (x, p), sparse_proxy_grad)


@pytest.mark.parametrize(("weight_lambda", "sparse_proxy_grad"), MODES, ids=MODE_IDS)
def test_loss_hessian_is_symmetric_and_equals_the_reference(weight_lambda, sparse_proxy_grad):
    loss_fn, x, p = issue_case(weight_lambda, sparse_proxy_grad)
    ours = hessian(loss_of(loss_fn), (x, p))
    reference = hessian(reference_loss_of(loss_fn), (x, p))
    num_embedding_entries = x.numel()
    mixed = ours[:num_embedding_entries, num_embedding_entries:]
    assert mixed.abs().max() > 1e-3  # the block the issue found asymmetric is not trivial
    torch.testing.assert_close(mixed, ours[num_embedding_entries:, :num_embedding_entries].T)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("selection_block_bytes", [1, gml.DEFAULT_SELECTION_BLOCK_BYTES])
@pytest.mark.parametrize("top_k", [2, 3, 7, 18])  # k < N, k = N, k > N, k = C * N
@pytest.mark.parametrize(("weight_lambda", "sparse_proxy_grad"), MODES, ids=MODE_IDS)
def test_hessian_vector_products_equal_the_reference(
    weight_lambda, sparse_proxy_grad, top_k, selection_block_bytes
):
    num_classes, proxies_per_class, dim, batch_size = 6, 3, 5, 8
    loss_fn = ProxyGMLLoss(
        num_classes,
        dim,
        proxies_per_class=proxies_per_class,
        top_k=top_k,
        weight_lambda=weight_lambda,
        sparse_proxy_grad=sparse_proxy_grad,
        selection_block_bytes=selection_block_bytes,
        regularizer_block_elements=7,
    ).double()
    source = generator(12)
    x = torch.randn(batch_size, dim, generator=source, dtype=torch.float64)
    p = torch.randn(num_classes * proxies_per_class, dim, generator=source, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch_size,), generator=source)
    inputs = x.requires_grad_(), p.requires_grad_()
    vectors = torch.randn_like(x), torch.randn_like(p)
    ours = hessian_vector_products(loss_of(loss_fn, labels), inputs, vectors)
    reference = hessian_vector_products(reference_loss_of(loss_fn, labels), inputs, vectors)
    for actual, expected in zip(ours, reference):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("weight_lambda", "sparse_proxy_grad"), MODES, ids=MODE_IDS)
def test_torch_func_grad_equals_autograd(monkeypatch, weight_lambda, sparse_proxy_grad, dtype):
    """torch.func.grad wraps its inputs in tensors without storage: no numpy top-k, and no
    timing of the GEMM orientation (which every block of plain tensors gets here)."""
    monkeypatch.setattr(gml, "ORIENTATION_MIN_MULTIPLY_ADDS", 0)
    monkeypatch.setattr(gml, "_TRANSPOSED_PRODUCT", {})
    loss_fn, x, p = issue_case(weight_lambda, sparse_proxy_grad)
    loss_fn, x, p = loss_fn.to(dtype), x.detach().to(dtype), p.detach().to(dtype)
    function = loss_of(loss_fn)
    func_grads = torch.func.grad(function, argnums=(0, 1))(x, p)
    assert not gml._TRANSPOSED_PRODUCT
    inputs = x.requires_grad_(), p.requires_grad_()
    autograd_grads = torch.autograd.grad(function(*inputs), inputs)
    assert gml._TRANSPOSED_PRODUCT
    for actual, expected in zip(func_grads, autograd_grads):
        assert actual.layout == expected.layout
        torch.testing.assert_close(actual.to_dense(), expected.to_dense())


@pytest.mark.parametrize(("weight_lambda", "sparse_proxy_grad"), MODES, ids=MODE_IDS)
def test_nested_torch_func_grad_gives_the_hessian_vector_product(weight_lambda, sparse_proxy_grad):
    loss_fn, x, p = issue_case(weight_lambda, sparse_proxy_grad)
    vectors = torch.randn_like(x), torch.randn_like(p)
    first = torch.func.grad(loss_of(loss_fn), argnums=(0, 1))

    def directional(x, p):
        return sum((grad.to_dense() * vector).sum() for grad, vector in zip(first(x, p), vectors))

    ours = torch.func.grad(directional, argnums=(0, 1))(x.detach(), p.detach())
    expected = hessian_vector_products(loss_of(loss_fn), (x, p), vectors)
    for actual, wanted in zip(ours, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("weight_lambda", "sparse_proxy_grad"), MODES, ids=MODE_IDS)
def test_a_plain_backward_takes_the_fused_path(weight_lambda, sparse_proxy_grad):
    """The differentiable gradients are only built when a graph of the backward is needed."""
    loss_fn, x, p = issue_case(weight_lambda, sparse_proxy_grad)
    recorded = {}
    for name in ("_differentiable_kept_gradients", "_differentiable_regularizer_gradients"):
        recorded[name] = mock.patch.object(gml, name, wraps=getattr(gml, name))
    with (
        recorded["_differentiable_kept_gradients"] as kept,
        recorded["_differentiable_regularizer_gradients"] as regularizer,
    ):
        loss_of(loss_fn)(x, p).backward()
        assert kept.call_count == regularizer.call_count == 0
        hessian_vector_products(loss_of(loss_fn), (x, p), (torch.ones_like(x), torch.ones_like(p)))
        assert kept.call_count == 1 and regularizer.call_count == (weight_lambda > 0)

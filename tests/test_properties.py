"""Property-based tests (hypothesis): the loss and its pieces against the dense float64 reference.

Random C, N, d, B and k (k < N, k = N, k > N, k = C * N), lambda, duplicated and rescaled
proxies (exact ties in the similarities, also across block boundaries), duplicated, zero and
tiny or huge embeddings and proxies, selection and regulariser blocks down to one row, and
sparse proxy gradients. Ties at the k-th place make the kept set ambiguous: the reference
then takes the implementation's set after checking that it is a top k (``selection_mask``).

The example count is bounded and derandomised for CI; ``PROXYGML_PROPERTY_EXAMPLES=2000``
runs a longer search.
"""

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import event, example, given, reject, settings
from hypothesis import strategies as st

from pml_proxygml import ProxyGMLLoss
from pml_proxygml import functional as gml
from tests.reference import (
    SELECTION_TOLERANCE,
    dense_official_loss,
    dense_proxy_regularizer,
    selection_mask,
)
from tests.test_second_order import hessian_vector_products, loss_of

PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("PROXYGML_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    derandomize=True,
    database=None,
)

# Row scales: below F.normalize's 1e-12 clamp, tiny, plain, huge.
SCALES = (1e-14, 1e-6, 1.0, 1e6, 1e100)
BLOCK_ROWS = (1, 3, None)  # rows of one selection or regulariser block; None: the default


@dataclass
class Problem:
    embeddings: torch.Tensor
    proxies: torch.Tensor
    labels: torch.Tensor
    proxies_per_class: int
    top_k: int
    weight_lambda: float
    sparse_proxy_grad: bool
    selection_block_bytes: int
    regularizer_block_elements: int

    @property
    def num_classes(self) -> int:
        return len(self.proxies) // self.proxies_per_class

    def loss(self) -> ProxyGMLLoss:
        loss_fn = ProxyGMLLoss(
            self.num_classes,
            self.proxies.shape[1],
            proxies_per_class=self.proxies_per_class,
            top_k=self.top_k,
            weight_lambda=self.weight_lambda,
            sparse_proxy_grad=self.sparse_proxy_grad,
            selection_block_bytes=self.selection_block_bytes,
            regularizer_block_elements=self.regularizer_block_elements,
        ).double()
        with torch.no_grad():
            loss_fn.proxies.copy_(self.proxies)
        return loss_fn


def scaled_rows(
    draw, rows: torch.Tensor, source: torch.Generator, zero_rows: bool = True
) -> torch.Tensor:
    """One scale for all rows or one per row, from ``SCALES``; maybe some rows zero."""
    if draw(st.booleans()):
        picks = torch.randint(0, len(SCALES), (len(rows),), generator=source)
        rows = rows * torch.tensor(SCALES, dtype=rows.dtype)[picks].unsqueeze(1)
    else:
        rows = rows * draw(st.sampled_from(SCALES))
    if zero_rows and draw(st.booleans()):
        rows[torch.rand(len(rows), generator=source) < 0.2] = 0
    return rows


def shared_directions(draw, rows: torch.Tensor, source: torch.Generator) -> torch.Tensor:
    """Maybe the rows of fewer distinct directions, each times a power of two (bit for bit
    the same cosines): exact ties within and across classes, and across selection blocks."""
    if not draw(st.booleans()):
        return rows
    distinct = draw(st.integers(1, min(2, len(rows))))
    picks = torch.randint(0, distinct, (len(rows),), generator=source)
    return rows[picks] * 2.0 ** torch.randint(-3, 4, (len(rows), 1), generator=source)


def with_copies(draw, rows: torch.Tensor, source: torch.Generator) -> torch.Tensor:
    """Maybe some rows copied over others."""
    if len(rows) < 2 or not draw(st.booleans()):
        return rows
    rows = rows.clone()
    copies = draw(st.integers(1, len(rows) - 1))
    targets = torch.randperm(len(rows), generator=source)[:copies]
    rows[targets] = rows[torch.randint(0, len(rows), (copies,), generator=source)]
    return rows


@st.composite
def problems(draw, second_order: bool = False) -> Problem:
    """A random problem; for ``second_order`` without zero proxies when lambda > 0: the
    loss normalises them with ``F.normalize`` there, whose second derivative at 0 is NaN."""
    num_classes = draw(st.integers(1, 6))
    proxies_per_class = draw(st.integers(1, 4))
    dim = draw(st.integers(1, 6))
    batch_size = draw(st.integers(1, 8))
    total = num_classes * proxies_per_class
    k_kinds = {"N": (proxies_per_class, proxies_per_class), "C * N": (total, total)}
    if proxies_per_class > 1:
        k_kinds["below N"] = (1, proxies_per_class - 1)
    if total > proxies_per_class + 1:
        k_kinds["between N and C * N"] = (proxies_per_class + 1, total - 1)
    k_kind = draw(st.sampled_from(sorted(k_kinds)))
    event(f"k: {k_kind}")
    top_k = draw(st.integers(*k_kinds[k_kind]))
    weight_lambda = draw(st.sampled_from([0.0, 0.3, 1.7]))
    sparse_proxy_grad = weight_lambda == 0 and draw(st.booleans())
    selection_rows = draw(st.sampled_from(BLOCK_ROWS))
    regularizer_rows = draw(st.sampled_from(BLOCK_ROWS))

    source = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    proxies = torch.randn(total, dim, generator=source, dtype=torch.float64)
    zero_proxies = not (second_order and weight_lambda > 0)
    proxies = scaled_rows(draw, proxies, source, zero_rows=zero_proxies)
    proxies = shared_directions(draw, proxies, source)
    labels = torch.randint(0, num_classes, (batch_size,), generator=source)
    if draw(st.booleans()):  # near one own-class proxy, as trained embeddings are
        own = F.normalize(proxies[labels * proxies_per_class], dim=1)
        embeddings = own + 0.3 * torch.randn(batch_size, dim, generator=source, dtype=torch.float64)
    else:
        embeddings = torch.randn(batch_size, dim, generator=source, dtype=torch.float64)
    embeddings = with_copies(draw, scaled_rows(draw, embeddings, source), source)
    return Problem(
        embeddings=embeddings,
        proxies=proxies,
        labels=labels,
        proxies_per_class=proxies_per_class,
        top_k=top_k,
        weight_lambda=weight_lambda,
        sparse_proxy_grad=sparse_proxy_grad,
        selection_block_bytes=(selection_rows or 1 << 20) * batch_size * 8,
        regularizer_block_elements=(regularizer_rows or 1 << 20) * num_classes,
    )


def tied_problem() -> Problem:
    """An explicit example: 3 classes x 2 proxies of one direction (times powers of two),
    so that every sample's one negative is a four-way tie, across one-row blocks."""
    direction = torch.tensor([[0.6, -0.8, 0.0]], dtype=torch.float64)
    proxies = direction * torch.tensor([[1.0], [2.0], [0.5], [4.0], [1.0], [8.0]])
    embeddings = torch.tensor([[1.0, 0.5, 0.0], [-0.3, 0.2, 2.0]], dtype=torch.float64)
    return Problem(
        embeddings=embeddings,
        proxies=proxies,
        labels=torch.tensor([0, 2]),
        proxies_per_class=2,
        top_k=3,
        weight_lambda=0.3,
        sparse_proxy_grad=False,
        selection_block_bytes=2 * 8,
        regularizer_block_elements=3,
    )


@contextlib.contextmanager
def recorded_selections():
    """Records what ``select_topk`` returns while the loss runs (the kept proxies)."""
    selections = []
    select_topk = gml.select_topk

    def recording(*args, **kwargs):
        selections.append(select_topk(*args, **kwargs))
        return selections[-1]

    with mock.patch.object(gml, "select_topk", recording):
        yield selections


def ranking(problem: Problem, labelled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, CN) cosine similarities and the official ranking scores, S + 1000 * positive."""
    similarity = F.normalize(problem.embeddings, dim=1) @ F.normalize(problem.proxies, dim=1).T
    if not labelled:
        return similarity, similarity
    classes = torch.arange(len(problem.proxies)) // problem.proxies_per_class
    return similarity, similarity + 1000 * (classes == problem.labels.unsqueeze(1))


def ambiguity(problem: Problem, kept: torch.Tensor) -> str | None:
    """Why the loss at this example is not one number (None if it is); notes ties.

    The official loss drops a class whose logit is exactly 0 from the softmax, so a class
    whose kept similarities cancel (e.g. opposite proxies in one dimension) is in or out
    depending on rounding. Ties at the k-th place are fine: the reference takes ``kept``.
    """
    similarity, scores = ranking(problem)
    lowest_kept = scores.gather(1, kept).amin(dim=1)
    highest_left = scores.scatter(1, kept, float("-inf")).amax(dim=1)
    if bool((highest_left >= lowest_kept - SELECTION_TOLERANCE).any()):
        event("tie at the k-th place")
    kept_similarity = similarity.gather(1, kept)
    kept_classes = kept // problem.proxies_per_class
    logits = torch.zeros(len(kept), problem.num_classes, dtype=torch.float64)
    magnitudes = logits.scatter_add(1, kept_classes, kept_similarity.abs())
    logits = logits.scatter_add(1, kept_classes, kept_similarity)
    if bool(((magnitudes > 0) & (logits.abs() <= 1e-12 * magnitudes)).any()):
        return "the kept similarities of a class cancel"
    return None


def compare_or_reject(outcomes: Counter, reason: str | None) -> None:
    """Counts the example as compared (no ``reason``), or rejects it for ``reason``."""
    outcomes[reason or "compared"] += 1
    if reason is not None:
        event(f"not compared: {reason}")
        reject()


def assert_mostly_compared(outcomes: Counter) -> None:
    """Rejections must stay rare (about 3% over 1,500 examples), or the property would
    test little: at least 80% of the examples are compared."""
    rejected = sum(outcomes.values()) - outcomes["compared"]
    assert outcomes["compared"] >= 4 * rejected, outcomes


def reference_loss(problem: Problem, kept: torch.Tensor):
    """The reference loss of ``problem`` with the given kept proxies, a function of (x, p)."""

    def reference(x, p):
        return dense_official_loss(
            F.normalize(x, dim=1),
            p,
            problem.labels,
            problem.proxies_per_class,
            problem.top_k,
            problem.weight_lambda,
            kept=kept,
        )["loss_total"]

    return reference


def problem_inputs(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh leaves ``(embeddings, proxies)`` that require a gradient."""
    return problem.embeddings.clone().requires_grad_(), problem.proxies.clone().requires_grad_()


def inverse_norms(rows: torch.Tensor) -> torch.Tensor:
    """1 / max(|row|, 1e-12): how much F.normalize scales a change of each row."""
    return torch.linalg.vector_norm(rows, dim=1).clamp_min(gml.NORM_EPS).reciprocal()


def assert_close_to_reference(
    actual: torch.Tensor, expected: torch.Tensor, row_scales: torch.Tensor, equal_nan=False
) -> None:
    """Entry-wise within 1e-7 relative, or within 1e-9 of its row's scale.

    The terms of a gradient are O(1) in the unit-norm similarities, times the inverse norm
    of the normalised row (``row_scales``), and cancel to rounding noise of that size
    whatever the result: zero or tiny rows put 1e12 into gradients, huge ones 1e-100.
    """
    allowed = 1e-7 * expected.abs() + 1e-9 * row_scales.unsqueeze(1)
    close = (actual - expected).abs() <= allowed
    if equal_nan:
        close |= actual.isnan() & expected.isnan()
    assert bool(close.all()), f"{actual} differs from {expected} by more than {allowed}"


def test_loss_and_gradients_match_the_reference():
    outcomes = Counter()

    @PROPERTY_SETTINGS
    @given(problems())
    @example(tied_problem())
    def check(problem):
        loss_fn = problem.loss()
        x, _ = problem_inputs(problem)
        with recorded_selections() as selections:
            loss = loss_fn(x, problem.labels)
        loss.backward()
        (kept, _), *_ = selections
        compare_or_reject(outcomes, ambiguity(problem, kept))
        x_ref, p_ref = problem_inputs(problem)
        reference = reference_loss(problem, kept)(x_ref, p_ref)
        reference.backward()

        torch.testing.assert_close(loss, reference, rtol=1e-9, atol=1e-12)
        assert_close_to_reference(x.grad, x_ref.grad, inverse_norms(x))
        proxy_grad = loss_fn.proxies.grad
        if problem.sparse_proxy_grad:
            rows = proxy_grad._indices()[0].tolist()  # one entry per touched proxy
            assert proxy_grad.is_sparse and sorted(set(rows)) == sorted(rows)
            assert set(rows) <= set(kept.flatten().tolist())
            proxy_grad = proxy_grad.to_dense()
        assert_close_to_reference(proxy_grad, p_ref.grad, inverse_norms(p_ref))

    check()
    assert_mostly_compared(outcomes)


@PROPERTY_SETTINGS
@given(problems(), st.booleans())
def test_selection_is_a_top_k_with_positives_first(problem, labelled):
    x = F.normalize(problem.embeddings, dim=1)
    labels = problem.labels if labelled else None
    indices, values = gml.select_topk(
        x,
        problem.proxies,
        labels,
        problem.proxies_per_class,
        problem.top_k,
        problem.selection_block_bytes,
    )
    similarity, scores = ranking(problem, labelled)
    selection_mask(scores, problem.top_k, kept=indices)  # raises unless a top k
    torch.testing.assert_close(values, similarity.gather(1, indices), rtol=1e-12, atol=1e-15)


@PROPERTY_SETTINGS
@given(problems(), st.integers(0, 2**32 - 1), st.booleans())
def test_proxy_regularizer_matches_the_reference(problem, seed, sampled):
    proxies, per_class = problem.proxies, problem.proxies_per_class
    rows = None
    if sampled:
        source = torch.Generator().manual_seed(seed)
        rows = torch.randperm(len(proxies), generator=source)[: max(1, len(proxies) // 2)]
    p = proxies.clone().requires_grad_()
    ours = gml.proxy_regularizer(
        F.normalize(p, dim=1), per_class, problem.regularizer_block_elements, rows
    )
    ours.backward()
    p_ref = proxies.clone().requires_grad_()
    reference = dense_proxy_regularizer(F.normalize(p_ref, dim=1), per_class, rows)
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    assert_close_to_reference(p.grad, p_ref.grad, inverse_norms(p))


def test_hessian_vector_products_match_the_reference():
    """``F.normalize``'s second derivative at a zero embedding is NaN, in both."""
    outcomes = Counter()

    @PROPERTY_SETTINGS
    @given(problems(second_order=True), st.integers(0, 2**32 - 1))
    @example(tied_problem(), 0)
    def check(problem, seed):
        loss_fn = problem.loss()
        inputs = problem_inputs(problem)
        source = torch.Generator().manual_seed(seed)
        vectors = tuple(torch.randn(t.shape, generator=source, dtype=t.dtype) for t in inputs)
        with recorded_selections() as selections:
            ours = hessian_vector_products(loss_of(loss_fn, problem.labels), inputs, vectors)
        (kept, _), *_ = selections
        compare_or_reject(outcomes, ambiguity(problem, kept))
        reference = hessian_vector_products(reference_loss(problem, kept), inputs, vectors)
        # Entry (row r) of H v sums terms of size |v_s| / (|r| |s|) over the rows s.
        largest_term = max(
            (vector.abs().amax(dim=1) * inverse_norms(row)).max()
            for row, vector in zip(inputs, vectors)
        )
        for actual, expected, row in zip(ours, reference, inputs):
            assert_close_to_reference(
                actual, expected, inverse_norms(row) * largest_term, equal_nan=True
            )

    check()
    assert_mostly_compared(outcomes)

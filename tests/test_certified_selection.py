"""Certified selection: every screening precision keeps exactly the canonical top-k.

The canonical set is each row's k - N largest w_ij = fl(fl(x_i . p_j) * fl(1 / |p_j|)), ties
to the lower proxy index, the dot product by ``torch.sparse.sampled_addmm``. The reference
below computes w for every pair and sorts it; ``select_kept`` must return the same set for
"fp32", "bf16", "fp16" and "auto", on random inputs and on near-ties built to sit inside
the screening's error bound, where the bound forces rescoring and fallbacks.

The loss's default ``selection_precision="fp32"`` is not ``select_kept`` but the plain GEMM
ranking of ``select_topk``: it keeps the canonical set but for near-ties closer than the
GEMM's rounding (``test_the_default_selection_is_canonical_up_to_rounding``).
"""

import functools

import pytest
import torch
import torch.nn.functional as F

import tests.test_golden as golden_tests
from pml_proxygml import ProxyGMLLoss
from pml_proxygml import functional as gml
from tests.golden import CASE_IDS, CASES
from tests.test_precision_and_devices import HostSyncCounter

PRECISIONS = ["fp32", "bf16", "fp16", "auto"]
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def canonical_similarities(x, proxies):
    """(B, CN) w for every pair, by the sampled product over a dense pattern."""
    batch, num_proxies = len(x), len(proxies)
    pattern = torch.sparse_csr_tensor(
        torch.arange(0, batch * num_proxies + 1, num_proxies),
        torch.arange(num_proxies).repeat(batch),
        torch.zeros(batch * num_proxies, dtype=x.dtype),
        size=(batch, num_proxies),
        check_invariants=True,
    )
    dots = torch.sparse.sampled_addmm(pattern, x, proxies.T).values().view(batch, num_proxies)
    return dots * gml.proxy_norms(proxies).reciprocal()


def canonical_negatives(x, proxies, labels, proxies_per_class, k):
    """(B, k - N) canonical negatives in ascending index, and their w."""
    w = canonical_similarities(x, proxies)
    keys, count = w, k
    if labels is not None:
        positives = gml.positive_proxy_indices(labels, proxies_per_class)
        keys, count = w.scatter(1, positives, float("-inf")), k - proxies_per_class
    # A stable descending sort keeps equal keys in index order: ties to the lower index.
    kept = keys.sort(dim=1, descending=True, stable=True).indices[:, :count].sort(dim=1).values
    return kept, w.gather(1, kept)


def assert_canonical(selection, x, proxies, labels, proxies_per_class, k, exact_values):
    positives = 0 if labels is None else min(k, proxies_per_class)
    indices, values = selection.indices, selection.similarities
    if labels is not None:
        own = gml.positive_proxy_indices(labels, proxies_per_class)
        assert torch.equal(indices[:, :positives].sort(dim=1).values, own[:, :positives]) or (
            k < proxies_per_class
        )
    if k <= positives:
        return
    expected, expected_values = canonical_negatives(x, proxies, labels, proxies_per_class, k)
    negatives, values = indices[:, positives:], values[:, positives:]
    order = negatives.argsort(dim=1)
    negatives, values = negatives.gather(1, order), values.gather(1, order)
    assert torch.equal(negatives, expected)
    if exact_values and not selection.fallback_rows:  # a fallback row has GEMM values
        assert torch.equal(values, expected_values)
    else:  # the GEMM's value where the screening was certain: equal to the dtype's rounding
        scale = x.norm(dim=1, keepdim=True) * 4 * x.shape[1] * torch.finfo(x.dtype).eps
        assert ((values - expected_values).abs() <= scale).all()


def random_problem(seed, dtype, batch, classes, per_class, dim, normalised, labelled):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=generator, dtype=dtype)
    x = (
        F.normalize(x, dim=1)
        if normalised
        else x * 10 ** (6 * torch.rand((), generator=generator) - 3)
    )
    proxies = torch.randn(classes * per_class, dim, generator=generator, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), generator=generator) if labelled else None
    return x, proxies, labels


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalised", [True, False])
@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize(
    ("classes", "per_class", "dim", "k"),
    [
        (200, 1, 64, 10),  # k << CN
        (60, 4, 33, 4),  # k = N: the positives only
        (60, 4, 33, 3),  # k < N
        (50, 3, 17, 140),  # large k: the margin reaches every proxy
        (50, 3, 17, 147),  # every negative kept
        (300, 2, 128, 31),
    ],
)
def test_every_precision_keeps_the_canonical_set(
    precision, dtype, normalised, labelled, classes, per_class, dim, k
):
    seed = hash((classes, per_class, dim, k, normalised, labelled)) % 2**31
    x, proxies, labels = random_problem(
        seed, dtype, 24, classes, per_class, dim, normalised, labelled
    )
    selection = gml.select_kept(x, proxies, labels, per_class, k, precision=precision)
    exact_values = precision in LOW and k < classes * per_class - (per_class if labelled else 0)
    assert_canonical(selection, x, proxies, labels, per_class, k, exact_values)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_low_precision_equals_fp32_kept_sets_values_and_both_gradients(precision, dtype):
    """The loss in ``precision`` against its default (``select_topk``): these random inputs
    hold no near-ties below fp32 rounding, so kept sets are equal; ``select_kept`` in
    ``precision`` and in the compute dtype return the same set and values."""
    generator = torch.Generator().manual_seed(11)
    embeddings = torch.randn(40, 96, generator=generator, dtype=dtype)
    labels = torch.randint(0, 150, (40,), generator=generator)
    proxies = torch.randn(150 * 3, 96, generator=generator, dtype=dtype)
    results = {}
    for mode in ("fp32", precision):
        loss_fn = ProxyGMLLoss(150, 96, proxies_per_class=3, r=0.1, selection_precision=mode)
        loss_fn = loss_fn.to(dtype)
        with torch.no_grad():
            loss_fn.proxies.copy_(proxies)
        x = embeddings.clone().requires_grad_()
        loss = loss_fn(x, labels)
        loss.backward()
        kept = gml.select_kept(
            F.normalize(embeddings, dim=1), proxies, labels, 3, 45, precision=mode
        )
        results[mode] = (kept, loss.detach(), x.grad, loss_fn.proxies.grad)
    (kept, loss, grad_x, grad_p), (kept_low, loss_low, grad_x_low, grad_p_low) = results.values()
    by_index, by_index_low = kept.indices.sort(dim=1), kept_low.indices.sort(dim=1)
    assert torch.equal(by_index.values, by_index_low.values)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(
        kept.similarities.gather(1, by_index.indices),
        kept_low.similarities.gather(1, by_index_low.indices),
        rtol=0,
        atol=500 * eps,
    )
    torch.testing.assert_close(loss, loss_low, rtol=100 * eps, atol=0)
    torch.testing.assert_close(grad_x, grad_x_low, rtol=1000 * eps, atol=1000 * eps)
    torch.testing.assert_close(grad_p, grad_p_low, rtol=1000 * eps, atol=1000 * eps)


def near_ties(dtype, spacing, copies=300, base=0.5, dim=512, classes=400):
    """Six identical unit embeddings x and 400 proxies (N=1): ``copies`` of them at cosine
    base, base + spacing, base + 2 spacing... to x, the others at cosine -0.3, so the k-th
    place lies among the copies, closer than bf16 or fp16 (or, small, float32) can tell."""
    generator = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(dim, generator=generator, dtype=torch.float64), dim=0)
    directions = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    directions = F.normalize(directions - (directions @ x).unsqueeze(1) * x, dim=1)
    cosine = torch.full((classes, 1), -0.3, dtype=torch.float64)
    cosine[:copies, 0] = base + spacing * torch.arange(copies, dtype=torch.float64)
    proxies = cosine * x + (1 - cosine**2).sqrt() * directions
    return x.expand(6, dim).to(dtype), proxies.to(dtype)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spacing", [0.0, 1e-9, 1e-6, 1e-4])
def test_near_ties_inside_the_bound(precision, dtype, spacing):
    """300 proxies within 300 * spacing of each other hold the k-th place: low precision
    cannot order them (nor, below ~1e-5, can fp32's bound), so rows fall back, and still
    the canonical set comes out; spacing 0 makes exact ties, broken towards lower index."""
    x, proxies = near_ties(dtype, spacing)
    labels = torch.arange(6) + 350  # positives outside the tied group
    selection = gml.select_kept(x, proxies, labels, 1, 40, precision=precision)
    assert_canonical(selection, x, proxies, labels, 1, 40, exact_values=precision in LOW)
    negatives = selection.indices[:, 1:].sort(dim=1).values
    assert torch.equal(negatives, negatives[:1].expand(6, 39))  # identical rows
    if precision in LOW and spacing <= 1e-6:  # more uncertain candidates than the margin
        assert selection.fallback_rows == 6


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    ("base", "spacing"), [(0.5, 1e-9), (0.5, 1e-7), (0.02, 1e-9), (0.5, 1e-5), (0.5, 1e-4)]
)
@pytest.mark.parametrize("k", [11, 21, 30, 36])
def test_near_ties_decided_by_rescoring(precision, base, spacing, k):
    """40 near-tied proxies around the k-th, few enough for the margin: the row is
    certified where it is screened, and rescoring, not the screening, orders them (at
    cosine 0.02, float32 GEMM values are finer than 1e-9 and yet misordered)."""
    x, proxies = near_ties(torch.float32, spacing, copies=40, base=base)
    selection = gml.select_kept(x, proxies, torch.arange(6) + 350, 1, k, precision=precision)
    assert_canonical(selection, x, proxies, torch.arange(6) + 350, 1, k, precision in LOW)
    if spacing >= 1e-5:
        assert selection.fallback_rows == 0


def test_exact_ties_go_to_the_lower_index():
    """8 copies of 5 proxies, k = 12: all 8 copies of the best, the 4 first of the next."""
    proxies = torch.randn(5, 8, dtype=torch.float64).repeat(8, 1)
    x = torch.randn(3, 8, dtype=torch.float64)
    order = canonical_similarities(x, proxies)[:, :5].argsort(dim=1, descending=True)
    copies = torch.arange(0, 40, 5)
    expected = [
        sorted((copies + best).tolist() + (copies[:4] + second).tolist())
        for best, second in order[:, :2].tolist()
    ]
    for precision in ("fp32", "bf16", "fp16"):
        kept = (
            gml.select_kept(x, proxies, None, 1, 12, precision=precision).indices.sort(dim=1).values
        )
        assert kept.tolist() == expected


def test_zero_embeddings_tie_everything():
    """x = 0: every w is 0, no screening can certify anything; the lowest indices win."""
    x, proxies = torch.zeros(2, 16), torch.randn(300, 16)
    labels = torch.tensor([0, 299])
    for precision in ("fp32", "bf16", "fp16"):
        selection = gml.select_kept(x, proxies, labels, 1, 30, precision=precision)
        assert selection.fallback_rows == 2
        negatives = [[j for j in range(300) if j != label][:29] for label in (0, 299)]
        assert selection.indices[:, 1:].sort(dim=1).values.tolist() == negatives


def test_the_loss_counts_fallback_rows():
    x, proxies = near_ties(torch.float32, 1e-6, copies=300)
    loss_fn = ProxyGMLLoss(400, 512, proxies_per_class=1, top_k=40, selection_precision="bf16")
    loss_fn.collect_stats = True
    with torch.no_grad():
        loss_fn.proxies.copy_(proxies)
    loss_fn(x, torch.arange(6) + 350)
    assert loss_fn.selection_fallback_rows == 6
    loss_fn(F.normalize(torch.randn(6, 512), dim=1), torch.arange(6) + 350)
    assert loss_fn.selection_fallback_rows == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("screening", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("normalised", [True, False])
def test_the_error_bound_holds_for_every_pair(dtype, screening, normalised):
    """|score - w| <= E + c |score| over all pairs, wherever the GEMM and w disagree most."""
    x, proxies, labels = random_problem(7, dtype, 32, 2000, 1, 256, normalised, True)
    inverse_norms = gml.proxy_norms(proxies).reciprocal()
    problem = gml._Screening(x, proxies, inverse_norms, labels[:, None], 1 << 30)
    lp = LOW.get(screening, dtype)
    screened = gml._screened(problem, len(proxies), lp)
    scores, bound = screened.scores.double(), screened.bound
    w = canonical_similarities(x, proxies).double().gather(1, screened.columns)
    w = torch.ldexp(w, screened.exponents)  # in the scores' units
    finite = scores.isfinite()
    gap = (scores - w).abs() - (bound.error + bound.relative * scores.abs())
    assert (gap[finite] <= 0).all()
    # and the bound is not vacuous: within 20x of the largest error seen (bf16, fp16)
    if lp in LOW.values():
        seen = ((scores - w).abs()[finite]).max()
        assert bound.error.max() < 20 * seen


@pytest.mark.parametrize("relative", [0.0, 2.0**-8, 2.0**-11])
def test_thresholds_invert_the_bound(relative):
    """least_reaching(v) is where s + E + c|s| meets v - E - c|v|, least_beating(v) where
    s - E - c|s| meets v + E + c|v|: sound just outside, tight to float64 rounding."""
    generator = torch.Generator().manual_seed(8)
    scores = torch.randn(1000, 1, generator=generator, dtype=torch.float64)
    error = torch.rand(1000, 1, generator=generator, dtype=torch.float64) * 1e-3
    bound = gml._Bound(error, relative)

    def upper(s):
        return s + error + relative * s.abs()

    def lower(s):
        return s - error - relative * s.abs()

    reaching, beating = bound.least_reaching(scores), bound.least_beating(scores)
    below = torch.where(reaching > 0, reaching * (1 - 1e-9), reaching * (1 + 1e-9)) - 1e-12
    above = torch.where(beating > 0, beating * (1 + 1e-9), beating * (1 - 1e-9)) + 1e-12
    assert (upper(below) < lower(scores)).all() and (lower(above) > upper(scores)).all()
    torch.testing.assert_close(upper(reaching), lower(scores), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lower(beating), upper(scores), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("legacy", "high"), ("legacy", "medium"), ("mkldnn", "bf16"), ("mkldnn", "tf32")],
)
def test_reduced_precision_float32_matmuls_are_accounted_for(setting, value):
    """torch may run float32 GEMMs in TF32 / bf16 (legacy or per-backend API); the fp32
    screening's bound widens to match, and mixing the two APIs does not break it."""
    x, proxies, labels = random_problem(5, torch.float32, 16, 3000, 1, 256, True, True)
    legacy = torch.get_float32_matmul_precision()
    try:
        if setting == "legacy":
            torch.set_float32_matmul_precision(value)
        else:
            torch.backends.mkldnn.matmul.fp32_precision = value
        assert gml._matmul_input_unit(x) == {"high": 2.0**-11, "tf32": 2.0**-11}.get(value, 2.0**-8)
        selection = gml.select_kept(x, proxies, labels, 1, 150, precision="fp32")
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision(legacy)
    assert_canonical(selection, x, proxies, labels, 1, 150, exact_values=False)
    assert gml._matmul_input_unit(x) == 0.0


@pytest.mark.parametrize("low", list(LOW.values()))
@pytest.mark.parametrize(
    ("batch", "num_proxies", "dim"), [(3, 50, 7), (64, 3000, 512), (9, 700, 2048)]
)
def test_low_precision_gemms_sum_in_float32_here(low, batch, num_proxies, dim):
    """The bound's assumption: products summed in float32, the sum rounded once to the
    format. Values of 1 plus (d - 1) terms of u/2 lose every term if summed in low
    precision; summed in float32 the result is the format's rounding of the exact sum."""
    tiny_term = torch.finfo(low).eps / 4
    x = torch.full((batch, dim), tiny_term, dtype=torch.float64)
    x[:, 0] = 1
    p = torch.ones(num_proxies, dim, dtype=torch.float64)
    exact = 1 + (dim - 1) * tiny_term
    assert torch.equal(
        (x.to(low) @ p.to(low).T).double(), torch.full((batch, num_proxies), exact).to(low).double()
    )
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(batch, dim, generator=generator).to(low)
    b = torch.randn(num_proxies, dim, generator=generator).to(low)
    exact = a.double() @ b.double().T
    unit = torch.finfo(low).eps / 2
    summed = gml._gamma(dim, 2.0**-24) * (a.double().abs() @ b.double().abs().T)
    error = ((a @ b.T).double() - exact).abs()
    assert (error <= unit / (1 - unit) * exact.abs() + summed * (1 + unit)).all()


def test_sampled_products_are_canonical():
    """A pair's w has the same bits in either orientation and whatever else is asked."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(50, 100, generator=generator)
    proxies = torch.randn(5000, 100, generator=generator)
    problem = gml._Screening(
        x, proxies, gml.proxy_norms(proxies).reciprocal(), x.new_empty(50, 0), 0
    )
    rows = torch.randint(0, 50, (8000,), generator=generator).sort().values
    columns = torch.randint(0, 5000, (8000,), generator=generator)
    proxy_major = gml._canonical_similarities(problem, rows, columns)  # pairs > proxies
    sample_major = torch.cat(
        [
            gml._canonical_similarities(problem, rows[i : i + 10], columns[i : i + 10])
            for i in range(0, 8000, 10)
        ]
    )
    assert torch.equal(proxy_major, sample_major)
    assert torch.equal(proxy_major, canonical_similarities(x, proxies)[rows, columns])


def select_topk_by(precision, *args, **kwargs):
    """``gml.select_topk``'s result, from ``select_kept`` in ``precision``."""
    return gml.select_kept(*args, **kwargs, precision=precision)[:2]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_golden_cases_in_every_precision(monkeypatch, case, precision):
    """tests/test_golden.py's checks, with the loss and the selection in this precision
    (the loss's "fp32" is its default, ``select_topk``, which test_golden.py checks too)."""
    monkeypatch.setattr(
        golden_tests,
        "loss_for_case",
        functools.partial(golden_tests.loss_for_case, selection_precision=precision),
    )
    monkeypatch.setattr(gml, "select_topk", functools.partial(select_topk_by, precision))
    for dtype in (torch.float64, torch.float32):
        golden_tests.test_loss_and_gradients_from_raw_embeddings(case, dtype)
        golden_tests.test_selection_logits_and_probabilities(case, dtype)
    golden_tests.test_official_input_convention(case)
    golden_tests.test_sub_losses(case)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_host_syncs_per_step_do_not_grow_with_the_classes(monkeypatch, precision):
    monkeypatch.setattr(gml, "AUTO_MIN_MULTIPLY_ADDS", 0)  # "auto" measures, then screens
    counts = []
    for classes in (300, 3000):
        loss_fn = ProxyGMLLoss(
            classes,
            64,
            proxies_per_class=2,
            top_k=40,
            check_inputs=False,
            selection_precision=precision,
        )
        embeddings = torch.randn(16, 64, requires_grad=True)
        labels = torch.randint(0, classes, (16,))
        loss_fn(embeddings, labels)  # "auto" measures on the first call
        with HostSyncCounter() as counter:
            loss_fn(embeddings, labels).backward()
        counts.append(len(counter.syncs))
    # select_kept reads its counts of rescored pairs and uncertified rows; the default none.
    assert counts[0] == counts[1] == (0 if precision == "fp32" else 1)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_step_runs_on_the_meta_device(precision):
    with torch.device("meta"):
        loss_fn = ProxyGMLLoss(
            100, 64, proxies_per_class=12, check_inputs=False, selection_precision=precision
        )
        embeddings = torch.randn(32, 64, requires_grad=True)
        loss = loss_fn(embeddings, torch.randint(0, 100, (32,)))
        loss.backward()
        logits = loss_fn.get_logits(embeddings)
    assert loss.device.type == "meta" and logits.shape == (32, 100)
    assert embeddings.grad.shape == (32, 64) and loss_fn.proxies.grad.shape == (1200, 64)


def test_auto_measures_once_per_shape_and_keeps_the_same_set(monkeypatch):
    monkeypatch.setattr(gml, "AUTO_MIN_MULTIPLY_ADDS", 0)
    monkeypatch.setattr(gml, "_FASTEST_SCREENING", {})
    timed = []
    original = gml._selection_seconds
    monkeypatch.setattr(
        gml, "_selection_seconds", lambda *args: timed.append(args[2]) or original(*args)
    )
    x, proxies, labels = random_problem(9, torch.float32, 20, 500, 2, 48, True, True)
    auto = gml.select_kept(x, proxies, labels, 2, 30, precision="auto")
    gml.select_kept(x, proxies, labels, 2, 30, precision="auto")
    assert timed == [torch.float32, torch.bfloat16, torch.float16]  # once, every candidate
    (choice,) = gml._FASTEST_SCREENING.values()
    assert choice in timed
    # Whichever screening the timings chose (it varies with the machine's load), the kept
    # set is the canonical one; the order of the negatives within a row may differ.
    assert_canonical(auto, x, proxies, labels, 2, 30, exact_values=False)


def test_small_problems_screen_in_the_compute_dtype_unmeasured(monkeypatch):
    monkeypatch.setattr(gml, "_FASTEST_SCREENING", {})
    x, proxies, labels = random_problem(9, torch.float32, 20, 500, 2, 48, True, True)
    gml.select_kept(x, proxies, labels, 2, 30, precision="auto")
    assert gml._FASTEST_SCREENING == {}
    assert gml.AUTO_MIN_MULTIPLY_ADDS > 20 * 1000 * 48


def test_bad_precisions_are_rejected():
    x, proxies = torch.randn(2, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="precision must be one of"):
        gml.select_kept(x, proxies, None, 1, 2, precision="int8")
    with pytest.raises(ValueError, match="selection_precision must be one of"):
        ProxyGMLLoss(3, 4, proxies_per_class=2, selection_precision="fp64")


def rounding_tolerance(x, proxies):
    """(B, 1): twice the bound on |fl(x . p_j) r_j - (x . p_j) r_j| for any summation order,
    2 gamma_(d+2) |x| (1 + u) (Higham, Thm 3.1; the norms' rounding in the + 2): the most a
    GEMM's value and the canonical w of one pair may differ by."""
    unit = torch.finfo(x.dtype).eps / 2
    terms = (x.shape[1] + 2) * unit
    return 2 * terms / (1 - terms) * (1 + unit) * x.double().norm(dim=1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("seed", "spacing"), [(1, None), (2, None), (3, 0.0), (4, 1e-9), (5, 1e-7), (6, 1e-4)]
)
def test_the_default_selection_is_canonical_up_to_rounding(dtype, seed, spacing):
    """``select_topk`` (the loss's default) keeps the canonical set, except that a proxy it
    keeps or drops against the canonical order lies within ``rounding_tolerance`` of the
    canonical boundary; its values are the canonical ones to within that tolerance."""
    if spacing is None:
        x, proxies, labels = random_problem(seed, dtype, 24, 300, 2, 64, False, True)
        per_class, k = 2, 41
    else:  # 300 near-tied proxies around the k-th place
        x, proxies = near_ties(dtype, spacing)
        labels, per_class, k = torch.arange(6) + 350, 1, 40
    indices, values = gml.select_topk(x, proxies, labels, per_class, k)
    w = canonical_similarities(x, proxies)
    torch.testing.assert_close(
        values.double(),
        w.gather(1, indices).double(),
        rtol=0,
        atol=rounding_tolerance(x, proxies).max().item(),
    )
    expected, _ = canonical_negatives(x, proxies, labels, per_class, k)
    kept = indices[:, per_class:].sort(dim=1).values
    tolerance = rounding_tolerance(x, proxies)
    boundary = w.gather(1, expected).amin(dim=1, keepdim=True).double()
    for row in range(len(x)):
        differing = set(kept[row].tolist()) ^ set(expected[row].tolist())
        gaps = (w[row, list(differing)].double() - boundary[row]).abs()
        assert bool((gaps <= tolerance[row]).all()), (row, differing)
    if spacing is None or spacing >= 1e-4:  # no sub-rounding near-ties: the same set
        assert torch.equal(kept, expected)

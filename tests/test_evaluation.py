"""DMLAccuracyCalculator against brute-force numpy references."""

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.inference import FaissKMeans, FaissKNN
from sklearn.metrics import normalized_mutual_info_score

from pml_proxygml.evaluation import (
    DEFAULT_RECALL_KS,
    DMLAccuracyCalculator,
    as_float_dict,
    recall_key,
)

KS = (1, 2, 4, 8, 16)
DTYPES = [torch.float32, torch.float64]


def random_data(n=240, dim=8, classes=10, seed=0, lone=True):
    """Continuous Gaussian embeddings (no ties) and labels; optionally one singleton class."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    y = rng.integers(0, classes, size=n)
    if lone:
        y[0] = classes  # a class with a single item: a "lone" query
    return x, y


def neighbour_match(query, query_labels, reference=None, reference_labels=None):
    """(Q, R') same-label matrix of each query's neighbours by float64 cosine, self excluded."""
    same_source = reference is None
    if same_source:
        reference, reference_labels = query, query_labels
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    sim = q @ r.T
    if same_source:
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    if same_source:
        order = order[:, :-1]  # the query itself, ranked last
    return reference_labels[order] == query_labels[:, None]


def brute_recall(match, ks):
    has_positive = match.any(axis=1)  # lone queries are excluded, as PML does
    return {recall_key(k): match[has_positive, :k].any(axis=1).mean() for k in ks}


def brute_map_at_r(match):
    aps, rps = [], []
    for row in match:
        r = int(row.sum())
        if r == 0:
            continue
        top = row[:r].astype(np.float64)
        precision = np.cumsum(top) / np.arange(1, r + 1)
        aps.append((precision * top).sum() / r)
        rps.append(top.sum() / r)
    return np.mean(aps), np.mean(rps)


class SpyKNN:
    """PML's FaissKNN (inner product) that records the k it is asked for."""

    def __init__(self):
        self.inner = FaissKNN(index_init_fn=faiss.IndexFlatIP)
        self.ks = []

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        self.ks.append(k)
        return self.inner(query, k, reference, ref_includes_query)


class RecordingKMeans:
    """PML's default FaissKMeans that records its inputs and the cluster labels it returns."""

    def __init__(self):
        self.inner = FaissKMeans(niter=20)
        self.calls = []

    def __call__(self, x, num_clusters):
        labels = self.inner(x, num_clusters)
        self.calls.append((x.clone(), num_clusters, labels.clone()))
        return labels


@pytest.mark.parametrize("dtype", DTYPES)
def test_recall_at_k_matches_brute_force_cosine(dtype):
    x, y = random_data()
    calc = DMLAccuracyCalculator(KS, include=tuple(recall_key(k) for k in KS))
    got = calc.get_flat_accuracy(torch.as_tensor(x, dtype=dtype), torch.as_tensor(y))
    expected = brute_recall(neighbour_match(x, y), KS)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # Non-trivial values, increasing with K, so a broken K slice cannot pass.
    values = [got[recall_key(k)] for k in KS]
    assert 0 < values[0] < values[-1] < 1
    assert values == sorted(values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_recall_with_separate_reference_set(dtype):
    x, y = random_data(n=300, classes=8, seed=1, lone=False)
    q, ql, r, rl = x[:100], y[:100], x[100:], y[100:]
    calc = DMLAccuracyCalculator(KS, include=tuple(recall_key(k) for k in KS))
    got = calc.get_flat_accuracy(
        torch.as_tensor(q, dtype=dtype), ql, torch.as_tensor(r, dtype=dtype), rl
    )
    expected = brute_recall(neighbour_match(q, ql, r, rl), KS)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_recall_requests_at_least_max_k_neighbours():
    x, y = random_data(seed=2)
    spy = SpyKNN()
    calc = DMLAccuracyCalculator(
        (1, 16), k=1, knn_func=spy, include=("recall_at_1", "recall_at_16")
    )
    got = calc.get_flat_accuracy(x, y)
    assert spy.ks and min(spy.ks) >= 16
    expected = brute_recall(neighbour_match(x, y), (16,))
    assert got["recall_at_16"] == pytest.approx(expected["recall_at_16"], abs=1e-12)
    assert got["recall_at_16"] > got["recall_at_1"]


def test_recall_k_capped_at_available_neighbours():
    x = np.random.default_rng(3).normal(size=(6, 4))
    y = np.array([0, 0, 1, 1, 2, 2])
    spy = SpyKNN()
    calc = DMLAccuracyCalculator((1, 10, 100, 1000), knn_func=spy, include=(recall_key(1000),))
    got = calc.get_flat_accuracy(x, y)
    assert spy.ks == [5]
    assert got[recall_key(1000)] == 1.0


def test_cosine_ranking_ignores_embedding_norms():
    x, y = random_data(seed=4)
    scale = np.random.default_rng(5).uniform(0.1, 10.0, size=(len(x), 1))
    include = tuple(recall_key(k) for k in KS)
    base = DMLAccuracyCalculator(KS, include=include).get_flat_accuracy(x, y)
    assert DMLAccuracyCalculator(KS, include=include).get_flat_accuracy(x * scale, y) == base
    # Without normalisation (PML's stock L2 k-NN) the norms do matter on this data.
    raw = DMLAccuracyCalculator(KS, include=include, normalize_embeddings=False)
    assert raw.get_flat_accuracy(x * scale, y) != base


def test_float32_and_float64_inputs_agree():
    x, y = random_data(seed=6)
    calc = DMLAccuracyCalculator(KS, exclude=("NMI", "AMI"))
    r32 = calc.get_flat_accuracy(torch.as_tensor(x, dtype=torch.float32), y)
    r64 = calc.get_flat_accuracy(torch.as_tensor(x, dtype=torch.float64), y)
    assert r32 == pytest.approx(r64, abs=1e-12)


def test_ties_use_pml_neighbour_order_deterministically():
    rng = np.random.default_rng(7)
    points = rng.normal(size=(4, 8))
    x = points[rng.integers(0, 4, size=120)]  # many exact duplicates: tied similarities
    y = rng.integers(0, 5, size=120)
    calc = DMLAccuracyCalculator(KS, exclude=("NMI", "AMI"))
    first, second = calc.get_flat_accuracy(x, y), calc.get_flat_accuracy(x, y)
    assert first == second
    # Recall@1 sees exactly the neighbour list PML's precision_at_1 sees.
    assert first["recall_at_1"] == first["precision_at_1"]


def test_recall_avg_of_avgs_is_mean_over_classes():
    x, y = random_data(seed=8, lone=False)
    calc = DMLAccuracyCalculator((4,), include=(recall_key(4),), avg_of_avgs=True)
    got = calc.get_flat_accuracy(x, y)[recall_key(4)]
    hits = neighbour_match(x, y)[:, :4].any(axis=1)
    expected = np.mean([hits[y == c].mean() for c in np.unique(y)])
    assert got == pytest.approx(expected, abs=1e-12)
    assert got != pytest.approx(hits.mean(), abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_map_at_r_and_r_precision_match_numpy(dtype):
    x, y = random_data(n=40, dim=4, classes=3, seed=9)
    calc = DMLAccuracyCalculator(include=("mean_average_precision_at_r", "r_precision"))
    got = calc.get_flat_accuracy(torch.as_tensor(x, dtype=dtype), y)
    map_r, r_prec = brute_map_at_r(neighbour_match(x, y))
    assert got["mean_average_precision_at_r"] == pytest.approx(map_r, abs=1e-12)
    assert got["r_precision"] == pytest.approx(r_prec, abs=1e-12)
    assert 0 < map_r < r_prec < 1  # a non-degenerate example


def test_map_at_r_hand_example():
    # Unit vectors at these angles; label 1 is lone (excluded), R = 2 for the others.
    # Rankings: q0 -> [same, other, same]: AP = 1/2; q1 -> [same, other, same]: AP = 1/2;
    # q3 -> [other, same, same]: AP = (1/2) / 2 = 1/4. MAP@R = 5/12.
    angles = np.array([0.0, 0.1, 0.25, 0.45])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    y = np.array([0, 0, 1, 0])
    assert brute_map_at_r(neighbour_match(x, y))[0] == pytest.approx(5 / 12)
    got = DMLAccuracyCalculator(include=("mean_average_precision_at_r",)).get_flat_accuracy(x, y)
    assert got["mean_average_precision_at_r"] == pytest.approx(5 / 12, abs=1e-12)


def test_nmi_is_pml_nmi_of_pml_clusters():
    x, y = random_data(n=400, dim=8, classes=5, seed=10, lone=False)
    kmeans = RecordingKMeans()
    got = DMLAccuracyCalculator(include=("NMI",), kmeans_func=kmeans).get_flat_accuracy(x, y)
    ((clustered, num_clusters, cluster_labels),) = kmeans.calls
    assert num_clusters == 5
    # k-means runs on the unit-normalised embeddings.
    torch.testing.assert_close(clustered.norm(dim=1), torch.ones(len(x)), rtol=0, atol=1e-5)
    expected = normalized_mutual_info_score(y, cluster_labels.numpy())
    assert got["NMI"] == pytest.approx(expected, abs=1e-12)


def test_nmi_near_one_on_separated_blobs_and_near_zero_on_random_labels():
    # PML's default FaissKMeans has a single random initialisation, which on clean blobs
    # often merges two of them (NMI ~0.87 for 5 blobs); restarts make the optimum reliable.
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(5, 16)) * 10
    y = np.repeat(np.arange(5), 80)
    blobs = centers[y] + rng.normal(scale=0.1, size=(len(y), 16))
    calc = DMLAccuracyCalculator(include=("NMI",), kmeans_func=FaissKMeans(niter=20, nredo=10))
    assert calc.get_flat_accuracy(blobs, y)["NMI"] > 0.99
    random_labels = rng.permutation(y)
    assert calc.get_flat_accuracy(blobs, random_labels)["NMI"] < 0.05


def test_any_recall_ks_with_any_pml_metrics():
    assert DMLAccuracyCalculator().recall_ks == DEFAULT_RECALL_KS == (1, 2, 4, 8)
    assert DMLAccuracyCalculator((8, 1, 4, 1)).recall_ks == (1, 4, 8)
    others = ("NMI", "precision_at_1", "r_precision", "mean_average_precision_at_r")
    large = DMLAccuracyCalculator(
        (1, 10, 100, 1000), include=(*(recall_key(k) for k in (1, 10, 100, 1000)), *others)
    )
    assert large.recall_keys == ("recall_at_1", "recall_at_10", "recall_at_100", "recall_at_1000")
    assert set(large.get_curr_metrics()) == {*large.recall_keys, *others}


def test_dataset_names_are_not_k_lists():
    """The paper's per-dataset K lists live in the benchmarks' recipes, not in the library."""
    with pytest.raises(ValueError, match="got the string 'sop'"):
        DMLAccuracyCalculator("sop")


@pytest.mark.parametrize("bad", [(), (0,), (2, -1), (True,), (1.5,)])
def test_invalid_recall_ks_rejected(bad):
    with pytest.raises(ValueError):
        DMLAccuracyCalculator(bad)


def test_as_float_dict():
    results = {
        "a": np.float32(0.5),
        "b": np.float64(0.25),
        "c": 1,
        "d": torch.tensor(0.75),
        "e": np.array(0.125),
    }
    flat = as_float_dict(results)
    assert flat == {"a": 0.5, "b": 0.25, "c": 1.0, "d": 0.75, "e": 0.125}
    assert all(type(v) is float for v in flat.values())
    with pytest.raises(TypeError, match="not a scalar"):
        as_float_dict({"per_class": [0.1, 0.2]})

"""Retrieval and clustering metrics as reported by ProxyGML and the DML literature.

``DMLAccuracyCalculator`` is PML's ``AccuracyCalculator`` plus Recall@K for any tuple of
K (keys ``recall_at_1``, ``recall_at_2``, ...). Everything else is PML's own code, reused
unchanged: ``NMI``/``AMI`` (faiss k-means with as many clusters as query classes),
``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r`` and friends.

Distance: by default embeddings are L2-normalised and neighbours are ranked by inner
product, i.e. by cosine similarity, using PML's ``FaissKNN`` with a flat inner-product
index. (PML's stock default is ``FaissKNN`` with an L2 index on the raw embeddings; on
unit vectors ``|a - b|^2 = 2 - 2 a.b`` so both give the same ranking up to float rounding.)
``normalize_embeddings=False`` restores PML's stock behaviour exactly.

Precision: PML casts embeddings to float32 before searching (faiss is float32-only).
float64 inputs are accepted; they are normalised in float64 and then cast.

Conventions, all PML's: when no reference set is given, the query set is its own reference
and each query is removed from its own neighbour list ("embeddings come from same
source"). Queries whose label has no other item in the reference set ("lone" queries) are
left out of every k-NN metric, so ``recall_at_1 == precision_at_1``. Ties in similarity
are ordered by the k-NN backend (faiss, deterministic for a given input), the same
neighbour lists that PML's metrics see; Recall@K never re-sorts them.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils import accuracy_calculator as pml_acc
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKNN

__all__ = [
    "DEFAULT_RECALL_KS",
    "DMLAccuracyCalculator",
    "as_float_dict",
    "recall_key",
]

# Recall@1/2/4/8, the usual report of DML papers on small datasets; any K list can be given.
DEFAULT_RECALL_KS: tuple[int, ...] = (1, 2, 4, 8)

_RECALL_PREFIX = "recall_at_"


def recall_key(k: int) -> str:
    """Metric name of Recall@k, e.g. ``recall_at_4``."""
    return f"{_RECALL_PREFIX}{k}"


def _validate_ks(recall_ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(recall_ks, str):
        raise ValueError(
            f"recall_ks must be a sequence of positive ints, got the string {recall_ks!r}"
        )
    ks = tuple(recall_ks)
    # bool is an int subclass; True as "K=1" is almost certainly a mistake.
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"recall_ks must be a non-empty sequence of positive ints, got {ks!r}")
    return tuple(sorted(set(ks)))


def _unit_rows(x: Any) -> torch.Tensor | None:
    """L2-normalise rows in the input's own float precision (numpy or torch input)."""
    if x is None:
        return None
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.float()
    return F.normalize(t, p=2, dim=1)


class DMLAccuracyCalculator(AccuracyCalculator):
    """PML ``AccuracyCalculator`` with Recall@K metrics and cosine retrieval by default.

    Args:
        recall_ks: the K values of Recall@K, e.g. ``(1, 10, 100, 1000)`` for a large
            dataset such as SOP.
        normalize_embeddings: L2-normalise query and reference before any metric, so that
            k-NN ranks by cosine similarity and k-means clusters unit vectors.
        k: as in PML, but the number of neighbours actually searched is raised to
            ``max(recall_ks)`` whenever a Recall@K metric is computed, and capped at the
            number of available neighbours. Defaults to ``"max_bin_count"`` (exact
            MAP@R/R-precision without an all-pairs search) rather than PML's ``None``.
            PML's ``mean_average_precision`` is MAP over the searched neighbours, so it
            depends on this number; the paper metrics do not.
        knn_func: PML k-NN callable; defaults to ``FaissKNN`` with an inner-product index
            when normalising, PML's own default (L2) otherwise.
        **kwargs: forwarded to ``AccuracyCalculator`` (``include``, ``exclude``,
            ``avg_of_avgs``, ``return_per_class``, ``label_comparison_fn``, ``device``,
            ``kmeans_func``).

    Recall@K is the fraction of (non-lone) queries with at least one same-label item among
    their K nearest neighbours. If K exceeds the number of neighbours available, all of
    them are used.
    """

    def __init__(
        self,
        recall_ks: Sequence[int] = DEFAULT_RECALL_KS,
        *,
        normalize_embeddings: bool = True,
        k: int | str | None = "max_bin_count",
        knn_func: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.recall_ks = _validate_ks(recall_ks)
        self.normalize_embeddings = normalize_embeddings
        # PML discovers metrics through dir(self) during __init__, so the per-K methods
        # must exist as instance attributes before the parent constructor runs.
        for rk in self.recall_ks:
            setattr(self, "calculate_" + recall_key(rk), functools.partial(self._recall_at, rk))
        if knn_func is None and normalize_embeddings:
            knn_func = FaissKNN(index_init_fn=faiss.IndexFlatIP)
        super().__init__(k=k, knn_func=knn_func, **kwargs)

    @property
    def recall_keys(self) -> tuple[str, ...]:
        """Metric names of the configured Recall@K values, in increasing K."""
        return tuple(recall_key(rk) for rk in self.recall_ks)

    def requires_knn(self) -> list[str]:
        return [*super().requires_knn(), *self.recall_keys]

    def determine_k(
        self, bin_counts: torch.Tensor, num_reference_embeddings: int, ref_includes_query: bool
    ) -> int:
        k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
        if any(name in self.recall_keys for name in self.get_curr_metrics()):
            k = max(k, self.recall_ks[-1])
        # More neighbours than exist would make faiss pad with index -1, which would then
        # silently index the last reference label.
        return min(k, num_reference_embeddings - int(ref_includes_query))

    def _recall_at(
        self,
        recall_k: int,
        knn_labels: torch.Tensor,
        query_labels: torch.Tensor,
        not_lone_query_mask: torch.Tensor,
        label_counts: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Any,
    ) -> float | list[float]:
        knn_labels, query_labels = pml_acc.try_getting_not_lone_labels(
            knn_labels, query_labels, not_lone_query_mask
        )
        if knn_labels is None:
            return pml_acc.nan_accuracy(label_counts[0], self.return_per_class)
        # Same label test and same averaging helper as PML's precision_at_k, so custom
        # label_comparison_fn, avg_of_avgs and return_per_class behave identically.
        same_label = self.label_comparison_fn(query_labels[:, None], knn_labels[:, :recall_k])
        hit = torch.any(same_label, dim=1).to(torch.float64)
        return pml_acc.maybe_get_avg_of_avgs(
            hit, query_labels[:, None], self.avg_of_avgs, self.return_per_class
        )

    def get_accuracy(
        self,
        query: Any,
        query_labels: Any,
        reference: Any = None,
        reference_labels: Any = None,
        ref_includes_query: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> dict[str, Any]:
        """PML's ``get_accuracy``, after L2-normalising the embeddings if configured."""
        if self.normalize_embeddings:
            query, reference = _unit_rows(query), _unit_rows(reference)
        return super().get_accuracy(
            query,
            query_labels,
            reference,
            reference_labels,
            ref_includes_query,
            include=include,
            exclude=exclude,
        )

    def get_flat_accuracy(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``get_accuracy`` with the result passed through :func:`as_float_dict`."""
        return as_float_dict(self.get_accuracy(*args, **kwargs))


def as_float_dict(results: Mapping[str, Any]) -> dict[str, float]:
    """PML's result dict as ``{metric: float}`` (PML returns numpy and Python floats mixed).

    Raises ``TypeError`` for non-scalar values such as the per-class lists returned with
    ``return_per_class=True``.
    """
    flat: dict[str, float] = {}
    for name, value in results.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, (numbers.Real, np.bool_)):
            flat[name] = float(value)
        else:
            raise TypeError(f"metric {name!r} is not a scalar: {type(value).__name__}")
    return flat

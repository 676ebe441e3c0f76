"""ProxyGMLLoss: ProxyGML (Zhu et al., NeurIPS 2020) as a pytorch-metric-learning loss."""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .. import functional as gml

# Above this many multiply-adds per step the exact regulariser gets a warning.
REGULARIZER_WARNING_FLOPS = 1e11

LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def official_uniform_init(proxies: torch.Tensor) -> None:
    """U(-1/sqrt(CN), 1/sqrt(CN)): the official Kaiming-uniform(a=sqrt(5)) scale."""
    bound = 1.0 / math.sqrt(proxies.shape[0])
    with torch.no_grad():
        proxies.uniform_(-bound, bound)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class ProxyGMLLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """ProxyGML: deep graph metric learning with fewer proxies (NeurIPS 2020).

    Each sample keeps its k most relevant proxies (all of its own class first), sums the
    kept cosine similarities per class, and takes a softmax cross-entropy over the classes
    that appear in its sub-graph; a proxy regulariser weighted by ``weight_lambda`` pulls
    each proxy towards its own class. Computes what the official code computes, through a
    sparse path: nothing of size (CN, C) or (CN, CN) is built.

    Args:
        num_classes: C, the number of training classes; labels must lie in [0, C).
        embedding_size: d.
        proxies_per_class: N (official: 12 on CUB and Cars, 1 on SOP).
        r: fraction of the C * N proxies kept per sample, k = ceil(r * C * N).
        top_k: k itself; overrides ``r`` when given (capped at C * N).
        weight_lambda: weight of the proxy regulariser (official: 0.3 on CUB and Cars,
            0 on SOP). It costs O(C * N * C * d) per step; set 0 for very many classes.
        regularizer_samples: approximate the regulariser by its mean over this many proxies
            drawn uniformly each step (an unbiased estimate, cost O(samples * C * d) instead
            of O(C * N * C * d)); None (default) computes it exactly over all proxies.
        regularizer_block_elements: memory budget (in logits) of one block of the
            regulariser; larger problems are processed block by block.
        selection_block_bytes: memory budget of one (batch, block) block of similarities
            during selection; more proxies are streamed block by block with a running top-k.
        selection_precision: how the selection scores all proxies before rescoring its
            candidates exactly: ``"fp32"`` (the compute dtype), ``"bf16"`` or ``"fp16"``
            (certified low-precision screening), or ``"auto"`` (default: the fastest of
            them here, measured on the first step of each shape). Every choice keeps the
            same proxies (``functional.select_kept``); with ``collect_stats``,
            ``selection_fallback_rows`` counts the rows whose screening fell back.
        sparse_proxy_grad: give the proxies a sparse gradient holding only the rows some
            sample kept, for ``torch.optim.SparseAdam``: optimizer work and gradient memory
            then follow the B * k touched rows, not C * N. Needs ``weight_lambda=0`` and no
            ``weight_regularizer`` (both touch every proxy).
        check_inputs: check label range and finiteness of the embeddings every step
            (shapes and dtypes are always checked). The check costs one host
            synchronisation; turn it off in a tuned GPU loop.
        **kwargs: PML's ``reducer``, ``distance`` (``CosineSimilarity`` by default; a
            ``DotProductSimilarity(normalize_embeddings=False)`` skips normalising the
            embeddings, as the official loss does), ``embedding_regularizer``,
            ``weight_regularizer``, ``weight_init_func`` and ``collect_stats``.

    The proxies are one parameter ``proxies`` of shape (C * N, d), row j of class j // N.
    Sub-losses: ``loss`` (per-sample classification loss, batch mean by default) and
    ``proxy_reg_loss`` (``weight_lambda`` times the regulariser, already reduced).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int = 12,
        r: float = 0.05,
        top_k: int | None = None,
        weight_lambda: float = 0.3,
        regularizer_samples: int | None = None,
        regularizer_block_elements: int = gml.DEFAULT_REGULARIZER_BLOCK_ELEMENTS,
        selection_block_bytes: int = gml.DEFAULT_SELECTION_BLOCK_BYTES,
        selection_precision: str = "auto",
        sparse_proxy_grad: bool = False,
        check_inputs: bool = True,
        **kwargs,
    ):
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("embedding_size", embedding_size)
        _check_positive_int("proxies_per_class", proxies_per_class)
        if top_k is not None:
            _check_positive_int("top_k", top_k)
        if regularizer_samples is not None:
            _check_positive_int("regularizer_samples", regularizer_samples)
        _check_positive_int("regularizer_block_elements", regularizer_block_elements)
        _check_positive_int("selection_block_bytes", selection_block_bytes)
        if selection_precision not in gml.SELECTION_PRECISIONS:
            raise ValueError(
                f"selection_precision must be one of {gml.SELECTION_PRECISIONS}, "
                f"got {selection_precision!r}"
            )
        if not isinstance(r, numbers.Real) or not 0 < r <= 1:
            raise ValueError(f"r must be in (0, 1], got {r!r}")
        if not isinstance(weight_lambda, numbers.Real) or not weight_lambda >= 0:
            raise ValueError(f"weight_lambda must be >= 0, got {weight_lambda!r}")
        super().__init__(**kwargs)
        self._check_distance()
        if sparse_proxy_grad and (weight_lambda > 0 or self.weight_regularizer is not None):
            raise ValueError(
                "sparse_proxy_grad=True needs weight_lambda=0 and no weight_regularizer, got "
                f"weight_lambda={weight_lambda!r}, weight_regularizer={self.weight_regularizer!r}"
            )
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.proxies_per_class = int(proxies_per_class)
        self.r = float(r)
        self.weight_lambda = float(weight_lambda)
        self.regularizer_samples = regularizer_samples
        self.regularizer_block_elements = int(regularizer_block_elements)
        self.selection_block_bytes = int(selection_block_bytes)
        self.selection_precision = selection_precision
        self.sparse_proxy_grad = bool(sparse_proxy_grad)
        self.check_inputs = bool(check_inputs)
        self.top_k = gml.num_selected(self.r, self.num_classes, self.proxies_per_class, top_k)
        self.proxies = torch.nn.Parameter(
            torch.empty(self.num_classes * self.proxies_per_class, self.embedding_size)
        )
        self.weight_init_func(self.proxies)
        self.add_to_recordable_attributes(
            list_of_names=[
                "num_classes",
                "embedding_size",
                "proxies_per_class",
                "r",
                "top_k",
                "weight_lambda",
            ],
            is_stat=False,
        )
        self.add_to_recordable_attributes(
            list_of_names=[
                "avg_classes_per_subgraph",
                "proxy_reg_value",
                "selection_fallback_rows",
            ],
            is_stat=True,
        )
        self._warn_about_costly_or_degenerate_settings()

    def _check_distance(self) -> None:
        distance = self.distance
        if not isinstance(distance, DotProductSimilarity) or distance.power != 1 or distance.p != 2:
            raise ValueError(
                "ProxyGMLLoss requires distance to be CosineSimilarity() or "
                f"DotProductSimilarity() with p=2 and power=1, got {distance!r}"
            )

    def _warn_about_costly_or_degenerate_settings(self) -> None:
        if self.top_k <= self.proxies_per_class:
            warnings.warn(
                f"ProxyGMLLoss: top_k={self.top_k} <= proxies_per_class="
                f"{self.proxies_per_class}, so no proxy of another class is kept and the "
                "classification loss is ~0. Raise r or top_k (r=0.05 suits about 40 or "
                "more classes with 12 proxies each).",
                stacklevel=3,
            )
        anchors = self.num_classes * self.proxies_per_class
        if self.regularizer_samples is not None:
            anchors = min(anchors, self.regularizer_samples)
        flops = anchors * self.num_classes * self.embedding_size
        if self.weight_lambda > 0 and flops > REGULARIZER_WARNING_FLOPS:
            warnings.warn(
                f"ProxyGMLLoss: the proxy regulariser costs about {flops:.1e} multiply-adds "
                f"per step ({anchors} proxies x C={self.num_classes} classes x "
                f"d={self.embedding_size}). The official recipe for many classes (SOP) "
                "uses weight_lambda=0 and proxies_per_class=1; regularizer_samples "
                "approximates the regulariser at a fraction of the cost.",
                stacklevel=3,
            )

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """PML's forward; float16/bfloat16 embeddings are upcast to float32 on entry."""
        if torch.is_tensor(embeddings) and embeddings.dtype in LOW_PRECISION_DTYPES:
            embeddings = embeddings.float()
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        self._validate(embeddings, labels)
        with gml.full_precision(embeddings.device):
            x, proxies = self._inputs_in_compute_dtype(embeddings)
            selection = self._select_kept(x, proxies, labels)
            indices, values = selection.indices, selection.similarities
            per_sample, present = gml.subgraph_loss(
                gml.kept_similarities(x, proxies, indices, values, self.sparse_proxy_grad),
                indices // self.proxies_per_class,
                labels,
                classes_are_distinct=self.proxies_per_class == 1,
                classes_are_grouped=True,  # select_kept's layout
            )
            miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=x.dtype)
            loss_dict = {
                "loss": {
                    "losses": per_sample * miner_weights,
                    "indices": c_f.torch_arange_from_size(embeddings),
                    "reduction_type": "element",
                    # DivisorReducer reads this: the official loss is a batch mean.
                    "divisor": len(embeddings),
                },
                "proxy_reg_loss": self._proxy_regularization(proxies),
            }
            if self.collect_stats:
                self.avg_classes_per_subgraph = present.sum(dim=1).float().mean().item()
                self.selection_fallback_rows = selection.fallback_rows.item()
        self.add_weight_regularization_to_loss_dict(loss_dict, self.proxies)
        return loss_dict

    def _select_kept(self, x: torch.Tensor, proxies: torch.Tensor, labels) -> gml.Selection:
        return gml.select_kept(
            x,
            proxies,
            labels,
            self.proxies_per_class,
            self.top_k,
            self.selection_block_bytes,
            self.selection_precision,
        )

    def _proxy_regularization(self, proxies: torch.Tensor) -> dict:
        if self.weight_lambda == 0:
            return self.zero_loss()
        rows = None
        if self.regularizer_samples is not None and self.regularizer_samples < len(proxies):
            rows = torch.randperm(len(proxies), device=proxies.device)[: self.regularizer_samples]
        reg = gml.proxy_regularizer(
            F.normalize(proxies, p=2, dim=1),
            self.proxies_per_class,
            self.regularizer_block_elements,
            rows,
        )
        if self.collect_stats:
            self.proxy_reg_value = reg.item()
        return {
            "losses": self.weight_lambda * reg,
            "indices": None,
            "reduction_type": "already_reduced",
        }

    def _inputs_in_compute_dtype(
        self, embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (normalised if the distance says so) and raw proxies, in one dtype.

        The compute dtype is the promotion of both (at least float32): float64 embeddings
        or ``.double()`` proxies give float64 throughout. The parameter itself is never cast.
        The proxies are normalised inside the selection and its backward, never copied.
        """
        dtype = torch.promote_types(embeddings.dtype, self.proxies.dtype)
        embeddings = embeddings.to(dtype)
        proxies = self.proxies.to(device=embeddings.device, dtype=dtype)
        x = self.distance.maybe_normalize(embeddings)
        self.distance.reset_stats()
        if self.distance.collect_stats:
            unit_proxies = F.normalize(proxies.detach(), p=2, dim=1)
            self.distance.set_default_stats(embeddings, proxies, x, unit_proxies)
        return x, proxies

    def _validate(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """ValueErrors that name the bad argument; one host sync for the value checks."""
        self._validate_embedding_shape(embeddings)
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if not self.check_inputs:
            return
        labels_in_range = (labels.min() >= 0) & (labels.max() < self.num_classes)
        if bool(labels_in_range & torch.isfinite(embeddings).all()):
            return
        bad_labels = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad_labels) > 0:
            raise ValueError(
                f"labels must be in [0, num_classes={self.num_classes}), "
                f"got {bad_labels.unique().tolist()[:10]}"
            )
        bad_rows = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten()
        raise ValueError(f"embeddings contain NaN or Inf in rows {bad_rows.tolist()[:10]}")

    def _validate_embedding_shape(self, embeddings: torch.Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have shape (batch_size, {self.embedding_size}), "
                f"got {tuple(embeddings.shape)}"
            )
        if embeddings.shape[0] == 0:
            raise ValueError("embeddings is an empty batch (batch_size 0)")
        if not embeddings.is_floating_point():
            raise ValueError(f"embeddings must be floating point, got dtype {embeddings.dtype}")

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) class scores of ProxyGML's sub-graph without labels.

        Each sample keeps its k most similar proxies; a class scores the sum of its kept
        similarities, and classes with no kept proxy score -inf, so ``softmax`` of the
        result is ProxyGML's class distribution for the sample. Differentiable.
        """
        self._validate_embedding_shape(embeddings)
        with gml.full_precision(embeddings.device):
            x, proxies = self._inputs_in_compute_dtype(embeddings)
            selection = self._select_kept(x, proxies, None)
            indices, values = selection.indices, selection.similarities
            kept = gml.kept_similarities(x, proxies, indices, values, self.sparse_proxy_grad)
            kept_classes = indices // self.proxies_per_class
            scores = torch.zeros(len(x), self.num_classes, dtype=x.dtype, device=x.device)
            scores = scores.scatter_add(1, kept_classes, kept)
            selected = torch.zeros_like(scores, dtype=torch.bool).scatter(1, kept_classes, True)
            return scores.masked_fill(~selected, float("-inf"))

    def get_default_distance(self):
        return CosineSimilarity()

    def get_default_weight_init_func(self):
        return official_uniform_init

    def _sub_loss_names(self):
        return ["loss", "proxy_reg_loss"]

"""ProxyGMLLoss: ProxyGML (Zhu et al., NeurIPS 2020) as a pytorch-metric-learning loss."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

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

# The official r (CUB, Cars and SOP alike).
OFFICIAL_R = 0.05


def default_top_k(num_classes: int, proxies_per_class: int) -> int:
    """k when neither ``r`` nor ``top_k`` is given: ``max(ceil(0.05 * C * N), 2 * N)``.

    The official rounding keeps ``ceil(0.05 * C * N)`` proxies, no more than the sample's own
    N up to 20 classes: no other class enters the sub-graph and the loss is ~0 from the first
    step. At least 2 * N keeps the sample's N own proxies and N of other classes. Both
    agree whenever ``0.05 * C * N > 2 * N - 1``, so from 40 classes up (CUB, Cars and SOP
    keep their official k); never more than C * N.
    """
    official = gml.num_selected(OFFICIAL_R, num_classes, proxies_per_class)
    return min(max(official, 2 * proxies_per_class), num_classes * proxies_per_class)


# The regulariser's estimators (``regularizer_estimator``): which need a period, which rows.
REGULARIZER_ESTIMATORS = ("exact", "uniform", "lazy", "cached", "svrg")
PERIODIC_ESTIMATORS = ("lazy", "cached", "svrg")
SAMPLED_ESTIMATORS = ("uniform", "svrg")
DEFAULT_REGULARIZER_PERIOD = 16


def official_uniform_init(proxies: torch.Tensor) -> None:
    """U(-1/sqrt(CN), 1/sqrt(CN)): the official Kaiming-uniform(a=sqrt(5)) scale."""
    bound = 1.0 / math.sqrt(proxies.shape[0])
    with torch.no_grad():
        proxies.uniform_(-bound, bound)


def _is_number(value) -> bool:
    """A real number; ``True`` and ``False`` are flags, not numbers."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> None:
    if not (_is_number(value) and isinstance(value, numbers.Integral) and value >= 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_layout(saved: Mapping[str, Any] | None, expected: Mapping[str, Any], hint: str) -> None:
    """Refuse a checkpoint whose recorded layout differs from ``expected``.

    Every entry the checkpoint records must match; entries it does not record (a checkpoint
    saved before that entry existed) are not checked, and a checkpoint recording none at all
    is left to the proxies' shape check of ``load_state_dict``.
    """
    if saved is None or all(expected.get(key) == value for key, value in saved.items()):
        return
    raise ValueError(
        f"this checkpoint has layout {dict(saved)}, this loss has layout {dict(expected)}{hint}"
    )


def _check_input_types(embeddings, labels) -> None:
    """Errors naming the argument where PML's forward fails with an AttributeError or
    IndexError (a list or numpy array of labels, 0-d labels)."""
    if not torch.is_tensor(embeddings):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if labels is None:
        return  # labels_required says so
    if not torch.is_tensor(labels):
        raise TypeError(
            "labels must be a torch.Tensor of shape (batch_size,), got "
            f"{type(labels).__name__} (convert it with torch.as_tensor)"
        )
    if labels.ndim != 1:
        raise ValueError(
            f"labels must be a 1D tensor of shape (batch_size,), got shape {tuple(labels.shape)}"
        )


def _resolve_regularizer_estimator(
    estimator, period, samples, weight_lambda
) -> tuple[str, int | None]:
    """The estimator's name (None: uniform if ``samples`` is given, else exact) and period."""
    if estimator is None:
        estimator = "exact" if samples is None else "uniform"
    if not isinstance(estimator, str) or estimator not in REGULARIZER_ESTIMATORS:
        raise ValueError(
            f"regularizer_estimator must be one of {REGULARIZER_ESTIMATORS}, got {estimator!r}"
        )
    if period is not None and estimator not in PERIODIC_ESTIMATORS:
        raise ValueError(
            f"regularizer_period applies to regularizer_estimator in {PERIODIC_ESTIMATORS}, "
            f"got regularizer_estimator={estimator!r}"
        )
    if (samples is None) == (estimator in SAMPLED_ESTIMATORS):
        raise ValueError(
            f"regularizer_samples is needed by, and only by, regularizer_estimator in "
            f"{SAMPLED_ESTIMATORS}, got regularizer_estimator={estimator!r} and "
            f"regularizer_samples={samples!r}"
        )
    if estimator != "exact" and weight_lambda == 0:
        raise ValueError(
            f"regularizer_estimator={estimator!r} needs weight_lambda > 0 (with 0 there is "
            "no regulariser to estimate)"
        )
    if estimator in PERIODIC_ESTIMATORS and period is None:
        period = DEFAULT_REGULARIZER_PERIOD
    return estimator, period


def _sync_regularizer_step(loss: ProxyGMLLoss, incompatible_keys) -> None:
    """After ``load_state_dict``: the host copy of the step follows the loaded buffer."""
    loss._regularizer_steps_taken = int(loss.regularizer_step)


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
        r: fraction of the C * N proxies kept per sample, k = ceil(r * C * N) rounded as
            the official code rounds it (official: 0.05). None (default) keeps
            ``default_top_k(C, N) = max(ceil(0.05 * C * N), 2 * N)``: the official k from
            40 classes up, and proxies of other classes in every sub-graph below.
        top_k: k itself; overrides ``r`` when given (capped at C * N).
        weight_lambda: weight of the proxy regulariser (official: 0.3 on CUB and Cars,
            0 on SOP). It costs O(C * N * C * d) per step; set 0 for very many classes.
        regularizer_estimator: how each step estimates the regulariser (the exact one
            costs O(C * N * C * d)). ``"exact"``: the official recipe. ``"cached"``: the
            exact regulariser every ``regularizer_period``-th step; every step applies the
            last one's gradient, carried through the current normalisation (its value to
            first order), at O(C * N * d): the closest to exact per cost measured
            (``benchmarks/regularizer_estimators.py``). ``"lazy"``: the exact one every
            period-th step weighted by the period, else nothing (StyleGAN2's lazy
            regularisation): the same cost, but each step's gradient is 0 or m times the
            exact one. ``"svrg"``: cached plus a correction over ``regularizer_samples``
            uniform proxies (SVRG's control variate): unbiased, but its sampling noise
            exceeds cached's staleness. ``"uniform"``: the mean over
            ``regularizer_samples`` proxies drawn each step (unbiased; the proxies left out
            get no gradient from their own row). None (default): ``"uniform"`` if
            ``regularizer_samples`` is given, else ``"exact"``. The periodic estimators
            keep their step and cached gradient in buffers (in ``state_dict``: a resumed
            run keeps its schedule); a step is a call with gradients enabled, and other
            calls compute the exact value.
        regularizer_period: steps between exact regularisers of the periodic estimators
            (default 16).
        regularizer_samples: proxies drawn per step by ``"uniform"`` and ``"svrg"``.
        regularizer_block_elements: memory budget (in logits) of one block of the
            regulariser; larger problems are processed block by block.
        selection_block_bytes: memory budget of one (batch, block) block of similarities
            during selection; more proxies are streamed block by block with a running top-k.
        selection_precision: ``"fp32"`` (default): the proxies' GEMM in the compute dtype
            ranks them (``functional.select_topk``). ``"bf16"``, ``"fp16"``: a certified
            low-precision screening, exact candidates rescored (``functional.select_kept``),
            for hardware whose low-precision GEMMs are faster; ``"auto"``: the fastest
            certified screening here, the compute dtype's included, measured once per shape.
            They keep the same proxies but for near-ties closer than the fp32 GEMM's own
            rounding, which ``select_kept`` breaks one canonical way; with ``collect_stats``,
            ``selection_fallback_rows`` counts the rows a certified screening redid.
        sparse_proxy_grad: give the proxies a sparse gradient holding only the rows some
            sample kept, for ``torch.optim.SparseAdam``: optimizer work and gradient memory
            then follow the B * k touched rows, not C * N. Needs ``weight_lambda=0`` and no
            ``weight_regularizer`` (both touch every proxy).
        check_inputs: check label range and finiteness of the embeddings every step with a
            ValueError naming the bad values (shapes and dtypes are always checked). The
            check costs one host synchronisation; turn it off in a tuned GPU loop, where an
            out-of-range label still stops the step, through an asynchronous device assert
            (a RuntimeError on CPU).
        **kwargs: PML's ``reducer``, ``distance`` (``CosineSimilarity`` by default; a
            ``DotProductSimilarity(normalize_embeddings=False)`` skips normalising the
            embeddings, as the official loss does), ``embedding_regularizer``,
            ``weight_regularizer``, ``weight_init_func`` and ``collect_stats``.

    The proxies are one parameter ``proxies`` of shape (C * N, d), row j of class j // N.
    The loss computes in the promotion of the embeddings', the proxies' and float32 dtypes
    (``.double()`` proxies give a float64 loss) and returns the loss in that dtype.
    Sub-losses: ``loss`` (per-sample classification loss, batch mean by default) and
    ``proxy_reg_loss`` (``weight_lambda`` times the regulariser, already reduced).
    ``state_dict()`` records the layout (C, N, d) next to the proxies; loading a checkpoint
    of another layout raises a ValueError naming both.

    Subclasses change how proxies are created and laid out, selected, differentiated and
    regularised through ``_create_proxies``, ``_layout``, ``_select``,
    ``_kept_similarities`` and ``_proxy_regularization``.
    """

    # Appended to the message refusing a checkpoint of another layout.
    _LAYOUT_HINT = ""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int = 12,
        r: float | None = None,
        top_k: int | None = None,
        weight_lambda: float = 0.3,
        regularizer_samples: int | None = None,
        regularizer_estimator: str | None = None,
        regularizer_period: int | None = None,
        regularizer_block_elements: int = gml.DEFAULT_REGULARIZER_BLOCK_ELEMENTS,
        selection_block_bytes: int = gml.DEFAULT_SELECTION_BLOCK_BYTES,
        selection_precision: str = "fp32",
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
        if regularizer_period is not None:
            _check_positive_int("regularizer_period", regularizer_period)
        _check_positive_int("regularizer_block_elements", regularizer_block_elements)
        _check_positive_int("selection_block_bytes", selection_block_bytes)
        if selection_precision not in gml.SELECTION_PRECISIONS:
            raise ValueError(
                f"selection_precision must be one of {gml.SELECTION_PRECISIONS}, "
                f"got {selection_precision!r}"
            )
        if r is not None and not (_is_number(r) and 0 < r <= 1):
            raise ValueError(f"r must be in (0, 1], got {r!r}")
        if not (_is_number(weight_lambda) and 0 <= weight_lambda < math.inf):
            raise ValueError(f"weight_lambda must be a finite number >= 0, got {weight_lambda!r}")
        _check_flag("sparse_proxy_grad", sparse_proxy_grad)
        _check_flag("check_inputs", check_inputs)
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
        self.r = None if r is None else float(r)
        self.weight_lambda = float(weight_lambda)
        self.regularizer_samples = regularizer_samples
        self.regularizer_estimator, self.regularizer_period = _resolve_regularizer_estimator(
            regularizer_estimator, regularizer_period, regularizer_samples, weight_lambda
        )
        self.regularizer_block_elements = int(regularizer_block_elements)
        self.selection_block_bytes = int(selection_block_bytes)
        self.selection_precision = selection_precision
        self.sparse_proxy_grad = sparse_proxy_grad
        self.check_inputs = check_inputs
        if self.r is None and top_k is None:
            self.top_k = default_top_k(self.num_classes, self.proxies_per_class)
        else:
            self.top_k = gml.num_selected(self.r, self.num_classes, self.proxies_per_class, top_k)
        self.proxies = self._create_proxies()
        self.weight_init_func(self.proxies)
        self._register_regularizer_state()
        settings = ["num_classes", "embedding_size", "proxies_per_class", "top_k", "weight_lambda"]
        if self.r is not None:
            settings.append("r")
        self.add_to_recordable_attributes(list_of_names=settings, is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=[
                "avg_classes_per_subgraph",
                "proxy_reg_value",
                "selection_fallback_rows",
            ],
            is_stat=True,
        )
        self._warn_about_costly_or_degenerate_settings()

    def _create_proxies(self) -> torch.nn.Parameter:
        """The (C * N, d) proxies, class-major; ``weight_init_func`` initialises them."""
        return torch.nn.Parameter(
            torch.empty(self.num_classes * self.proxies_per_class, self.embedding_size)
        )

    def _layout(self) -> dict[str, int]:
        """What ``state_dict()`` records about the layout of the proxies."""
        return {
            "num_classes": self.num_classes,
            "proxies_per_class": self.proxies_per_class,
            "embedding_size": self.embedding_size,
        }

    def _register_regularizer_state(self) -> None:
        """Buffers of the periodic estimators: the step, and the cached exact regulariser.

        The step is also kept on the host, so choosing a step's work costs no device sync.
        """
        if self.regularizer_estimator not in PERIODIC_ESTIMATORS:
            return
        self.register_buffer("regularizer_step", torch.zeros((), dtype=torch.long))
        self._regularizer_steps_taken = 0
        self.register_load_state_dict_post_hook(_sync_regularizer_step)
        if self.regularizer_estimator != "lazy":
            self.register_buffer("regularizer_anchor_value", torch.zeros(()))
            self.register_buffer("regularizer_anchor_proxies", torch.zeros_like(self.proxies))
            self.register_buffer("regularizer_anchor_gradient", torch.zeros_like(self.proxies))

    def _regularizer_rows_per_step(self) -> float:
        """Proxies whose C-way cross-entropy one step computes, on average over a period."""
        total = self.num_classes * self.proxies_per_class
        sampled = min(total, self.regularizer_samples or 0)
        if self.regularizer_estimator == "uniform":
            return sampled
        if self.regularizer_estimator == "exact":
            return total
        return total / self.regularizer_period + 2 * sampled  # svrg: two samples a step

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
                "classification loss is ~0. Raise r or top_k, or leave both unset for a "
                "default that keeps 2 * proxies_per_class.",
                stacklevel=3,
            )
        anchors = self._regularizer_rows_per_step()
        flops = anchors * self.num_classes * self.embedding_size
        if self.weight_lambda > 0 and flops > REGULARIZER_WARNING_FLOPS:
            warnings.warn(
                f"ProxyGMLLoss: the proxy regulariser costs about {flops:.1e} multiply-adds "
                f"per step ({anchors} proxies x C={self.num_classes} classes x "
                f"d={self.embedding_size}). The official recipe for many classes (SOP) "
                "uses weight_lambda=0 and proxies_per_class=1; regularizer_estimator "
                "approximates the regulariser at a fraction of the cost.",
                stacklevel=3,
            )

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """PML's forward, with the embeddings cast to the compute dtype first.

        The compute dtype is the promotion of the embeddings', the proxies' and float32
        dtypes; PML's reducers return the loss in the embeddings' dtype, so it is that one.
        The gradient reaches the embeddings in their own dtype.
        """
        _check_input_types(embeddings, labels)
        if embeddings.is_floating_point():
            embeddings = embeddings.to(self._compute_dtype(embeddings))
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        self._validate(embeddings, labels)
        with gml.full_precision(embeddings.device):
            x, proxies, norms, indices, values = self._subgraphs(embeddings, labels)
            kept_classes = self._kept_classes(indices)
            per_sample = gml.subgraph_loss(
                self._kept_similarities(x, proxies, indices, values, norms),
                kept_classes,
                labels,
                classes_are_distinct=self.proxies_per_class == 1,
                num_classes=self.num_classes,
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
                classes = gml.classes_per_subgraph(kept_classes)
                self.avg_classes_per_subgraph = classes.float().mean().item()
        self.add_weight_regularization_to_loss_dict(loss_dict, self.proxies)
        return loss_dict

    def _subgraphs(
        self, embeddings: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, proxies, norms, indices, values)``: the inputs in the compute dtype, the
        proxies' norms (one pass over them, shared by the selection and the backward) and
        the (B, k) indices and similarities of each sample's kept proxies (plain top-k when
        ``labels`` is None). The opening of both ``compute_loss`` and ``get_logits``."""
        x, proxies = self._inputs_in_compute_dtype(embeddings)
        if self.collect_stats:
            self.selection_fallback_rows = 0  # the selection adds its own (``_select_top``)
        with torch.no_grad():
            norms = gml.proxy_norms(proxies)
        indices, values = self._select(x, proxies, labels, norms)
        return x, proxies, norms, indices, values

    def _kept_classes(self, indices: torch.Tensor) -> torch.Tensor:
        """The class of each kept proxy (its index itself with one proxy per class)."""
        return indices if self.proxies_per_class == 1 else indices // self.proxies_per_class

    def _select(
        self,
        x: torch.Tensor,
        proxies: torch.Tensor,
        labels: torch.Tensor | None,
        norms: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and similarities of the k proxies each sample keeps (no gradient)."""
        return self._select_top(x, proxies, labels, self.top_k, norms)

    def _select_top(
        self,
        x: torch.Tensor,
        proxies: torch.Tensor,
        labels: torch.Tensor | None,
        k: int,
        norms: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's positives and most similar negatives, k in all, by the selection
        ``selection_precision`` names; a certified one adds its fallback rows to the stats."""
        if self.selection_precision == "fp32":
            return gml.select_topk(
                x,
                proxies,
                labels,
                self.proxies_per_class,
                k,
                self.selection_block_bytes,
                norms=norms,
            )
        selection = gml.select_kept(
            x,
            proxies,
            labels,
            self.proxies_per_class,
            k,
            self.selection_block_bytes,
            self.selection_precision,
            norms=norms,
        )
        if self.collect_stats:
            self.selection_fallback_rows += selection.fallback_rows.item()
        return selection.indices, selection.similarities

    def _kept_similarities(
        self,
        x: torch.Tensor,
        proxies: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
        norms: torch.Tensor,
    ) -> torch.Tensor:
        """The (B, k) kept similarities, differentiable in ``x`` and ``proxies``."""
        return gml.kept_similarities(
            x,
            proxies,
            indices,
            values,
            self.sparse_proxy_grad,
            self.selection_block_bytes,
            norms=norms,
        )

    def _proxy_regularization(self, proxies: torch.Tensor) -> dict:
        if self.weight_lambda == 0:
            return self.zero_loss()
        if self.regularizer_estimator in PERIODIC_ESTIMATORS and torch.is_grad_enabled():
            reg = self._periodic_regularizer(proxies)
        else:  # exact or uniform; the periodic estimators outside training take no step
            rows = self._rows() if self.regularizer_estimator == "uniform" else None
            reg = self._regularizer_over(proxies, rows)
        if self.collect_stats:
            self.proxy_reg_value = reg.item()
        return {
            "losses": self.weight_lambda * reg,
            "indices": None,
            "reduction_type": "already_reduced",
        }

    def _regularizer_over(self, proxies: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """L^p of the raw proxies, averaged over ``rows`` (None: all of them, exactly)."""
        blocks = self.regularizer_block_elements
        if rows is None:
            return gml.exact_regularizer(proxies, self.proxies_per_class, blocks)
        unit = F.normalize(proxies, p=2, dim=1)
        return gml.proxy_regularizer(unit, self.proxies_per_class, blocks, rows)

    def _compute_dtype(self, embeddings: torch.Tensor) -> torch.dtype:
        """The promotion of the embeddings', the proxies' and float32 dtypes."""
        dtype = torch.promote_types(embeddings.dtype, self.proxies.dtype)
        return torch.promote_types(dtype, torch.float32)

    def _rows(self) -> torch.Tensor | None:
        """``regularizer_samples`` proxies drawn uniformly without replacement (None: all)."""
        total = len(self.proxies)
        if self.regularizer_samples >= total:
            return None
        return torch.randperm(total, device=self.proxies.device)[: self.regularizer_samples]

    def _periodic_regularizer(self, proxies: torch.Tensor) -> torch.Tensor:
        """This step's estimate by a periodic estimator; the exact one on the period's first."""
        step = self._regularizer_steps_taken
        refresh = step % self.regularizer_period == 0
        self._regularizer_steps_taken = step + 1
        self.regularizer_step.fill_(step + 1)
        blocks = self.regularizer_block_elements
        if self.regularizer_estimator == "lazy":
            if not refresh:
                return proxies.new_zeros(())
            return self.regularizer_period * self._regularizer_over(proxies, None)
        if refresh:
            unit = F.normalize(proxies.detach(), p=2, dim=1)
            value, gradient = gml.regularizer_value_and_gradient(
                unit, self.proxies_per_class, blocks
            )
            self.regularizer_anchor_value.copy_(value)
            self.regularizer_anchor_proxies.copy_(unit)
            self.regularizer_anchor_gradient.copy_(gradient)
        anchor = (
            self.regularizer_anchor_proxies.to(proxies.dtype),
            self.regularizer_anchor_value.to(proxies.dtype),
            self.regularizer_anchor_gradient.to(proxies.dtype),
        )
        if self.regularizer_estimator == "cached" or refresh:
            return gml.linearized_regularizer(proxies, *anchor)
        return gml.variance_reduced_regularizer(
            proxies, *anchor, self.proxies_per_class, self._rows(), blocks
        )

    def _inputs_in_compute_dtype(
        self, embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (normalised if the distance says so) and raw proxies, in one dtype.

        The parameter itself is never cast. The proxies are normalised inside the
        selection and its backward, never copied.
        """
        dtype = self._compute_dtype(embeddings)
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
        labels_in_range = (labels.min() >= 0) & (labels.max() < self.num_classes)
        if not self.check_inputs:
            # No host sync: a label out of range (-1 would index class C - 1's proxies)
            # stops the step through an asynchronous device assert, or at once on CPU.
            torch._assert_async(
                labels_in_range,
                f"labels must be in [0, num_classes={self.num_classes}) "
                "(check_inputs=True names the bad labels)",
            )
            return
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
            x, proxies, norms, indices, values = self._subgraphs(embeddings, None)
            kept = self._kept_similarities(x, proxies, indices, values, norms)
            kept_classes = self._kept_classes(indices)
            scores = torch.zeros(len(x), self.num_classes, dtype=x.dtype, device=x.device)
            scores = scores.scatter_add(1, kept_classes, kept)
            selected = torch.zeros_like(scores, dtype=torch.bool).scatter(1, kept_classes, True)
            return scores.masked_fill(~selected, float("-inf"))

    # -- checkpoints -------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, int]:
        return self._layout()

    def set_extra_state(self, state: dict) -> None:
        """Nothing to set: the layout is fixed at construction and checked before loading."""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs
    ):
        """Refuse another layout before anything is loaded; accept a state without one.

        A state saved before the layout was recorded loads when the proxies' shape
        (C * N, d) matches, read as this loss's C classes of N proxies.
        """
        key = prefix + "_extra_state"
        check_layout(state_dict.get(key), self._layout(), self._LAYOUT_HINT)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs
        )
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def get_default_distance(self):
        return CosineSimilarity()

    def get_default_weight_init_func(self):
        return official_uniform_init

    def _sub_loss_names(self):
        return ["loss", "proxy_reg_loss"]

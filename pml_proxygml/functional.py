"""The ProxyGML method as small pure tensor functions.

Notation (as in the paper and ``shared/spec``): B samples, d embedding dims, C classes,
N proxies per class, CN = C * N proxies in total, k proxies kept per sample.
Proxies are stored row-wise, ``(CN, d)``; row ``j`` belongs to class ``j // N``.

Nothing here owns state or touches PML: the loss class composes these functions, and
every one of them runs unchanged on CPU and CUDA without host synchronisation.
Nothing of size (CN, C) or (CN, CN) is ever built: class logits are segment sums over
the B * k kept entries, and the regulariser goes through per-class proxy sums.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# The official code's epsilons: 1e-8 in the softmax denominator, 1e-20 inside the log.
SOFTMAX_DENOMINATOR_EPS = 1e-8
LOG_EPS = 1e-20

# Elements of one (rows, C) logits block of the regulariser; larger problems are chunked.
DEFAULT_REGULARIZER_BLOCK_ELEMENTS = 1 << 24


def num_selected(
    r: float, num_classes: int, proxies_per_class: int, top_k: int | None = None
) -> int:
    """k, the number of proxies kept per sample.

    ``top_k`` wins when given; otherwise ``ceil(r * C * N)`` evaluated left to right in
    Python floats, exactly as the official code rounds it (0.2 * 24 * 5 gives 25).
    Never more than ``C * N``.
    """
    total = num_classes * proxies_per_class
    k = top_k if top_k is not None else math.ceil(r * num_classes * proxies_per_class)
    return min(k, total)


def positive_proxy_indices(labels: torch.Tensor, proxies_per_class: int) -> torch.Tensor:
    """(B, N) row indices of each sample's own-class proxies."""
    offsets = torch.arange(proxies_per_class, device=labels.device)
    return labels.unsqueeze(1) * proxies_per_class + offsets


@torch.no_grad()
def select_topk(
    similarities: torch.Tensor,
    labels: torch.Tensor,
    proxies_per_class: int,
    k: int,
) -> torch.Tensor:
    """Indices (B, k) of the proxies kept per sample, positives ranked first.

    Equivalent to the official ``topk(S + 1000 * positive_mask, k)`` without relying on
    |S| <= 1: if k >= N every positive proxy is kept plus the k - N most similar negative
    ones; if k < N only the k most similar positives are kept (and no negatives at all).
    The order of the returned indices is not meaningful. No gradient flows through it.
    """
    positives = positive_proxy_indices(labels, proxies_per_class)
    if k < proxies_per_class:
        best = similarities.gather(1, positives).topk(k, dim=1, sorted=False).indices
        return positives.gather(1, best)
    num_negatives = k - proxies_per_class
    if num_negatives == 0:
        return positives
    negatives_only = similarities.scatter(1, positives, float("-inf"))
    negatives = negatives_only.topk(num_negatives, dim=1, sorted=False).indices
    return torch.cat([positives, negatives], dim=1)


def class_logits(
    kept_similarities: torch.Tensor, kept_classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class **sum** of the kept similarities ("reverse label propagation").

    A segment sum over each row's k kept entries, so its cost is O(B * k log k) whatever C.

    Args:
        kept_similarities: (B, k) similarities of the kept proxies.
        kept_classes: (B, k) class of each kept proxy.

    Returns:
        ``(logits, classes, present)``, each (B, k): slot ``m`` of row ``i`` holds the
        summed similarity ``logits[i, m]`` of class ``classes[i, m]`` when
        ``present[i, m]``; slots past the row's number of distinct classes are empty
        (logit 0, class -1, present False).
    """
    sorted_classes, order = kept_classes.sort(dim=1)
    sorted_values = kept_similarities.gather(1, order)
    starts_segment = torch.ones_like(sorted_classes, dtype=torch.bool)
    starts_segment[:, 1:] = sorted_classes[:, 1:] != sorted_classes[:, :-1]
    segment = starts_segment.cumsum(dim=1) - 1
    logits = torch.zeros_like(sorted_values).scatter_add(1, segment, sorted_values)
    # Every entry of a segment carries the same class, so duplicate writes agree.
    classes = torch.full_like(sorted_classes, -1).scatter(1, segment, sorted_classes)
    slots = torch.arange(segment.shape[1], device=segment.device)
    present = slots < starts_segment.sum(dim=1, keepdim=True)
    return logits, classes, present


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official masked softmax ``exp(Z) * M / (1e-8 + sum(exp(Z) * M))``.

    Computed max-shifted, ``exp(Z - m) / (1e-8 * exp(-m) + sum(exp(Z - m)))``, which is the
    same function (same value and gradient, the 1e-8 included) without overflow.
    A row with an empty mask gives all-zero probabilities, as in the official code.
    """
    neg_inf = torch.finfo(logits.dtype).min
    shift = logits.detach().masked_fill(~mask, neg_inf).amax(dim=1, keepdim=True)
    shift = torch.where(mask.any(dim=1, keepdim=True), shift, torch.zeros_like(shift))
    exp = torch.exp((logits - shift).masked_fill(~mask, float("-inf")))
    denominator = SOFTMAX_DENOMINATOR_EPS * torch.exp(-shift) + exp.sum(dim=1, keepdim=True)
    return exp / denominator


def classification_loss(probabilities: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-log(P[target] + 1e-20)``, shape (B,); a missing target costs 46.05."""
    target_probability = (probabilities * is_target).sum(dim=1)
    return -torch.log(target_probability + LOG_EPS)


def _regularizer_block_sum(
    proxy_block: torch.Tensor, class_sums: torch.Tensor, block_classes: torch.Tensor
) -> torch.Tensor:
    logits = proxy_block @ class_sums.T
    return F.cross_entropy(logits, block_classes, reduction="sum")


def proxy_regularizer(
    normalized_proxies: torch.Tensor,
    proxies_per_class: int,
    block_elements: int = DEFAULT_REGULARIZER_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """The proxy regulariser L^p: mean over all CN proxies of a C-way cross-entropy.

    Proxy j's logit for class c is the sum of its cosines to every proxy of c (itself
    included), i.e. ``p_j . U_c`` with ``U_c`` the sum of class c's proxies, so the cost is
    O(CN * C * d) time and never a (CN, C) or (CN, CN) matrix: rows are processed in
    blocks of about ``block_elements`` logits, recomputed in backward.

    Args:
        normalized_proxies: (CN, d) unit-norm proxies, class-major.
        proxies_per_class: N.
        block_elements: memory budget of one block of logits, in elements.
    """
    total, dim = normalized_proxies.shape
    num_classes = total // proxies_per_class
    class_sums = normalized_proxies.view(num_classes, proxies_per_class, dim).sum(dim=1)
    proxy_classes = torch.arange(total, device=normalized_proxies.device) // proxies_per_class
    rows_per_block = max(1, block_elements // num_classes)
    if rows_per_block >= total:
        return _regularizer_block_sum(normalized_proxies, class_sums, proxy_classes) / total
    block_sums = [
        checkpoint(
            _regularizer_block_sum,
            normalized_proxies[start : start + rows_per_block],
            class_sums,
            proxy_classes[start : start + rows_per_block],
            use_reentrant=False,
        )
        for start in range(0, total, rows_per_block)
    ]
    return torch.stack(block_sums).sum() / total

"""An independent, deliberately literal float64 reference of the official ProxyGML loss.

Written from the equations of ``docs/method.md`` with the dense objects the
official code uses (one-hot matrices, the +1000 ranking boost, no max-shift), so that the
sparse implementation can be checked against a different formulation of the same math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_official_loss(
    embeddings: torch.Tensor,
    proxy_rows: torch.Tensor,
    labels: torch.Tensor,
    proxies_per_class: int,
    k: int,
    weight_lambda: float,
    kept: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Official forward on embeddings as given (no normalisation) and raw (CN, d) proxies.

    ``kept``: the (B, k) proxies an implementation kept, used when they are a top k (see
    ``selection_mask``), so that tied similarities can be compared at all.
    """
    num_proxies = proxy_rows.shape[0]
    num_classes = num_proxies // proxies_per_class
    dtype = embeddings.dtype
    proxy_classes = torch.arange(num_proxies) // proxies_per_class
    proxy_one_hot = (proxy_classes[:, None] == torch.arange(num_classes)[None]).to(dtype)
    centers = normalize_rows(proxy_rows)
    similarity = embeddings @ centers.T
    positive = (labels[:, None] == proxy_classes[None]).to(dtype)
    selected = selection_mask(similarity + 1000 * positive, k, kept)
    logits = (similarity * selected) @ proxy_one_hot
    mask = (logits != 0).to(dtype)
    exp = torch.exp(logits) * mask
    prob = exp / (1e-8 + exp.sum(dim=1, keepdim=True))
    target = F.one_hot(labels, num_classes).to(dtype)
    loss_cls = torch.mean(torch.sum(-target * torch.log(prob + 1e-20), dim=1))
    total = loss_cls
    if weight_lambda > 0:  # as the official code, which skips the (CN, CN) work otherwise
        total = loss_cls + weight_lambda * dense_proxy_regularizer(centers, proxies_per_class)
    return {
        "loss_total": total,
        "loss_cls": loss_cls,
        "logits": logits,
        "logits_mask": mask,
        "prob": prob,
        "topk_indices": selected.nonzero()[:, 1].view(-1, k),
    }


def normalize_rows(rows: torch.Tensor) -> torch.Tensor:
    """``F.normalize(rows, dim=1)``: rows / max(|row|, 1e-12), written as
    rows / sqrt(max(|row|^2, 1e-24)), the same function whose second derivative at a zero
    row is defined (``F.normalize``'s is NaN there: it differentiates the norm at 0)."""
    return rows / (rows * rows).sum(dim=1, keepdim=True).clamp_min(1e-24).sqrt()


# Scores this close count as tied: the implementation's rounding may order them either way.
SELECTION_TOLERANCE = 1e-9


def selection_mask(
    scores: torch.Tensor,
    k: int,
    kept: torch.Tensor | None = None,
    tolerance: float = SELECTION_TOLERANCE,
) -> torch.Tensor:
    """(B, CN) 0/1 mask of the k highest ``scores`` of each row.

    With ties at the k-th place several sets are a top k. ``kept`` (B, k) is one if each
    row holds k distinct columns and no column left out scores above a kept one (beyond
    ``tolerance``); it is then the selection, else an AssertionError. Without ``kept``,
    ``torch.topk`` chooses.
    """
    if kept is None:
        kept = torch.topk(scores, k, dim=1).indices
    selected = torch.zeros_like(scores).scatter(1, kept, 1.0)
    assert bool((selected.sum(dim=1) == k).all()), "kept columns repeat within a row"
    lowest_kept = scores.masked_fill(selected == 0, float("inf")).amin(dim=1)
    highest_left = scores.masked_fill(selected == 1, float("-inf")).amax(dim=1)
    assert bool((highest_left <= lowest_kept + tolerance).all()), "kept columns are no top k"
    return selected


def dense_proxy_regularizer(
    centers: torch.Tensor, proxies_per_class: int, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """L^p: mean over proxies (``rows`` only, if given) of CE((P P^T) one_hot, class)."""
    num_proxies = centers.shape[0]
    proxy_classes = torch.arange(num_proxies) // proxies_per_class
    proxy_one_hot = F.one_hot(proxy_classes, num_proxies // proxies_per_class).to(centers.dtype)
    if rows is None:
        rows = torch.arange(num_proxies)
    center_logits = (centers[rows] @ centers.T) @ proxy_one_hot
    return F.cross_entropy(center_logits, proxy_classes[rows])

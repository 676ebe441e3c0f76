"""An independent, deliberately literal float64 reference of the official ProxyGML loss.

Written from ``shared/spec/official_reference.md`` section 1.2 with the dense objects the
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
) -> dict[str, torch.Tensor]:
    """Official forward on embeddings as given (no normalisation) and raw (CN, d) proxies."""
    num_proxies = proxy_rows.shape[0]
    num_classes = num_proxies // proxies_per_class
    dtype = embeddings.dtype
    proxy_classes = torch.arange(num_proxies) // proxies_per_class
    proxy_one_hot = (proxy_classes[:, None] == torch.arange(num_classes)[None]).to(dtype)
    centers = F.normalize(proxy_rows, p=2, dim=1)
    similarity = embeddings @ centers.T
    positive = (labels[:, None] == proxy_classes[None]).to(dtype)
    topk = torch.topk(similarity + 1000 * positive, k, dim=1).indices
    selected = torch.zeros_like(similarity).scatter(1, topk, 1.0)
    logits = (similarity * selected) @ proxy_one_hot
    mask = (logits != 0).to(dtype)
    exp = torch.exp(logits) * mask
    prob = exp / (1e-8 + exp.sum(dim=1, keepdim=True))
    target = F.one_hot(labels, num_classes).to(dtype)
    loss_cls = torch.mean(torch.sum(-target * torch.log(prob + 1e-20), dim=1))
    total = loss_cls
    if weight_lambda > 0:  # as the official code, which skips the (CN, CN) work otherwise
        center_logits = (centers @ centers.T) @ proxy_one_hot
        total = loss_cls + weight_lambda * F.cross_entropy(center_logits, proxy_classes)
    return {
        "loss_total": total,
        "loss_cls": loss_cls,
        "logits": logits,
        "logits_mask": mask,
        "prob": prob,
        "topk_indices": topk.sort(dim=1).values,
    }

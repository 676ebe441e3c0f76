"""One name per loss, for every benchmark script: ``LOSSES[name].build(C, d, **settings)``.

``settings`` are the PML loss's keyword arguments (a recipe's ``losses.<name>.settings``),
with one addition for SoftTriple: ``tau``, the weight of its centre regulariser, computed by
:class:`BlockSparseCentersRegularizer` (``tau=0``, the default, leaves it out, as PML does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import DivisorReducer
from pytorch_metric_learning.regularizers import BaseRegularizer
from pytorch_metric_learning.utils import common_functions as c_f

from pml_proxygml import ProxyGMLLoss

from .errors import RecipeError

# ProxyGMLLoss's selection precisions in the order the speed scripts time them: the default
# first, the certified screenings, then "auto" (which picks one of them).
TIMED_SELECTION_PRECISIONS = ("fp32", "bf16", "fp16", "auto")

SOFTTRIPLE_SQRT_EPS = 1e-5  # official SoftTriple code, keeps the regulariser's gradient finite


class BlockSparseCentersRegularizer(BaseRegularizer):
    """SoftTriple's tau regulariser, as in the official code and PML's ``SparseCentersRegularizer``:
    the mean of sqrt(2 + 1e-5 - 2 cos) over same-class centre pairs.

    Only same-class pairs enter it, so this computes the C blocks of K x K similarities,
    O(C K^2 d), where PML's materialises all (CK)^2. The 1e-5 is the official code's; PML's uses
    the float's smallest normal number there, whose sqrt gradient overflows once two
    same-class centres merge. Takes the (C*K, d) centres, row j of class j // K, as
    ``SoftTripleLoss`` passes them.
    """

    def __init__(self, num_classes: int, centers_per_class: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.centers_per_class = centers_per_class

    def compute_loss(self, weights: torch.Tensor) -> dict[str, Any]:
        k = self.centers_per_class
        centers = F.normalize(weights, dim=1).view(self.num_classes, k, -1)
        rows, cols = torch.triu_indices(k, k, offset=1, device=weights.device)
        similarities = (centers @ centers.transpose(1, 2))[:, rows, cols].flatten()
        reg = torch.sqrt(2.0 + SOFTTRIPLE_SQRT_EPS - torch.clamp(2.0 * similarities, max=2))
        return {
            "loss": {
                "losses": reg,
                "indices": c_f.torch_arange_from_size(reg),
                "reduction_type": "element",
                "divisor": 2 * len(reg),  # the official mean over ordered pairs
            }
        }

    def get_default_reducer(self) -> DivisorReducer:
        return DivisorReducer()


def softtriple_loss(
    num_classes: int, embedding_size: int, tau: float = 0.0, **settings: Any
) -> losses.SoftTripleLoss:
    """PML's SoftTripleLoss, with the block-sparse centre regulariser weighted ``tau``."""
    if tau:
        centers = settings.get("centers_per_class", 10)
        settings["weight_regularizer"] = BlockSparseCentersRegularizer(num_classes, centers)
        settings["weight_reg_weight"] = tau
    return losses.SoftTripleLoss(num_classes, embedding_size, **settings)


@dataclass(frozen=True)
class LossSpec:
    """A loss: its table label and its constructor ``(num_classes, embedding_size, **settings)``.

    A variant (``variant_of``) is another loss with some settings fixed: in a recipe that does
    not name it, it takes that loss's entry (settings, optimizer) with ``settings`` added, so
    it stays identical to it in every recipe but for them.
    """

    label: str
    build: Callable[..., BaseMetricLossFunction]
    variant_of: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


# ProxyGML with a cheaper regulariser (benchmarks/regularizer_estimators.py measured them).
def _proxygml_regularizer(estimator: str) -> LossSpec:
    return LossSpec(
        f"ProxyGML ({estimator} regulariser)",
        ProxyGMLLoss,
        variant_of="proxygml",
        settings={"regularizer_estimator": estimator, "regularizer_period": 16},
    )


LOSSES: dict[str, LossSpec] = {
    "proxygml": LossSpec("ProxyGML", ProxyGMLLoss),
    "proxygml_cached": _proxygml_regularizer("cached"),
    "proxygml_lazy": _proxygml_regularizer("lazy"),
    "proxyanchor": LossSpec("ProxyAnchor", losses.ProxyAnchorLoss),
    "softtriple": LossSpec("SoftTriple", softtriple_loss),
    "normsoftmax": LossSpec("NormalizedSoftmax", losses.NormalizedSoftmaxLoss),
    "proxynca": LossSpec("ProxyNCA", losses.ProxyNCALoss),
}


def check_name(name: str) -> str:
    if name not in LOSSES:
        raise RecipeError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return name


def build_loss(
    name: str, num_classes: int, embedding_size: int, settings: Mapping[str, Any]
) -> BaseMetricLossFunction:
    """Loss ``name`` for ``num_classes`` classes of ``embedding_size``-d embeddings."""
    try:
        return LOSSES[check_name(name)].build(num_classes, embedding_size, **settings)
    except TypeError as error:  # an unknown keyword in the recipe
        raise RecipeError(f"losses.{name}.settings: {error}") from None

"""pml-proxygml: ProxyGML (NeurIPS 2020) as a pytorch-metric-learning loss.

Importing this package also makes ``pytorch_metric_learning.losses.ProxyGMLLoss``
available, unless PML already defines that name.
"""

from pytorch_metric_learning import losses as _pml_losses

from . import functional, losses
from .losses import ProxyGMLLoss

__version__ = "0.1.0"
__all__ = ["ProxyGMLLoss", "functional", "losses"]

if not hasattr(_pml_losses, "ProxyGMLLoss"):
    _pml_losses.ProxyGMLLoss = ProxyGMLLoss

"""Losses of pml-proxygml, laid out like ``pytorch_metric_learning.losses``."""

from .proxy_gml_loss import ProxyGMLLoss

__all__ = ["ProxyGMLLoss"]

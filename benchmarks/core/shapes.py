"""The loss-step shapes the speed scripts share, one name each."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """B embeddings of size d against C classes of N proxies; k from r, or ``top_k``."""

    name: str
    batch_size: int
    classes: int
    proxies_per_class: int
    embedding_size: int
    r: float = 0.05
    top_k: int | None = None


# Issue 12's mid-size shapes, issue 15's SOP shapes and one whose every product is tiny.
SHAPES = (
    Shape("fixed cost: C=10 N=12 B=32", 32, 10, 12, 128, top_k=60),
    Shape("SOP B=32", 32, 11318, 1, 512),
    Shape("SOP B=256", 256, 11318, 1, 512),
    Shape("emoji B=32", 32, 818, 12, 128, top_k=491),
    Shape("C=1000 N=12 B=32", 32, 1000, 12, 128),
)
MILLION = Shape("1M classes B=256", 256, 1_000_000, 1, 512, top_k=1000)
# The official recipes' other shapes: CUB (and Cars, two classes fewer), SOP's classes at N=12.
CUB = Shape("CUB recipe: C=100 N=12 B=32", 32, 100, 12, 512)
SOP_TWELVE_PROXIES = Shape("SOP classes N=12 B=32", 32, 11318, 12, 512)

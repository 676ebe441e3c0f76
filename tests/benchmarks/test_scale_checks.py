"""benchmarks/scale_checks.py's CSR cross-check and the core's tensor-memory measurement."""

import pytest
import torch

from benchmarks import scale_checks
from benchmarks.core import measure
from pml_proxygml import functional as gml

MIB = 2**20


def test_allocation_peak_counts_temporaries_and_separates_gradients():
    weights = torch.randn(512, 512, requires_grad=True)  # its gradient is 1 MiB

    def step():
        (weights * 2).sum().backward()  # the product (1 MiB) is freed with the graph
        torch.ones(1024, 1024).sum()  # 4 MiB while the gradient is live

    peak, working = measure.allocation_peak_mib(step, [weights])
    assert 5.0 <= peak < 5.1  # the gradient and the 4 MiB temporary
    assert 4.0 <= working < 4.1


@pytest.mark.parametrize("batch", [3, 8])
def test_embedding_bag_products_equal_csr_products(batch):
    """The backward's weighted bag sums against torch.sparse.mm of the same CSR matrix."""
    generator = torch.Generator().manual_seed(batch)
    rows = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    members = torch.randint(0, 50, (batch * 4,), generator=generator)
    weights = torch.randn(batch * 4, generator=generator, dtype=torch.float64)
    bag_starts = torch.tensor([0, 0, *sorted(torch.randint(0, batch * 4, (batch - 2,)).tolist())])
    bag_starts = torch.cat([bag_starts, torch.tensor([batch * 4])])  # an empty bag, then others
    torch.testing.assert_close(
        gml._weighted_bag_sums(bag_starts, members, weights, rows),
        scale_checks._csr_product(bag_starts, members, weights, rows),
        rtol=1e-12,
        atol=1e-12,
    )


def test_targets_time_every_selection_precision_against_issue_15s_targets(monkeypatch):
    monkeypatch.setattr(scale_checks, "SOP_CLASSES", 300)
    rows = scale_checks._target_rows(32, repeats=1)
    timed = [row for row in rows if row["quantity"].startswith("time")]
    assert [row["quantity"] for row in timed[::2]] == [
        f"time: ProxyGML ({p} selection) fwd+bwd / floor" for p in ("fp32", "bf16", "fp16", "auto")
    ]
    assert {row["target"] for row in timed} == {"<= 1.8x", "<= 0.3x"}
    assert all(isinstance(row["met"], bool) for row in rows) and len(rows) == 10

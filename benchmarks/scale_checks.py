"""Measurements behind three design choices of ProxyGMLLoss at scale.

1. ``backward``: the sparse backward (a custom autograd Function, CSR products) against the
   two plain-autograd formulations it replaced: gathering the kept similarities out of a
   dense S = X @ P_hat^T (autograd then backpropagates a dense (B, C*N) gradient), and
   gathering the kept proxies and differentiating (B, k, d) dot products.
2. ``regularizer``: the exact proxy regulariser against ``regularizer_samples`` (a uniform
   sample of proxies per step): time, and how far value and gradient are from exact.
3. ``million``: a full training step (loss forward, backward, optimizer step) at 1,000,000
   classes, N=1, d=512, B=256, top_k=1000, with Adam on a dense proxy gradient and with
   SparseAdam on ``sparse_proxy_grad=True``: time and the process's peak resident memory.

Times are medians of ``--repeats`` runs after one warm-up, and every comparison is a ratio
of measurements taken in the same process. Run ``python -m benchmarks.scale_checks`` (all
three, about 5 minutes on 2 CPU cores) or name some: ``python -m benchmarks.scale_checks
backward regularizer``. Results: ``benchmarks/results/scale_checks_<check>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pml_proxygml import ProxyGMLLoss
from pml_proxygml import functional as gml

from . import reporting

RESULTS = Path(__file__).parent / "results"


def median_seconds(step: Callable[[], Any], repeats: int) -> float:
    step()  # warm-up: first-touch allocations and lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_gib() -> float:
    """Peak resident memory since the last ``reporting.reset_peak_rss()`` (VmHWM)."""
    return reporting.proc_status_kib("VmHWM") / 2**20


def _kept_from_dense(x: torch.Tensor, proxies: torch.Tensor, indices: torch.Tensor):
    return (x @ F.normalize(proxies, dim=1).T).gather(1, indices)


def _kept_by_gathered_dots(x: torch.Tensor, proxies: torch.Tensor, indices: torch.Tensor):
    return (F.normalize(proxies[indices], dim=2) * x.unsqueeze(1)).sum(dim=2)


def _backward_rows(
    batch: int, num_proxies: int, proxies_per_class: int, repeats: int
) -> list[dict[str, Any]]:
    num_classes = num_proxies // proxies_per_class
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(batch, 512, generator=generator), dim=1).requires_grad_()
    proxies = torch.randn(num_proxies, 512, generator=generator).requires_grad_()
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    k = gml.num_selected(0.05, num_classes, proxies_per_class)
    indices, values = gml.select_topk(x.detach(), proxies.detach(), labels, proxies_per_class, k)
    upstream = torch.randn(batch, k, generator=generator)
    formulations = {
        "sparse backward (custom Function)": lambda: gml.kept_similarities(
            x, proxies, indices, values
        ),
        "gather from dense S (autograd)": lambda: _kept_from_dense(x, proxies, indices),
        "gathered (B, k, d) dots (autograd)": lambda: _kept_by_gathered_dots(x, proxies, indices),
    }

    def step(kept: Callable[[], torch.Tensor]) -> None:
        x.grad = proxies.grad = None
        kept().backward(upstream)

    times = {name: median_seconds(lambda f=f: step(f), repeats) for name, f in formulations.items()}
    floor = median_seconds(lambda: x.detach() @ proxies.detach().T, repeats)
    sparse_time = times["sparse backward (custom Function)"]
    return [
        {
            "shape": f"B={batch} CN={num_proxies} N={proxies_per_class} k={k}",
            "formulation": name,
            "ms": seconds * 1e3,
            "x floor": seconds / floor,
            "x sparse": seconds / sparse_time,
        }
        for name, seconds in times.items()
    ]


def check_backward(repeats: int) -> list[dict[str, Any]]:
    """fwd+bwd of the kept similarities alone, per formulation (selection excluded).

    "floor" is the forward-only matmul X @ P^T of the same shape.
    """
    shapes = [(32, 11318, 1), (256, 11318, 1), (32, 1200, 12), (256, 1200, 12)]
    return [
        row for shape in tqdm(shapes, desc="backward") for row in _backward_rows(*shape, repeats)
    ]


def check_regularizer(repeats: int, draws: int) -> list[dict[str, Any]]:
    """Exact vs sampled regulariser at SOP scale (C=11318, N=1, d=512), proxies at init."""
    torch.manual_seed(0)
    loss = ProxyGMLLoss(11318, 512, proxies_per_class=1, weight_lambda=1.0)
    unit = F.normalize(loss.proxies.detach(), dim=1).requires_grad_()

    def value_and_grad(rows):
        unit.grad = None
        value = gml.proxy_regularizer(unit, 1, rows=rows)
        value.backward()
        return value.item(), unit.grad.flatten().clone()

    exact_value, exact_grad = value_and_grad(None)
    exact_seconds = median_seconds(lambda: value_and_grad(None), repeats)
    rows = [
        {
            "proxies per step": "all 11318 (exact)",
            "ms": exact_seconds * 1e3,
            "x exact time": 1.0,
            "value rel. error (mean ± std)": "0",
            "grad cosine to exact (mean)": 1.0,
        }
    ]
    for samples in tqdm((256, 1024, 4096), desc="regularizer"):
        errors, cosines = [], []
        for _ in range(draws):
            value, grad = value_and_grad(torch.randperm(11318)[:samples])
            errors.append((value - exact_value) / exact_value)
            cosines.append(F.cosine_similarity(grad, exact_grad, dim=0).item())
        seconds = median_seconds(
            lambda s=samples: value_and_grad(torch.randperm(11318)[:s]), repeats
        )
        rows.append(
            {
                "proxies per step": samples,
                "ms": seconds * 1e3,
                "x exact time": seconds / exact_seconds,
                "value rel. error (mean ± std)": (
                    f"{statistics.mean(errors):.1e} ± {statistics.stdev(errors):.1e}"
                ),
                "grad cosine to exact (mean)": statistics.mean(cosines),
            }
        )
    return rows


def _million_row(sparse: bool, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    reporting.reset_peak_rss()
    before = reporting.proc_status_kib("VmRSS") / 2**20
    loss = ProxyGMLLoss(
        1_000_000, 512, proxies_per_class=1, top_k=1000, weight_lambda=0.0, sparse_proxy_grad=sparse
    )
    if sparse:
        optimizer = torch.optim.SparseAdam(loss.parameters(), lr=0.01)
    else:
        optimizer = torch.optim.Adam(loss.parameters(), lr=0.01, fused=True)
    embeddings = torch.randn(256, 512, requires_grad=True)
    labels = torch.randint(0, 1_000_000, (256,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(embeddings, labels).backward()
        optimizer.step()

    return {
        "optimizer": "SparseAdam, sparse_proxy_grad=True" if sparse else "Adam(fused=True), dense",
        "step s (median)": median_seconds(step, repeats),
        "peak RSS GiB (process)": peak_rss_gib(),
        "RSS GiB before building the loss": before,
    }


def check_million(repeats: int) -> list[dict[str, Any]]:
    """A full training step at one million classes, dense Adam vs SparseAdam.

    N=1, d=512, B=256, top_k=1000, lambda=0: loss forward, backward and optimizer step.
    Peak RSS is the whole process's (Python and torch included), reset before each variant.
    Dense Adam runs ``fused=True``: the unfused CPU update allocates (C*N, d) temporaries.
    """
    return [_million_row(sparse, repeats) for sparse in tqdm((False, True), desc="million")]


CHECKS_DOC = {
    "backward": check_backward.__doc__,
    "regularizer": check_regularizer.__doc__,
    "million": check_million.__doc__,
}
CHECKS = {
    "backward": lambda args: check_backward(args.repeats),
    "regularizer": lambda args: check_regularizer(args.repeats, args.draws),
    "million": lambda args: check_million(args.repeats),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checks", nargs="*", default=list(CHECKS), help=f"of {list(CHECKS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draws", type=int, default=20, help="sampled-regulariser draws")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    unknown = set(args.checks) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}; choose from {list(CHECKS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    environment = reporting.capture_environment("cpu")
    for name in args.checks:
        rows = CHECKS[name](args)
        table = reporting.markdown_table(rows, {key: key for key in rows[0]})
        reporting.write_json(args.out / f"scale_checks_{name}.json", rows, environment)
        notes = CHECKS_DOC[name]
        reporting.write_markdown(
            args.out / f"scale_checks_{name}.md", f"scale_checks: {name}", table, environment, notes
        )
        print(f"\n## {name}\n\n{table}")


if __name__ == "__main__":
    main()

"""Measurements behind ProxyGMLLoss's design choices at scale, and its SOP-shape targets.

1. ``backward``: the sparse backward (a custom autograd Function, embedding_bag products)
   against the two plain-autograd formulations it replaced: gathering the kept similarities
   out of a dense S = X @ P_hat^T (autograd then backpropagates a dense (B, C*N) gradient),
   and gathering the kept proxies and differentiating (B, k, d) dot products; and its two
   sparse products against CSR ``torch.sparse.mm``.
2. ``regularizer``: the exact proxy regulariser against ``regularizer_samples`` (a uniform
   sample of proxies per step): time, and how far value and gradient are from exact.
3. ``million``: a full training step (loss forward, backward, optimizer step) at 1,000,000
   classes, N=1, d=512, B=256, top_k=1000, with Adam on a dense proxy gradient and with
   SparseAdam on ``sparse_proxy_grad=True``: time and the process's peak resident memory.
4. ``topk``: the per-row top-k of a similarity block, torch.topk against numpy's
   argpartition (what the selection uses on CPU).
5. ``targets``: the SOP-shape targets of the loss step (C=11,318, N=1, d=512, r=0.05,
   lambda=0, B=32 and 256), in each selection precision: time against the floor and
   ProxyAnchorLoss, interleaved in one process, and the step's peak tensor memory from the
   torch profiler's memory timeline.

Times are medians of ``--repeats`` runs after one warm-up (:mod:`benchmarks.core.measure`),
and every comparison is a ratio of measurements taken in the same process. Run
``python -m benchmarks.scale_checks`` (all five, about 6 minutes on 2 CPU cores) or name some:
``python -m benchmarks.scale_checks backward targets``. Results: ``--out`` (default
``runs/scale_checks/``) as ``scale_checks_<check>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses
from tqdm import tqdm

from pml_proxygml import ProxyGMLLoss
from pml_proxygml import functional as gml

from .core import cli, report
from .core.measure import (
    PeakMemory,
    allocation_peak_mib,
    median_seconds,
    product_floor,
    time_steps,
)
from .core.registry import TIMED_SELECTION_PRECISIONS

MIB = 2**20
GIB = 2**30


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


def _csr_product(
    row_starts: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, dense: torch.Tensor
) -> torch.Tensor:
    size = (len(row_starts) - 1, len(dense))
    matrix = torch.sparse_csr_tensor(row_starts, columns, values, size=size)
    return torch.sparse.mm(matrix, dense)


def _product_rows(batch: int, num_proxies: int, repeats: int) -> list[dict[str, Any]]:
    """The backward's two sparse products, by embedding_bag and by a CSR torch.sparse.mm."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 512, generator=generator)
    proxies = torch.randn(num_proxies, 512, generator=generator)
    k = gml.num_selected(0.05, num_proxies, 1)
    indices = torch.rand(batch, num_proxies, generator=generator).topk(k, dim=1).indices
    weights = torch.randn(batch * k, generator=generator)
    flat = indices.reshape(-1)
    by_sample = torch.arange(0, batch * k + 1, k)
    order = flat.argsort(stable=True)
    by_proxy = torch.searchsorted(flat[order], torch.arange(num_proxies + 1))
    products = {
        "(B, CN) x proxies": (by_sample, flat, weights, proxies),
        "(CN, B) x embeddings": (by_proxy, order // k, weights[order], x),
    }
    rows = []
    for product, parts in products.items():
        bag = median_seconds(lambda p=parts: gml._weighted_bag_sums(*p), repeats)
        csr = median_seconds(lambda p=parts: _csr_product(*p), repeats)
        rows.append(
            {
                "shape": f"B={batch} CN={num_proxies} k={k}",
                "formulation": f"product {product}: embedding_bag",
                "ms": bag * 1e3,
                "x sparse": csr / bag,
            }
        )
    return rows


def check_backward(repeats: int) -> list[dict[str, Any]]:
    """fwd+bwd of the kept similarities alone, per formulation (selection excluded).

    "floor" is the forward-only matmul X @ P^T of the same shape. The "product" rows time
    the backward's two sparse products alone with ``embedding_bag`` (what the Function
    uses); their "x sparse" column is the time of the same product by a CSR
    ``torch.sparse.mm`` over it.
    """
    shapes = [(32, 11318, 1), (256, 11318, 1), (32, 1200, 12), (256, 1200, 12)]
    rows = [
        row for shape in tqdm(shapes, desc="backward") for row in _backward_rows(*shape, repeats)
    ]
    for batch in (32, 256):
        rows += _product_rows(batch, 11318, repeats)
    return rows


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
    memory = PeakMemory("cpu").start()
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
        "peak RSS GiB (process)": memory.peak_bytes() / GIB,
        "RSS GiB before building the loss": memory.baseline / GIB,
    }


def check_million(repeats: int) -> list[dict[str, Any]]:
    """A full training step at one million classes, dense Adam vs SparseAdam.

    N=1, d=512, B=256, top_k=1000, lambda=0: loss forward, backward and optimizer step.
    Peak RSS is the whole process's (Python and torch included), reset before each variant.
    Dense Adam runs ``fused=True``: the unfused CPU update allocates (C*N, d) temporaries.
    """
    return [_million_row(sparse, repeats) for sparse in tqdm((False, True), desc="million")]


def check_topk(repeats: int) -> list[dict[str, Any]]:
    """Per-row top-k of a similarity block: torch.topk against the CPU path of ``_largest``
    (numpy argpartition over chunks of rows on torch's thread count), same block, same k.

    Shapes: the SOP selection (B x 11,318, k - 1 negatives) and one merge of the streamed
    selection at a million classes with top_k=1000 (B x (16,384 + 999)).
    """
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch, width, count in tqdm(
        [(32, 11318, 565), (256, 11318, 565), (256, 16384 + 999, 999)], desc="topk"
    ):
        block = torch.randn(batch, width, generator=generator)
        torch_seconds = median_seconds(
            lambda b=block, c=count: b.topk(c, dim=1, sorted=False), repeats
        )
        numpy_seconds = median_seconds(lambda b=block, c=count: gml._largest(b, c), repeats)
        rows.append(
            {
                "block": f"{batch} x {width}, k={count}",
                "torch.topk ms": torch_seconds * 1e3,
                "numpy argpartition ms": numpy_seconds * 1e3,
                "speed-up": torch_seconds / numpy_seconds,
                "threads": torch.get_num_threads(),
            }
        )
    return rows


SOP_CLASSES = 11318
# Issue 15's targets for every selection precision: the fp32 floor stays the reference.
TARGET_X_FLOOR = {32: 1.8, 256: 1.5}
TARGET_X_PROXYANCHOR = 0.3
TARGET_MEMORY_X_BCN = 2.0


def _target_rows(batch: int, repeats: int) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 512, generator=generator).requires_grad_()
    proxies = torch.randn(SOP_CLASSES, 512, generator=generator)
    labels = torch.randint(0, SOP_CLASSES, (batch,), generator=generator)
    proxygml = {}
    for precision in TIMED_SELECTION_PRECISIONS:
        loss = ProxyGMLLoss(
            SOP_CLASSES,
            512,
            proxies_per_class=1,
            r=0.05,
            weight_lambda=0.0,
            selection_precision=precision,
        )
        with torch.no_grad():
            loss.proxies.copy_(proxies)
        proxygml[precision] = loss
    proxyanchor = losses.ProxyAnchorLoss(SOP_CLASSES, 512)

    def floor() -> None:
        product_floor(x, proxies)

    def loss_step(loss: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            x.grad = loss.proxies.grad = None
            loss(x, labels).backward()

        return step

    steps = {"floor": floor, "ProxyAnchor": loss_step(proxyanchor)}
    steps |= {precision: loss_step(loss) for precision, loss in proxygml.items()}
    times = time_steps(steps, repeats)  # interleaved round by round, one warm-up round
    median = {name: statistics.median(values) for name, values in times.items()}
    shape = f"B={batch}"
    rows = []
    for precision in TIMED_SELECTION_PRECISIONS:
        x_floor = median[precision] / median["floor"]
        x_anchor = median[precision] / median["ProxyAnchor"]
        rows += [
            {
                "shape": shape,
                "quantity": f"time: ProxyGML ({precision} selection) fwd+bwd / floor",
                "measured": f"{x_floor:.2f}x ({median[precision] * 1e3:.1f} / "
                f"{median['floor'] * 1e3:.1f} ms)",
                "target": f"<= {TARGET_X_FLOOR[batch]}x",
                "met": x_floor <= TARGET_X_FLOOR[batch],
            },
            {
                "shape": shape,
                "quantity": f"time: ProxyGML ({precision} selection) / ProxyAnchor fwd+bwd",
                "measured": f"{x_anchor:.2f}x ({median['ProxyAnchor'] * 1e3:.1f} ms ProxyAnchor)",
                "target": f"<= {TARGET_X_PROXYANCHOR}x",
                "met": x_anchor <= TARGET_X_PROXYANCHOR,
            },
        ]
    default = proxygml["fp32"]
    peak, working = allocation_peak_mib(loss_step(default), [x, default.proxies])
    anchor_peak, _ = allocation_peak_mib(steps["ProxyAnchor"])
    one_bcn = batch * SOP_CLASSES * 4 / MIB
    memory_limit = TARGET_MEMORY_X_BCN * one_bcn
    memory_target = f"< {TARGET_MEMORY_X_BCN:.0f} (B, CN) = {memory_limit:.1f} MiB"
    return [
        *rows,
        {
            "shape": shape,
            "quantity": "memory: step's working tensors (gradients written excluded)",
            "measured": f"{working:.1f} MiB = {working / one_bcn:.2f} (B, CN)",
            "target": memory_target,
            "met": working < memory_limit,
        },
        {
            "shape": shape,
            "quantity": "memory: step's peak incl. the gradients (proxies' is (CN, d))",
            "measured": f"{peak:.1f} MiB = {peak / one_bcn:.2f} (B, CN); "
            f"ProxyAnchor {anchor_peak:.1f} MiB",
            "target": memory_target,
            "met": peak < memory_limit,
        },
    ]


def check_targets(repeats: int) -> list[dict[str, Any]]:
    """The SOP-shape targets (C=11,318, N=1, d=512, r=0.05, lambda=0), B=32 and 256.

    Times: ProxyGMLLoss in each selection precision (the same proxies), PML's
    ProxyAnchorLoss fwd+bwd and the floor (normalised X @ P^T in float32, forward only),
    interleaved round by round in this process; medians. Memory, of the default (fp32)
    selection: the torch profiler's record of every tensor allocation during one step (not
    RSS): the peak over what was live before, with and without the gradients the step
    writes (the embeddings' (B, d) and the proxies' (CN, d), which every proxy loss
    writes). The target compares with one (B, CN) float32 tensor.
    """
    return [
        row for batch in tqdm((32, 256), desc="targets") for row in _target_rows(batch, repeats)
    ]


CHECKS_DOC = {
    "backward": check_backward.__doc__,
    "regularizer": check_regularizer.__doc__,
    "million": check_million.__doc__,
    "topk": check_topk.__doc__,
    "targets": check_targets.__doc__,
}
CHECKS = {
    "backward": lambda args: check_backward(args.repeats),
    "regularizer": lambda args: check_regularizer(args.repeats, args.draws),
    "million": lambda args: check_million(args.repeats),
    "topk": lambda args: check_topk(args.repeats),
    "targets": lambda args: check_targets(args.repeats),
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale_checks",
        description=__doc__.splitlines()[0],
        parents=[cli.common_flags("out")],
    )
    parser.add_argument("checks", nargs="*", default=list(CHECKS), help=f"of {list(CHECKS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draws", type=int, default=20, help="sampled-regulariser draws")
    args = parser.parse_args(argv)
    unknown = set(args.checks) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}; choose from {list(CHECKS)}")
    out = report.output_folder(args.out, "scale_checks")
    command = report.command_line("benchmarks.scale_checks", argv)
    environment = report.capture_environment("cpu", command)
    for name in args.checks:
        rows = CHECKS[name](args)
        report.write_results(
            out,
            f"scale_checks_{name}",
            rows,
            environment,
            title=f"scale_checks: {name}",
            columns={key: key for key in rows[0]},
            notes=CHECKS_DOC[name],
        )
        print(f"\n## {name}\n\n{report.markdown_table(rows, {key: key for key in rows[0]})}")


if __name__ == "__main__":
    main()

"""The certified selection in each screening precision, and the loss step it drives.

Variants per shape, timed in one process in interleaved rounds (every variant once per
round, ``--warmup`` rounds discarded), medians over ``--repeats`` rounds:

* ``floor``: the forward-only ``F.normalize(X) @ F.normalize(P).T`` of the shape, as in
  ``loss_speed`` and ``scale_checks targets``: the least any proxy loss pays.
* ``streamed product``: the same product's arithmetic alone: normalised X times proxies
  normalised once beforehand, block by block of the selection's size, each (B, block)
  block dropped at once. At a million classes the floor's fresh (CN, d) and (B, CN)
  tensors cost more than this arithmetic where new memory pages are slow to map.
* ``select topk``: ``functional.select_topk``, the loss's default selection, on
  normalised embeddings and the raw proxies (what the loss calls).
* ``select <p>``: ``functional.select_kept`` in screening precision p, likewise, with the
  rows it could not certify and, for ``auto``, what it chose (measured on its first call).
* ``select + kept backward``: the default step's selection and its kept similarities'
  backward (``functional.kept_similarities`` given a fixed upstream gradient), with the
  proxies' norms taken once as the loss does: every large kernel of the step, without
  the loss's own math, autograd's bookkeeping of it, PML's reducers and input checks.
  The step minus this is what those cost.
* ``step <p>``: ``ProxyGMLLoss(..., weight_lambda=0, selection_precision=p)`` forward and
  backward (``fp32``: the default, ``select_topk``; the others ``select_kept``),
  embeddings and proxies requiring grad, their gradients set to None before each step as
  ``optimizer.zero_grad()`` does.
* ``step fp32 compiled`` (with ``--compile``): the ``fp32`` step through
  ``torch.compile(loss)`` (inductor; its compilation falls in the warm-up rounds): what
  fusing the elementwise work around the selection's numpy partition gains.
* ``step ProxyAnchor`` (with ``--proxyanchor``): PML's ``ProxyAnchorLoss(C, d)`` forward and
  backward on the same embeddings, beside.

On CUDA (``--device cuda``) every timed call is bracketed by a device synchronisation, and
each ``step`` row also gives the synchronising CUDA calls of one more step with
``check_inputs=False`` (``torch.cuda.set_sync_debug_mode("warn")``, counted): the loss
promises none in the fp32 selection.

Shapes: C=10, N=12, d=128, B=32, k=60 (every product tiny, so the step's time is its
fixed cost: dispatch of its operations, Python, PML's reducers); SOP (C=11,318, N=1, d=512,
r=0.05) at B=32 and 256; the emoji shape (B=32, C=818, N=12, d=128, k=491) and C=1,000,
N=12, d=128, r=0.05, B=32 (issue 12); with ``--million``
also 1,000,000 classes, N=1, d=512, B=256, top_k=1000 (2 GB of proxies, about 10 s a
round on 2 cores). The ``select_kept`` screenings return the same (canonical) kept sets;
``select_topk``'s differ from them only in near-ties below the fp32 GEMM's rounding.

Run ``python -m benchmarks.selection_speed [--million] [--device cuda] [--proxyanchor]``;
results go to ``--out`` (default ``runs/selection_speed/``) as
``selection_speed[_million][_cuda].{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses

from pml_proxygml import ProxyGMLLoss
from pml_proxygml import functional as gml

from .core import cli, report
from .core.measure import host_syncs, load_average, product_floor, synchronizer
from .core.registry import TIMED_SELECTION_PRECISIONS
from .core.shapes import MILLION, SHAPES, Shape


def _variants(
    shape: Shape, compiled: bool, device: str = "cpu", proxyanchor: bool = False
) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[], int | None]]]:
    """``(variants, host_syncs)``: name -> a callable timing one run (``select`` ones return
    their Selection), and per ProxyGML step, a callable counting one step's host syncs."""
    generator = torch.Generator().manual_seed(0)
    num_proxies = shape.classes * shape.proxies_per_class
    embeddings = torch.randn(shape.batch_size, shape.embedding_size, generator=generator)
    labels = torch.randint(0, shape.classes, (shape.batch_size,), generator=generator)
    proxies = torch.randn(num_proxies, shape.embedding_size, generator=generator)
    embeddings, labels, proxies = embeddings.to(device), labels.to(device), proxies.to(device)
    k = gml.num_selected(shape.r, shape.classes, shape.proxies_per_class, shape.top_k)
    normalised = F.normalize(embeddings, dim=1)

    def floor() -> None:
        product_floor(embeddings, proxies)

    unit_proxies = F.normalize(proxies)
    block_rows = gml.selection_block_rows(
        shape.batch_size, normalised.element_size(), gml.DEFAULT_SELECTION_BLOCK_BYTES
    )

    def streamed_product() -> None:
        for start in range(0, num_proxies, block_rows):
            normalised @ unit_proxies[start : start + block_rows].T

    variants: dict[str, Callable[[], Any]] = {
        "floor": floor,
        "streamed product": streamed_product,
        "select topk": lambda: gml.select_topk(
            normalised, proxies, labels, shape.proxies_per_class, k
        ),
    }
    for precision in TIMED_SELECTION_PRECISIONS:
        variants[f"select {precision}"] = lambda p=precision: gml.select_kept(
            normalised, proxies, labels, shape.proxies_per_class, k, precision=p
        )
    leaf_embeddings = normalised.clone().requires_grad_()
    leaf_proxies = proxies.clone().requires_grad_()
    upstream = torch.randn(shape.batch_size, k, generator=generator).to(device)

    def selection_and_kept_backward() -> None:
        leaf_embeddings.grad = leaf_proxies.grad = None
        with torch.no_grad():
            norms = gml.proxy_norms(leaf_proxies)
        indices, values = gml.select_topk(
            leaf_embeddings, leaf_proxies, labels, shape.proxies_per_class, k, norms=norms
        )
        gml.kept_similarities(leaf_embeddings, leaf_proxies, indices, values, norms=norms).backward(
            upstream
        )

    variants["select + kept backward"] = selection_and_kept_backward
    embeddings.requires_grad_()
    with warnings.catch_warnings():  # costly-setting warnings: measured on purpose
        warnings.simplefilter("ignore")
        loss = ProxyGMLLoss(
            shape.classes,
            shape.embedding_size,
            proxies_per_class=shape.proxies_per_class,
            r=shape.r,
            top_k=shape.top_k,
            weight_lambda=0.0,
        )
    loss.to(device)
    with torch.no_grad():
        loss.proxies.copy_(proxies)

    def step(precision: str, module: torch.nn.Module = loss) -> None:
        loss.selection_precision = precision  # one loss: one copy of the proxies
        embeddings.grad = loss.proxies.grad = None
        module(embeddings, labels).backward()

    def unchecked_step_syncs(precision: str) -> int | None:
        checked, loss.check_inputs = loss.check_inputs, False
        try:
            return host_syncs(lambda: step(precision), device)
        finally:
            loss.check_inputs = checked

    host_syncs_of = {}
    for precision in TIMED_SELECTION_PRECISIONS:
        variants[f"step {precision}"] = lambda p=precision: step(p)
        host_syncs_of[f"step {precision}"] = lambda p=precision: unchecked_step_syncs(p)
    if compiled:
        compiled_loss = torch.compile(loss)
        variants["step fp32 compiled"] = lambda: step("fp32", compiled_loss)
    if proxyanchor:
        anchor = losses.ProxyAnchorLoss(shape.classes, shape.embedding_size).to(device)

        def anchor_step() -> None:
            embeddings.grad = anchor.proxies.grad = None
            anchor(embeddings, labels).backward()

        variants["step ProxyAnchor"] = anchor_step
    return variants, host_syncs_of


def measure(
    shape: Shape,
    repeats: int,
    warmup: int,
    compiled: bool,
    device: str = "cpu",
    proxyanchor: bool = False,
) -> list[dict[str, Any]]:
    variants, host_syncs_of = _variants(shape, compiled, device, proxyanchor)
    synchronize = synchronizer(device)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    fallbacks: dict[str, int] = {}
    screened_in: dict[str, str] = {}
    for round_ in range(warmup + repeats):
        for name, run in variants.items():
            synchronize()
            start = time.perf_counter()
            result = run()
            synchronize()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                seconds[name].append(elapsed)
            if isinstance(result, gml.Selection):
                fallbacks[name] = fallbacks.get(name, 0) + int(result.fallback_rows)
                screened_in[name] = str(result.screening).removeprefix("torch.")
    median = {name: statistics.median(times) for name, times in seconds.items()}
    syncs = {name: count() for name, count in host_syncs_of.items()}
    return [
        {
            "shape": shape.name,
            "variant": name,
            "ms": median[name] * 1e3,
            "x floor": median[name] / median["floor"],
            "fallback rows": fallbacks.get(name),
            "screened in": screened_in.get(name),
            "host syncs": syncs.get(name),
        }
        for name in variants
    ]


COLUMNS = {
    "shape": "shape",
    "variant": "variant",
    "ms": "median ms",
    "x floor": "x floor",
    "fallback rows": "uncertified rows (all rounds)",
    "screened in": "screened in",
    "host syncs": "CUDA host syncs, one step, check_inputs=False",
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], parents=[cli.common_flags("out", "device")]
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--million", action="store_true", help="the 1M-class shape only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--compile", action="store_true", help="add the fp32 step through torch.compile"
    )
    parser.add_argument(
        "--proxyanchor", action="store_true", help="add PML's ProxyAnchorLoss step beside"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = report.command_line("benchmarks.selection_speed", argv)
    environment = report.capture_environment(args.device, command)
    environment["torch_threads"] = torch.get_num_threads()
    shapes = (MILLION,) if args.million else SHAPES
    rows = [
        row
        for shape in shapes
        for row in measure(
            shape, args.repeats, args.warmup, args.compile, args.device, args.proxyanchor
        )
    ]
    environment["load_average_at_end"] = load_average()
    out = report.output_folder(args.out, "selection_speed")
    out.mkdir(parents=True, exist_ok=True)
    notes = __doc__.split("\n\n", 1)[1].rsplit("\n\nRun ", 1)[0] + (
        "\n\nWall-clock times: other processes on the machine (see the load averages below)"
        " slow every variant, unevenly. Compare ratios within one run only.\n"
    )
    device_type = torch.device(args.device).type
    stem = "selection_speed" + ("_million" if args.million else "")
    stem += "" if device_type == "cpu" else f"_{device_type}"
    report.write_results(
        out, stem, rows, environment, title="selection speed", columns=COLUMNS, notes=notes
    )
    print(report.markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()

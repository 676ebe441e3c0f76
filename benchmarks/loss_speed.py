"""Time and peak memory of one loss step: ProxyGMLLoss against PML's proxy losses.

One step is ``loss(embeddings, labels).backward()`` with (B, d) embeddings that require grad;
the loss's parameters get their gradients too, and every gradient is set to None before
each step, as ``optimizer.zero_grad()`` does. "floor" is a bare forward-only
``F.normalize(X) @ F.normalize(P).T`` of the same shape (B x d times d x C*N): the least any
proxy loss pays.

Each measurement runs in its own worker process (forked from a forkserver that has already
imported torch), so an out-of-memory kill costs one row, not the run, and peak memory is that
of one measurement. In the worker: build the inputs and the loss; take the baseline; run
``--warmup`` steps, then ``--repeats`` timed steps, and report their median. Time and peak
memory come from the benchmarks' one helper (:mod:`benchmarks.core.measure`: perf_counter
around each step with the device synchronised; CPU peak resident set or CUDA peak allocation
over the baseline, ``peak_reset`` False where the kernel would not reset the CPU peak). The
first (warm-up) step's one-time allocations count too: about 10 MiB on CPU, which only matters
at tiny sizes.
* Limits: ``--memory-limit-gb`` caps the address space the worker may add after importing
  torch (RLIMIT_AS) on CPU, the caching allocator's share of the GPU on CUDA; a failed
  allocation, or a worker killed by SIGKILL (the kernel's OOM killer), is reported "oom".
  ``--timeout`` bounds a whole measurement (building included); the worker is then killed
  and the row reads "timeout". Any other exception reads "error: ...".

Baselines, by their names in the benchmarks' loss registry: ``proxyanchor``, ``normsoftmax``,
``proxynca`` (PML's defaults, one proxy per class) and ``softtriple`` with
``centers_per_class=N`` and no centre regulariser: SoftTriple gets as
many centres per class as ProxyGML has proxies (not its default 10), so that the two
multi-proxy losses hold the same C*N vectors. At the CUB point (100 classes x N=12) the
one-proxy baselines therefore hold 100 proxies where ProxyGML, SoftTriple and the floor hold
1200; the plot puts that point at C*N = 1200.

Linux only (it reads /proc). Run ``python -m benchmarks.loss_speed --quick`` (a tiny grid)
or with no flags for the full grid; results go to ``--out`` (default ``runs/loss_speed/``)
as ``loss_speed_<device>[_quick].{csv,json,md,png}``.
"""

from __future__ import annotations

import argparse
import inspect
import multiprocessing
import re
import resource
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pml_proxygml import ProxyGMLLoss
from pml_proxygml import functional as gml

from .core import cli, measure, registry, report

MEASURED_LOSSES = ("proxyanchor", "proxygml", "softtriple", "normsoftmax", "proxynca")
LOSS_LABELS = {
    "floor": "floor (matmul)",
    **{name: registry.LOSSES[name].label for name in MEASURED_LOSSES},
}
# The capped-top_k variant of ProxyGML is measured from this many proxies on (r * C * N is
# then 50,000 with the default r, so the cap changes the selection by a large factor).
CAPPED_TOP_K_MIN_PROXIES = 1_000_000
# ProxyGMLLoss's default selection; the others (certified screenings) are opt-in rows.
DEFAULT_SELECTION_PRECISION = (
    inspect.signature(ProxyGMLLoss).parameters["selection_precision"].default
)
CSV_COLUMNS = [
    "config",
    "loss",
    "status",
    "median_ms",
    "min_ms",
    "peak_extra_mib",
    "x_floor",
    "x_proxyanchor",
    "loss_name",
    "classes",
    "proxies_per_class",
    "num_proxies",
    "batch_size",
    "embedding_size",
    "r",
    "top_k",
    "weight_lambda",
    "selection_precision",
    "device",
    "threads",
    "warmup",
    "repeats",
    "peak_reset",
]
TABLE_COLUMNS = {
    "config": "config",
    "loss": "loss",
    "status": "status",
    "median_ms": "median ms",
    "peak_extra_mib": "peak extra MiB",
    "x_floor": "x floor",
    "x_proxyanchor": "x ProxyAnchor",
}
MIB = 2**20


@dataclass(frozen=True)
class ClassSpec:
    """A grid point: ``classes`` classes with ``proxies_per_class`` proxies each ("100x12")."""

    classes: int
    proxies_per_class: int = 1

    @classmethod
    def parse(cls, text: str) -> ClassSpec:
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip().lower())
        if match is None:
            raise argparse.ArgumentTypeError(f"expected CLASSES or CLASSESxN, got {text!r}")
        spec = cls(int(match[1]), int(match[2] or 1))
        if spec.classes < 1 or spec.proxies_per_class < 1:
            raise argparse.ArgumentTypeError(f"classes and N must be positive, got {text!r}")
        return spec

    def __str__(self) -> str:
        if self.proxies_per_class == 1:
            return str(self.classes)
        return f"{self.classes}x{self.proxies_per_class}"


FULL_GRID = {
    "classes": [ClassSpec(100, 12), ClassSpec(11318), ClassSpec(100_000), ClassSpec(1_000_000)],
    "batch_sizes": [32, 256],
    "warmup": 2,
    "repeats": 5,
    "timeout": 300.0,
}
QUICK_GRID = {
    "classes": [ClassSpec(100, 12), ClassSpec(11318)],
    "batch_sizes": [32],
    "warmup": 1,
    "repeats": 3,
    "timeout": 60.0,
}


@dataclass(frozen=True)
class Measurement:
    """One (config, loss) cell of the grid; r, top_k, weight_lambda and
    selection_precision are ProxyGML's."""

    loss_name: str
    classes: int
    proxies_per_class: int
    batch_size: int
    embedding_size: int
    r: float | None = None
    top_k: int | None = None
    weight_lambda: float | None = None
    selection_precision: str | None = None

    @property
    def num_proxies(self) -> int:
        return self.classes * self.proxies_per_class

    @property
    def config(self) -> str:
        classes = ClassSpec(self.classes, self.proxies_per_class)
        return f"C={classes} B={self.batch_size} d={self.embedding_size}"

    @property
    def label(self) -> str:
        label = LOSS_LABELS[self.loss_name]
        if self.weight_lambda is not None:
            label += f" λ={self.weight_lambda:g}"
        if self.top_k is not None:
            label += f" top_k={self.top_k}"
        if self.selection_precision not in (None, DEFAULT_SELECTION_PRECISION):
            label += f" {self.selection_precision} selection"
        return label


@dataclass(frozen=True)
class Settings:
    """How every measurement runs."""

    device: str
    threads: int
    warmup: int
    repeats: int
    timeout: float
    memory_limit_gb: float


def build_grid(
    class_specs: Sequence[ClassSpec],
    batch_sizes: Sequence[int],
    loss_names: Sequence[str],
    embedding_size: int,
    lambdas: Sequence[float],
    r: float,
    capped_top_k: int | None,
    capped_top_k_min_proxies: int = CAPPED_TOP_K_MIN_PROXIES,
    selection_precisions: Sequence[str] = (DEFAULT_SELECTION_PRECISION,),
) -> list[Measurement]:
    """Measurements in run order: per config, the losses in ``loss_names`` order; ProxyGML
    once per top_k, weight_lambda and selection precision, in that nesting."""
    grid = []
    for spec in class_specs:
        for batch_size in batch_sizes:
            base = Measurement("", spec.classes, spec.proxies_per_class, batch_size, embedding_size)
            for name in loss_names:
                if name != "proxygml":
                    grid.append(replace(base, loss_name=name))
                    continue
                top_ks: list[int | None] = [None]
                if capped_top_k and base.num_proxies >= capped_top_k_min_proxies:
                    top_ks.append(capped_top_k)
                grid += [
                    replace(
                        base,
                        loss_name=name,
                        r=r,
                        top_k=top_k,
                        weight_lambda=weight_lambda,
                        selection_precision=precision,
                    )
                    for top_k in top_ks
                    for weight_lambda in lambdas
                    for precision in selection_precisions
                ]
    return grid


def build_loss(measurement: Measurement) -> torch.nn.Module:
    """The measured loss from the registry: ProxyGML with this cell's settings, SoftTriple
    with N centres per class, the others with PML's defaults."""
    m = measurement
    settings: dict[str, Any] = {}
    if m.loss_name == "proxygml":
        settings = {"proxies_per_class": m.proxies_per_class, "r": m.r}
        settings |= {"top_k": m.top_k, "weight_lambda": m.weight_lambda}
        if m.selection_precision is not None:
            settings["selection_precision"] = m.selection_precision
    elif m.loss_name == "softtriple":
        settings = {"centers_per_class": m.proxies_per_class}
    return registry.build_loss(m.loss_name, m.classes, m.embedding_size, settings)


def _limit_memory(device: torch.device, limit_bytes: int) -> None:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), device)
        return
    # RLIMIT_AS, not RSS: the kernel enforces no RSS limit. It is never set on CUDA, whose
    # driver reserves far more address space than it uses.
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = measure.proc_status_kib("VmSize") * 1024 + limit_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard < 0 else min(cap, hard), hard))


def _build_step(
    measurement: Measurement, device: torch.device
) -> tuple[Callable[[], None], list[torch.Tensor], int | None]:
    """The step to time, the tensors whose gradients it fills, and ProxyGML's k."""
    m = measurement
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(m.batch_size, m.embedding_size, generator=generator).to(device)
    if m.loss_name == "floor":
        proxies = torch.randn(m.num_proxies, m.embedding_size, generator=generator).to(device)

        def floor_step() -> None:
            measure.product_floor(embeddings, proxies)

        return floor_step, [], None
    labels = torch.randint(m.classes, (m.batch_size,), generator=generator).to(device)
    embeddings.requires_grad_(True)
    with warnings.catch_warnings():
        # ProxyGMLLoss warns about costly settings; the benchmark measures them on purpose.
        warnings.simplefilter("ignore")
        loss = build_loss(m).to(device)

    def loss_step() -> None:
        loss(embeddings, labels).backward()

    return loss_step, [embeddings, *loss.parameters()], getattr(loss, "top_k", None)


def measure_step(measurement: Measurement, settings: Settings) -> dict[str, Any]:
    """Run one measurement in this process (the worker) and return its result fields."""
    device = torch.device(settings.device)
    torch.set_num_threads(settings.threads)
    # Start the intra-op and BLAS thread pools before the address-space cap: thread stacks
    # and malloc arenas reserve address space that a small cap would refuse.
    torch.randn(256, 256) @ torch.randn(256, 256)
    torch.randn(1 << 20).exp().sum()
    _limit_memory(device, int(settings.memory_limit_gb * 2**30))
    step, with_grad, top_k = _build_step(measurement, device)

    def clear_gradients() -> None:
        for tensor in with_grad:
            tensor.grad = None

    peak = measure.PeakMemory(device).start()
    timed = measure.time_steps(
        {"step": step}, settings.repeats, settings.warmup, clear_gradients, device
    )["step"]
    return {
        "status": "ok",
        "median_ms": statistics.median(timed) * 1e3,
        "min_ms": min(timed) * 1e3,
        "peak_extra_mib": peak.extra_bytes() / MIB,
        "top_k": top_k,
        "threads": torch.get_num_threads(),
        "peak_reset": peak.reset,
    }


def _failure_status(error: BaseException) -> str:
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return "oom"
    message = str(error)
    # The CPU allocator raises a plain RuntimeError when malloc fails (RLIMIT_AS hit).
    if isinstance(error, RuntimeError) and (
        "can't allocate memory" in message or "out of memory" in message
    ):
        return "oom"
    first_line = message.strip().splitlines()[0] if message.strip() else ""
    return f"error: {type(error).__name__}: {first_line}"[:200]


def _worker(measurement: Measurement, settings: Settings, sender: Connection) -> None:
    try:
        result = measure_step(measurement, settings)
    except Exception as error:  # every failure must come back as a row
        result = {"status": _failure_status(error)}
    sender.send(result)


def _death_status(exitcode: int | None) -> str:
    if exitcode == -signal.SIGKILL:  # only the kernel's OOM killer sends it unasked
        return "oom"
    if exitcode is not None and exitcode < 0:
        return f"error: worker killed by {signal.Signals(-exitcode).name}"
    return f"error: worker exited with code {exitcode} without a result"


def worker_context() -> multiprocessing.context.BaseContext:
    """Forkserver workers: forked from a process that has imported torch and PML already,
    so a worker starts in milliseconds yet shares nothing with this process's state."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "pytorch_metric_learning.losses", "pml_proxygml"])
    return context


def run_measurement(
    measurement: Measurement, settings: Settings, context: multiprocessing.context.BaseContext
) -> dict[str, Any]:
    """Measure in a fresh worker; the row reads "oom", "timeout" or "error: ..." on failure."""
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker, args=(measurement, settings, sender), daemon=True)
    process.start()
    sender.close()  # so that a worker that dies unanswered makes recv() raise EOFError
    try:
        result = receiver.recv() if receiver.poll(settings.timeout) else {"status": "timeout"}
    except EOFError:
        result = None
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()
    if result is None:
        result = {"status": _death_status(process.exitcode)}
    row = {
        "config": measurement.config,
        "loss": measurement.label,
        "num_proxies": measurement.num_proxies,
        **asdict(measurement),
        "device": settings.device,
        "threads": settings.threads,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
    }
    row.update({key: value for key, value in result.items() if value is not None})
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """x_floor and x_proxyanchor: median time over that of the floor / ProxyAnchor, same config."""
    medians = {
        (row["config"], row["loss_name"]): row["median_ms"]
        for row in rows
        if row["status"] == "ok" and row["loss_name"] in ("floor", "proxyanchor")
    }
    for row in rows:
        for reference, column in (("floor", "x_floor"), ("proxyanchor", "x_proxyanchor")):
            denominator = medians.get((row["config"], reference))
            ok = row["status"] == "ok" and denominator
            row[column] = row["median_ms"] / denominator if ok else None


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Log-log time and peak memory against C*N; one line per loss and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(row["loss"] for row in rows))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    batch_sizes = sorted({row["batch_size"] for row in rows}, reverse=True)
    styles = {b: ("-", "--", ":", "-.")[i % 4] for i, b in enumerate(batch_sizes)}
    figure, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    panels = (("median_ms", "median time per step (ms)"), ("peak_extra_mib", "peak extra MiB"))
    for axis, (key, ylabel) in zip(axes, panels):
        ok_values = [row[key] for row in rows if row["status"] == "ok" and row[key] > 0]
        top = max(ok_values, default=1.0)
        series_keys = [(label, b) for label in labels for b in batch_sizes]
        for index, (label, batch_size) in enumerate(series_keys):
            series = [r for r in rows if r["loss"] == label and r["batch_size"] == batch_size]
            ok = [r for r in series if r["status"] == "ok"]
            axis.plot(
                [r["num_proxies"] for r in ok],
                [r[key] for r in ok],
                linestyle=styles[batch_size],
                marker="o",
                color=colors[label],
                label=f"{label}, B={batch_size}",
            )
            # Failures go above every measured value, one level per series so none overlap.
            failure_y = top * 2 * 1.3**index
            for r in series:
                if r["status"] != "ok":
                    axis.plot(r["num_proxies"], failure_y, "x", color=colors[label], ms=8)
                    axis.annotate(
                        f"{r['status'].split(':')[0]} B={batch_size}",
                        (r["num_proxies"], failure_y),
                        textcoords="offset points",
                        xytext=(5, -3),
                        fontsize=7,
                        color=colors[label],
                    )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("classes x proxies per class, C*N (100x12 at 1200)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_title("forward + backward (floor: forward only); x = oom / timeout / error")
    axes[1].set_title("peak memory over the baseline")
    handles, legend_labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, legend_labels, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(title)
    figure.tight_layout()
    report.save_figure(figure, path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def run_grid(
    measurements: Sequence[Measurement], settings: Settings, progress: bool = True
) -> list[dict[str, Any]]:
    context = worker_context()
    rows = []
    bar = tqdm(measurements, unit="measurement", disable=not progress, dynamic_ncols=True)
    for measurement in bar:
        bar.set_postfix_str(f"{measurement.config} {measurement.label}")
        rows.append(run_measurement(measurement, settings, context))
    add_ratios(rows)
    return rows


def write_results(
    rows: Sequence[dict[str, Any]], environment: dict[str, Any], out_dir: Path, stem: str
) -> dict[str, Path]:
    """Write <stem>.csv/.json/.md/.png under ``out_dir``; return the paths."""
    notes = (
        f"One step: forward + backward on {environment['device']} with "
        f"{environment['threads']} threads; median of {environment['repeats']} steps after "
        f"{environment['warmup']} warm-up steps. Peak extra memory: "
        f"{environment['peak_memory']}. The method is described in benchmarks/loss_speed.py.\n"
    )
    paths = report.write_results(
        out_dir,
        stem,
        rows,
        environment,
        title=f"Loss speed ({stem})",
        columns=TABLE_COLUMNS,
        notes=notes,
        csv_columns=CSV_COLUMNS,
    )
    machine = environment["machine"]
    title = f"{stem}: {machine['cpu_model']}, {environment['threads']} threads"
    if "gpu" in environment:
        title = f"{stem}: {environment['gpu']['name']}"
    try:
        paths["png"] = out_dir / f"{stem}.png"
        plot(rows, paths["png"], title)
    except ImportError:
        print("matplotlib is missing (pip install 'pml-proxygml[bench]'): no plot written")
        del paths["png"]
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def grid_default(key: str) -> str:
        def text(value: Any) -> str:
            return " ".join(map(str, value)) if isinstance(value, list) else f"{value:g}"

        return f"default: {text(FULL_GRID[key])}; with --quick: {text(QUICK_GRID[key])}"

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loss_speed",
        description=__doc__.split("\n", 1)[0],
        parents=[cli.common_flags("out", "device", "no_progress")],
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny grid (explicit flags still win); output files get a _quick suffix",
    )
    parser.add_argument(
        "--classes",
        nargs="+",
        type=ClassSpec.parse,
        help="grid points, CLASSES or CLASSESxN with N proxies per class "
        f"({grid_default('classes')})",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, help=grid_default("batch_sizes"))
    parser.add_argument(
        "--losses",
        nargs="+",
        choices=list(LOSS_LABELS),
        default=list(LOSS_LABELS),
        metavar="LOSS",
        help=f"any of {' '.join(LOSS_LABELS)} (default: all)",
    )
    parser.add_argument(
        "--lambdas",
        nargs="+",
        type=float,
        default=[0.0, 0.3],
        help="ProxyGML weight_lambda values (default: 0 0.3)",
    )
    parser.add_argument("--r", type=float, default=0.05, help="ProxyGML r (default: 0.05)")
    parser.add_argument(
        "--selection-precisions",
        nargs="+",
        choices=gml.SELECTION_PRECISIONS,
        default=[DEFAULT_SELECTION_PRECISION],
        metavar="PRECISION",
        help="ProxyGML selection_precision values, any of "
        f"{' '.join(gml.SELECTION_PRECISIONS)} (default: {DEFAULT_SELECTION_PRECISION})",
    )
    parser.add_argument(
        "--capped-top-k",
        type=int,
        default=1000,
        help="also run ProxyGML with this top_k at grid points of at least "
        f"{CAPPED_TOP_K_MIN_PROXIES} proxies; 0: never (default: 1000)",
    )
    parser.add_argument("--embedding-size", type=int, default=512, help="d (default: 512)")
    parser.add_argument("--warmup", type=int, help=f"untimed steps ({grid_default('warmup')})")
    parser.add_argument("--repeats", type=int, help=f"timed steps ({grid_default('repeats')})")
    parser.add_argument(
        "--timeout", type=float, help=f"seconds per measurement ({grid_default('timeout')})"
    )
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=20.0,
        help="memory a measurement may add, GiB (default: 20)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=measure.usable_cores(),
        help="torch threads (default: the usable cores, %(default)s here)",
    )
    args = parser.parse_args(argv)
    grid = QUICK_GRID if args.quick else FULL_GRID
    for key, value in grid.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = report.output_folder(args.out, "loss_speed")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    settings = Settings(
        args.device, args.threads, args.warmup, args.repeats, args.timeout, args.memory_limit_gb
    )
    measurements = build_grid(
        args.classes,
        args.batch_sizes,
        args.losses,
        args.embedding_size,
        args.lambdas,
        args.r,
        args.capped_top_k,
        selection_precisions=args.selection_precisions,
    )
    command = report.command_line("benchmarks.loss_speed", argv)
    environment = report.capture_environment(settings.device, command)
    environment.update(asdict(settings))
    environment["peak_memory"] = (
        "torch.cuda.max_memory_allocated over the baseline"
        if settings.device.startswith("cuda")
        else "VmHWM (peak RSS, /proc/self/status) over VmRSS at the baseline"
    )
    started = time.perf_counter()
    rows = run_grid(measurements, settings, progress=not args.no_progress)
    environment["wall_s"] = round(time.perf_counter() - started, 1)
    device_kind = "cuda" if settings.device.startswith("cuda") else "cpu"
    stem = f"loss_speed_{device_kind}" + ("_quick" if args.quick else "")
    paths = write_results(rows, environment, args.out, stem)
    print(report.markdown_table(rows, TABLE_COLUMNS))
    print(f"{len(rows)} measurements in {environment['wall_s']} s; wrote", *paths.values())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

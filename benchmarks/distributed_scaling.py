"""Per-rank peak memory and step time vs number of classes, 1, 2 and 4 CPU ranks (gloo).

Weak scaling: every rank owns ``--classes-per-rank`` classes, so C = W x that, and passes its
own batch of ``--batch-per-rank`` samples (the gathered batch grows with W, as it does when
GPUs are added). Three ways to run the loss:

* ``sharded``: ``ShardedProxyGMLLoss``, each rank holds C / W classes' proxies;
* ``data_parallel``: ``data_parallel_loss(ProxyGMLLoss)``, each rank holds all C * N proxies
  and DDP all-reduces their gradient;
* ``single``: a plain ``ProxyGMLLoss`` in one process without torch.distributed (W = 1 only),
  the reference for the overhead of the distributed machinery.

One step is ``loss(embeddings, labels).backward()`` with gradients set to None before it;
k is ``--top-k`` (fixed, so that only the number of classes changes) and lambda is 0 (the
regulariser's O(C^2) cost would dominate; the official recipe for many classes has it off).
Each configuration runs in W freshly spawned processes (file store, no ports) with
``usable cores // W`` threads each. In each rank: the baseline is taken after the process
group and thread pools start, before the loss exists, so the proxies, their gradient and the
step's temporaries all count; ``--warmup`` steps, then ``--repeats`` timed steps, each after
a barrier. Reported: the slowest rank's median step time and the largest per-rank peak
(VmHWM of /proc/self/status, reset at the baseline, minus VmRSS there).

``python -m benchmarks.distributed_scaling`` runs the full grid; ``--quick`` a small one.
Results: ``--out`` (default ``runs/distributed_scaling/``) as
``distributed_scaling_cpu[_quick].{json,md}``. Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pml_proxygml import ProxyGMLLoss
from pml_proxygml.distributed import ShardedProxyGMLLoss, data_parallel_loss

from .core import cli, measure, report

MIB = 2**20
MODES = ("single", "data_parallel", "sharded")
COLUMNS = {
    "mode": "mode",
    "ranks": "ranks",
    "classes": "classes C",
    "proxies_per_rank": "proxies per rank",
    "global_batch": "global batch",
    "top_k": "k",
    "step_ms": "step ms (slowest rank)",
    "peak_extra_mib": "peak MiB per rank (max)",
    "threads_per_rank": "threads per rank",
    "status": "status",
}


def _measure_rank(rank: int, config: dict[str, Any], out_dir: str) -> None:
    """One rank of one configuration; writes ``rank<r>.json``."""
    world_size, mode = config["ranks"], config["mode"]
    torch.set_num_threads(config["threads_per_rank"])
    torch.randn(256, 256) @ torch.randn(256, 256)  # start the thread pools before the baseline
    if mode != "single":
        dist.init_process_group(
            "gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world_size
        )
    generator = torch.Generator().manual_seed(rank)
    embeddings = torch.randn(config["batch_per_rank"], config["dim"], generator=generator)
    labels = torch.randint(config["classes"], (config["batch_per_rank"],), generator=generator)
    embeddings.requires_grad_()
    memory = measure.PeakMemory("cpu").start()

    loss_args = {
        "num_classes": config["classes"],
        "embedding_size": config["dim"],
        "proxies_per_class": config["proxies_per_class"],
        "top_k": config["top_k"],
        "weight_lambda": 0.0,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the settings warnings are expected here
        if mode == "sharded":
            loss = ShardedProxyGMLLoss(**loss_args)
            loss_fn, proxies = loss, loss.proxies
        else:
            loss = ProxyGMLLoss(**loss_args)
            proxies = loss.proxies
            loss_fn = loss if mode == "single" else data_parallel_loss(loss)

    def before_step() -> None:
        embeddings.grad = proxies.grad = None
        if mode != "single":
            dist.barrier()

    times = measure.time_steps(
        {"step": lambda: loss_fn(embeddings, labels).backward()},
        config["repeats"],
        config["warmup"],
        before_step,
    )["step"]
    result = {
        "median_ms": statistics.median(times) * 1e3,
        "peak_extra_mib": memory.extra_bytes() / MIB,
        "peak_reset": memory.reset,
        "proxies_per_rank": len(proxies),
        "top_k": loss.top_k,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(result, file)
    if mode != "single":
        del loss_fn, loss
        gc.collect()  # DDP's reference cycles hold the process group: free them before it
        dist.destroy_process_group()


def run_config(config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Spawn the ranks of one configuration; the row of the results table."""
    row = {
        **config,
        "global_batch": config["batch_per_rank"] * config["ranks"],
        "classes_per_rank": config["classes"] // config["ranks"],
    }
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _measure_rank,
            args=(config, out_dir),
            nprocs=config["ranks"],
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    for process in context.processes:
                        process.kill()
                    return {**row, "status": "timeout"}
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
            return {**row, "status": f"error: {str(error).strip().splitlines()[-1]}"}
        ranks = []
        for rank in range(config["ranks"]):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as file:
                ranks.append(json.load(file))
    return {
        **row,
        "status": "ok",
        "step_ms": max(result["median_ms"] for result in ranks),
        "peak_extra_mib": max(result["peak_extra_mib"] for result in ranks),
        "peak_reset": all(result["peak_reset"] for result in ranks),
        "proxies_per_rank": max(result["proxies_per_rank"] for result in ranks),
        "top_k": ranks[0]["top_k"],
        "per_rank": ranks,
    }


def build_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    cores = measure.usable_cores()
    grid = []
    for classes_per_rank in args.classes_per_rank:
        for world_size in args.ranks:
            for mode in args.modes:
                if mode == "single" and world_size != 1:
                    continue
                grid.append(
                    {
                        "mode": mode,
                        "ranks": world_size,
                        "classes": classes_per_rank * world_size,
                        "proxies_per_class": args.proxies_per_class,
                        "dim": args.dim,
                        "batch_per_rank": args.batch_per_rank,
                        "top_k": args.top_k,
                        "warmup": args.warmup,
                        "repeats": args.repeats,
                        "threads_per_rank": max(1, cores // world_size),
                    }
                )
    return grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.distributed_scaling",
        description=__doc__.split("\n")[0],
        parents=[cli.common_flags("out")],
    )
    parser.add_argument("--quick", action="store_true", help="a small grid, a few seconds each")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--classes-per-rank", type=int, nargs="+")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--proxies-per-class", type=int, default=1)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch-per-rank", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    args = parser.parse_args(argv)
    args.out = report.output_folder(args.out, "distributed_scaling")
    if args.classes_per_rank is None:
        args.classes_per_rank = [5_000] if args.quick else [10_000, 100_000]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = report.command_line("benchmarks.distributed_scaling", argv)
    environment = report.capture_environment("cpu", command)
    rows = []
    for config in build_grid(args):
        row = run_config(config, args.timeout)
        rows.append(row)
        print(
            f"{row['mode']:>13} W={row['ranks']} C={row['classes']}: {row['status']}, "
            f"{row.get('step_ms', float('nan')):.1f} ms, "
            f"{row.get('peak_extra_mib', float('nan')):.1f} MiB",
            flush=True,
        )
    stem = "distributed_scaling_cpu" + ("_quick" if args.quick else "")
    settings = {
        key: getattr(args, key)
        for key in ("ranks", "classes_per_rank", "proxies_per_class", "dim", "batch_per_rank")
    }
    settings |= {"top_k": args.top_k, "warmup": args.warmup, "repeats": args.repeats}
    notes = (
        f"Weak scaling on CPU (gloo): {args.classes_per_rank} classes per rank x "
        f"{args.proxies_per_class} proxies, d={args.dim}, {args.batch_per_rank} samples per "
        f"rank, k={args.top_k}, lambda=0; one step = loss forward + backward. Step time: the "
        "slowest rank's median; memory: the largest per-rank peak above the rank's baseline "
        "(proxies, their gradient and the step's temporaries). With more ranks than cores the "
        "ranks time-share the CPU, so times then grow with W by that alone; memory does not.\n"
    )
    report.write_results(
        args.out,
        stem,
        rows,
        environment,
        title="Distributed scaling (CPU, gloo)",
        columns=COLUMNS,
        notes=notes,
        extra={"settings": settings},
    )
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

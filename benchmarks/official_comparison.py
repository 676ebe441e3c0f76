"""ProxyGMLLoss against the official ProxyGML module in one process: same proxies, same batch.

The official module is read at run time from the file the user names; nothing of it is in
this repository::

    git clone https://github.com/YuehuaZhu/ProxyGML
    python -m benchmarks.official_comparison --official ProxyGML/loss/ProxyGML.py

For each configuration (the CUB and SOP recipes of the official ``run.sh``, and SOP's classes
with N=12) both losses get the same unit embeddings, labels and proxies (the official module
stores them transposed, d x CN); the loss values and both gradients are compared (the
embeddings' in the tangent space of the unit sphere, see ``tangent``), and one forward +
backward of each is timed, interleaved round by round (medians), beside the configuration's
floor (``floor_step``): what the targets ask for reads as a multiple of it (``target x
floor``), where a target under about 2 floors asks more than an exact step's products can
give on the machine. Inputs are seeded
(``--seed``). The kept proxies are the official ones except where two similarities at the
k-th place lie within the float32 rounding of the two products: then each code keeps
another of the two, and the gradients differ by about 1e-4 relative (one of four seeds at
the SOP recipe with B=256). Every ratio to the official code quoted in the README comes
from this script's results.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import statistics
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pml_proxygml import ProxyGMLLoss

from .core import cli, report
from .core.errors import BenchmarkError
from .core.measure import product_floor, relative_difference, time_steps

DIM = 512
R = 0.05


@dataclass(frozen=True)
class Config:
    """One comparison: C classes, N proxies per class, batch B, regulariser weight λ, and
    the speed-up over the official module that issue 15 set as the target."""

    name: str
    num_classes: int
    proxies_per_class: int
    batch_size: int
    weight_lambda: float
    target_speedup: float


CONFIGS = (
    Config("CUB recipe", 100, 12, 32, 0.3, 10),
    Config("SOP recipe", 11318, 1, 32, 0.0, 20),
    Config("SOP recipe", 11318, 1, 256, 0.0, 30),
    Config("SOP classes, N=12", 11318, 12, 32, 0.0, 50),
    Config("SOP recipe, lambda=0.3", 11318, 1, 32, 0.3, 30),
)


def load_official(path: Path) -> type:
    """The ``ProxyGML`` class of the official ``loss/ProxyGML.py`` at ``path``."""
    if not path.is_file():
        raise BenchmarkError(f"--official {path}: no such file (the official loss/ProxyGML.py)")
    spec = importlib.util.spec_from_file_location("official_proxygml", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # any failure of foreign code is a problem of the user's file
        raise BenchmarkError(f"--official {path}: cannot import it ({error})") from None
    if not isinstance(getattr(module, "ProxyGML", None), type):
        raise BenchmarkError(f"--official {path}: defines no class ProxyGML")
    return module.ProxyGML


def build_official(official: type, config: Config) -> torch.nn.Module:
    """The official module with the options its constructor reads (its banner silenced)."""
    opt = types.SimpleNamespace(
        dim=DIM,
        C=config.num_classes,
        N=config.proxies_per_class,
        r=R,
        weight_lambda=config.weight_lambda,
        device="cpu",
        dataset="comparison",
        centerlr=0.0,
        rate=0.0,
        new_epoch_to_decay=0,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        return official(opt, dim=DIM)


def tangent(grad: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """The part of each row of ``grad`` orthogonal to its unit embedding: all that passes
    back through the network's final L2 normalisation. The official module takes the
    embeddings as given, ProxyGMLLoss normalises them (PML's CosineSimilarity), so only
    this part of their gradients is comparable."""
    return grad - (grad * units).sum(dim=1, keepdim=True) * units


def floor_step(
    config: Config, embeddings: torch.Tensor, proxies: torch.Tensor
) -> list[torch.Tensor]:
    """The configuration's forward-only products: ``product_floor`` and, with λ > 0, the
    regulariser's logits, every unit proxy against every class's sum of unit proxies (the
    Gram matrix with N = 1). An exact step pays these and its backward on top."""
    if not config.weight_lambda:
        return [product_floor(embeddings, proxies)]
    with torch.no_grad():
        units = F.normalize(proxies)  # once for both products, as a step normalises them
        class_sums = units.view(config.num_classes, config.proxies_per_class, -1).sum(1)
        return [F.normalize(embeddings) @ units.T, units @ class_sums.T]


def compare(official: type, config: Config, repeats: int, seed: int = 0) -> dict[str, Any]:
    """One configuration's row; ``seed`` draws the official proxies (its constructor uses
    torch's global generator), the embeddings and the labels."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    theirs = build_official(official, config)
    ours = ProxyGMLLoss(
        config.num_classes,
        DIM,
        proxies_per_class=config.proxies_per_class,
        r=R,
        weight_lambda=config.weight_lambda,
    )
    with torch.no_grad():
        ours.proxies.copy_(theirs.Proxies.T)
    embeddings = F.normalize(torch.randn(config.batch_size, DIM, generator=generator), dim=1)
    labels = torch.randint(0, config.num_classes, (config.batch_size,), generator=generator)
    inputs = {name: embeddings.clone().requires_grad_() for name in ("official", "ours")}
    losses = {}

    def official_step() -> None:
        inputs["official"].grad = theirs.Proxies.grad = None
        losses["official"], _ = theirs(inputs["official"], labels)
        losses["official"].backward()

    def our_step() -> None:
        inputs["ours"].grad = ours.proxies.grad = None
        losses["ours"] = ours(inputs["ours"], labels)
        losses["ours"].backward()

    steps = {
        "official": official_step,
        "ours": our_step,
        "floor": lambda: floor_step(config, embeddings, ours.proxies),
    }
    median_ms = {
        name: statistics.median(seconds) * 1e3
        for name, seconds in time_steps(steps, repeats).items()
    }
    official_ms, our_ms, floor_ms = median_ms["official"], median_ms["ours"], median_ms["floor"]
    speedup = official_ms / our_ms
    target_ms = official_ms / config.target_speedup
    return {
        "config": config.name,
        "C": config.num_classes,
        "N": config.proxies_per_class,
        "B": config.batch_size,
        "lambda": config.weight_lambda,
        "official ms": official_ms,
        "ours ms": our_ms,
        "speed-up": speedup,
        "target": f">= {config.target_speedup:g}x",
        "met": speedup >= config.target_speedup,
        "floor ms": floor_ms,
        "ours x floor": our_ms / floor_ms,
        "target ms": target_ms,
        "target x floor": target_ms / floor_ms,
        "loss official": losses["official"].item(),
        "loss ours": losses["ours"].item(),
        "rel. diff loss": abs(losses["ours"].item() - losses["official"].item())
        / abs(losses["official"].item()),
        "rel. diff grad x": relative_difference(
            tangent(inputs["ours"].grad, embeddings), tangent(inputs["official"].grad, embeddings)
        ),
        "rel. diff grad proxies": relative_difference(ours.proxies.grad, theirs.Proxies.grad.T),
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.official_comparison",
        description=__doc__.splitlines()[0],
        parents=[cli.common_flags("out")],
    )
    parser.add_argument(
        "--official",
        type=Path,
        required=True,
        help="the official loss/ProxyGML.py (github.com/YuehuaZhu/ProxyGML), read at run time",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of proxies, embeddings, labels (default 0)"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        type=int,
        metavar="I",
        help="indices of the configurations to run (default: all): "
        + "; ".join(
            f"{i}: {c.name}, C={c.num_classes}, N={c.proxies_per_class}, B={c.batch_size}, "
            f"lambda={c.weight_lambda}"
            for i, c in enumerate(CONFIGS)
        ),
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    official = load_official(args.official)
    chosen = [CONFIGS[i] for i in (args.configs or range(len(CONFIGS)))]
    command = report.command_line("benchmarks.official_comparison", argv)
    environment = report.capture_environment("cpu", command)
    rows = []
    for config in chosen:
        rows.append(compare(official, config, args.repeats, args.seed))
        gc.collect()  # the official module's dense one-hot is 6 GB at N=12
        print(report.markdown_table(rows[-1:], {key: key for key in rows[-1]}), flush=True)
    out = report.output_folder(args.out, "official_comparison")
    notes = (
        f"d={DIM}, r={R}, float32, CPU; unit embeddings (the official network normalises "
        "them before the loss). Times: one forward + backward each, interleaved round by "
        f"round, median of {args.repeats} after one warm-up round. The official module is "
        "YuehuaZhu/ProxyGML's loss/ProxyGML.py, read from the path in the command.\n"
    )
    report.write_results(
        out,
        "official_comparison",
        rows,
        environment,
        title="ProxyGMLLoss against the official module, in one process",
        columns={key: key for key in rows[0]},
        notes=notes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""ProxyGMLLoss of this working tree against a git revision of itself, in one process.

Timings on a shared machine drift between processes by more than most changes to the step
gain, so a change is measured here with both versions imported side by side: the revision's
``pml_proxygml`` is exported with ``git archive`` into a temporary folder under another
package name. For each case both losses get the same proxies, embeddings and labels; one
forward + backward of each is timed, interleaved round by round (medians), and the loss
values and both gradients are compared::

    python -m benchmarks.revision_comparison --base d9a8ef7 --out DIR

Cases: the shapes of ``benchmarks.selection_speed`` at λ = 0, the CUB recipe at λ = 0 and
0.3, and SOP's classes with N = 12.
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pml_proxygml import ProxyGMLLoss

from .core import cli, report
from .core.errors import BenchmarkError
from .core.measure import relative_difference, time_steps
from .core.shapes import CUB, SHAPES, SOP_TWELVE_PROXIES, Shape

PACKAGE = "pml_proxygml"


@dataclass(frozen=True)
class Case:
    shape: Shape
    weight_lambda: float = 0.0


CASES = (
    *(Case(shape) for shape in (*SHAPES, CUB, SOP_TWELVE_PROXIES)),
    Case(CUB, 0.3),
)


def resolve(revision: str) -> tuple[str, str]:
    """``(commit, subject)`` of ``revision``."""
    found = report.git_output("log", "-1", "--format=%H %s", f"{revision}^{{commit}}", "--")
    if not found:
        raise BenchmarkError(f"--base {revision}: not a commit of this repository")
    commit, _, subject = found.partition(" ")
    return commit, subject


def load_revision(commit: str, folder: Path) -> type:
    """The ``ProxyGMLLoss`` class of ``pml_proxygml`` at ``commit``, imported from ``folder``
    as its own package (every mention of the package's name renamed), beside this one."""
    archive = subprocess.run(
        ["git", "-C", str(report.REPO_ROOT), "archive", "--format=tar", commit, PACKAGE],
        capture_output=True,
    )
    if archive.returncode != 0:
        raise BenchmarkError(f"git archive {commit} {PACKAGE}: {archive.stderr.decode().strip()}")
    # The archive is this repository's own; "data" where tarfile has extraction filters.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, **safe)
    name = f"{PACKAGE}_at_{commit[:12]}"
    (folder / PACKAGE).rename(folder / name)
    for source in (folder / name).rglob("*.py"):
        source.write_text(re.sub(rf"\b{PACKAGE}\b", name, source.read_text()))
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name).ProxyGMLLoss
    finally:
        sys.path.remove(str(folder))


def compare(base: type, case: Case, repeats: int, warmup: int, seed: int) -> dict[str, Any]:
    """One case's row: both versions' step times, and how far their results lie apart."""
    shape = case.shape
    generator = torch.Generator().manual_seed(seed)
    num_proxies = shape.classes * shape.proxies_per_class
    embeddings = torch.randn(shape.batch_size, shape.embedding_size, generator=generator)
    labels = torch.randint(0, shape.classes, (shape.batch_size,), generator=generator)
    proxies = torch.randn(num_proxies, shape.embedding_size, generator=generator)
    versions = {"base": base, "working tree": ProxyGMLLoss}
    losses, inputs, values = {}, {}, {}
    with warnings.catch_warnings():  # costly-setting warnings: measured on purpose
        warnings.simplefilter("ignore")
        for name, loss_class in versions.items():
            losses[name] = loss_class(
                shape.classes,
                shape.embedding_size,
                proxies_per_class=shape.proxies_per_class,
                r=shape.r,
                top_k=shape.top_k,
                weight_lambda=case.weight_lambda,
            )
            with torch.no_grad():
                losses[name].proxies.copy_(proxies)
            inputs[name] = embeddings.clone().requires_grad_()

    def step(name: str) -> None:
        inputs[name].grad = losses[name].proxies.grad = None
        values[name] = losses[name](inputs[name], labels)
        values[name].backward()

    times = time_steps({name: lambda n=name: step(n) for name in versions}, repeats, warmup)
    base_ms, tree_ms = (statistics.median(times[name]) * 1e3 for name in versions)
    base_loss, tree_loss = (values[name].item() for name in versions)
    return {
        "shape": shape.name,
        "lambda": case.weight_lambda,
        "base ms": base_ms,
        "working tree ms": tree_ms,
        "working tree / base": tree_ms / base_ms,
        "rel. diff loss": abs(tree_loss - base_loss) / abs(base_loss),
        "rel. diff grad x": relative_difference(inputs["working tree"].grad, inputs["base"].grad),
        "rel. diff grad proxies": relative_difference(
            losses["working tree"].proxies.grad, losses["base"].proxies.grad
        ),
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.revision_comparison",
        description=__doc__.splitlines()[0],
        parents=[cli.common_flags("out")],
    )
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--repeats", type=int, default=41, help="timed rounds (default 41)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    parser.add_argument(
        "--cases",
        nargs="+",
        type=int,
        metavar="I",
        help="indices of the cases to run (default: all): "
        + "; ".join(
            f"{i}: {case.shape.name}, lambda={case.weight_lambda}" for i, case in enumerate(CASES)
        ),
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    commit, subject = resolve(args.base)
    command = report.command_line("benchmarks.revision_comparison", argv)
    environment = report.capture_environment("cpu", command)
    environment["base_commit"] = commit
    with tempfile.TemporaryDirectory() as folder:
        base = load_revision(commit, Path(folder))
    rows = []
    for index in args.cases or range(len(CASES)):
        rows.append(compare(base, CASES[index], args.repeats, args.warmup, args.seed))
        print(report.markdown_table(rows[-1:], {key: key for key in rows[-1]}), flush=True)
    notes = (
        f"Base: {commit[:12]} ({subject}). Working tree: the environment's git_commit, "
        "with git_dirty saying whether it differed. One forward + backward each (λ = 0 "
        "unless stated; embeddings and proxies requiring grad, their gradients set to None "
        f"before each step), interleaved round by round, medians of {args.repeats} after "
        f"{args.warmup} untimed rounds; inputs seeded ({args.seed}).\n"
    )
    report.write_results(
        report.output_folder(args.out, "revision_comparison"),
        "revision_comparison",
        rows,
        environment,
        title="ProxyGMLLoss against an earlier revision of itself, in one process",
        columns={key: key for key in rows[0]},
        notes=notes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

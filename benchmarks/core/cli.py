"""The command-line flags every benchmark script shares, defined once.

A script takes the ones it needs as an argparse parent::

    parser = argparse.ArgumentParser(parents=[cli.common_flags("out", "device")])

and reports a :class:`~benchmarks.core.errors.BenchmarkError` as one line (``error: ...``) with
a non-zero exit status, without a traceback (:func:`report_errors`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from pytorch_metric_learning.utils import common_functions as c_f

from .errors import BenchmarkError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device")
    return text


FLAGS = {
    "out": (
        ("--out",),
        {
            "type": Path,
            "help": "results folder (default: runs/<name>/, which git ignores; committed "
            "results change only when pointed at benchmarks/results/... on purpose)",
        },
    ),
    "device": (
        ("--device",),
        {
            "type": _device,
            "default": default_device(),
            "help": "cpu, cuda or cuda:I (default: %(default)s)",
        },
    ),
    "data_root": (
        ("--data-root",),
        {"type": Path, "help": "the dataset's folder (default: the recipe's, where it has one)"},
    ),
    "no_progress": (("--no-progress",), {"action": "store_true", "help": "no progress bars"}),
    "overrides": (
        ("--set",),
        {
            "dest": "overrides",
            "nargs": "+",
            "action": "extend",
            "default": [],
            "metavar": "KEY=VALUE",
            "help": "recipe overrides, e.g. train.batch_size=64 losses.proxygml.settings.r=0.1",
        },
    ),
}


def common_flags(*names: str) -> argparse.ArgumentParser:
    """A parent parser with the shared flags ``names`` (keys of ``FLAGS``)."""
    parser = argparse.ArgumentParser(add_help=False)
    for name in names:
        flags, options = FLAGS[name]
        parser.add_argument(*flags, **options)
    return parser


def configure_logging() -> None:
    """Our INFO lines on stderr; PML's per-step chatter off."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger(c_f.LOGGER_NAME).setLevel(logging.WARNING)


def one_line(error: BaseException) -> str:
    """The message of ``error``, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(error):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


@contextlib.contextmanager
def report_errors() -> Iterator[None]:
    """Turn a :class:`BenchmarkError` into ``SystemExit("error: ...")``: one line, status 1."""
    try:
        yield
    except BenchmarkError as error:
        raise SystemExit(f"error: {one_line(error)}") from None


def main(
    parse_args: Callable[[list[str]], argparse.Namespace],
    run: Callable[[argparse.Namespace, list[str]], None],
    argv: Sequence[str] | None = None,
) -> int:
    """A script's entry point: parse ``argv`` (the command line when None), then ``run`` with
    the parsed arguments and ``argv`` (for the command recorded in the results), turning
    user errors into one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    with report_errors():
        run(args, argv)
    return 0

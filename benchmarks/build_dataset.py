"""Build an offline benchmark dataset from the package registries: one command per dataset.

    python -m benchmarks.build_dataset emoji --out DIR [--size 48] [--cache DIR]
    python -m benchmarks.build_dataset han_glyphs [--out DIR]
    python -m benchmarks.build_dataset spoken_words [--out DIR]

The runner builds the emoji dataset itself into its default cache when that is empty; this
command builds elsewhere, or with other options. The Han-glyph and spoken-word datasets are
only built here (by default into ``benchmarks/.cache/<name>``, where their recipes look).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .core import cli
from .core.datasets import BUILDERS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.build_dataset", description=__doc__.split("\n", 1)[0]
    )
    names = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, builder in BUILDERS.items():
        builder.add_arguments(names.add_parser(name, help=builder.__doc__.split("\n", 1)[0]))
    args = parser.parse_args(argv)
    with cli.report_errors():
        print(BUILDERS[args.dataset].build_from_arguments(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

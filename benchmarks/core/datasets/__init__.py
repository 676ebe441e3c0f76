"""Every dataset a recipe can name (``dataset.name``), and the builders of the offline ones.

``DATASETS[name](config, data_root, download)`` opens a dataset as :class:`.common.Splits`
(``config`` is the recipe's ``dataset`` section). Only the emoji dataset is ever built by a
run, and only into its default cache; every other ``--data-root`` must already hold data
(the built datasets default to their builder's output, ``benchmarks/.cache/<name>``).
``BUILDERS`` are the datasets ``python -m benchmarks.build_dataset NAME`` builds, each a
module with ``add_arguments(parser)`` and ``build_from_arguments(args)``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

from . import emoji, folder, han_glyphs, paper, spoken_words, stored
from .common import Splits

Opener = Callable[[Any, Optional[Path], bool], Splits]

DATASETS: dict[str, Opener] = {
    "emoji": emoji.open_splits,
    "folder": folder.open_splits,
    **{m.NAME: stored.opener(m.NAME, m.TITLE) for m in (han_glyphs, spoken_words)},
    **dict.fromkeys(paper.DATASETS, paper.open_splits),
}
BUILDERS: dict[str, ModuleType] = {
    "emoji": emoji,
    "han_glyphs": han_glyphs,
    "spoken_words": spoken_words,
}


def open_splits(config: Any, data_root: Path | None, download: bool = False) -> Splits:
    """Dataset ``config.name`` with its validation split applied when the recipe asks."""
    splits = DATASETS[config.name](config, data_root, download)
    if config.validation_fraction is not None:
        splits = splits.hold_out_validation(config.validation_fraction, config.split_seed)
    return splits

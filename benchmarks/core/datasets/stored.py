"""How a built dataset is stored, split and summarised, shared by the registry-built datasets.

A build is a folder holding ``<name>.npz`` (``images``: uint8 ``(n, size, size, 3)``, ``labels``:
int64 class ids, and one int64 array naming each image's source, e.g. its font face) and
``manifest.json`` (sources with versions, hashes and licences; classes; the class split; counts;
what was skipped and why; tool versions; the npz's SHA-256). The npz is written with fixed zip
timestamps, so equal inputs give equal bytes, and both files are replaced atomically.

The class split is :func:`.common.split_halves` (the emoji dataset's): classes ordered by the
SHA-256 of ``f"{seed}:{key}"`` (no RNG, so no dependence on a library version), the first half
(rounded down) trains and the rest is tested on. :func:`open_build` opens a build for a run.
Pinned sources are data, under ``benchmarks/datasets_manifest/<name>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from .. import report
from ..errors import DataError
from .common import Splits, TensorImages

CACHE_ROOT = report.REPO_ROOT / "benchmarks" / ".cache"
DEBIAN_CACHE = CACHE_ROOT / "debian"
SOURCES_DIR = report.REPO_ROOT / "benchmarks" / "datasets_manifest"
MANIFEST_NAME = "manifest.json"


class DatasetBuildError(DataError):
    """A build cannot proceed: a missing tool, a source that does not match its pin, bad
    options. The message says what to do; the runner and ``build_dataset`` print it as one
    line."""


@dataclass(frozen=True)
class BuildOptions:
    """What every registry-built dataset is built with; each adds its own options."""

    size: int = 32
    classes: int = 500
    seed: int = 0


Options = TypeVar("Options", bound=BuildOptions)


@dataclass(frozen=True)
class SourceOptions:
    """Where a build's sources come from: the package cache, optionally a folder of .deb files
    (no apt) and a sources JSON replacing the pinned one."""

    cache_dir: Path = DEBIAN_CACHE
    debs_dir: Path | None = None
    sources_path: Path | None = None


DEFAULT_SOURCES = SourceOptions()


def load_sources(name: str, path: Path | None = None) -> dict[str, Any]:
    """The sources of dataset ``name``: the pinned ones
    (``benchmarks/datasets_manifest/<name>.json``) unless a file of the same layout is given."""
    path = SOURCES_DIR / f"{name}.json" if path is None else path
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DatasetBuildError(f"cannot read the sources {path}: {error}") from None


def hashed_uniforms(text: str, count: int) -> tuple[float, ...]:
    """``count`` (at most 8) numbers in [0, 1) from the SHA-256 of ``text``: a random draw that
    depends on nothing but its key."""
    digest = hashlib.sha256(text.encode()).digest()
    return tuple(int.from_bytes(digest[4 * i : 4 * i + 4], "big") / 2**32 for i in range(count))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``np.load``-able npz whose zip entries carry a fixed date, unlike ``np.savez``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(arrays):
            array = io.BytesIO()
            np.lib.format.write_array(array, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, array.getvalue())
    return buffer.getvalue()


def split_counts(labels: np.ndarray, train: Sequence[int], test: Sequence[int]) -> dict[str, int]:
    """The manifest's ``counts``: classes and images, in all and per side of the split."""
    in_train = np.isin(labels, train)
    return {
        "classes": len(train) + len(test),
        "images": len(labels),
        "train_classes": len(train),
        "test_classes": len(test),
        "train_images": int(in_train.sum()),
        "test_images": int((~in_train).sum()),
    }


def write_build(
    out_dir: Path, name: str, arrays: dict[str, np.ndarray], manifest: dict[str, Any]
) -> dict[str, Any]:
    """Write ``<name>.npz`` and ``manifest.json`` (with the npz's SHA-256); return the
    manifest as written."""
    npz = npz_bytes(arrays)
    report.write_bytes(out_dir / f"{name}.npz", npz)
    manifest = {
        **manifest,
        "npz": {
            "file": f"{name}.npz",
            "sha256": hashlib.sha256(npz).hexdigest(),
            "arrays": {k: f"{a.dtype}{list(a.shape)}" for k, a in sorted(arrays.items())},
        },
    }
    text = json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    report.write_bytes(out_dir / MANIFEST_NAME, text.encode("utf-8"))
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a build in ``root``."""
    return json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))


def read_build(root: Path, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and manifest of a build in ``root``."""
    with np.load(root / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}, read_manifest(root)


def load_build(root: Path, name: str) -> tuple[TensorImages, dict[str, Any]]:
    """A build's images (all classes, labels = manifest class ids) and its manifest."""
    manifest = read_manifest(root)
    names = [c.get("short_name", str(c["id"])) for c in manifest["classes"]]
    with np.load(root / f"{name}.npz") as data:
        images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()
        return TensorImages(images, data["labels"], names), manifest


def open_build(name: str, title: str, root: Path, missing_hint: str = "") -> Splits:
    """The build of dataset ``name`` in ``root`` as its manifest's train and test classes;
    a :class:`DataError` saying how to build it when there is none (``missing_hint`` adds
    the dataset's other ways)."""
    if not (root / f"{name}.npz").is_file():
        raise DataError(
            f"no {name} dataset in {root} ({name}.npz missing): build one there with "
            f"`python -m benchmarks.build_dataset {name} --out {root}`{missing_hint}"
        )
    everything, manifest = load_build(root, name)
    info = {
        "name": name,
        "title": title,
        "root": report.relative(root),
        "npz_sha256": manifest.get("npz", {}).get("sha256"),
        "image_size": manifest.get("size"),
    }
    split = manifest["split"]
    return Splits(everything.select(split["train"]), everything.select(split["test"]), info)


def build_root(name: str, data_root: Path | None) -> Path:
    """Where a run reads dataset ``name``: ``data_root``, or the builder's default output."""
    return CACHE_ROOT / name if data_root is None else Path(data_root)


def opener(name: str, title: str) -> Callable[[Any, Path | None, bool], Splits]:
    """The :data:`..DATASETS` entry of a built dataset that a run never builds: it opens
    ``data_root``, or the builder's default output."""

    def open_splits(config: Any, data_root: Path | None, download: bool = False) -> Splits:
        return open_build(name, title, build_root(name, data_root))

    return open_splits


def counts_line(manifest: dict[str, Any]) -> str:
    """One line of a build's counts, overall and per side of the split."""
    counts = manifest["counts"]
    size = manifest["size"]
    return (
        f"{counts['classes']} classes, {counts['images']} images of {size}x{size} "
        f"(train {counts['train_classes']} classes / {counts['train_images']} images, "
        f"test {counts['test_classes']} / {counts['test_images']})"
    )


def option(default: Any, help: str) -> Any:
    """A builder option's field: its default and the help of its ``--flag``."""
    return field(default=default, metadata={"help": help})


def add_option_arguments(parser: argparse.ArgumentParser, cls: type[BuildOptions]) -> None:
    """One ``--flag`` per field of ``cls`` declared with :func:`option`, of its default's type."""
    for declared in fields(cls):
        if "help" in declared.metadata:
            parser.add_argument(
                f"--{declared.name.replace('_', '-')}",
                type=type(declared.default),
                default=declared.default,
                help=declared.metadata["help"],
            )


def add_common_arguments(parser: argparse.ArgumentParser, name: str, size: int) -> None:
    """Options every registry-built dataset takes."""
    parser.add_argument(
        "--out", type=Path, default=CACHE_ROOT / name, help="output folder (default: %(default)s)"
    )
    parser.add_argument("--size", type=int, default=size, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="class selection and split seed")
    parser.add_argument(
        "--cache", type=Path, default=DEBIAN_CACHE, help="unpacked Debian package cache"
    )
    parser.add_argument("--debs", type=Path, help="folder of the pinned .deb files (no apt)")
    parser.add_argument(
        "--sources", type=Path, help="JSON to use instead of the pinned sources (same layout)"
    )


def options_from_arguments(
    cls: type[Options], args: argparse.Namespace
) -> tuple[Options, SourceOptions]:
    """A builder's options and its sources' from parsed arguments (same names)."""
    options = cls(**{field.name: getattr(args, field.name) for field in fields(cls)})
    return options, SourceOptions(args.cache, args.debs, args.sources)


def summary(args: argparse.Namespace, name: str, lines: Sequence[str]) -> str:
    """A build's summary ``lines`` with where it was written."""
    return "\n".join([*lines, f"written: {args.out / f'{name}.npz'}"])

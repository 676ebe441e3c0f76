"""Emoji retrieval dataset: one class per emoji, one image per vendor design.

Built offline from pinned npm packages, fetched by :mod:`.npm` in Python (Node.js is not
needed) and checked against the registry's integrity hashes. Vendors (artwork licence):
Twemoji 16 (CC-BY-4.0), Google Noto (Apache-2.0), Noto's Android 7 "blob" design (Apache-2.0)
and EmojiOne 2.2.7 (CC-BY-4.0) as 64 px PNGs from emoji-datasource; Microsoft Fluent 3D (MIT)
as WebP; OpenMoji (CC-BY-SA-4.0) and Fluent Color and Flat (MIT) as SVG, rasterised with
resvg-py (the resvg Rust renderer in a self-contained wheel, no system library). Apple and
Facebook artwork is not freely licensed and is never read.

Class policy, also written into the manifest:

* Classes are the top-level emoji of emoji-datasource's ``emoji.json`` (Emoji 16.0), in Unicode
  order. U+FE0F is ignored when matching files to classes: vendors disagree on it.
* Skin tones: only the default (yellow) design is used. Toned variants are neither classes nor
  extra images, being recoloured copies of one drawing (trivially easy positives).
* Flags are dropped unless ``include_flags``: many differ by a shade or not at all (Chad and
  Romania, Indonesia and Monaco), so their labels are ill-posed at 48 px.
* Components (the five standalone skin-tone swatches) are dropped.
* Classes with fewer than ``min_images`` images are dropped.
* Images are not cropped to their content, since relative size separates classes (small, medium
  and large squares): each vendor's canvas is kept, padded to a square.

Every vendor file left unused is counted with a reason; missing and unreadable files are also
listed by path. Output: ``emoji.npz`` (uint8 images (n, size, size, 3), int64 labels and vendor
ids, written with fixed zip timestamps so equal inputs give equal bytes) and ``manifest.json``.

Build: ``python -m benchmarks.build_dataset emoji --out DIR [--size 48] [--cache DIR]``. The
emoji recipes build it into ``benchmarks/.cache/emoji`` when that folder has none, and
nowhere else (a mistyped ``--data-root`` is an error, not a download).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image
from tqdm import tqdm

from .. import report
from ..errors import DataError
from .common import Splits, split_halves
from .npm import Package, fetch, npm_settings
from .stored import CACHE_ROOT, open_build, write_build

NAME = "emoji"
NPZ_NAME = f"{NAME}.npz"
DEFAULT_CACHE = CACHE_ROOT / NAME
RESAMPLE = Image.Resampling.LANCZOS
# SVGs are rendered at twice the output size, then take the same resize as the bitmaps.
SVG_SCALE = 2
VARIATION_SELECTOR_16 = 0xFE0F
SKIN_TONES = range(0x1F3FB, 0x1F400)
# Hex code points joined by "-" or "_", as every directory-layout vendor names its files.
_FILE_NAME = re.compile(r"([0-9a-f]{2,6}(?:[-_][0-9a-f]{2,6})*)\.(?:png|webp|svg)", re.IGNORECASE)


@dataclass(frozen=True)
class Vendor:
    """One vendor design: where its images are inside an npm package, and their licence."""

    key: str
    title: str
    package: Package
    artwork_licence: str
    image_dir: str
    # emoji-datasource image set name; its emoji.json indexes the files. None: list the folder.
    datasource_set: str | None = None


INVENTORY = Package("emoji-datasource-twitter", "16.0.0")
VENDORS: tuple[Vendor, ...] = (
    Vendor(
        "twemoji",
        "Twemoji 16.0.1 (jdecked fork of Twitter's)",
        INVENTORY,
        "CC-BY-4.0",
        "img/twitter/64",
        "twitter",
    ),
    Vendor(
        "noto",
        "Google Noto 2.048",
        Package("emoji-datasource-google", "16.0.0"),
        "Apache-2.0",
        "img/google/64",
        "google",
    ),
    Vendor(
        "noto-blob",
        "Google Noto, Android 7 blob design (2017)",
        Package("emoji-datasource-google", "3.0.0"),
        "Apache-2.0",
        "img/google/64",
        "google",
    ),
    Vendor(
        "emojione2",
        "EmojiOne 2.2.7",
        Package("emoji-datasource-emojione", "3.0.0"),
        "CC-BY-4.0",
        "img/emojione/64",
        "emojione",
    ),
    Vendor("openmoji", "OpenMoji", Package("openmoji", "17.0.0"), "CC-BY-SA-4.0", "color/svg"),
    Vendor(
        "fluent-3d",
        "Microsoft Fluent 3D",
        Package("@lobehub/fluent-emoji-3d", "1.1.0"),
        "MIT",
        "assets",
    ),
    Vendor(
        "fluent-color",
        "Microsoft Fluent Color",
        Package("@lobehub/fluent-emoji-modern", "1.0.0"),
        "MIT",
        "assets",
    ),
    Vendor(
        "fluent-flat",
        "Microsoft Fluent Flat",
        Package("@lobehub/fluent-emoji-flat", "1.1.0"),
        "MIT",
        "assets",
    ),
)

POLICY = {
    "classes": "top-level emoji of the inventory's emoji.json, in its sort_order",
    "variation_selector": "U+FE0F ignored when matching vendor files to classes",
    "skin_tones": "default design only; toned variants are neither classes nor images",
    "components": "standalone skin-tone swatches excluded",
    "crop": "none; each vendor's canvas is kept, padded to a square",
}


# ----------------------------------------------------------------------------- fetching


def required_packages(vendors: Iterable[Vendor], inventory: Package = INVENTORY) -> list[Package]:
    """The distinct packages a build reads, sorted."""
    return sorted({inventory, *(vendor.package for vendor in vendors)}, key=lambda p: p.spec)


def fetch_packages(packages: Iterable[Package], cache_dir: Path) -> Path:
    """Fetch and extract each package not yet in ``cache_dir``; return the packages root."""
    root = cache_dir / "packages"
    missing = [p for p in packages if not (p.folder(root) / "package.json").is_file()]
    settings = npm_settings() if missing else {}
    for package in tqdm(missing, desc="npm packages", unit="pkg"):
        fetch(package, root, settings)
    return root


# ----------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _key(code_points: str) -> tuple[int, ...]:
    """Matching key of a code point sequence such as ``"2764-FE0F"``: ints without U+FE0F."""
    values = (int(part, 16) for part in re.split("[-_]", code_points))
    return tuple(v for v in values if v != VARIATION_SELECTOR_16)


def load_inventory(
    folder: Path, include_flags: bool
) -> tuple[list[dict[str, Any]], dict[tuple[int, ...], str]]:
    """Classes from emoji-datasource's ``emoji.json``, and the excluded keys with their reason."""
    entries = sorted(
        _read_json(folder / "emoji.json"), key=lambda e: (e["sort_order"], e["unified"])
    )
    classes: list[dict[str, Any]] = []
    excluded: dict[tuple[int, ...], str] = {}
    for entry in entries:
        key = _key(entry["unified"])
        if entry["category"] == "Component":
            excluded[key] = "component"
        elif entry["category"] == "Flags" and not include_flags:
            excluded[key] = "flag"
        else:
            classes.append(
                {
                    "code_points": entry["unified"],
                    "emoji": "".join(chr(int(p, 16)) for p in entry["unified"].split("-")),
                    "name": entry["name"].lower(),
                    "short_name": entry["short_name"],
                    "category": entry["category"],
                    "subcategory": entry["subcategory"],
                }
            )
    return classes, excluded


def _package_record(root: Path, package: Package) -> dict[str, Any]:
    meta_path = package.folder(root) / "package.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{package.spec} is not extracted at {package.folder(root)}; "
            "build without --packages to fetch it from the npm registry"
        )
    meta = _read_json(meta_path)
    if (meta.get("name"), meta.get("version")) != (package.name, package.version):
        raise ValueError(
            f"{meta_path} is {meta.get('name')}@{meta.get('version')}, expected {package.spec}"
        )
    return {
        "name": package.name,
        "version": package.version,
        "package_licence": meta.get("license"),
    }


def _candidates(vendor: Vendor, folder: Path) -> list[tuple[str | None, Path]]:
    """``(code points, path)`` of every file a vendor ships; code points None if unrecognised."""
    image_dir = folder / vendor.image_dir
    if vendor.datasource_set is None:
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{vendor.key}: no image folder {image_dir}")
        found = []
        for path in sorted(image_dir.iterdir()):
            match = _FILE_NAME.fullmatch(path.name)
            found.append((match[1] if match else None, path))
        return found
    # emoji-datasource indexes its files (and whether the vendor has art) in emoji.json, so a
    # listed file that is absent is a defect worth counting, not a gap in the vendor's set.
    has_image = f"has_img_{vendor.datasource_set}"
    listed = []
    for entry in _read_json(folder / "emoji.json"):
        for item in (entry, *entry.get("skin_variations", {}).values()):
            if item.get(has_image):
                listed.append((item["unified"], image_dir / item["image"]))
    return sorted(listed, key=lambda c: c[1].name)


def _render_svg(path: Path, width: int) -> Image.Image:
    try:
        import resvg_py  # only SVG vendors need it
    except ImportError as err:
        raise RuntimeError("SVG vendors need resvg-py: pip install resvg-py") from err
    # System fonts off: emoji SVGs draw no text, and fonts would make output host-dependent.
    png = resvg_py.svg_to_bytes(svg_path=str(path), width=width, skip_system_fonts=True)
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGBA")


def load_image(path: Path, size: int) -> np.ndarray:
    """One image file as (size, size, 3) uint8: RGBA padded to a square on white, resized."""
    if path.suffix.lower() == ".svg":
        rgba = _render_svg(path, SVG_SCALE * size)
    else:
        with Image.open(path) as image:
            rgba = image.convert("RGBA")
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    return np.asarray(canvas.convert("RGB").resize((size, size), RESAMPLE), dtype=np.uint8)


def read_packages(
    packages_root: Path,
    *,
    size: int = 48,
    vendors: Sequence[Vendor] = VENDORS,
    inventory: Package = INVENTORY,
    include_flags: bool = False,
    min_images: int = 2,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read extracted packages into arrays (images, labels, vendors) and a manifest."""
    used_for: dict[Package, list[str]] = defaultdict(list)
    used_for[inventory].append("inventory")
    for vendor in vendors:
        used_for[vendor.package].append(vendor.key)
    packages = [
        {**_package_record(packages_root, package), "used_for": used_for[package]}
        for package in sorted(used_for, key=lambda p: p.spec)
    ]
    classes, excluded = load_inventory(inventory.folder(packages_root), include_flags)
    index = {_key(c["code_points"]): i for i, c in enumerate(classes)}
    if len(index) != len(classes):
        raise ValueError("inventory has two classes with the same code points")

    found: dict[int, list[tuple[int, np.ndarray, str]]] = defaultdict(list)
    skipped: dict[str, dict[str, int]] = {}
    skipped_files: dict[str, dict[str, list[str]]] = {}
    for vendor_id, vendor in enumerate(vendors):
        folder = vendor.package.folder(packages_root)
        counts: Counter[str] = Counter()
        bad: dict[str, list[str]] = defaultdict(list)
        chosen: dict[int, Path] = {}
        for code_points, path in _candidates(vendor, folder):
            if code_points is None:
                counts["unrecognised_name"] += 1
                continue
            key = _key(code_points)
            cls = index.get(key)
            if cls is None:
                tone = any(cp in SKIN_TONES for cp in key)
                counts[excluded.get(key, "skin_tone_variant" if tone else "not_in_inventory")] += 1
            elif cls in chosen:
                counts["duplicate"] += 1
            else:
                chosen[cls] = path
        for cls, path in tqdm(sorted(chosen.items()), desc=vendor.key, unit="img"):
            rel = path.relative_to(folder).as_posix()
            if not path.is_file():
                counts["missing_file"] += 1
                bad["missing_file"].append(rel)
                continue
            try:
                image = load_image(path, size)
            except (OSError, ValueError) as err:
                counts["unreadable"] += 1
                bad["unreadable"].append(f"{rel} ({type(err).__name__})")
                continue
            found[cls].append((vendor_id, image, rel))
        skipped[vendor.key] = dict(sorted(counts.items()))
        skipped_files[vendor.key] = dict(sorted(bad.items()))

    kept = [c for c in range(len(classes)) if len(found[c]) >= min_images]
    dropped = [c["code_points"] for i, c in enumerate(classes) if len(found[i]) < min_images]
    if not kept:
        raise ValueError(f"no class has at least {min_images} images")
    rows = [(new_id, *item) for new_id, cls in enumerate(kept) for item in found[cls]]
    arrays = {
        "images": np.stack([image for _, _, image, _ in rows]),
        "labels": np.array([new_id for new_id, _, _, _ in rows], dtype=np.int64),
        "vendors": np.array([vendor_id for _, vendor_id, _, _ in rows], dtype=np.int64),
    }
    train, test = split_halves([classes[c]["code_points"] for c in kept], seed)
    in_train = np.isin(arrays["labels"], train)
    per_vendor = np.bincount(arrays["vendors"], minlength=len(vendors))
    uses_svg = any(rel.endswith(".svg") for *_, rel in rows)
    manifest = {
        "format": 1,
        "size": size,
        "image_pipeline": {
            "background": "white",
            "resample": RESAMPLE.name,
            "svg_render_width": SVG_SCALE * size,
        },
        "policy": {
            **POLICY,
            "flags": "kept" if include_flags else "excluded",
            "min_images_per_class": min_images,
        },
        "inventory": {
            "package": inventory.spec,
            "file": "emoji.json",
            "excluded": dict(sorted(Counter(excluded.values()).items())),
        },
        "packages": packages,
        "vendors": [
            {
                "id": i,
                "key": v.key,
                "title": v.title,
                "package": v.package.spec,
                "image_dir": v.image_dir,
                "artwork_licence": v.artwork_licence,
                "images": int(per_vendor[i]),
            }
            for i, v in enumerate(vendors)
        ],
        "classes": [
            {"id": new_id, **classes[cls], "images": len(found[cls])}
            for new_id, cls in enumerate(kept)
        ],
        "dropped_classes": {f"fewer_than_{min_images}_images": dropped},
        "images": [
            {"class": new_id, "vendor": vendors[vendor_id].key, "file": rel}
            for new_id, vendor_id, _, rel in rows
        ],
        "split": {
            "method": "class-disjoint halves ordered by sha256(f'{seed}:{code_points}')",
            "seed": seed,
            "train": train,
            "test": test,
        },
        "counts": {
            "classes": len(kept),
            "images": len(rows),
            "train_classes": len(train),
            "test_classes": len(test),
            "train_images": int(in_train.sum()),
            "test_images": int((~in_train).sum()),
            "per_vendor": {v.key: int(per_vendor[i]) for i, v in enumerate(vendors)},
        },
        "skipped": skipped,
        "skipped_files": skipped_files,
        "tools": {
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "resvg-py": metadata.version("resvg-py") if uses_svg else None,
        },
    }
    return arrays, manifest


# ----------------------------------------------------------------------------- writing


def build_dataset(
    out_dir: Path,
    *,
    cache_dir: Path = DEFAULT_CACHE,
    packages_root: Path | None = None,
    size: int = 48,
    vendors: Sequence[Vendor] = VENDORS,
    include_flags: bool = False,
    min_images: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Fetch (unless ``packages_root`` holds extracted packages), read, write; return manifest."""
    if packages_root is None:
        packages_root = fetch_packages(required_packages(vendors), cache_dir)
    arrays, manifest = read_packages(
        packages_root,
        size=size,
        vendors=vendors,
        include_flags=include_flags,
        min_images=min_images,
        seed=seed,
    )
    return write_build(out_dir, NAME, arrays, manifest)


# ----------------------------------------------------------------------------- reading a build


def open_splits(config: Any, data_root: Path | None, download: bool = False) -> Splits:
    """The built dataset's train and test classes (the manifest's split). Without
    ``data_root`` the default cache is used, and built first when empty; a given folder must
    hold a build."""
    root = DEFAULT_CACHE if data_root is None else Path(data_root)
    if data_root is None and not (root / NPZ_NAME).is_file():
        build_dataset(root)
    hint = f", or leave out --data-root to use (and build) {report.relative(DEFAULT_CACHE)}"
    return open_build(NAME, "Emoji", root, hint)


# ----------------------------------------------------------------------------- CLI


def summary(manifest: dict[str, Any]) -> str:
    """Human-readable counts of a build."""
    counts = manifest["counts"]
    size = manifest["size"]
    lines = [
        f"{counts['classes']} classes, {counts['images']} images of {size}x{size} "
        f"(train {counts['train_classes']} classes / {counts['train_images']} images, "
        f"test {counts['test_classes']} / {counts['test_images']})",
        "images per vendor:",
        *(
            f"  {v['key']:<13} {v['images']:>5}  {v['package']} ({v['artwork_licence']})"
            for v in manifest["vendors"]
        ),
        "skipped files per vendor:",
        *(
            f"  {key:<13} " + (", ".join(f"{r} {n}" for r, n in reasons.items()) or "none")
            for key, reasons in manifest["skipped"].items()
        ),
        f"inventory entries excluded: {manifest['inventory']['excluded']}",
    ]
    for reason, codes in manifest["dropped_classes"].items():
        lines.append(f"classes dropped ({reason}): {len(codes)}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The builder's options (``python -m benchmarks.build_dataset emoji --help``)."""
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="folder of the fetched npm packages"
    )
    parser.add_argument(
        "--packages", type=Path, help="folder of already-extracted packages (nothing fetched)"
    )
    parser.add_argument("--seed", type=int, default=0, help="train/test split seed")
    parser.add_argument("--min-images", type=int, default=2, help="fewest images per class")
    parser.add_argument("--include-flags", action="store_true", help="keep flag emoji")
    parser.add_argument(
        "--vendors",
        default=",".join(v.key for v in VENDORS),
        help="comma-separated vendor keys (default: all)",
    )


def build_from_arguments(args: argparse.Namespace) -> str:
    """Build as ``args`` say; a summary of the build."""
    by_key = {v.key: v for v in VENDORS}
    unknown = sorted(set(args.vendors.split(",")) - set(by_key))
    if unknown:
        raise DataError(f"unknown vendors {unknown}; choose from {sorted(by_key)}")
    start = time.perf_counter()
    manifest = build_dataset(
        args.out,
        cache_dir=args.cache,
        packages_root=args.packages,
        size=args.size,
        vendors=[by_key[k] for k in args.vendors.split(",")],
        include_flags=args.include_flags,
        min_images=args.min_images,
        seed=args.seed,
    )
    elapsed = time.perf_counter() - start
    return f"{summary(manifest)}\nbuilt in {elapsed:.1f} s: {args.out / NPZ_NAME}"

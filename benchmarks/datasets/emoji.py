"""Emoji retrieval dataset: one class per emoji, one image per vendor design.

Built offline from pinned npm packages fetched with ``npm pack``, so only the npm registry is
needed. Vendors (artwork licence): Twemoji 16 (CC-BY-4.0), Google Noto (Apache-2.0), Noto's
Android 7 "blob" design (Apache-2.0) and EmojiOne 2.2.7 (CC-BY-4.0) as 64 px PNGs from
emoji-datasource; Microsoft Fluent 3D (MIT) as WebP; OpenMoji (CC-BY-SA-4.0) and Fluent Color and
Flat (MIT) as SVG, rasterised with resvg-py (the resvg Rust renderer in a self-contained wheel, no
system library). Apple and Facebook artwork is not freely licensed and is never read.

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

CLI: ``python -m benchmarks.datasets.emoji --out DIR [--size 48] [--cache DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

NPZ_NAME = "emoji.npz"
MANIFEST_NAME = "manifest.json"
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "emoji"
RESAMPLE = Image.Resampling.LANCZOS
# SVGs are rendered at twice the output size, then take the same resize as the bitmaps.
SVG_SCALE = 2
VARIATION_SELECTOR_16 = 0xFE0F
SKIN_TONES = range(0x1F3FB, 0x1F400)
# Hex code points joined by "-" or "_", as every directory-layout vendor names its files.
_FILE_NAME = re.compile(r"([0-9a-f]{2,6}(?:[-_][0-9a-f]{2,6})*)\.(?:png|webp|svg)", re.IGNORECASE)
# Light augmentation: random resized crop. No flips or rotations (arrows, pointing hands and
# text-bearing emoji are distinct classes under mirroring) and no colour jitter (colour alone
# separates hearts, circles and squares); the area range is narrow because size does too.
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NpmNotFoundError(RuntimeError):
    """Raised when packages must be fetched and ``npm`` is not on PATH."""


@dataclass(frozen=True)
class Package:
    """An npm package pinned to an exact version."""

    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    def folder(self, root: Path) -> Path:
        """Where the extracted package lives under ``root`` (``root/name@version``)."""
        return root / self.spec


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


def require_npm() -> str:
    """Path of the ``npm`` executable, or a clear error naming how to install it."""
    npm = shutil.which("npm")
    if npm is None:
        raise NpmNotFoundError(
            "npm is not on PATH; it fetches the emoji packages. Install Node.js and npm "
            "(Debian/Ubuntu: apt-get install nodejs npm), or build from already-extracted "
            "packages with --packages DIR."
        )
    return npm


def required_packages(vendors: Iterable[Vendor], inventory: Package = INVENTORY) -> list[Package]:
    """The distinct packages a build reads, sorted."""
    return sorted({inventory, *(vendor.package for vendor in vendors)}, key=lambda p: p.spec)


def fetch_packages(packages: Iterable[Package], cache_dir: Path) -> Path:
    """``npm pack`` and extract each package not yet in ``cache_dir``; return the packages root."""
    root = cache_dir / "packages"
    missing = [p for p in packages if not (p.folder(root) / "package.json").is_file()]
    if missing:
        npm = require_npm()
        root.mkdir(parents=True, exist_ok=True)
        for package in tqdm(missing, desc="npm pack", unit="pkg"):
            # The extracted folder is the cache (npm keeps its own copy of the tarball).
            with tempfile.TemporaryDirectory(dir=root) as tarballs:
                _extract(_npm_pack(npm, package, Path(tarballs)), package.folder(root))
    return root


def _npm_pack(npm: str, package: Package, dest: Path) -> Path:
    result = subprocess.run(
        [npm, "pack", package.spec, "--json", "--ignore-scripts", "--pack-destination", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"npm pack {package.spec} failed:\n{result.stderr.strip()[-2000:]}")
    return dest / json.loads(result.stdout)[0]["filename"]


def _extract(tarball: Path, dest: Path) -> None:
    """Extract the regular files of an npm tarball into ``dest``, dropping its top folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Extract beside dest and rename at the end, so a broken run never looks like a package.
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                # Links and devices are never needed, and links could point outside dest.
                if not member.isfile():
                    continue
                parts = PurePosixPath(member.name).parts[1:]
                if not parts or PurePosixPath(member.name).is_absolute() or ".." in parts:
                    raise ValueError(f"unsafe path {member.name!r} in {tarball}")
                target = tmp.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # regular files always have data
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
        tmp.chmod(0o755)  # mkdtemp makes it private
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
            "build without --packages to fetch it with npm"
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


def split_classes(code_points: Sequence[str], seed: int) -> tuple[list[int], list[int]]:
    """Class-disjoint halves (train gets the smaller one), sorted class ids.

    Classes are ordered by a seeded SHA-256 of their code points rather than by an RNG, so the
    split does not depend on the numpy version.
    """
    order = sorted(
        range(len(code_points)),
        key=lambda i: hashlib.sha256(f"{seed}:{code_points[i]}".encode()).hexdigest(),
    )
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])


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
    train, test = split_classes([classes[c]["code_points"] for c in kept], seed)
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


def _replace_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
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


def write_dataset(
    arrays: dict[str, np.ndarray], manifest: dict[str, Any], out_dir: Path
) -> dict[str, Any]:
    """Write ``emoji.npz`` and ``manifest.json`` (with the npz's sha256) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = _npz_bytes(arrays)
    _replace_atomically(out_dir / NPZ_NAME, npz)
    manifest = {
        **manifest,
        "npz": {
            "file": NPZ_NAME,
            "sha256": hashlib.sha256(npz).hexdigest(),
            "arrays": {k: f"{a.dtype}{list(a.shape)}" for k, a in sorted(arrays.items())},
        },
    }
    text = json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    _replace_atomically(out_dir / MANIFEST_NAME, text.encode("utf-8"))
    return manifest


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
    return write_dataset(arrays, manifest, out_dir)


# ----------------------------------------------------------------------------- dataset


def random_resized_crop(
    image: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> torch.Tensor:
    """Crop a random box (area fraction in ``scale``, aspect in ``ratio``) of a CHW image and
    resize it back to the input size, bilinearly, with an affine sampling grid."""
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    aspect = math.exp(math.log(ratio[0]) + math.log(ratio[1] / ratio[0]) * u[1])
    # Half-sizes and centre in grid_sample's [-1, 1] coordinates; the box stays inside.
    width = min(1.0, math.sqrt(area * aspect))
    height = min(1.0, math.sqrt(area / aspect))
    cx = (1.0 - width) * (2.0 * u[2] - 1.0)
    cy = (1.0 - height) * (2.0 * u[3] - 1.0)
    theta = torch.tensor([[[width, 0.0, cx], [0.0, height, cy]]], dtype=image.dtype)
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", align_corners=False)[0]


class EmojiDataset(torch.utils.data.Dataset):
    """One split of a built emoji dataset, PML style: ``(image, label)`` items and ``labels``.

    Images are float32 CHW in [0, 1] (ImageNet-normalised if ``normalize``); labels are remapped
    to ``0..C_split-1`` in class-id order (``class_ids[label]`` is the manifest class id).
    Augmentation is seeded per (``seed``, epoch, index), so it does not depend on worker count or
    order; call ``set_epoch`` to draw new crops.
    """

    def __init__(
        self,
        root_or_npz: str | os.PathLike[str],
        split: str = "train",
        augment: bool = False,
        normalize: bool = False,
        seed: int = 0,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        path = Path(root_or_npz)
        npz = path / NPZ_NAME if path.is_dir() else path
        manifest = _read_json(npz.parent / MANIFEST_NAME)
        self.class_ids = np.asarray(manifest["split"][split], dtype=np.int64)
        with np.load(npz) as data:
            labels = data["labels"]
            keep = np.isin(labels, self.class_ids)
            self.labels = np.searchsorted(self.class_ids, labels[keep])
            self.vendors = data["vendors"][keep]
            self.images = torch.from_numpy(data["images"][keep]).permute(0, 3, 1, 2).contiguous()
        self.augment = augment
        self.normalize = normalize
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        image = self.images[idx].float() / 255.0
        if self.augment:
            state = np.random.SeedSequence([self.seed, self.epoch, idx]).generate_state(1)
            generator = torch.Generator().manual_seed(int(state[0]))
            image = random_resized_crop(image, generator)
        if self.normalize:
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            image = (image - mean) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return image, int(self.labels[idx])


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.datasets.emoji",
        description="Build the emoji retrieval dataset from pinned npm packages.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="npm package cache")
    parser.add_argument(
        "--packages", type=Path, help="folder of already-extracted packages (no npm needed)"
    )
    parser.add_argument("--seed", type=int, default=0, help="train/test split seed")
    parser.add_argument("--min-images", type=int, default=2, help="fewest images per class")
    parser.add_argument("--include-flags", action="store_true", help="keep flag emoji")
    parser.add_argument(
        "--vendors",
        default=",".join(v.key for v in VENDORS),
        help="comma-separated vendor keys (default: all)",
    )
    args = parser.parse_args(argv)
    by_key = {v.key: v for v in VENDORS}
    unknown = sorted(set(args.vendors.split(",")) - set(by_key))
    if unknown:
        parser.error(f"unknown vendors {unknown}; choose from {sorted(by_key)}")
    start = time.perf_counter()
    try:
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
    except NpmNotFoundError as err:
        sys.exit(f"error: {err}")
    print(summary(manifest))
    print(f"built in {time.perf_counter() - start:.1f} s: {args.out / NPZ_NAME}")


if __name__ == "__main__":
    main()

"""Emoji dataset builder on tiny fake npm packages laid out like the real ones (no network)."""

from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.datasets import emoji

VENDOR = {v.key: v for v in emoji.VENDORS}
TWEMOJI, FLUENT_3D, OPENMOJI = VENDOR["twemoji"], VENDOR["fluent-3d"], VENDOR["openmoji"]
SIZE = 16

# (code points, name, category) of the fake inventory; both vendors draw the first eight.
COMMON = [
    ("1F600", "GRINNING FACE", "Smileys & Emotion"),
    ("1F602", "FACE WITH TEARS OF JOY", "Smileys & Emotion"),
    ("2764-FE0F", "HEAVY BLACK HEART", "Smileys & Emotion"),
    ("1F44D", "THUMBS UP SIGN", "People & Body"),
    ("1F680", "ROCKET", "Travel & Places"),
    ("1F355", "SLICE OF PIZZA", "Food & Drink"),
    ("1F436", "DOG FACE", "Animals & Nature"),
    ("1F431", "CAT FACE", "Animals & Nature"),
]
ONLY_TWEMOJI = ("1F98A", "FOX FACE", "Animals & Nature")
BROKEN_IN_TWEMOJI = ("2B50", "WHITE MEDIUM STAR", "Travel & Places")
MISSING_IN_TWEMOJI = ("1F422", "TURTLE", "Animals & Nature")
FLAG = ("1F1EB-1F1F7", "FRANCE FLAG", "Flags")
SWATCH = ("1F3FB", "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "Component")
INVENTORY = [*COMMON, ONLY_TWEMOJI, BROKEN_IN_TWEMOJI, MISSING_IN_TWEMOJI, FLAG, SWATCH]
SOLID = (10, 200, 30)


def _noise(seed: int, shape: tuple[int, int] = (64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    return Image.fromarray(pixels, "RGBA")


def _package_json(folder: Path, package: emoji.Package) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"name": package.name, "version": package.version, "license": "MIT"}
    (folder / "package.json").write_text(json.dumps(meta))


def make_packages(root: Path) -> Path:
    """Fake emoji-datasource-twitter (inventory + PNGs) and @lobehub/fluent-emoji-3d (WebPs)."""
    twemoji = TWEMOJI.package.folder(root)
    _package_json(twemoji, TWEMOJI.package)
    images = twemoji / TWEMOJI.image_dir
    images.mkdir(parents=True)
    entries = []
    for order, (code, name, category) in enumerate(INVENTORY):
        entry = {
            "unified": code,
            "name": name,
            "short_name": name.lower().replace(" ", "_"),
            "category": category,
            "subcategory": "test",
            "sort_order": order,
            "image": f"{code.lower()}.png",
            "has_img_twitter": True,
        }
        if code == "1F44D":
            tone = {"unified": "1F44D-1F3FB", "image": "1f44d-1f3fb.png", "has_img_twitter": True}
            entry["skin_variations"] = {"1F3FB": tone}
            _noise(99).save(images / tone["image"])
        entries.append(entry)
        if code == MISSING_IN_TWEMOJI[0]:
            continue  # listed in emoji.json, file absent
        path = images / entry["image"]
        if code == BROKEN_IN_TWEMOJI[0]:
            _noise(order).save(path)
            path.write_bytes(path.read_bytes()[:200])  # truncated
        elif code == "1F600":
            Image.new("RGBA", (64, 64), (*SOLID, 255)).save(path)
        elif code == "1F602":
            Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(path)
        else:
            _noise(order).save(path)
    (twemoji / "emoji.json").write_text(json.dumps(entries))

    fluent = FLUENT_3D.package.folder(root)
    _package_json(fluent, FLUENT_3D.package)
    assets = fluent / FLUENT_3D.image_dir
    assets.mkdir(parents=True)
    names = [code.lower() for code, _, _ in [*COMMON, BROKEN_IN_TWEMOJI, MISSING_IN_TWEMOJI, FLAG]]
    # Duplicate (U+FE0F-less twin), skin tone, non-inventory and unparseable names.
    names += ["2764", "1f44d-1f3fb", "e000"]
    for seed, name in enumerate(names):
        shape = (20, 64) if name == "1f680" else (64, 64)
        _noise(100 + seed, shape).save(assets / f"{name}.webp", lossless=True)
    (assets / "1f600svg").write_bytes(b"stray file")
    return root


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_packages(tmp_path_factory.mktemp("packages"))


@pytest.fixture(scope="module")
def built(packages: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built")
    emoji.build_dataset(out, packages_root=packages, size=SIZE, vendors=[TWEMOJI, FLUENT_3D])
    return out


def _load(out: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(out / emoji.NPZ_NAME) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads((out / emoji.MANIFEST_NAME).read_text(encoding="utf-8"))


def test_arrays_and_manifest(built: Path) -> None:
    arrays, manifest = _load(built)
    assert arrays["images"].shape == (16, SIZE, SIZE, 3)
    assert arrays["images"].dtype == np.uint8
    assert arrays["labels"].tolist() == [c for c in range(8) for _ in range(2)]
    assert arrays["vendors"].tolist() == [0, 1] * 8
    assert [c["code_points"] for c in manifest["classes"]] == [c for c, _, _ in COMMON]
    assert manifest["classes"][0]["emoji"] == "😀"
    assert manifest["counts"]["per_vendor"] == {"twemoji": 8, "fluent-3d": 8}
    assert manifest["dropped_classes"] == {"fewer_than_2_images": ["1F98A", "2B50", "1F422"]}
    assert manifest["inventory"]["excluded"] == {"component": 1, "flag": 1}
    assert manifest["policy"]["flags"] == "excluded"
    assert manifest["policy"]["min_images_per_class"] == 2
    assert [p["name"] for p in manifest["packages"]] == [
        "@lobehub/fluent-emoji-3d",
        "emoji-datasource-twitter",
    ]
    assert manifest["packages"][1]["used_for"] == ["inventory", "twemoji"]
    assert [v["artwork_licence"] for v in manifest["vendors"]] == ["CC-BY-4.0", "MIT"]
    assert manifest["images"][4] == {
        "class": 2,
        "vendor": "twemoji",
        "file": "img/twitter/64/2764-fe0f.png",
    }
    assert manifest["images"][5]["file"] == "assets/2764-fe0f.webp"


def test_skip_counts_name_every_unused_file(built: Path) -> None:
    _, manifest = _load(built)
    assert manifest["skipped"] == {
        "twemoji": {
            "component": 1,
            "flag": 1,
            "missing_file": 1,
            "skin_tone_variant": 1,
            "unreadable": 1,
        },
        "fluent-3d": {
            "duplicate": 1,
            "flag": 1,
            "not_in_inventory": 1,
            "skin_tone_variant": 1,
            "unrecognised_name": 1,
        },
    }
    bad = manifest["skipped_files"]["twemoji"]
    assert bad["missing_file"] == ["img/twitter/64/1f422.png"]
    assert [entry.split(" (")[0] for entry in bad["unreadable"]] == ["img/twitter/64/2b50.png"]
    assert manifest["skipped_files"]["fluent-3d"] == {}


def test_images_are_composited_on_white_and_padded(built: Path) -> None:
    arrays, _ = _load(built)
    images = arrays["images"]
    assert (images[0] == SOLID).all()  # opaque solid colour survives the resize
    assert (images[2] == 255).all()  # fully transparent: white
    rocket = images[9]  # 64 x 20 WebP, padded to a square with white
    assert (rocket[0] == 255).all() and (rocket[-1] == 255).all()
    assert (rocket[SIZE // 2] != 255).any()


def test_rebuild_is_byte_identical(packages: Path, built: Path, tmp_path: Path) -> None:
    emoji.build_dataset(tmp_path, packages_root=packages, size=SIZE, vendors=[TWEMOJI, FLUENT_3D])
    for name in (emoji.NPZ_NAME, emoji.MANIFEST_NAME):
        assert (tmp_path / name).read_bytes() == (built / name).read_bytes()


def test_split_is_class_disjoint_and_seeded(built: Path) -> None:
    _, manifest = _load(built)
    train, test = manifest["split"]["train"], manifest["split"]["test"]
    assert sorted(train + test) == list(range(8)) and len(train) == len(test) == 4
    codes = [c["code_points"] for c in manifest["classes"]]
    assert emoji.split_classes(codes, 0) == (train, test)
    assert emoji.split_classes(codes, 1) != (train, test)
    counts = manifest["counts"]
    assert counts["train_images"] + counts["test_images"] == counts["images"] == 16


def test_flags_can_be_kept(packages: Path, tmp_path: Path) -> None:
    manifest = emoji.build_dataset(
        tmp_path,
        packages_root=packages,
        size=SIZE,
        vendors=[TWEMOJI, FLUENT_3D],
        include_flags=True,
    )
    assert "1F1EB-1F1F7" in [c["code_points"] for c in manifest["classes"]]
    assert manifest["inventory"]["excluded"] == {"component": 1}


def test_dataset_remaps_labels(built: Path) -> None:
    arrays, manifest = _load(built)
    for split in ("train", "test"):
        dataset = emoji.EmojiDataset(built / emoji.NPZ_NAME, split=split)
        assert len(dataset) == 8
        assert sorted(set(dataset.labels.tolist())) == [0, 1, 2, 3]
        assert dataset.class_ids.tolist() == manifest["split"][split]
        image, label = dataset[3]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        source = np.flatnonzero(arrays["labels"] == dataset.class_ids[label])
        assert any(
            torch.equal(image, torch.from_numpy(arrays["images"][i]).permute(2, 0, 1) / 255.0)
            for i in source
        )
    normalised, _ = emoji.EmojiDataset(built, split="test", normalize=True)[3]
    assert torch.allclose(normalised[0] * 0.229 + 0.485, image[0], atol=1e-6)
    with pytest.raises(ValueError, match="split"):
        emoji.EmojiDataset(built, split="val")


def test_augmentation_keeps_shape_and_is_seeded(built: Path) -> None:
    plain = emoji.EmojiDataset(built, split="train")
    dataset = emoji.EmojiDataset(built, split="train", augment=True, seed=3)
    idx = next(i for i in range(len(plain)) if plain[i][0].std() > 0.1)  # a textured image
    first, label = dataset[idx]
    assert first.shape == (3, SIZE, SIZE) and first.dtype == torch.float32
    assert label == plain[idx][1]
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert torch.equal(first, emoji.EmojiDataset(built, augment=True, seed=3)[idx][0])
    assert not torch.equal(first, plain[idx][0])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[idx][0])


def test_missing_npm_error_names_the_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(emoji.NpmNotFoundError, match="apt-get install nodejs npm"):
        emoji.fetch_packages([TWEMOJI.package], tmp_path)
    with pytest.raises(SystemExit, match="npm is not on PATH"):
        emoji.main(["--out", str(tmp_path / "out"), "--cache", str(tmp_path)])


def test_fetch_packs_and_extracts_with_npm(
    packages: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A stand-in ``npm`` on PATH serves tarballs of the fake packages."""
    registry = tmp_path / "registry"
    registry.mkdir()
    for vendor in (TWEMOJI, FLUENT_3D):
        name = vendor.package.name.lstrip("@").replace("/", "-")
        with tarfile.open(registry / f"{name}-{vendor.package.version}.tgz", "w:gz") as tar:
            tar.add(vendor.package.folder(packages), arcname="package")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_npm = bin_dir / "npm"
    fake_npm.write_text(
        f"#!{sys.executable}\n"
        "import json, shutil, sys\n"
        "name, version = sys.argv[2].rsplit('@', 1)\n"
        "tgz = name.lstrip('@').replace('/', '-') + '-' + version + '.tgz'\n"
        "dest = sys.argv[sys.argv.index('--pack-destination') + 1]\n"
        f"shutil.copy({str(registry)!r} + '/' + tgz, dest)\n"
        "print(json.dumps([{'filename': tgz}]))\n"
    )
    fake_npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    cache = tmp_path / "cache"
    root = emoji.fetch_packages(emoji.required_packages([TWEMOJI, FLUENT_3D]), cache)
    webp = FLUENT_3D.package.folder(root) / "assets" / "1f600.webp"
    assert (
        webp.read_bytes() == (FLUENT_3D.package.folder(packages) / "assets/1f600.webp").read_bytes()
    )
    assert sorted(p.name for p in root.iterdir()) == ["@lobehub", "emoji-datasource-twitter@16.0.0"]

    # Everything is cached now: npm is not needed again.
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    assert emoji.fetch_packages(emoji.required_packages([TWEMOJI, FLUENT_3D]), cache) == root


def test_extract_rejects_paths_outside_the_package(tmp_path: Path) -> None:
    tarball = tmp_path / "evil.tgz"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(payload, arcname="package/../../escaped")
    with pytest.raises(ValueError, match="unsafe path"):
        emoji._extract(tarball, tmp_path / "pkg")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "pkg").exists()


def test_svg_vendor_is_rasterised(packages: Path, tmp_path: Path) -> None:
    root = tmp_path / "packages"
    root.mkdir()
    (root / TWEMOJI.package.spec).symlink_to(TWEMOJI.package.folder(packages))
    openmoji = OPENMOJI.package.folder(root)
    _package_json(openmoji, OPENMOJI.package)
    svgs = openmoji / OPENMOJI.image_dir
    svgs.mkdir(parents=True)
    square = (
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
        '<rect width="72" height="72" fill="#0a1e{:02x}"/></svg>'
    )
    for i, (code, _, _) in enumerate(COMMON[:3]):
        (svgs / f"{code}.svg").write_text(square.format(i))
    (svgs / "1F680.svg").write_text("<svg this is broken")
    manifest = emoji.build_dataset(
        tmp_path / "out", packages_root=root, size=SIZE, vendors=[TWEMOJI, OPENMOJI]
    )
    assert manifest["counts"]["per_vendor"] == {"twemoji": 3, "openmoji": 3}
    assert manifest["skipped_files"]["openmoji"] == {
        "unreadable": ["color/svg/1F680.svg (ValueError)"]
    }
    assert manifest["tools"]["resvg-py"] is not None
    arrays, _ = _load(tmp_path / "out")
    assert (arrays["images"][arrays["vendors"] == 1][0] == (10, 30, 0)).all()


def test_vendors_are_freely_licensed() -> None:
    assert len(VENDOR) == len(emoji.VENDORS)
    for vendor in emoji.VENDORS:
        assert not any(word in vendor.package.name for word in ("apple", "facebook", "messenger"))
        assert vendor.artwork_licence in {"CC-BY-4.0", "CC-BY-SA-4.0", "Apache-2.0", "MIT"}

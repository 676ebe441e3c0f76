"""Emoji dataset builder on tiny fake npm packages laid out like the real ones, fetched in
Python from a local stand-in registry (no network, no Node.js)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.core.datasets import common, emoji, npm, stored
from benchmarks.core.errors import DataError

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
    return arrays, json.loads((out / stored.MANIFEST_NAME).read_text(encoding="utf-8"))


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
    for name in (emoji.NPZ_NAME, stored.MANIFEST_NAME):
        assert (tmp_path / name).read_bytes() == (built / name).read_bytes()


def test_split_is_class_disjoint_and_seeded(built: Path) -> None:
    _, manifest = _load(built)
    train, test = manifest["split"]["train"], manifest["split"]["test"]
    assert sorted(train + test) == list(range(8)) and len(train) == len(test) == 4
    codes = [c["code_points"] for c in manifest["classes"]]
    assert common.split_halves(codes, 0) == (train, test)
    assert common.split_halves(codes, 1) != (train, test)
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


def test_a_build_opens_as_train_and_test_classes(built: Path) -> None:
    arrays, manifest = _load(built)
    splits = emoji.open_splits(None, built)
    for source, split in ((splits.train, "train"), (splits.eval, "test")):
        assert len(source) == 8 and source.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        ids = manifest["split"][split]
        assert source.class_names == [manifest["classes"][i]["short_name"] for i in ids]
        image = source.image(3)
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
        original = np.flatnonzero(arrays["labels"] == ids[1])[1]
        assert torch.equal(image, torch.from_numpy(arrays["images"][original]).permute(2, 0, 1))
    assert splits.info["npz_sha256"] == manifest["npz"]["sha256"]


# ----------------------------------------------------------------------------- fetching


def tarball(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname="package")
    return buffer.getvalue()


def sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


class Registry:
    """A stand-in npm registry on localhost: metadata and tarballs of the fake packages."""

    def __init__(self, packages: Path, vendors: list[emoji.Vendor]) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                registry.requests.append(self.path)
                body = registry.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body or b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        for vendor in vendors:
            package = vendor.package
            data = tarball(package.folder(packages))
            path = f"/{package.name}/-/{package.name.split('/')[-1]}-{package.version}.tgz"
            self.files[path] = data
            dist = {"tarball": self.url.rstrip("/") + path, "integrity": sri(data)}
            metadata = {"name": package.name, "versions": {package.version: {"dist": dist}}}
            self.files["/" + urllib.parse.quote(package.name, safe="@")] = json.dumps(
                metadata
            ).encode()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def registry(packages: Path) -> Iterator[Registry]:
    served = Registry(packages, [TWEMOJI, FLUENT_3D])
    yield served
    served.server.shutdown()
    served.server.server_close()


def test_fetch_downloads_verifies_and_extracts_in_python(
    packages: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no user .npmrc
    monkeypatch.setenv("npm_config_registry", registry.url)
    monkeypatch.setenv("PATH", "")  # no node, no npm
    cache = tmp_path / "cache"
    root = emoji.fetch_packages(emoji.required_packages([TWEMOJI, FLUENT_3D]), cache)
    webp = FLUENT_3D.package.folder(root) / "assets" / "1f600.webp"
    assert (
        webp.read_bytes() == (FLUENT_3D.package.folder(packages) / "assets/1f600.webp").read_bytes()
    )
    assert sorted(p.name for p in root.iterdir()) == ["@lobehub", "emoji-datasource-twitter@16.0.0"]
    assert "/@lobehub%2Ffluent-emoji-3d" in registry.requests

    # Everything is cached now: the registry is not asked again.
    registry.requests.clear()
    assert emoji.fetch_packages(emoji.required_packages([TWEMOJI, FLUENT_3D]), cache) == root
    assert registry.requests == []


def test_a_tarball_that_fails_its_integrity_check_is_not_extracted(
    registry: Registry, tmp_path: Path
) -> None:
    path = next(p for p in registry.files if p.endswith(".tgz") and "twitter" in p)
    registry.files[path] = registry.files[path][:-10] + b"0123456789"
    settings = {"registry": registry.url}
    with pytest.raises(
        DataError, match=r"emoji-datasource-twitter@16\.0\.0: sha512 is .*, the registry says"
    ):
        npm.fetch(TWEMOJI.package, tmp_path, settings)
    assert not TWEMOJI.package.folder(tmp_path).exists()
    with pytest.raises(DataError, match=r"cannot fetch .*left-pad \(HTTP Error 404"):
        npm.fetch(npm.Package("left-pad", "1.0.0"), tmp_path, settings)


def test_npm_settings_follow_npms_precedence(tmp_path: Path) -> None:
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    (home / ".npmrc").write_text(
        "registry=https://home.example/npm/\n"
        "; a comment\n"
        "//mirror.example/npm/:_authToken=${TOKEN}\n"
    )
    (project / ".npmrc").write_text(
        "registry = https://project.example/\n@lobehub:registry=https://mirror.example/npm\n"
    )
    environ = {"TOKEN": "s3cret"}
    settings = npm.npm_settings(environ, home, (project,))
    assert npm.registry_for(TWEMOJI.package, settings) == "https://project.example/"
    scoped = npm.registry_for(FLUENT_3D.package, settings)
    assert scoped == "https://mirror.example/npm/"
    assert npm.auth_headers(scoped + "@lobehub%2ffluent-emoji-3d", settings) == {
        "Authorization": "Bearer s3cret"
    }
    assert npm.auth_headers("https://project.example/x", settings) == {}
    environ["NPM_CONFIG_REGISTRY"] = "https://env.example"
    settings = npm.npm_settings(environ, home, (project,))
    assert npm.registry_for(TWEMOJI.package, settings) == "https://env.example/"
    assert npm.registry_for(
        TWEMOJI.package, npm.npm_settings({}, tmp_path / "none", (tmp_path,))
    ) == (npm.DEFAULT_REGISTRY)


def test_integrity_strings() -> None:
    data = b"payload"
    npm.check_integrity(data, f"sha1-xxx {sri(data)}", "p")  # the strongest hash decides
    with pytest.raises(DataError, match="no supported hash"):
        npm.check_integrity(data, "md5-abc", "p")


def test_extract_rejects_paths_outside_the_package(tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_text("x")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(payload, arcname="package/../../escaped")
    with pytest.raises(DataError, match="unsafe path"):
        common.extract_tar(buffer.getvalue(), tmp_path / "pkg", "tarball", strip=1)
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

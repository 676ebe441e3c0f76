"""Fetch pinned npm packages in Python, without Node.js.

For each package: the registry's metadata (``GET <registry>/<name>``, the abbreviated
document npm itself reads) gives the version's tarball URL and its ``dist.integrity`` (a
Subresource-Integrity hash, ``sha512-<base64>``); the tarball is downloaded, checked against
that hash (a mismatch is an error, nothing is extracted) and its regular files are extracted.

The registry is the user's npm setting, as npm resolves it: the ``npm_config_registry``
environment variable, else ``registry=`` in the project's ``.npmrc`` (the current folder's,
then the repository's), else in ``~/.npmrc``, else https://registry.npmjs.org/. A scope's own
registry (``@scope:registry=...``) and a registry's ``//host/path/:_authToken=...`` are honoured
too; ``${VAR}`` in an ``.npmrc`` value is read from the environment.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import report
from ..errors import DataError
from .common import extract_tar

DEFAULT_REGISTRY = "https://registry.npmjs.org/"
ABBREVIATED_METADATA = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8"
# Strongest first, as npm picks among several hashes of one integrity string.
INTEGRITY_ALGORITHMS = ("sha512", "sha384", "sha256", "sha1")
TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class Package:
    """An npm package pinned to an exact version."""

    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def scope(self) -> str | None:
        return self.name.split("/")[0] if self.name.startswith("@") else None

    def folder(self, root: Path) -> Path:
        """Where the extracted package lives under ``root`` (``root/name@version``)."""
        return root / self.spec


# ----------------------------------------------------------------------------- configuration


def read_npmrc(path: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """``key=value`` lines of an ``.npmrc`` (comments and blank lines skipped, ``${VAR}``
    expanded); {} where there is no such file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    settings = {}
    for line in lines:
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = re.sub(r"\$\{(\w+)\}", lambda m: environ.get(m[1], ""), value.strip())
        settings[key.strip()] = value.strip().strip("\"'")
    return settings


def npm_settings(
    environ: Mapping[str, str] = os.environ,
    home: Path | None = None,
    project_folders: tuple[Path, ...] = (),
) -> dict[str, str]:
    """The npm settings that matter here, by npm's precedence: environment, then the project's
    ``.npmrc`` (first of ``project_folders``, default: this folder and the repository), then the
    user's ``~/.npmrc``."""
    home = Path.home() if home is None else home
    folders = project_folders or (Path.cwd(), report.REPO_ROOT)
    settings = read_npmrc(home / ".npmrc", environ)
    for folder in reversed(list(dict.fromkeys(folders))):
        settings.update(read_npmrc(folder / ".npmrc", environ))
    prefix = "npm_config_"
    settings.update(
        {
            key[len(prefix) :].lower(): v
            for key, v in environ.items()
            if key.lower().startswith(prefix)
        }
    )
    return settings


def registry_for(package: Package, settings: Mapping[str, str]) -> str:
    """The registry URL (ending in ``/``) that serves ``package``."""
    url = settings.get(f"{package.scope}:registry") if package.scope else None
    url = url or settings.get("registry") or DEFAULT_REGISTRY
    return url if url.endswith("/") else url + "/"


def auth_headers(url: str, settings: Mapping[str, str]) -> dict[str, str]:
    """An ``Authorization`` header where an ``.npmrc`` holds a token for ``url``'s registry."""
    parsed = urllib.parse.urlsplit(url)
    path = f"//{parsed.netloc}{parsed.path}"
    best = ""
    for key in settings:
        prefix = key.removesuffix(":_authToken")
        if key.endswith(":_authToken") and path.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return {"Authorization": f"Bearer {settings[best + ':_authToken']}"} if best else {}


# ----------------------------------------------------------------------------- fetching


def _get(url: str, settings: Mapping[str, str], accept: str = "*/*") -> bytes:
    headers = {
        "Accept": accept,
        "User-Agent": "pml-proxygml-benchmarks",
        **auth_headers(url, settings),
    }
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT_SECONDS
        ) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as error:
        raise DataError(f"cannot fetch {url} ({error})") from None


def tarball_dist(package: Package, settings: Mapping[str, str]) -> dict[str, str]:
    """The version's ``dist`` entry (``tarball``, ``integrity``) from its registry."""
    registry = registry_for(package, settings)
    url = registry + urllib.parse.quote(package.name, safe="@")
    try:
        metadata = json.loads(_get(url, settings, ABBREVIATED_METADATA))
        return metadata["versions"][package.version]["dist"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{registry} has no {package.spec} (metadata from {url})") from None


def check_integrity(data: bytes, integrity: str, what: str) -> None:
    """Raise :class:`DataError` unless ``data`` has the SRI hash ``integrity``."""
    hashes = dict(item.split("-", 1) for item in integrity.split() if "-" in item)
    algorithm = next((a for a in INTEGRITY_ALGORITHMS if a in hashes), None)
    if algorithm is None:
        raise DataError(f"{what}: no supported hash in its integrity {integrity!r}")
    expected = hashes[algorithm].split("?")[0]
    actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if actual != expected:
        raise DataError(f"{what}: {algorithm} is {actual}, the registry says {expected}")


def fetch(package: Package, root: Path, settings: Mapping[str, str] | None = None) -> Path:
    """Download, verify and extract ``package`` under ``root`` unless already there."""
    folder = package.folder(root)
    if (folder / "package.json").is_file():
        return folder
    settings = npm_settings() if settings is None else settings
    dist = tarball_dist(package, settings)
    data = _get(dist["tarball"], settings)
    if "integrity" in dist:
        check_integrity(data, dist["integrity"], package.spec)
    else:  # registries from before SRI only give the tarball's sha1
        digest = base64.b64encode(bytes.fromhex(dist["shasum"])).decode()
        check_integrity(data, f"sha1-{digest}", package.spec)
    extract_tar(data, folder, package.spec, strip=1)  # npm tarballs hold package/...
    return folder

"""Pinned Debian packages: fetched with ``apt-get download``, checked, unpacked in Python.

A :class:`DebPackage` names an exact version and the SHA-256 of its ``.deb`` (the ``SHA256``
field of ``apt-cache show``), so a build reads the same bytes on every machine or fails. The
``.deb`` is an ``ar`` archive whose ``data.tar.*`` holds the installed files; only regular files
are unpacked (no links, devices or paths outside the package), into
``cache/<name>_<version>/``, which is the cache: a package whose folder records the pinned
SHA-256 is never fetched again, and a folder is renamed into place only once complete, so an
interrupted build resumes. Nothing is installed system-wide, and ``dpkg`` is not needed.

``apt-get`` needs Debian 12 (bookworm) package lists (``apt-get update``); elsewhere, put the
``.deb`` files in a folder and pass it as ``debs_dir``: they are checked the same way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import extract_tar
from .stored import DatasetBuildError

# The file in an unpacked package folder that records which .deb it came from.
SOURCE_RECORD = ".deb-sha256"
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


@dataclass(frozen=True)
class DebPackage:
    """A Debian package pinned to a version and to the SHA-256 of its ``.deb``."""

    name: str
    version: str
    sha256: str
    licence: str

    @property
    def spec(self) -> str:
        """``name=version``, as ``apt-get download`` takes it."""
        return f"{self.name}={self.version}"

    def folder(self, cache_dir: Path) -> Path:
        """Where the unpacked package lives (the epoch's ``:`` is not portable in names)."""
        return cache_dir / f"{self.name}_{self.version.replace(':', '%3a')}"

    def record(self) -> dict[str, Any]:
        """The package as a manifest lists it."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "licence": self.licence,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DebPackage:
        return cls(data["name"], data["version"], data["sha256"], data["licence"])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(
    packages: Iterable[DebPackage], cache_dir: Path, debs_dir: Path | None = None
) -> dict[str, Path]:
    """Unpacked folder of each package (by name), fetching and unpacking what is missing."""
    folders = {}
    for package in packages:
        folder = package.folder(cache_dir)
        record = folder / SOURCE_RECORD
        if not (record.is_file() and record.read_text().strip() == package.sha256):
            with tempfile.TemporaryDirectory(prefix=".download-", dir=_made(cache_dir)) as tmp:
                deb = _find_deb(package, debs_dir) if debs_dir else _apt_download(package, tmp)
                unpack(deb, package, folder)
        folders[package.name] = folder
    return folders


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _apt_download(package: DebPackage, dest: str) -> Path:
    apt = shutil.which("apt-get")
    if apt is None:
        raise DatasetBuildError(
            f"apt-get is not on PATH; it fetches {package.spec}. Download the pinned .deb files "
            "on a Debian 12 machine and pass their folder with --debs"
        )
    # apt's download sandbox user must be able to write the temporary folder.
    os.chmod(dest, 0o777)
    result = subprocess.run(
        [apt, "download", "-q", package.spec], cwd=dest, capture_output=True, text=True
    )
    debs = sorted(Path(dest).glob("*.deb"))
    if result.returncode != 0 or len(debs) != 1:
        raise DatasetBuildError(
            f"apt-get download {package.spec} failed: {result.stderr.strip()[-500:]}\n"
            "It needs Debian 12 (bookworm) package lists (run `apt-get update`); "
            "or pass a folder of the pinned .deb files with --debs"
        )
    return debs[0]


def _find_deb(package: DebPackage, debs_dir: Path) -> Path:
    candidates = sorted(debs_dir.glob(f"{package.name}_*.deb"))
    for deb in candidates:
        if sha256_of(deb) == package.sha256:
            return deb
    raise DatasetBuildError(
        f"no .deb of {package.spec} with SHA-256 {package.sha256} in {debs_dir} "
        f"(found {[d.name for d in candidates]})"
    )


def unpack(deb: Path, package: DebPackage, folder: Path) -> None:
    """Check ``deb`` against the pin, then unpack its files into ``folder`` atomically."""
    actual = sha256_of(deb)
    if actual != package.sha256:
        raise DatasetBuildError(
            f"{deb.name} has SHA-256 {actual}, but {package.spec} is pinned to {package.sha256}"
        )
    stamps = {SOURCE_RECORD: package.sha256 + "\n"}
    extract_tar(_data_tar(deb), folder, deb.name, stamps=stamps)


def _data_tar(deb: Path) -> bytes:
    """The ``data.tar.*`` member of a ``.deb`` (an ``ar`` archive of fixed 60-byte headers)."""
    blob = deb.read_bytes()
    if not blob.startswith(_AR_MAGIC):
        raise DatasetBuildError(f"{deb.name} is not a Debian package (no ar header)")
    offset = len(_AR_MAGIC)
    while offset + _AR_HEADER <= len(blob):
        header = blob[offset : offset + _AR_HEADER]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii"))
        start = offset + _AR_HEADER
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise DatasetBuildError(f"{deb.name}: zstd-compressed data is not supported")
            return blob[start : start + size]
        offset = start + size + (size % 2)  # members are 2-byte aligned
    raise DatasetBuildError(f"{deb.name} has no data.tar member")

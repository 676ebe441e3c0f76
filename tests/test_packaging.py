"""The release artefacts and the documentation site, built as CI and a user build them.

The sdist and the wheel are built offline (``python -m build --no-isolation``) from a copy of
the repository, so that stale files of an earlier build cannot leak into them; the docs are
built with ``mkdocs build --strict`` and their pages are checked against the public names
found by importing the package (the site finds them statically, through griffe).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import pml_proxygml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pml_proxygml"
NOT_SHIPPED = ("tests/", "benchmarks/", "docs/", "examples/")
# Without git: what a copy leaves out (environments, build outputs, caches).
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".ci-venv", "build", "dist", "*.egg-info", "__pycache__", ".cache", "cache"
)


def source_version() -> str:
    """``__version__`` as written in the package's ``__init__.py``, the single source."""
    tree = ast.parse((ROOT / PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("pml_proxygml/__init__.py defines no __version__")


def copy_sources(destination: Path) -> None:
    """The repository's files as git lists them (tests/, benchmarks/... included), or a copy.

    Untracked run folders, which can hold gigabytes of checkpoints, stay behind.
    """
    git = shutil.which("git")
    listed = git and subprocess.run([git, "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if not listed or listed.returncode != 0:
        shutil.copytree(ROOT, destination, ignore=COPY_IGNORE)
        return
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("packaging") / "source"
    copy_sources(copy)
    return copy


@pytest.fixture(scope="module")
def dists(source) -> dict[str, Path]:
    pytest.importorskip("build", reason="the dev extra installs build")
    out = source.parent / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_holds_the_library_its_licence_and_metadata_only(source, dists):
    names = zipfile.ZipFile(dists["wheel"]).namelist()
    dist_info = f"{PACKAGE}-{source_version()}.dist-info/"
    assert (source / "tests").is_dir() and (source / "benchmarks").is_dir()
    library = {
        path.relative_to(source).as_posix()
        for path in (source / PACKAGE).rglob("*")
        if path.is_file() and path.suffix in (".py", ".typed")
    }
    assert f"{PACKAGE}/py.typed" in library
    assert library <= set(names), f"missing from the wheel: {sorted(library - set(names))}"
    outside = [n for n in names if not n.startswith((f"{PACKAGE}/", dist_info))]
    assert outside == []
    assert not [n for n in names if n.startswith(NOT_SHIPPED) or "/tests/" in n]
    assert {f"{dist_info}METADATA", f"{dist_info}RECORD", f"{dist_info}WHEEL"} <= set(names)
    licence = [n for n in names if n.startswith(dist_info) and n.endswith("/LICENSE")]
    assert len(licence) == 1
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        assert wheel.read(licence[0]) == (ROOT / "LICENSE").read_bytes()


def test_metadata_is_complete_and_renders_on_a_package_index(dists):
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        (metadata_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(wheel.read(metadata_name).decode())
    assert metadata["Name"] == "pml-proxygml"
    assert metadata["Version"] == source_version() == pml_proxygml.__version__
    assert metadata["Requires-Python"] == ">=3.9"
    assert "MIT" in (metadata["License-Expression"] or metadata["License"] or "")
    classifiers = metadata.get_all("Classifier")
    for expected in ("Typing :: Typed", "Programming Language :: Python :: 3.9"):
        assert expected in classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert urls["Official code"] == "https://github.com/YuehuaZhu/ProxyGML"
    # A package index shows the README without the repository: no relative images there.
    description = metadata.get_payload()
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", description)
    images += re.findall(r"<img[^>]*src=[\"']([^\"']+)", description)
    assert [i for i in images if not i.startswith("https://")] == []

    twine_check = pytest.importorskip("twine.commands.check", reason="the dev extra installs twine")
    failed = twine_check.check([str(dists["wheel"]), str(dists["sdist"])], strict=True)
    assert not failed


def test_sdist_carries_the_licence_and_the_build_files(dists):
    with tarfile.open(dists["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for required in ("LICENSE", "README.md", "setup.cfg", "pyproject.toml"):
        assert required in names
    assert f"{PACKAGE}/py.typed" in names


# ---------------------------------------------------------------------------------------
# The documentation site


def public_modules() -> list[str]:
    submodules = [
        f"{PACKAGE}.{info.name}"
        for info in pkgutil.iter_modules(pml_proxygml.__path__)
        if not info.name.startswith("_")
    ]
    return [PACKAGE, *sorted(submodules)]


def public_objects(module_name: str) -> dict[str, object]:
    """``__all__``, or else the functions and classes the module itself defines."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return {name: getattr(module, name) for name in module.__all__}
    return {
        name: obj
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module_name
    }


def page_headings(site: Path) -> dict[str, Path]:
    """Identifier -> page, for every object rendered as the title (h1) of an API page."""
    headings = {}
    for page in (site / "api").rglob("index.html"):
        for identifier in re.findall(
            r'<h1 id="([\w.]+)" class="doc doc-heading"', page.read_text()
        ):
            headings[identifier] = page
    return headings


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(
            module, reason='the docs extra is not installed: pip install -e ".[docs]"'
        )
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    return out


def test_every_public_function_and_class_has_a_page_of_its_own(site):
    headings = page_headings(site)
    modules = public_modules()
    assert {"pml_proxygml.functional", "pml_proxygml.losses"} <= set(modules)
    paths_of: dict[int, set[str]] = {}  # an object may be public under several paths
    for module in modules:
        for name, obj in public_objects(module).items():
            paths_of.setdefault(id(obj), set()).add(f"{module}.{name}")
    missing = []
    for module in modules:
        assert module in headings, f"no page for module {module}"
        for name, obj in public_objects(module).items():
            if inspect.ismodule(obj):
                assert obj.__name__ in headings
            elif not paths_of[id(obj)] & set(headings):
                missing.append(f"{module}.{name}")
    assert missing == []
    # Each has a page of its own: the object is the page's title, not a section of another.
    assert headings["pml_proxygml.functional.select_topk"].parent.name == "select_topk"


def test_equations_render_and_results_are_part_of_the_site(site):
    method = (site / "method" / "index.html").read_text()
    assert len(re.findall(r'class="arithmatex"', method)) >= 10
    assert "javascripts/mathjax.js" in method
    assert (site / "results" / "emoji" / "summary" / "index.html").is_file()

"""MkDocs hook: a page for every public name of ``pml_proxygml``, and the committed results.

Public modules are the package and each of its direct submodules without a leading
underscore. A module's public names are its ``__all__`` when it has one, otherwise what it
defines without a leading underscore (imports excluded): griffe's rule, so the pages hold
exactly what mkdocstrings renders. Each object gets one page, at the first public path
that reaches it (``pml_proxygml.ProxyGMLLoss`` before ``pml_proxygml.losses.ProxyGMLLoss``),
and the nav entry "API reference" becomes one section per module. A name added to the
library later gets its page with no edit here.

The committed benchmark results (``benchmarks/results``) are added to the site under
``results/``, so that a page links to the file its numbers come from and
``mkdocs build --strict`` fails when that file is missing.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

import griffe
from mkdocs.structure.files import File, InclusionLevel

PACKAGE = "pml_proxygml"
API_DIR = "api"
API_NAV_TITLE = "API reference"
RESULTS_SOURCE = ("benchmarks", "results")
RESULTS_DIR = "results"


@dataclass(frozen=True)
class PublicName:
    """A public name of a module, and the page that renders its object."""

    name: str
    kind: str
    summary: str
    page: str
    rendered_here: bool


@dataclass
class PublicModule:
    path: str
    summary: str
    names: list[PublicName] = field(default_factory=list)

    @property
    def page(self) -> str:
        return f"{API_DIR}/{self.path}/index.md"


def _summary(obj: griffe.Object) -> str:
    """The first line of the docstring, safe inside a Markdown table cell."""
    if obj.docstring is None:
        return ""
    return obj.docstring.value.strip().splitlines()[0].replace("|", "\\|")


def _public_names(module: griffe.Module) -> list[str]:
    if module.exports is not None:
        return [str(name) for name in module.exports]
    return [
        name
        for name, member in module.members.items()
        if not name.startswith("_") and not member.is_alias and member.is_public
    ]


def public_api(repo_root: str) -> list[PublicModule]:
    """The public modules, package first, each with its public names and their pages."""
    package = griffe.load(
        PACKAGE, search_paths=[repo_root], resolve_aliases=True, resolve_external=False
    )
    submodules = sorted(
        (m for name, m in package.modules.items() if not name.startswith("_")),
        key=lambda m: m.path,
    )
    modules = [PublicModule(m.path, _summary(m)) for m in (package, *submodules)]
    pages: dict[str, str] = {}
    for module, source in zip(modules, (package, *submodules)):
        for name in _public_names(source):
            member = source[name]
            target = member.final_target if member.is_alias else member
            own_page = f"{API_DIR}/{module.path}/{name}.md"
            if target.is_module:
                page = f"{API_DIR}/{target.path}/index.md"
            else:
                page = pages.setdefault(target.path, own_page)
            module.names.append(
                PublicName(name, target.kind.value, _summary(target), page, page == own_page)
            )
    return modules


def _link(page: str, from_page: str) -> str:
    return posixpath.relpath(page, posixpath.dirname(from_page))


def _module_markdown(module: PublicModule) -> str:
    rows = [
        f"| [`{n.name}`]({_link(n.page, module.page)}) | {n.kind} | {n.summary} |"
        for n in module.names
    ]
    table = ["| name | kind | summary |", "|---|---|---|", *rows] if rows else ["None."]
    directive = f"::: {module.path}\n    options:\n      members: false\n"
    return "\n".join([directive, "## Public names", "", *table, ""])


def _index_markdown(modules: list[PublicModule]) -> str:
    index = f"{API_DIR}/index.md"
    rows = [f"| [`{m.path}`]({_link(m.page, index)}) | {m.summary} |" for m in modules]
    intro = (
        "Generated from the docstrings: a page per module, and a page per public function, "
        "class and constant (a module's `__all__`, or else what it defines without a "
        "leading underscore)."
    )
    return "\n".join(
        ["# API reference", "", intro, "", "| module | summary |", "|---|---|", *rows, ""]
    )


def _nav(modules: list[PublicModule]) -> list:
    return [
        f"{API_DIR}/index.md",
        *(
            {m.path: [m.page, *({n.name: n.page} for n in m.names if n.rendered_here)]}
            for m in modules
        ),
    ]


def _pages(modules: list[PublicModule]) -> dict[str, str]:
    pages = {f"{API_DIR}/index.md": _index_markdown(modules)}
    for module in modules:
        pages[module.page] = _module_markdown(module)
        for name in module.names:
            if name.rendered_here:
                pages[name.page] = f"::: {module.path}.{name.name}\n"
    return pages


def _repo_root(config) -> str:
    return os.path.dirname(os.path.abspath(config.config_file_path))


_modules: list[PublicModule] = []


def on_config(config):
    _modules[:] = public_api(_repo_root(config))
    nav = list(config.nav or [])
    section = {API_NAV_TITLE: _nav(_modules)}
    titles = [next(iter(item)) if isinstance(item, dict) else None for item in nav]
    if API_NAV_TITLE in titles:
        nav[titles.index(API_NAV_TITLE)] = section
    else:
        nav.append(section)
    config.nav = nav
    return config


def on_files(files, config):
    for uri, content in _pages(_modules).items():
        files.append(File.generated(config, uri, content=content))
    source = os.path.join(_repo_root(config), *RESULTS_SOURCE)
    for folder, _, names in sorted(os.walk(source)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            uri = posixpath.join(RESULTS_DIR, os.path.relpath(path, source).replace(os.sep, "/"))
            # Linked from the pages, not listed in the nav.
            files.append(
                File.generated(config, uri, abs_src_path=path, inclusion=InclusionLevel.NOT_IN_NAV)
            )
    return files

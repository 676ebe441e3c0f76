"""Where results go, what they record about the machine, and how they are written.

* Results-folder convention: every script writes to ``--out``; without it, to
  ``runs/<script or recipe>/`` at the repository root, which git ignores. Committed results under
  ``benchmarks/results/`` change only when a command is pointed there on purpose.
* Results hold relative paths only (:func:`relative`), and the command line that made them
  (:func:`command_line`) with the paths inside the repository made relative too.
* Every file is written atomically (:func:`atomic_file`: a temporary file, fsync, rename), so a
  run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import math
import os
import platform
import shlex
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy
import pytorch_metric_learning
import torch

from . import measure

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS_ROOT = REPO_ROOT / "runs"

Row = Mapping[str, Any]


# ----------------------------------------------------------------------------- paths


def output_folder(out: Path | None, name: str) -> Path:
    """``out``, or ``runs/<name>`` (git-ignored) when the user gave none."""
    return Path(out) if out is not None else RUNS_ROOT / name


def relative(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the repository root (``../`` where it lies outside), POSIX style."""
    return Path(os.path.relpath(Path(path).resolve(), REPO_ROOT)).as_posix()


def command_line(module: str, argv: Sequence[str]) -> str:
    """``python -m module argv...`` with absolute paths made relative to the repository."""
    words = [relative(word) if os.path.isabs(word) else word for word in argv]
    return shlex.join(["python", "-m", module, *words])


# ----------------------------------------------------------------------------- environment


def git_output(*args: str) -> str | None:
    """The stripped output of ``git args`` in this repository, or None where git fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_state() -> tuple[str | None, bool | None]:
    """HEAD, and whether tracked files differ from it (then the commit does not pin the code)."""
    status = git_output("status", "--porcelain", "--untracked-files=no")
    return git_output("rev-parse", "HEAD"), None if status is None else bool(status)


# Taken when the benchmarks are imported, i.e. with the code this process runs: a long run
# must not report a commit made while it was running.
GIT_COMMIT_AT_START, GIT_DIRTY_AT_START = _git_state()


# Environment variables that change how memory is allocated (glibc's malloc tunables,
# a preloaded allocator such as jemalloc or tcmalloc).
ALLOCATOR_VARIABLE_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD")


def capture_environment(device: str, command: str) -> dict[str, Any]:
    """Machine, library versions, git commit, command line and date, for a results file."""
    mem_total = measure.proc_field("/proc/meminfo", "MemTotal")  # "24576000 kB"
    environment: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git_commit": GIT_COMMIT_AT_START,
        "git_dirty": GIT_DIRTY_AT_START,
        "machine": {
            "cpu_model": measure.proc_field("/proc/cpuinfo", "model name") or platform.processor(),
            "cpu_cores": os.cpu_count(),
            "usable_cores": measure.usable_cores(),
            "ram_gib": None if mem_total is None else round(int(mem_total.split()[0]) / 2**20, 1),
            "platform": platform.platform(),
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "numpy": numpy.__version__,
        "device": device,
        # Other processes on the machine make timings noisy; this shows whether there were any.
        "load_average_at_start": measure.load_average(),
        # The memory allocator's settings move CPU timings (fresh pages for big temporaries).
        "allocator_environment": {
            name: value
            for name, value in sorted(os.environ.items())
            if name.startswith(ALLOCATOR_VARIABLE_PREFIXES)
        },
    }
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        environment["gpu"] = {
            "name": properties.name,
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return environment


# ----------------------------------------------------------------------------- text


def format_value(value: Any) -> str:
    """Table text of one value: 3 significant digits below 100, integers above, "—" for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown_table(rows: Sequence[Row], columns: Mapping[str, str]) -> str:
    """A GitHub markdown table; ``columns`` maps row keys to headers, in order."""

    def cell(value: Any) -> str:
        # A "|" or a newline inside a cell (error messages) would break the table.
        return format_value(value).replace("|", "\\|").replace("\n", " ")

    numeric = [
        all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows)
        for key in columns
    ]
    lines = [
        "| " + " | ".join(columns.values()) + " |",
        "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def environment_markdown(environment: Mapping[str, Any]) -> str:
    """The environment as a markdown bullet list (nested dicts flattened to one line each)."""
    lines = []
    for key, value in environment.items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{name}: {format_value(item)}" for name, item in value.items())
        lines.append(f"- **{key}**: {format_value(value)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- writing


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path``; on success fsync it and rename it over ``path``.

    A crash at any moment leaves ``path`` as it was or complete, never partial; an exception
    inside the block leaves ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    newline = "" if "b" not in mode else None  # csv writes its own line endings
    try:
        with open(tmp, mode, newline=newline) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_folder(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as file:
        file.write(data)


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as file:
        file.write(text)


def write_csv(path: Path, rows: Sequence[Row], columns: Sequence[str]) -> None:
    """All ``columns`` of every row, in order; a missing value is an empty cell."""
    with atomic_file(path) as file:
        writer = csv.DictWriter(file, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_json(
    path: Path,
    rows: Sequence[Row],
    environment: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """``{"environment": ..., **extra, "rows": [...]}`` as indented JSON."""
    data = {"environment": environment, **(extra or {}), "rows": list(rows)}
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_markdown(
    path: Path, title: str, table: str, environment: Mapping[str, Any], notes: str = ""
) -> None:
    """A results page: title, optional notes, the table, then the environment."""
    parts = [f"# {title}\n", notes, table, "## Environment\n", environment_markdown(environment)]
    write_text(path, "\n".join(part for part in parts if part))


def save_figure(figure: Any, path: Path, **kwargs: Any) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **kwargs)
    write_bytes(path, buffer.getvalue())


def write_results(
    out: Path,
    stem: str,
    rows: Sequence[Row],
    environment: Mapping[str, Any],
    *,
    title: str,
    columns: Mapping[str, str],
    notes: str = "",
    csv_columns: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """The measurement scripts' results: ``<stem>.json``, ``<stem>.md`` and, with
    ``csv_columns``, ``<stem>.csv`` in ``out``; returns the paths by extension."""
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    write_json(paths["json"], rows, environment, extra)
    write_markdown(paths["md"], title, markdown_table(rows, columns), environment, notes)
    if csv_columns is not None:
        paths["csv"] = out / f"{stem}.csv"
        write_csv(paths["csv"], rows, csv_columns)
    return paths

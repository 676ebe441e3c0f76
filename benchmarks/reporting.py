"""Helpers shared by the benchmarks: environment capture and CSV / JSON / markdown output."""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy
import pytorch_metric_learning
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

Row = Mapping[str, Any]


def proc_field(path: str, key: str) -> str | None:
    """Value of the first ``key: value`` line of a /proc file, or None where there is none."""
    try:
        with open(path) as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def proc_status_kib(key: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, VmSize...) in KiB."""
    return int(proc_field("/proc/self/status", key).split()[0])


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _git_state() -> tuple[str | None, bool | None]:
    """HEAD, and whether tracked files differ from it (then the commit does not pin the code)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return _git("rev-parse", "HEAD"), None if status is None else bool(status)


# Taken when the benchmarks are imported, i.e. with the code this process runs: a long run
# must not report a commit made while it was running.
GIT_COMMIT_AT_START, GIT_DIRTY_AT_START = _git_state()


def capture_environment(device: str) -> dict[str, Any]:
    """Machine, library versions, git commit, command line and date, for a results file."""
    mem_total = proc_field("/proc/meminfo", "MemTotal")  # "24576000 kB"
    environment: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # orig_argv (3.10+) keeps "-m package.module"; argv[0] would be the file's path.
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "git_commit": GIT_COMMIT_AT_START,
        "git_dirty": GIT_DIRTY_AT_START,
        "machine": {
            "cpu_model": proc_field("/proc/cpuinfo", "model name") or platform.processor(),
            "cpu_cores": os.cpu_count(),
            "usable_cores": usable_cores(),
            "ram_gib": None if mem_total is None else round(int(mem_total.split()[0]) / 2**20, 1),
            "platform": platform.platform(),
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "numpy": numpy.__version__,
        "device": device,
        # Other processes on the machine make timings noisy; this shows whether there were any.
        "load_average_at_start": (
            [round(load, 2) for load in os.getloadavg()] if hasattr(os, "getloadavg") else None
        ),
    }
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        environment["gpu"] = {
            "name": properties.name,
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return environment


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


def write_csv(path: Path, rows: Sequence[Row], columns: Sequence[str]) -> None:
    """All ``columns`` of every row, in order; a missing value is an empty cell."""
    with open(path, "w", newline="") as file:
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
    with open(path, "w") as file:
        json.dump({"environment": environment, **(extra or {}), "rows": list(rows)}, file, indent=2)
        file.write("\n")


def write_markdown(
    path: Path, title: str, table: str, environment: Mapping[str, Any], notes: str = ""
) -> None:
    """A results page: title, optional notes, the table, then the environment."""
    parts = [f"# {title}\n", notes, table, "## Environment\n", environment_markdown(environment)]
    path.write_text("\n".join(part for part in parts if part))

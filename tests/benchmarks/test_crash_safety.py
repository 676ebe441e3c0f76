"""A run killed with SIGKILL at any moment resumes on the same command and ends with the numbers
of an uninterrupted run (issue 11).

Each kill is real: a child process runs ``benchmarks.run`` on a tiny image folder and kills
itself with SIGKILL at a chosen point (mid-epoch, in the middle of writing a checkpoint, with
a checkpoint or results file written but not yet renamed into place, right after a rename,
while the summary is written). The same command then runs again in the same folder, killed at
the next point, until a last run finishes; every run's rows and the summary must equal those
of an uninterrupted run in another folder, and no kill may leave an unreadable checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.core import harness, report

from .fakes import TINY_FOLDER, write_image_folder

pytestmark = pytest.mark.slow

# Runs benchmarks.run with argv[2:] and SIGKILLs itself at the point argv[1] names:
#   step:N             before the N-th optimizer step of this process (mid-epoch)
#   save:N             in the N-th checkpoint save, half of the temporary file written
#   replace:NAME:N     before the N-th rename onto a file called NAME (temporary file complete)
#   renamed:NAME:N     right after the N-th rename onto NAME
#   none               never
CHILD = r"""
import os, signal, sys

point, argv = sys.argv[1].split(":"), sys.argv[2:]
kind, count = point[0], {"n": 0}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def counted(limit):
    count["n"] += 1
    return count["n"] == int(limit)


if kind == "step":
    from pytorch_metric_learning.trainers import BaseTrainer

    step_optimizers = BaseTrainer.step_optimizers

    def step(self):
        if counted(point[1]):
            die()
        step_optimizers(self)

    BaseTrainer.step_optimizers = step
elif kind == "save":
    import io
    import torch

    save = torch.save

    def half_save(obj, file, *args, **kwargs):
        if not counted(point[1]):
            return save(obj, file, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        file.flush()
        os.fsync(file.fileno())
        die()

    torch.save = half_save
elif kind in ("replace", "renamed"):
    replace = os.replace

    def killing_replace(source, target):
        hit = os.path.basename(target) == point[1] and counted(point[2])
        if hit and kind == "replace":
            die()
        replace(source, target)
        if hit:
            die()

    os.replace = killing_replace

from benchmarks import run

sys.exit(run.main(argv))
"""

LOSSES = ("proxygml", "proxyanchor")
# Four training images a class, three training classes: 3 optimizer steps an epoch of
# batches of 4, evaluated after every epoch; 3 epochs a run, two runs (ProxyGML first).
KILL_POINTS = (
    "step:5",  # ProxyGML, epoch 2, second batch
    "save:1",  # ProxyGML, epoch 2's checkpoint half written
    "replace:proxygml_seed0.pt:1",  # epoch 2's checkpoint complete, not renamed
    "renamed:proxygml_seed0.pt:1",  # epoch 2 saved, its results not yet written
    "replace:results.json:1",  # epoch 3 (the last) saved, its results not renamed
    "replace:summary.json:1",  # ProxyAnchor trained too, the summary not renamed
)


def command(data: Path, out: Path) -> list[str]:
    return [
        *("--recipe", "folder", "--data-root", str(data), "--out", str(out)),
        *("--loss", *LOSSES, "--epochs", "3", "--device", "cpu", "--set", *TINY_FOLDER),
    ]


def child(point: str, data: Path, out: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, point, *command(data, out)],
        cwd=report.REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(report.REPO_ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
    return done.returncode


def numbers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without their timings and load averages (which differ between any two runs)."""
    timings = ("seconds", "load_average")
    return [{k: v for k, v in row.items() if not any(t in k for t in timings)} for row in rows]


def outcome(out: Path) -> dict[str, Any]:
    runs = {
        loss: numbers(
            json.loads((out / "runs" / loss / "seed0" / "results.json").read_text())["rows"]
        )
        for loss in LOSSES
    }
    summary = json.loads((out / "summary.json").read_text())
    return {"runs": runs, "summary": numbers(summary["rows"])}


def test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_numbers(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", classes=6, per_class=4)
    assert child("none", data, tmp_path / "straight") == 0
    expected = outcome(tmp_path / "straight")
    assert [row["epoch"] for row in expected["runs"]["proxygml"]] == [1, 2, 3]

    out = tmp_path / "killed"
    for point in KILL_POINTS:
        assert child(point, data, out) == -signal.SIGKILL, f"{point} was never reached"
        for checkpoint in (out / "checkpoints").glob("*.pt"):
            harness.load_checkpoint(checkpoint)  # never torn: a complete old or new state
    assert child("none", data, out) == 0
    assert outcome(out) == expected
    log = (out / "run.log").read_text()
    assert log.count("proxygml seed 0: resuming after epoch 1") >= 2
    assert "proxygml seed 0: finished (3 epochs), skipped" in log

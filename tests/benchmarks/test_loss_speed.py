"""benchmarks/loss_speed.py and the core's report and measure helpers on tiny shapes."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re

import pytest

from benchmarks import loss_speed
from benchmarks.core import measure, report
from benchmarks.loss_speed import ClassSpec, Measurement, Settings

TINY = ["--classes", "4x3", "--batch-sizes", "8", "--embedding-size", "16", "--lambdas", "0.3"]


@pytest.fixture(scope="module")
def context():
    return loss_speed.worker_context()


def test_tiny_grid_runs_end_to_end_through_workers(tmp_path, capsys):
    argv = ["--quick", *TINY, "--device", "cpu", "--warmup", "1", "--repeats", "2"]
    assert loss_speed.main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0

    stem = "loss_speed_cpu_quick"  # --quick names the files, explicit flags set the grid
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{stem}.{ext}" for ext in ("csv", "json", "md", "png")
    ]
    with open(tmp_path / f"{stem}.csv") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == loss_speed.CSV_COLUMNS
        rows = list(reader)
    # One row per (config, loss): all six losses, ProxyGML once (one lambda, no cap).
    assert [row["loss_name"] for row in rows] == list(loss_speed.LOSS_LABELS)
    assert {row["config"] for row in rows} == {"C=4x3 B=8 d=16"}
    assert all(row["status"] == "ok" for row in rows), [row["status"] for row in rows]
    by_loss = {row["loss_name"]: row for row in rows}
    assert float(by_loss["floor"]["x_floor"]) == 1.0
    assert float(by_loss["proxyanchor"]["x_proxyanchor"]) == 1.0
    assert by_loss["proxygml"]["top_k"] == "1"  # ceil(0.05 * 12), as the loss reports it
    assert by_loss["proxygml"]["loss"] == "ProxyGML λ=0.3"
    for row in rows:
        assert float(row["median_ms"]) > 0
        assert float(row["peak_extra_mib"]) >= 0
        assert int(row["threads"]) >= 1

    results = json.loads((tmp_path / f"{stem}.json").read_text())
    assert len(results["rows"]) == len(rows)
    assert results["environment"]["repeats"] == 2
    assert "peak_memory" in results["environment"]
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "| config | loss | status | median ms | peak extra MiB | x floor | x ProxyAnchor |" in (
        markdown
    )
    assert (tmp_path / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
    assert "| C=4x3 B=8 d=16 | ProxyGML λ=0.3 | ok |" in capsys.readouterr().out


def test_out_of_memory_is_a_row_not_a_crash(context):
    settings = Settings("cpu", 1, 0, 1, timeout=60, memory_limit_gb=2 / 1024)
    # The 4096 x 512 float32 proxies alone take 8 MiB, over the 2 MiB budget.
    row = loss_speed.run_measurement(Measurement("proxyanchor", 4096, 1, 8, 512), settings, context)
    assert row["status"] == "oom"
    assert row["loss"] == "ProxyAnchor" and row["config"] == "C=4096 B=8 d=512"
    assert "median_ms" not in row


def test_timeout_is_a_row_not_a_crash(context):
    settings = Settings("cpu", 1, 0, repeats=10**9, timeout=0.5, memory_limit_gb=1)
    row = loss_speed.run_measurement(Measurement("floor", 4, 1, 8, 16), settings, context)
    assert row["status"] == "timeout"


def test_exception_is_an_error_row(context):
    settings = Settings("cpu", 1, 0, 1, timeout=60, memory_limit_gb=1)
    bad = Measurement("proxygml", 4, 3, 8, 16, r=2.0, weight_lambda=0.0)  # r must be in (0, 1]
    row = loss_speed.run_measurement(bad, settings, context)
    assert row["status"].startswith("error: ValueError: r must be in (0, 1]")


@pytest.mark.parametrize(
    ("exitcode", "status"),
    [
        (-9, "oom"),  # SIGKILL: the kernel's OOM killer
        (-11, "error: worker killed by SIGSEGV"),
        (1, "error: worker exited with code 1 without a result"),
    ],
)
def test_a_worker_that_dies_unanswered_is_classified(exitcode, status):
    assert loss_speed._death_status(exitcode) == status


def test_ratios_skip_failed_rows_and_missing_references():
    rows = [
        {"config": "a", "loss_name": "floor", "status": "ok", "median_ms": 2.0},
        {"config": "a", "loss_name": "proxyanchor", "status": "oom"},
        {"config": "a", "loss_name": "proxygml", "status": "ok", "median_ms": 5.0},
        {"config": "a", "loss_name": "proxynca", "status": "timeout"},
    ]
    loss_speed.add_ratios(rows)
    assert [row["x_floor"] for row in rows] == [1.0, None, 2.5, None]
    assert [row["x_proxyanchor"] for row in rows] == [None] * 4


def test_plot_marks_failures(tmp_path):
    rows = [
        {"loss": "L", "batch_size": b, "num_proxies": n, "status": s, "median_ms": t}
        | {"peak_extra_mib": t}
        for b in (8, 32)
        for n, s, t in ((10, "ok", 1.0), (100, "ok", 3.0), (1000, "oom", None))
    ]
    loss_speed.plot(rows, tmp_path / "p.png", "title")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_grid_adds_the_capped_top_k_variant_only_for_many_proxies():
    specs = [ClassSpec.parse("100x12"), ClassSpec.parse("1000000")]
    grid = loss_speed.build_grid(
        specs, [32], ["floor", "proxygml"], 512, [0.0, 0.3], 0.05, capped_top_k=1000
    )
    labels = [(m.config, m.label) for m in grid]
    assert labels == [
        ("C=100x12 B=32 d=512", "floor (matmul)"),
        ("C=100x12 B=32 d=512", "ProxyGML λ=0"),
        ("C=100x12 B=32 d=512", "ProxyGML λ=0.3"),
        ("C=1000000 B=32 d=512", "floor (matmul)"),
        ("C=1000000 B=32 d=512", "ProxyGML λ=0"),
        ("C=1000000 B=32 d=512", "ProxyGML λ=0.3"),
        ("C=1000000 B=32 d=512", "ProxyGML λ=0 top_k=1000"),
        ("C=1000000 B=32 d=512", "ProxyGML λ=0.3 top_k=1000"),
    ]
    assert grid[0].num_proxies == 1200


def test_grid_measures_each_selection_precision_and_builds_it():
    grid = loss_speed.build_grid(
        [ClassSpec.parse("100x12")],
        [32],
        ["floor", "proxygml"],
        512,
        [0.0],
        0.05,
        capped_top_k=None,
        selection_precisions=["fp32", "bf16"],
    )
    assert [m.label for m in grid] == [
        "floor (matmul)",
        "ProxyGML λ=0",
        "ProxyGML λ=0 bf16 selection",
    ]
    assert [loss_speed.build_loss(m).selection_precision for m in grid[1:]] == ["fp32", "bf16"]


def test_selection_precisions_flag_reaches_the_rows(tmp_path):
    argv = [*TINY, "--losses", "proxygml", "--selection-precisions", "fp32", "auto"]
    argv += ["--device", "cpu", "--warmup", "0", "--repeats", "1", "--no-progress"]
    assert loss_speed.main([*argv, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "loss_speed_cpu.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(row["loss"], row["selection_precision"], row["status"]) for row in rows] == [
        ("ProxyGML λ=0.3", "fp32", "ok"),
        ("ProxyGML λ=0.3 auto selection", "auto", "ok"),
    ]


@pytest.mark.parametrize("text", ["x12", "100x", "0", "100x0", "ten"])
def test_class_spec_rejects_bad_text(text):
    with pytest.raises(argparse.ArgumentTypeError):
        ClassSpec.parse(text)


def test_markdown_table_formats_and_escapes():
    rows = [
        {"name": "a", "ms": 1234.5, "ratio": 0.012345, "n": 3},
        {"name": "err|x\ny", "ms": None, "ratio": float("nan"), "n": 12},
    ]
    table = report.markdown_table(rows, {"name": "loss", "ms": "median ms", "ratio": "x"})
    assert table == (
        "| loss | median ms | x |\n|---|---:|---:|\n| a | 1234 | 0.0123 |\n| err\\|x y | — | — |\n"
    )


def test_environment_has_the_expected_keys():
    environment = report.capture_environment("cpu", "python -m benchmarks.loss_speed")
    assert {
        "date",
        "command",
        "git_commit",
        "git_dirty",
        "machine",
        "python",
        "torch",
        "pytorch_metric_learning",
        "numpy",
        "device",
        "load_average_at_start",
    } <= environment.keys()
    assert {"cpu_model", "cpu_cores", "usable_cores", "ram_gib", "platform"} <= (
        environment["machine"].keys()
    )
    assert re.fullmatch("[0-9a-f]{40}", environment["git_commit"])
    assert environment["command"] == "python -m benchmarks.loss_speed"
    json.dumps(environment)  # it goes into the JSON results as is


def test_command_lines_and_paths_are_relative(tmp_path):
    inside = report.REPO_ROOT / "runs" / "x"
    assert report.relative(inside) == "runs/x"
    assert not report.relative(tmp_path).startswith("/")
    command = report.command_line("benchmarks.run", ["--out", str(inside), "--seeds", "0"])
    assert command == "python -m benchmarks.run --out runs/x --seeds 0"


def test_time_steps_interleaves_rounds_and_skips_warmup():
    calls = []
    times = measure.time_steps(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=2,
        warmup=1,
        before=lambda: calls.append("-"),
    )
    assert calls == ["-", "a", "-", "b"] * 3
    assert [len(v) for v in times.values()] == [2, 2]
    assert all(t >= 0 for v in times.values() for t in v)
    with pytest.raises(ValueError, match="repeats"):
        measure.time_steps({"a": lambda: None}, repeats=0)


def test_peak_memory_sees_a_large_temporary():
    memory = measure.PeakMemory("cpu").start()
    block = bytearray(64 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    del block
    if memory.reset:  # the kernel let us reset the peak: the 64 MiB show above the baseline
        assert memory.extra_bytes() >= 60 * 2**20


def test_writers_are_atomic(tmp_path):
    path = tmp_path / "a" / "r.json"
    report.write_json(path, [{"x": 1}], {"device": "cpu"})
    before = path.read_bytes()
    with pytest.raises(RuntimeError), report.atomic_file(path) as file:
        file.write("half")
        raise RuntimeError("crash inside the block")
    assert path.read_bytes() == before  # the failed write left the old file
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_results_go_to_the_untracked_runs_folder_by_default():
    assert loss_speed.parse_args([]).out == report.RUNS_ROOT / "loss_speed"
    assert report.output_folder(None, "x") == report.RUNS_ROOT / "x"


def test_environment_records_the_allocator_settings(monkeypatch):
    for name in list(os.environ):
        if name.startswith(report.ALLOCATOR_VARIABLE_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4000000000")
    monkeypatch.setenv("MALLOC_UNRELATED_IS_KEPT_TOO", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    recorded = report.capture_environment("cpu", "x")["allocator_environment"]
    assert recorded == {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_UNRELATED_IS_KEPT_TOO": "1"}

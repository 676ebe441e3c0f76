"""benchmarks/selection_speed.py on a tiny shape: every variant measured, results written."""

import functools
import json
import warnings

import torch

from benchmarks import selection_speed
from benchmarks.core import measure


def test_a_tiny_shape_gives_one_row_per_variant():
    shape = selection_speed.Shape("tiny", 4, 30, 2, 8, top_k=7)
    rows = selection_speed.measure(shape, repeats=1, warmup=0, compiled=False)
    assert [row["variant"] for row in rows] == [
        "floor",
        "streamed product",
        "select topk",
        *(f"select {p}" for p in ("fp32", "bf16", "fp16", "auto")),
        "select + kept backward",
        *(f"step {p}" for p in ("fp32", "bf16", "fp16", "auto")),
    ]
    assert all(row["ms"] > 0 for row in rows) and rows[0]["x floor"] == 1
    selections = {row["variant"]: row for row in rows if row["variant"].startswith("select")}
    assert selections["select bf16"]["screened in"] == "bfloat16"
    assert selections["select auto"]["screened in"] == "float32"  # too small to measure
    assert all(row["host syncs"] is None for row in rows)  # counted on CUDA only


def test_proxyanchor_adds_its_step_on_the_same_batch():
    shape = selection_speed.Shape("tiny", 4, 30, 2, 8, top_k=7)
    rows = selection_speed.measure(shape, repeats=1, warmup=0, compiled=False, proxyanchor=True)
    assert rows[-1]["variant"] == "step ProxyAnchor" and rows[-1]["ms"] > 0


def test_host_syncs_counts_cuda_sync_warnings_and_restores_the_mode(monkeypatch):
    """The CUDA calls stand in for a GPU: the count is of set_sync_debug_mode's warnings."""
    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step():
        for message in (measure.SYNCHRONIZING_CALL, "another warning", measure.SYNCHRONIZING_CALL):
            warnings.warn(message, stacklevel=1)

    assert measure.host_syncs(step, "cuda") == 2
    assert modes == ["warn", 0]
    assert measure.host_syncs(step, "cpu") is None


def test_compile_adds_the_compiled_step(monkeypatch):
    """Inductor takes tens of seconds to compile: the eager backend stands in for it."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    shape = selection_speed.Shape("tiny", 4, 30, 2, 8, top_k=7)
    rows = selection_speed.measure(shape, repeats=1, warmup=1, compiled=True)
    assert rows[-1]["variant"] == "step fp32 compiled" and rows[-1]["ms"] > 0


def test_main_writes_the_results(tmp_path, monkeypatch):
    monkeypatch.setattr(selection_speed, "SHAPES", (selection_speed.Shape("tiny", 4, 30, 2, 8),))
    selection_speed.main(["--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "selection_speed.json").read_text())
    assert len(results["rows"]) == 12 and "load_average_at_end" in results["environment"]
    assert "Compare ratios within one run only" in (tmp_path / "selection_speed.md").read_text()

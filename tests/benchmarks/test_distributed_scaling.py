"""benchmarks/distributed_scaling.py on a tiny grid: 2 spawned gloo ranks, a few seconds."""

from __future__ import annotations

import json

import pytest

from benchmarks import distributed_scaling


@pytest.mark.slow
def test_tiny_grid_writes_one_row_per_mode(tmp_path):
    argv = ["--quick", "--ranks", "2", "--classes-per-rank", "30", "--dim", "8"]
    argv += ["--batch-per-rank", "4", "--top-k", "5", "--warmup", "1", "--repeats", "1"]
    assert distributed_scaling.main([*argv, "--out", str(tmp_path)]) == 0

    stem = "distributed_scaling_cpu_quick"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.md"]
    rows = json.loads((tmp_path / f"{stem}.json").read_text())["rows"]
    # "single" runs at one rank only; the proxies per rank show what each mode holds.
    assert [(row["mode"], row["status"]) for row in rows] == [
        ("data_parallel", "ok"),
        ("sharded", "ok"),
    ]
    assert [row["proxies_per_rank"] for row in rows] == [60, 30]
    assert all(row["classes"] == 60 and len(row["per_rank"]) == 2 for row in rows)
    assert all(row["step_ms"] > 0 and row["peak_extra_mib"] >= 0 for row in rows)
    assert "| sharded | 2 | 60 | 30 |" in (tmp_path / f"{stem}.md").read_text()

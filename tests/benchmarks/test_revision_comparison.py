"""benchmarks/revision_comparison.py against this repository's own HEAD, on a tiny case."""

import json

import pytest

from benchmarks import revision_comparison
from benchmarks.core.shapes import Shape
from pml_proxygml import ProxyGMLLoss


def test_the_revision_is_imported_beside_this_package(tmp_path):
    commit, _ = revision_comparison.resolve("HEAD")
    base = revision_comparison.load_revision(commit, tmp_path)
    assert base is not ProxyGMLLoss
    assert base.__module__.startswith(f"pml_proxygml_at_{commit[:12]}.")


def test_main_compares_head_with_the_working_tree(tmp_path, monkeypatch):
    tiny = revision_comparison.Case(Shape("tiny", 4, 30, 2, 8, top_k=7), 0.3)
    monkeypatch.setattr(revision_comparison, "CASES", (tiny,))
    revision_comparison.main(
        ["--base", "HEAD", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    )
    results = json.loads((tmp_path / "revision_comparison.json").read_text())
    (row,) = results["rows"]
    assert row["shape"] == "tiny" and row["lambda"] == 0.3
    assert row["base ms"] > 0 and row["working tree ms"] > 0
    # The working tree is HEAD, or a change to it that keeps the results.
    assert max(row[key] for key in row if key.startswith("rel. diff")) < 1e-5
    assert len(results["environment"]["base_commit"]) == 40


def test_an_unknown_revision_is_one_line_error():
    with pytest.raises(SystemExit, match=r"^error: --base no-such-revision: not a commit"):
        revision_comparison.main(["--base", "no-such-revision"])

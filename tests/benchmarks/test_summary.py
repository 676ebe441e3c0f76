"""The summary's per-second rows, paired differences, columns and compute, on made-up runs."""

import json

import pytest

from benchmarks.core import summary

KEY = summary.KEY_METRIC


def run(recalls, seconds_per_epoch):
    """One run's rows: Recall@1 per epoch, a constant epoch time."""
    return [
        {
            "epoch": epoch,
            "train_seconds": seconds_per_epoch,
            "cumulative_seconds": epoch * seconds_per_epoch,
            "eval_seconds": 1.0,
            "load_average": 1.5,
            KEY: recall,
        }
        for epoch, recall in enumerate(recalls, start=1)
    ]


RUNS = {
    # final Recall@1 0.5 (mean of 0.48 and 0.52); 4 epochs of 10 s
    "proxyanchor": [run([0.2, 0.3, 0.4, 0.48], 10.0), run([0.2, 0.3, 0.45, 0.52], 10.0)],
    # mean curve 0.35, 0.5, 0.55, 0.6: reaches 0.5 after 2 epochs of 12 s
    "proxygml_cached": [run([0.3, 0.5, 0.55, 0.6], 12.0), run([0.4, 0.5, 0.55, 0.6], 12.0)],
    # never reaches 0.5
    "proxynca": [run([0.1, 0.2, 0.3, 0.4], 8.0), run([0.1, 0.2, 0.3, 0.4], 8.0)],
}


def test_per_second_reads_the_mean_curves_against_the_reference():
    rows = {row["loss"]: row for row in summary.per_second(RUNS)}
    assert rows["proxygml_cached"]["seconds_to_reference_recall"] == pytest.approx(24.0)
    assert rows["proxygml_cached"]["x_reference_total"] == pytest.approx(24.0 / 40.0)
    assert rows["proxygml_cached"]["x_reference_epoch"] == pytest.approx(1.2)
    assert rows["proxyanchor"]["seconds_to_reference_recall"] == pytest.approx(40.0)
    assert rows["proxynca"]["seconds_to_reference_recall"] is None
    assert rows["proxynca"]["x_reference_total"] is None
    text = summary.per_second_text(summary.per_second(RUNS), "proxyanchor")
    assert "s to R@1 0.500" in text and "x ProxyAnchor total s" in text


def test_no_per_second_section_without_the_reference_loss():
    runs = {name: seeds for name, seeds in RUNS.items() if name != "proxyanchor"}
    assert summary.per_second(runs) == []
    assert summary.per_second_text([], "proxyanchor") == ""


def summary_json(finals):
    """A summary.json with only what the paired comparison reads: {(loss, seed): R@1}."""
    return {
        "dataset": {"title": "tiny"},
        "recipe": {"name": "tiny_recipe"},
        "losses": {loss: {} for loss, _ in finals},
        "runs": [
            {"loss": loss, "seed": seed, "final": {KEY: value}}
            for (loss, seed), value in finals.items()
        ],
    }


def test_paired_differences_match_seeds_and_skip_unpaired_ones(tmp_path):
    saved = summary_json(
        {
            ("proxyanchor", 0): 0.50,
            ("proxyanchor", 1): 0.52,
            ("proxygml", 0): 0.55,
            ("proxygml", 1): 0.53,
            ("proxygml", 2): 0.90,  # no ProxyAnchor run with seed 2: not paired
        }
    )
    differences = summary.paired_differences(saved, "proxygml", "proxyanchor")
    assert differences == pytest.approx([0.05, 0.01])
    (row,) = summary.paired_rows(saved, tmp_path / "summary.json")
    assert row["seeds"] == 2
    assert row["Δ R@1"] == "0.030 ± 0.028"  # mean 0.03, sample std 0.04 / sqrt(2)
    assert "Δ MAP@R" not in row  # not evaluated in these runs
    assert summary.paired_rows(summary_json({("proxygml", 0): 0.5}), tmp_path) == []


def test_across_datasets_puts_every_recipe_in_a_column_and_raw_pixels_last():
    first = summary_json({("proxyanchor", 0): 0.50, ("proxyanchor", 1): 0.52})
    first["raw_pixels"] = {KEY: 0.25, "mean_average_precision_at_r": 0.05}
    second = summary_json({("proxygml", 0): 0.9, ("proxyanchor", 0): 0.8})
    second["recipe"]["name"] = "other_recipe"
    rows, columns = summary.across_datasets([first, second])
    assert columns == {
        "loss": "Loss",
        "tiny_recipe": "tiny (`tiny_recipe`)",
        "other_recipe": "tiny (`other_recipe`)",
    }
    assert rows == [
        # mean 51.0, sample std 1.41; MAP@R not evaluated in these runs
        {"loss": "ProxyAnchor", "tiny_recipe": "51.0 ± 1.4 / —", "other_recipe": "80.0 / —"},
        {"loss": "ProxyGML", "other_recipe": "90.0 / —"},
        {"loss": "Raw pixels (no training)", "tiny_recipe": "25.0 / 5.0"},
    ]


def test_compute_sums_every_recorded_epoch_per_results_folder(tmp_path):
    def save(relative, rows, plan=True):
        path = tmp_path / relative / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"rows": rows, **({"plan": {}} if plan else {})}))

    # a comparison: two runs, 4 epochs each (one of 10 s, one of 12 s), 1 s evaluations
    save("cmp/runs/proxyanchor/seed0", run([0.1] * 4, 10.0))
    save("cmp/runs/proxygml/seed0", run([0.1] * 4, 12.0))
    # a tuning trial, interrupted after 2 epochs of 3600 s, one evaluated
    trial = run([0.1, 0.2], 3600.0)
    trial[0]["eval_seconds"] = None
    save("cmp_tuning/space/trial0/runs/proxygml/seed0", trial)
    save("speed", [{"seconds": 99.0}], plan=False)  # another benchmark's results: not runs
    rows = summary.compute_rows(tmp_path)
    assert [row["results"] for row in rows] == ["`cmp`", "`cmp_tuning`", "all"]
    assert rows[0] == {
        "results": "`cmp`",
        "runs": 2,
        "epochs": 8,
        "training h": f"{88 / 3600:.2f}",
        "evaluation h": f"{8 / 3600:.2f}",
        "total h": f"{96 / 3600:.2f}",
    }
    assert rows[1]["training h"] == "2.00" and rows[1]["evaluation h"] == "0.00"
    assert rows[2]["runs"] == 3 and rows[2]["epochs"] == 10
    assert rows[2]["total h"] == f"{(7200 + 96 + 1) / 3600:.2f}"

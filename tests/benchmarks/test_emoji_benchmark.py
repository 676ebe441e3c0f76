"""The emoji comparison CLI end to end on a tiny fake dataset, and its summary arithmetic."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from pytorch_metric_learning import regularizers

from benchmarks import emoji, training
from benchmarks.datasets import emoji as emoji_data

from .test_training import write_fake_emoji

LOSSES = ("proxygml", "proxyanchor")
SEEDS = 2


def cli(data: Path, out: Path) -> list[str]:
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--losses",
        *LOSSES,
        "--seeds",
        str(SEEDS),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--embedding-size",
        "8",
        "--device",
        "cpu",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_emoji(tmp_path_factory.mktemp("emoji"))


@pytest.fixture(scope="module")
def out(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results")
    with warnings.catch_warnings():
        # 4 training classes are too few for ProxyGML's default r; the mechanics are tested.
        warnings.filterwarnings("ignore", message="ProxyGMLLoss:")
        emoji.main(cli(data, out))
    return out


def test_cli_writes_every_output(out: Path) -> None:
    for name in ("summary.md", "summary.json", "recall_vs_epoch.png", "recall_vs_seconds.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "retrieval_proxygml.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "checkpoints" / ".gitignore").read_text() == "*\n"
    for loss in LOSSES:
        for seed in range(SEEDS):
            run = out / "runs" / loss / f"seed{seed}"
            saved = json.loads((run / training.RESULTS_JSON).read_text())
            assert saved["run"]["loss"] == loss and saved["run"]["seed"] == seed
            assert saved["finished"] is True
            assert saved["recipe"]["seed"] == seed
            # Each loss's own proxy rule on top of the shared backbone lr.
            assert saved["recipe"]["loss"]["lr"] == pytest.approx(
                emoji.BACKBONE_LR * emoji.LOSSES[loss].lr_multiplier
            )
            (row,) = saved["rows"]
            assert all(0 <= row[m] <= 1 for m in training.METRICS)
            assert (run / training.RESULTS_CSV).is_file()
            assert (out / "checkpoints" / f"{loss}_seed{seed}.pt").is_file()


def test_summary_files(out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert "--losses proxygml proxyanchor" in summary["environment"]["command"]
    assert summary["settings"]["seeds"] == SEEDS
    assert set(summary["losses"]) == set(LOSSES)
    assert [row["loss"] for row in summary["rows"]] == list(LOSSES)
    for row in summary["rows"]:
        assert row["seeds"] == SEEDS and row["epochs"] == 1
        for metric in training.METRICS:
            assert 0 <= row[f"{metric}_mean"] <= 1
            assert row[f"{metric}_std"] >= 0
        assert row["seconds_per_epoch"] > 0
    text = (out / "summary.md").read_text()
    for heading in ("## Per-loss recipes", "## Tuning", "## ProxyGML regulariser cost"):
        assert heading in text
    assert "| ProxyGML | 2 | 1 |" in text and "| ProxyAnchor | 2 | 1 |" in text


def test_rerun_skips_finished_runs(
    data: Path, out: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = sorted((out / "checkpoints").glob("*.pt"))
    before = [p.stat().st_mtime_ns for p in checkpoints]
    with caplog.at_level(logging.INFO, logger=training.LOGGER.name):
        emoji.main(cli(data, out))
    assert [p.stat().st_mtime_ns for p in checkpoints] == before
    assert sum("finished (1 epochs), skipped" in m for m in caplog.messages) == 4
    printed = capsys.readouterr().out
    assert "| Loss | seeds | epochs | R@1 |" in printed


def test_missing_dataset_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []

    def fake_build(out: Path) -> None:
        built.append(out)
        write_fake_emoji(out)

    monkeypatch.setattr(emoji_data, "build_dataset", fake_build)
    assert emoji.ensure_dataset(tmp_path) == tmp_path
    assert emoji.ensure_dataset(tmp_path) == tmp_path
    assert built == [tmp_path]


def test_aggregate_mean_and_sample_std() -> None:
    def rows(recall: float, seconds: tuple[float, float]) -> list[dict[str, float]]:
        base = {m: 0.5 for m in training.METRICS}
        return [
            {**base, "epoch": 1, "train_seconds": seconds[0], "eval_seconds": 1.0},
            {
                **base,
                "recall_at_1": recall,
                "epoch": 2,
                "train_seconds": seconds[1],
                "eval_seconds": 3.0,
                "cumulative_seconds": sum(seconds),
                "load_average": recall * 10,
            },
        ]

    three = [rows(0.5, (1, 3)), rows(0.6, (2, 4)), rows(0.7, (3, 5))]
    (row, single) = emoji.aggregate({"proxygml": three, "proxyanchor": [rows(0.4, (1, 1))]})
    assert row["loss"] == "proxygml" and row["seeds"] == 3 and row["epochs"] == 2
    assert row["recall_at_1_mean"] == pytest.approx(0.6)
    assert row["recall_at_1_std"] == pytest.approx(0.1)  # sample std, ddof=1
    assert row["NMI_mean"] == 0.5 and row["NMI_std"] == 0
    assert row["seconds_per_epoch"] == pytest.approx(3.0)  # mean of 1..5 over seeds, epochs
    assert row["eval_seconds_per_epoch"] == pytest.approx(2.0)
    assert row["train_seconds"] == pytest.approx(6.0)  # mean of 4, 6, 8
    assert row["max_load_average"] == pytest.approx(7.0)  # rows without one are left out
    assert single["recall_at_1_std"] is None
    table = emoji.summary_table([row, single])
    assert "| ProxyGML | 3 | 2 | 0.600 ± 0.100 |" in table
    assert "| ProxyAnchor | 1 | 2 | 0.400 |" in table


def test_block_sparse_centers_regularizer_matches_the_official_formula() -> None:
    classes, k, dim = 5, 4, 16
    weights = torch.randn(
        classes * k, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    ours = emoji.BlockSparseCentersRegularizer(classes, k)(weights)
    unit = torch.nn.functional.normalize(weights, dim=1).view(classes, k, dim)
    pairs = [
        torch.sqrt(2 + 1e-5 - 2 * unit[c, i] @ unit[c, j])
        for c in range(classes)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    official = torch.stack(pairs).sum() / (classes * k * (k - 1))
    assert ours.item() == pytest.approx(official.item(), rel=1e-12)
    # PML's dense version differs only by its epsilon inside the square root.
    pml = regularizers.SparseCentersRegularizer(classes, k)(weights)
    assert ours.item() == pytest.approx(pml.item(), abs=1e-5)


def test_recipe_rules() -> None:
    assert emoji.default_milestones(30) == (12, 24)
    assert emoji.default_milestones(10) == (4, 8)
    assert emoji.default_milestones(1) == ()
    recipe = emoji.make_recipe("proxygml", lr=1e-4, epochs=50, batch_size=32, seed=1)
    # The official ProxyGML numbers: proxies at 0.03 with Adam eps 0.01, decay after 20 and 40.
    assert recipe.loss.lr == pytest.approx(0.03) and recipe.loss.eps == 0.01
    assert recipe.milestones == (20, 40) and recipe.seed == 1
    args = emoji.parse_args(["--quick"])
    assert (args.losses, args.seeds, args.epochs) == (
        list(emoji.QUICK_LOSSES),
        1,
        emoji.QUICK_EPOCHS,
    )
    assert args.out == emoji.QUICK_OUT
    args = emoji.parse_args([])
    assert (args.losses, args.seeds, args.out) == (
        list(emoji.LOSSES),
        emoji.SEEDS,
        emoji.DEFAULT_OUT,
    )


def test_tune_uses_held_out_train_classes(tmp_path: Path) -> None:
    data = write_fake_emoji(tmp_path / "data", classes=16)
    out = tmp_path / "out"
    args = cli(data, out)
    args[args.index("--seeds") : args.index("--seeds") + 2] = [
        "--tune",
        "--tune-lrs",
        "1e-3",
        "1e-2",
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ProxyGMLLoss:")
        emoji.main(args)
    saved = json.loads((out / "tuning" / "tuning.json").read_text())
    mean = saved["rows"][-1]
    assert mean["loss"] == "mean"
    assert saved["best_lr"] == max((1e-3, 1e-2), key=lambda lr: mean[f"{lr:g}"])
    # 8 train classes: 2 held out for validation, 6 trained on; the test classes are untouched.
    run = json.loads(
        (out / "tuning" / "runs" / "lr0.001" / "proxyanchor" / training.RESULTS_JSON).read_text()
    )
    assert training.load_checkpoint(out / "tuning" / "checkpoints" / "lr0.001_proxyanchor.pt")[
        "loss"
    ]["proxies"].shape == (6, 8)
    assert run["finished"] is True
    assert "Best mean: lr" in (out / "tuning" / "tuning.md").read_text()

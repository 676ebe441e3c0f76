"""``python -m benchmarks.run`` end to end on tiny fake data: the emoji comparison, the user's
own image folder, the paper recipes (one harness call per run, resume), errors, --show and
--table."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import run
from benchmarks.core import harness, models, recipes, report
from benchmarks.core.datasets import emoji, open_splits, paper
from benchmarks.core.datasets.common import ImageDataset
from benchmarks.core.errors import DataError

from .fakes import TINY_EMOJI, TINY_FOLDER, TINY_PAPER, write_fake_emoji, write_image_folder

LOSSES = ("proxygml", "proxyanchor")
SEEDS = (0, 1)


def emoji_command(data: Path, out: Path) -> list[str]:
    return [
        *("--recipe", "emoji", "--data-root", str(data), "--out", str(out)),
        *("--loss", *LOSSES, "--seeds", *map(str, SEEDS), "--epochs", "1", "--device", "cpu"),
        *("--set", *TINY_EMOJI),
    ]


@pytest.fixture(scope="module")
def emoji_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The fake emoji data and the results folder of one run on it."""
    data = write_fake_emoji(tmp_path_factory.mktemp("emoji"))
    out = tmp_path_factory.mktemp("results")
    assert run.main(emoji_command(data, out)) == 0
    return data, out


@pytest.fixture(scope="module")
def emoji_out(emoji_run: tuple[Path, Path]) -> Path:
    return emoji_run[1]


def strings(value: Any) -> list[str]:
    """Every string inside a JSON value."""
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in [key, *strings(item)]]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


# ----------------------------------------------------------------------------- emoji


def test_emoji_run_writes_every_output(emoji_out: Path) -> None:
    for name in ("summary.md", "summary.json", "recall_vs_epoch.png", "recall_vs_seconds.png"):
        assert (emoji_out / name).stat().st_size > 0, name
    assert (emoji_out / "retrieval_proxygml.png").read_bytes().startswith(b"\x89PNG")
    assert (emoji_out / "checkpoints" / ".gitignore").read_text() == "*\n"
    assert json.loads((emoji_out / "recipe.json").read_text())["train"]["epochs"] == 1
    assert "proxygml seed 1 epoch 1/1" in (emoji_out / "run.log").read_text()
    for loss in LOSSES:
        for seed in SEEDS:
            saved = json.loads(
                (emoji_out / "runs" / loss / f"seed{seed}" / "results.json").read_text()
            )
            assert saved["run"]["loss"] == loss and saved["run"]["seed"] == seed
            assert saved["finished"] is True and saved["plan"]["seed"] == seed
            # Each loss's own proxy optimizer (the emoji recipe: ProxyGML x300, ProxyAnchor
            # AdamW x100 on the shared backbone lr of 1e-3).
            expected = {"proxygml": ("adam", 0.3), "proxyanchor": ("adamw", 0.1)}[loss]
            optimizer = saved["plan"]["loss_optimizer"]
            assert (optimizer["name"], optimizer["lr"]) == expected
            (row,) = saved["rows"]
            assert all(
                0 <= row[m] <= 1 for m in ("recall_at_1", "NMI", "mean_average_precision_at_r")
            )
            assert (emoji_out / "checkpoints" / f"{loss}_seed{seed}.pt").is_file()


def test_summary_names_its_dataset_and_holds_relative_paths(emoji_out: Path) -> None:
    summary = json.loads((emoji_out / "summary.json").read_text())
    assert summary["dataset"]["title"] == "Emoji" and summary["dataset"]["name"] == "emoji"
    assert summary["dataset"]["train"] == {"classes": 4, "images": 12}
    assert summary["settings"]["seeds"] == list(SEEDS)
    assert summary["settings"]["data"] == summary["dataset"]["root"]
    assert "--loss proxygml proxyanchor" in summary["environment"]["command"]
    assert [row["loss"] for row in summary["rows"]] == list(LOSSES)
    assert [(r["loss"], r["seed"]) for r in summary["runs"]] == [
        (loss, seed) for loss in LOSSES for seed in SEEDS
    ]
    for row in summary["rows"]:
        assert row["seeds"] == 2 and row["epochs"] == 1
        assert 0 <= row["recall_at_1_mean"] <= 1 and row["recall_at_1_std"] >= 0
    for path in [emoji_out / "summary.json", *emoji_out.glob("runs/*/*/results.json")]:
        absolute = [s for s in strings(json.loads(path.read_text())) if s.startswith("/")]
        assert absolute == [], path
    text = (emoji_out / "summary.md").read_text()
    assert text.startswith("# Emoji retrieval: ProxyGML vs ProxyAnchor")
    for heading in ("## Setup", "## Per-loss recipes", "## ProxyGML regulariser cost"):
        assert heading in text
    assert "| ProxyGML | 2 | 1 |" in text and "| ProxyAnchor | 2 | 1 |" in text
    assert re.search(r"(?<![.\w])/tmp/", text) is None  # relative paths only


def test_summary_ends_with_the_raw_pixel_floor(emoji_run: tuple[Path, Path]) -> None:
    """The untrained row: Recall@K of the test images' own normalised pixels, as the run sees
    them, checked against a brute-force cosine nearest-neighbour search."""
    data, out = emoji_run
    summary = json.loads((out / "summary.json").read_text())
    recipe = recipes.load_recipe("emoji", TINY_EMOJI)
    pixels = models.BACKBONES[recipe.model.backbone].pixels
    _, test = open_splits(recipe.dataset, data).datasets(recipe.data, pixels, seed=0)
    images = torch.stack([test[i][0] for i in range(len(test))]).flatten(1).double()
    labels = torch.as_tensor(test.labels)
    unit = torch.nn.functional.normalize(images, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    neighbours = similarity.topk(8, dim=1).indices
    for k in (1, 2, 4, 8):
        found = (labels[neighbours[:, :k]] == labels[:, None]).any(dim=1).double().mean()
        assert summary["raw_pixels"][f"recall_at_{k}"] == pytest.approx(found.item()), k
    text = (out / "summary.md").read_text()
    floor = summary["raw_pixels"]["recall_at_1"]
    assert f"| Raw pixels (no training) |  | 0 | {floor:.3f} |" in text


def test_committed_results_hold_relative_paths_only() -> None:
    files = sorted((report.REPO_ROOT / "benchmarks" / "results").rglob("*.json"))
    assert files
    for path in files:
        absolute = [s for s in strings(json.loads(path.read_text())) if s.startswith("/")]
        assert absolute == [], path


def test_rerun_skips_finished_runs(
    emoji_run: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    emoji_data, emoji_out = emoji_run
    checkpoints = sorted((emoji_out / "checkpoints").glob("*.pt"))
    before = [p.stat().st_mtime_ns for p in checkpoints]
    with caplog.at_level(logging.INFO, logger=harness.LOGGER.name):
        run.main(emoji_command(emoji_data, emoji_out))
    assert [p.stat().st_mtime_ns for p in checkpoints] == before
    assert sum("finished (1 epochs), skipped" in m for m in caplog.messages) == 4


def test_emoji_data_root_without_a_build_never_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a mistyped --data-root must not start a build")

    monkeypatch.setattr(emoji, "build_dataset", no_build)
    with pytest.raises(SystemExit, match=r"no emoji dataset in .*build_dataset emoji --out"):
        run.main(["--recipe", "emoji_quick", "--data-root", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()


def test_emoji_default_cache_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []

    def fake_build(out: Path) -> None:
        built.append(out)
        write_fake_emoji(out)

    monkeypatch.setattr(emoji, "DEFAULT_CACHE", tmp_path / "cache")
    monkeypatch.setattr(emoji, "build_dataset", fake_build)
    for _ in range(2):
        assert emoji.open_splits(None, None).train.num_classes == 4
    assert built == [tmp_path / "cache"]


# ----------------------------------------------------------------------------- folder


def test_folder_recipe_trains_on_an_image_folder(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "my_pictures", classes=10, per_class=6)
    out = tmp_path / "out"
    command = ["--recipe", "folder", "--data-root", str(data), "--out", str(out)]
    assert run.main([*command, "--epochs", "1", "--set", *TINY_FOLDER]) == 0
    for loss in LOSSES:
        saved = json.loads((out / "runs" / loss / "seed0" / "results.json").read_text())
        assert 0 <= saved["rows"][-1]["recall_at_1"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["title"] == "my_pictures"
    assert summary["dataset"]["train"] == {"classes": 5, "images": 30}
    assert summary["dataset"]["test"] == {"classes": 5, "images": 30}
    assert (out / "summary.md").read_text().startswith("# my_pictures retrieval:")


def test_folder_with_train_and_test_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "data" / "train", classes=3, per_class=4)
    write_image_folder(tmp_path / "data" / "test", classes=2, per_class=3)
    out = tmp_path / "out"
    run.main(
        [
            *("--recipe", "folder", "--data-root", str(tmp_path / "data"), "--out", str(out)),
            *("--loss", "proxyanchor", "--epochs", "1", "--set", *TINY_FOLDER),
        ]
    )
    dataset = json.loads((out / "summary.json").read_text())["dataset"]
    assert dataset["train"] == {"classes": 3, "images": 12}
    assert dataset["test"] == {"classes": 2, "images": 6}


def test_missing_data_root_is_a_one_line_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.run", "--recipe", "folder"),
            *("--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")),
        ],
        capture_output=True,
        text=True,
        cwd=report.REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(report.REPO_ROOT)},
        timeout=120,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: data root ") and line.endswith("nowhere is not a folder")
    assert not (tmp_path / "out").exists()  # a failed start leaves no run folder


def _empty_class(root: Path) -> None:
    write_image_folder(root, classes=3, per_class=2)
    (root / "class_01" / "0.png").unlink()
    (root / "class_01" / "1.png").rename(root / "class_01" / "notes.txt")


def _unreadable_image(root: Path) -> None:
    write_image_folder(root, classes=3, per_class=2)
    (root / "class_02" / "1.png").write_bytes(b"not a png")


def _truncated_image(root: Path) -> None:
    write_image_folder(root, classes=3, per_class=2)
    path = root / "class_00" / "0.png"
    path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda root: root.mkdir(), "has no class folders"),
        (_empty_class, "class folder .*class_01 has no images"),
        (_unreadable_image, r"class_02/1\.png is not a readable image"),
        (_truncated_image, r"class_00/0\.png is not a readable image"),
        (lambda root: write_image_folder(root, classes=1), "has one class"),
    ],
)
def test_folder_errors_name_the_problem(tmp_path: Path, prepare: Any, message: str) -> None:
    prepare(tmp_path / "data")
    with pytest.raises(SystemExit, match=f"^error: .*{message}"):
        run.main(["--recipe", "folder", "--data-root", str(tmp_path / "data")])


def test_folder_needs_a_data_root() -> None:
    with pytest.raises(SystemExit, match="the folder recipe needs --data-root DIR"):
        run.main(["--recipe", "folder"])


def test_an_image_broken_after_the_scan_is_a_data_error(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", classes=4, per_class=2)
    source = open_splits(recipes.load_recipe("folder").dataset, data).train
    source.paths[0].write_bytes(b"gone bad")
    with pytest.raises(DataError, match=r"cannot read image .*\.png"):
        source.image(0)


# ----------------------------------------------------------------------------- paper


def paper_command(dataset: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--recipe", f"{dataset}_64", "--loss", "proxygml", "--data-root", str(data)),
        *("--out", str(out), "--epochs", "4", "--device", "cpu", *extra),
        *("--set", *TINY_PAPER, "train.milestones=2", "train.eval_epochs=1,4"),
        *("train.frozen_trunk_epochs=2", "losses.proxygml.settings.r=0.5"),
    ]


def trunk_parameters(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    state = checkpoint["models"]["trunk"]
    return {k: v for k, v in state.items() if "running" not in k and "batches" not in k}


def numbers(row: dict[str, Any]) -> dict[str, Any]:
    """A results row without its timings (which differ between any two runs)."""
    timings = {"train_seconds", "cumulative_seconds", "eval_seconds", "load_average"}
    return {k: v for k, v in row.items() if k not in timings}


@pytest.mark.parametrize("dataset", ["cub", "cars", "sop"])
def test_paper_recipe_trains_a_whole_run_in_one_harness_call(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = paper.write_fake_dataset(dataset, tmp_path / "data")
    calls = []
    train_and_evaluate = harness.train_and_evaluate

    def counted(*args: Any, **kwargs: Any) -> harness.RunResult:
        calls.append(args[5])  # the plan
        return train_and_evaluate(*args, **kwargs)

    monkeypatch.setattr(harness, "train_and_evaluate", counted)
    extra = ("--set", "model.amp=bf16") if dataset == "cars" else ()
    run.main(paper_command(dataset, data, tmp_path / "out", *extra))
    (plan,) = calls
    assert (plan.epochs, plan.eval_epochs, plan.frozen_trunk_epochs) == (4, (1, 4), (2,))
    rows = json.loads((tmp_path / "out/runs/proxygml/seed0/results.json").read_text())["rows"]
    assert [row["epoch"] for row in rows if "recall_at_1" in row] == [1, 4]
    ks = (1, 10, 100, 1000) if dataset == "sop" else (1, 2, 4, 8)
    metrics = {f"recall_at_{k}" for k in ks} | {"NMI", "precision_at_1", "r_precision"}
    assert metrics <= rows[-1].keys()
    checkpoint = harness.load_checkpoint(tmp_path / "out/checkpoints/proxygml_seed0.pt")
    bn_mean = checkpoint["models"]["trunk"]["features.1.running_mean"]
    assert torch.equal(bn_mean, torch.zeros(8)) == (dataset != "sop")  # frozen BN but on SOP
    assert checkpoint["schedulers"]["trunk_scheduler_by_epoch"]["last_epoch"] == 4


class Interrupted(Exception):
    """Stands for a crash in the middle of an epoch."""


def test_resumed_paper_run_ends_as_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = paper.write_fake_dataset("cub", tmp_path / "data")
    run.main(paper_command("cub", data, tmp_path / "straight"))
    straight = harness.load_checkpoint(tmp_path / "straight/checkpoints/proxygml_seed0.pt")

    training_reads = []
    getitem = ImageDataset.__getitem__

    def crash_in_epoch_3(self: ImageDataset, index: int) -> tuple[torch.Tensor, int]:
        if self.crop.__class__.__name__ == "RandomResizedCrop":
            training_reads.append(index)
            if len(training_reads) == 2 * 12 + 5:  # 12 training images a epoch
                raise Interrupted
        return getitem(self, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", crash_in_epoch_3)
    with pytest.raises(Interrupted):
        run.main(paper_command("cub", data, tmp_path / "resumed"))
    monkeypatch.setattr(ImageDataset, "__getitem__", getitem)
    saved = harness.load_checkpoint(tmp_path / "resumed/checkpoints/proxygml_seed0.pt")
    assert saved["epoch"] == 2
    run.main(paper_command("cub", data, tmp_path / "resumed"))
    resumed = harness.load_checkpoint(tmp_path / "resumed/checkpoints/proxygml_seed0.pt")
    assert [numbers(r) for r in resumed["rows"]] == [numbers(r) for r in straight["rows"]]
    for model in ("trunk", "embedder"):
        for key, value in straight["models"][model].items():
            assert torch.equal(resumed["models"][model][key], value), key
    assert torch.equal(resumed["loss"]["proxies"], straight["loss"]["proxies"])
    assert not all(
        torch.equal(a, b)
        for a, b in zip(trunk_parameters(saved).values(), trunk_parameters(resumed).values())
    )


def test_proxyanchor_paper_recipe_runs(tmp_path: Path) -> None:
    data = paper.write_fake_dataset("cub", tmp_path / "data")
    run.main(
        [
            *("--recipe", "proxyanchor_cub_512", "--data-root", str(data)),
            *("--out", str(tmp_path / "out"), "--epochs", "2", "--set", *TINY_PAPER),
        ]
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (entry,) = summary["runs"]
    assert (entry["loss"], entry["seed"]) == ("proxyanchor", 1)  # its code's seed
    assert [e["epoch"] for e in entry["evaluations"]] == [1, 2]  # every epoch, as its code


def test_paper_dataset_missing_names_the_layout(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"Ebay_train\.txt.*--download"):
        run.main(
            ["--recipe", "sop_512", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]
        )
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- modes


def test_throughput_on_random_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run.main(
        [
            *("--recipe", "cub_512", "--throughput", "2", "--out", str(tmp_path)),
            *("--device", "cpu", "--set", *TINY_PAPER),
        ]
    )
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert [row["loss"] for row in saved["rows"]] == ["proxygml", "proxyanchor"]
    for row in saved["rows"]:
        assert row["images_per_second"] > 0 and row["batch_size"] == 4
        assert row["classes"] == 100 and row["image_size"] == 16
    assert "| proxygml | 4 | 16 | 100 |" in capsys.readouterr().out


def test_help_lists_the_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        run.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for name in ("emoji", "emoji_quick", "folder", "cub_512", "sop_64", "proxyanchor_cars_512"):
        assert f"\n  {name} " in text


def test_show_prints_the_resolved_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    run.main(
        [
            *("--recipe", "emoji_quick", "--show", "--seeds", "3", "4", "--epochs", "7"),
            *("--set", "losses.proxygml.settings.r=0.1", "train.gamma=1"),
        ]
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["epochs"] == 7 and shown["train"]["seeds"] == [3, 4]
    assert shown["train"]["gamma"] == 1.0 and shown["losses"]["proxygml"]["settings"]["r"] == 0.1
    assert shown["default_losses"] == ["proxygml_cached", "proxyanchor"]
    assert set(shown["losses"]) == {
        "proxygml",
        "proxyanchor",
        "softtriple",
        "normsoftmax",
        "proxynca",
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--recipe", "cub_1024"], "no recipe 'cub_1024'; known recipes: cars_384"),
        (
            ["--recipe", "proxyanchor_cub_512", "--loss", "proxygml"],
            "no settings for loss 'proxygml'",
        ),
        (["--recipe", "emoji", "--loss", "arcface"], "unknown loss 'arcface'"),
        (["--recipe", "emoji", "--set", "train.epoch=3"], "unknown key 'epoch'"),
    ],
)
def test_bad_commands_are_one_line_errors(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=f"^error: .*{message}"):
        run.main([*argv, "--show"])


def test_table_puts_ours_beside_the_published_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = paper.write_fake_dataset("cub", tmp_path / "data")
    run.main(paper_command("cub", data, tmp_path / "runs" / "cub"))
    capsys.readouterr()
    run.main(["--table", "--out", str(tmp_path / "runs")])
    table = capsys.readouterr().out
    assert table.startswith("### CUB-200-2011")
    assert "| Method | Source | R@1 | R@2 | R@4 | R@8 | NMI | P@1 | RP | MAP@R |" in table
    assert (
        "| ProxyGML | ProxyGML paper, 64-d, BN-Inception | 59.4 | 70.1 | 80.4 | — | 65.1 |" in table
    )
    ours = next(
        line for line in table.splitlines() if "ours, recipe `cub_64`, seeds 0, 4 epochs" in line
    )
    assert ours.startswith("| ProxyGML |") and " / " in ours
    assert "| Raw pixels (no training) | cosine on the normalised " in table

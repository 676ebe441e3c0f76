"""``python -m benchmarks.tune`` on tiny fake data: the trials drawn, equal budgets, the
validation split (test classes never evaluated), the choice, ``tuned.json``, resume, and
the one-line errors of bad tuning sections."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run, tune
from benchmarks.core import harness, recipes
from benchmarks.core.errors import RecipeError

from .fakes import TINY_EMOJI, write_fake_emoji

# 16 fake emoji classes: the 8 even ones train, the 8 odd ones test. Holding out 3/8 of the
# training classes leaves 5 to train on and 3 validation classes (9 images, enough for R@8).
CLASSES = 16
TRAIN_NAMES = {f"class_{i}" for i in range(0, CLASSES, 2)}
TEST_NAMES = {f"class_{i}" for i in range(1, CLASSES, 2)}
TINY_TUNING = {
    "extends": "emoji",
    "name": "tiny",
    "tuning": {
        "validation_fraction": 0.375,
        "trials": 3,
        "epochs": 1,
        "spaces": {
            "pair": {
                "losses": ["proxygml", "proxyanchor"],
                "grid": {
                    "train.backbone_optimizer.lr": [0.0001, 0.01],
                    "data.crop_scale": [[0.5, 1.0], [1.0, 1.0]],
                },
            },
            "gml": {
                "losses": ["proxygml"],
                "grid": {
                    "losses.proxygml.settings.weight_lambda": [0.0, 0.1],
                    "losses.proxygml.optimizer.lr": [0.01, 1.0],
                },
            },
            "anchor": {
                "losses": ["proxyanchor"],
                "grid": {
                    "losses.proxyanchor.settings.margin": [0.05, 0.2],
                    "losses.proxyanchor.settings.alpha": [16, 64],
                },
            },
        },
    },
}
SPACES = ("pair", "gml", "anchor")
RUNS = 3 * 2 + 3 + 3  # (trials x losses) of the three spaces


def write_recipe(folder: Path, raw: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{raw['name']}.json"
    path.write_text(json.dumps(raw))
    return path


def tune_command(recipe: Path, data: Path, out: Path) -> list[str]:
    return [
        *("--recipe", str(recipe), "--data-root", str(data), "--out", str(out)),
        *("--space", *SPACES, "--device", "cpu", "--set", *TINY_EMOJI),
    ]


def scores(out: Path) -> list[tuple[str, int, Any]]:
    rows = json.loads((out / "tuning.json").read_text())["rows"]
    return [(row["space"], row["trial"], row["scores"]) for row in rows]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tuning of the tiny recipe, with the class names of every evaluated set."""
    root = tmp_path_factory.mktemp("tuning")
    data = write_fake_emoji(root / "data", classes=CLASSES)
    recipe = write_recipe(root / "recipes", TINY_TUNING)
    out = root / "out"
    evaluated: list[tuple[str, list[str]]] = []
    evaluate = harness.evaluate

    def recording(tester: Any, dataset: Any, name: str, *args: Any) -> dict[str, float]:
        evaluated.append((name, dataset.source.class_names))
        return evaluate(tester, dataset, name, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "evaluate", recording)
        assert tune.main(tune_command(recipe, data, out)) == 0
    saved = json.loads((out / "tuning.json").read_text())
    return {"data": data, "recipe": recipe, "out": out, "evaluated": evaluated, "saved": saved}


def test_trials_are_drawn_deterministically_and_trial_0_is_the_recipe() -> None:
    recipe = recipes.load_recipe("emoji")
    assert recipe.tuning is not None and recipe.tuning.trials == 6
    raw = recipe.to_dict()
    orders = {}
    for name, space in recipe.tuning.spaces.items():
        defaults = recipes.tuning_defaults(raw, space)
        trials = space.draw(defaults, 6, seed=0)
        assert trials == space.draw(defaults, 6, seed=0)
        assert len(trials) == 6 and list(trials[0].values()) == defaults
        assert len({json.dumps(t) for t in trials}) == 6  # without replacement
        for trial in trials[1:]:
            assert all(value in space.grid[key] for key, value in trial.items())
        orders[name] = trials
    # The emoji spaces' trial 0: the papers' defaults and the shared recipe's values.
    assert list(orders["proxygml"][0].values()) == [12, 0.05, 0.3, 0.3]
    assert list(orders["proxyanchor"][0].values()) == [0.1, 32, 0.1]
    assert orders["shared"][0]["train.backbone_optimizer.lr"] == 0.001
    assert any(
        space.draw(recipes.tuning_defaults(raw, space), 6, seed=1) != orders[name]
        for name, space in recipe.tuning.spaces.items()
    )
    # Recipes that extend emoji tune the same spaces.
    for name in ("emoji_quick", "han_glyphs", "spoken_words"):
        other = recipes.load_recipe(name).tuning
        assert other is not None and other.spaces == recipe.tuning.spaces


def test_every_space_gets_the_same_trials_and_every_loss_as_many(tuned: dict[str, Any]) -> None:
    protocol = tuned["saved"]["protocol"]
    assert protocol["trials_per_space"] == {"pair": 3, "gml": 3, "anchor": 3}
    assert protocol["trials_per_loss"] == {"proxygml": 6, "proxyanchor": 6}
    assert (protocol["seed"], protocol["epochs"], protocol["metric"]) == (0, 1, "recall_at_1")
    rows = tuned["saved"]["rows"]
    assert [(r["space"], r["trial"]) for r in rows] == [(s, i) for s in SPACES for i in range(3)]
    for row in rows:
        assert all(0 <= value <= 1 for value in row["scores"].values()), row
        assert row["error"] is None and row["seconds"] > 0
    # Trial 0 of every space is the recipe's values (TINY_EMOJI and the emoji recipe's).
    first = {row["space"]: row["settings"] for row in rows if row["trial"] == 0}
    assert first["pair"] == {"train.backbone_optimizer.lr": 0.001, "data.crop_scale": [0.8, 1.0]}
    assert first["gml"] == {
        "losses.proxygml.settings.weight_lambda": 0.3,
        "losses.proxygml.optimizer.lr": 0.3,
    }


def test_only_validation_classes_are_evaluated(tuned: dict[str, Any]) -> None:
    split = tuned["saved"]["split"]
    validation = set(split["validation_classes"])
    assert split["evaluated"] == "validation" and split["validation_fraction"] == 0.375
    assert len(validation) == 3 and split["train_classes"] == 5
    assert validation < TRAIN_NAMES and not validation & TEST_NAMES
    assert split["dataset"]["validation"] == {"classes": 3, "images": 9}
    # What the harness actually evaluated: one evaluation per run, validation classes only.
    assert len(tuned["evaluated"]) == RUNS
    for name, classes in tuned["evaluated"]:
        assert name == "validation" and set(classes) == validation
    for path in tuned["out"].glob("*/trial*/recipe.json"):
        trial = json.loads(path.read_text())
        assert trial["dataset"]["validation_fraction"] == 0.375, path
        assert (trial["train"]["seeds"], trial["train"]["epochs"]) == ([0], 1), path
    results = list(tuned["out"].glob("*/trial*/runs/*/seed0/results.json"))
    assert len(results) == RUNS
    for path in results:  # every results file names the split it was evaluated on
        run = json.loads(path.read_text())["run"]
        assert run["evaluated_split"] == "validation", path
        held = run["validation_split"]
        assert (held["fraction"], held["seed"], len(held["classes"])) == (0.375, 0, 3), path


def test_the_chosen_trial_has_the_best_score_and_later_spaces_build_on_it(
    tuned: dict[str, Any],
) -> None:
    saved, out = tuned["saved"], tuned["out"]
    chosen: dict[str, Any] = {}
    for space in SPACES:
        rows = [row for row in saved["rows"] if row["space"] == space]
        means = [sum(r["scores"].values()) / len(r["scores"]) for r in rows]
        assert [r["score"] for r in rows] == pytest.approx(means)
        best = means.index(max(means))  # the earliest of equal scores
        assert [r["chosen"] for r in rows] == [i == best for i in range(3)]
        assert saved["spaces"][space]["chosen_trial"] == best
        assert saved["spaces"][space]["on_earlier_choices"] == chosen
        # Every trial of a later space trains on the earlier spaces' choices.
        for row in rows:
            trial = recipes.Recipe.from_dict(
                json.loads((out / space / f"trial{row['trial']}" / "recipe.json").read_text())
            )
            values = {**chosen, **row["settings"]}
            assert {k: recipes.get_value(trial.to_dict(), k) for k in values} == values
        chosen.update(rows[best]["settings"])
    text = (out / "tuning.md").read_text()
    assert "## Space `gml`" in text and "| ProxyGML R@1 |" in text and "**yes**" in text


def test_the_best_trial_is_the_highest_mean_the_earliest_among_equals() -> None:
    def trial(index: int, *scores: float | None) -> tune.Trial:
        return tune.Trial("space", index, {}, dict(zip(("a", "b"), scores)), 1.0)

    trials = [trial(0, 0.5, 0.5), trial(1, 0.9, None), trial(2, 0.4, 0.8), trial(3, 0.6, 0.6)]
    assert [t.score for t in trials] == pytest.approx([0.5, None, 0.6, 0.6])
    assert tune.best_trial(trials) is trials[2]
    assert tune.best_trial(trials[:2]) is trials[0]
    assert tune.best_trial([trial(0, None, 0.5)]) is None


def test_tuned_recipe_extends_the_tuned_one_with_the_choice(
    tuned: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tuned["out"] / "tuned.json"
    raw = json.loads(path.read_text())
    assert raw["extends"] == "../recipes/tiny.json"  # relative to tuned.json's folder
    recipe = recipes.load_recipe(str(path))
    chosen = {
        key: value
        for space in SPACES
        for key, value in tuned["saved"]["spaces"][space]["chosen_settings"].items()
    }
    assert {key: recipes.get_value(recipe.to_dict(), key) for key in chosen} == chosen
    assert recipe.name == "tiny_tuned" and recipe.data.crop == 12  # --set overrides kept
    assert recipe.dataset.validation_fraction is None and recipe.train.seeds == (0, 1, 2)
    assert "tuning.md" in recipe.notes[-1]
    assert run.main(["--recipe", str(path), "--show"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny_tuned"


def test_extends_takes_a_path_relative_to_the_file_and_refuses_loops(tmp_path: Path) -> None:
    first = write_recipe(tmp_path / "a", {"extends": "../b/second.json", "name": "first"})
    write_recipe(tmp_path / "b", {"extends": "emoji", "name": "second", "train": {"epochs": 3}})
    assert recipes.load_recipe(str(first)).train.epochs == 3
    write_recipe(tmp_path / "b", {"extends": "../a/first.json", "name": "second"})
    with pytest.raises(RecipeError, match="'extends' loops through"):
        recipes.load_recipe(str(first))


def test_rerun_skips_finished_trials(
    tuned: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    out = tuned["out"]
    checkpoints = sorted(out.glob("*/trial*/checkpoints/*.pt"))
    assert len(checkpoints) == RUNS
    before = [path.stat().st_mtime_ns for path in checkpoints]
    with caplog.at_level(logging.INFO, logger=harness.LOGGER.name):
        assert tune.main(tune_command(tuned["recipe"], tuned["data"], out)) == 0
    assert [path.stat().st_mtime_ns for path in checkpoints] == before
    assert sum("finished (1 epochs), skipped" in m for m in caplog.messages) == RUNS
    assert scores(out) == [(r["space"], r["trial"], r["scores"]) for r in tuned["saved"]["rows"]]


class Interrupted(Exception):
    pass


def test_an_interrupted_tuning_resumes_with_the_same_scores(
    tuned: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    train_one, calls = run.train_one, []

    def interrupted(*args: Any, **kwargs: Any) -> harness.RunResult:
        calls.append(1)
        if len(calls) == 8:  # in space gml, after pair's six runs and gml's first
            raise Interrupted
        return train_one(*args, **kwargs)

    command = tune_command(tuned["recipe"], tuned["data"], tmp_path)
    monkeypatch.setattr(run, "train_one", interrupted)
    with pytest.raises(Interrupted):
        tune.main(command)
    assert not (tmp_path / "tuning.json").exists()
    monkeypatch.setattr(run, "train_one", train_one)
    with caplog.at_level(logging.INFO, logger=harness.LOGGER.name):
        assert tune.main(command) == 0
    assert sum("finished (1 epochs), skipped" in m for m in caplog.messages) == 7
    assert scores(tmp_path) == scores(tuned["out"])


# ----------------------------------------------------------------------------- errors


BAD_SPACES = {
    "unknown key": ({"losses": ["proxygml"], "grid": {"train.epoch": [1]}}, "unknown key 'epoch'"),
    "empty grid": ({"losses": ["proxygml"], "grid": {}}, r"bad\.grid is empty"),
    "unknown loss": ({"losses": ["arcface"], "grid": {"train.epochs": [1]}}, "unknown loss"),
    "no losses": ({"losses": [], "grid": {"train.epochs": [1]}}, r"bad\.losses is empty"),
    "no values": ({"losses": ["proxygml"], "grid": {"train.epochs": []}}, "no candidate values"),
    "other loss": (
        {"losses": ["proxyanchor"], "grid": {"losses.proxygml.settings.r": [0.1, 0.2]}},
        "tunes only the losses it scores",
    ),
    "split": ({"losses": ["proxygml"], "grid": {"dataset.split_seed": [1]}}, "fixes the split"),
    "seeds": ({"losses": ["proxygml"], "grid": {"train.seeds": [[1]]}}, "fixes the split"),
    "bad value": ({"losses": ["proxygml"], "grid": {"train.sampler": ["sorted"]}}, "sampler"),
    "bad type": ({"losses": ["proxygml"], "grid": {"train.batch_size": [3.5]}}, "expected a int"),
    "refused setting": (
        {"losses": ["proxygml_cached"], "grid": {"losses.proxygml.settings.weight_lambda": [0.0]}},
        r"weight_lambda=0\.0: losses\.proxygml_cached\.settings: .*needs weight_lambda > 0",
    ),
    "small grid": (
        {"losses": ["proxygml"], "grid": {"train.epochs": [20, 10]}},
        "1 combinations besides the recipe's own values, fewer than the 5 trials",
    ),
}


@pytest.mark.parametrize("case", BAD_SPACES)
def test_a_bad_space_is_a_one_line_recipe_error(tmp_path: Path, case: str) -> None:
    space, message = BAD_SPACES[case]
    raw = {"extends": "emoji", "name": "bad", "tuning": {"spaces": {"bad": space}}}
    path = write_recipe(tmp_path, raw)
    with pytest.raises(RecipeError, match=message) as error:
        recipes.load_recipe(str(path))
    assert "\n" not in str(error.value) and "tuning.spaces.bad" in str(error.value)


def test_a_space_scoring_a_variant_tunes_the_entry_it_takes_settings_from(tmp_path: Path) -> None:
    grid = {"losses.proxygml.settings.r": [0.02, 0.05, 0.1, 0.2, 0.3, 0.4]}
    space = {"losses": ["proxygml_cached"], "grid": grid}
    raw = {"extends": "emoji", "name": "variant", "tuning": {"spaces": {"gml": space}}}
    recipe = recipes.load_recipe(str(write_recipe(tmp_path, raw)))
    assert recipe.entry_of("proxygml_cached") == "proxygml"
    tried = recipes.load_recipe(
        str(write_recipe(tmp_path, raw)), ["losses.proxygml.settings.r=0.2"]
    )
    assert tried.loss("proxygml_cached").settings["r"] == 0.2
    assert tried.loss("proxygml_cached").settings["regularizer_estimator"] == "cached"
    # A recipe with its own entry for the variant: the base's settings no longer reach it.
    own = {**load_raw_emoji_losses(), "proxygml_cached": load_raw_emoji_losses()["proxygml"]}
    path = write_recipe(tmp_path, {**raw, "losses": own})
    with pytest.raises(RecipeError, match="tunes only the losses it scores"):
        recipes.load_recipe(str(path))


def load_raw_emoji_losses() -> dict[str, Any]:
    return recipes.load_recipe("emoji").to_dict()["losses"]


def test_bad_tuning_settings_and_flags_are_one_line_errors(tmp_path: Path) -> None:
    settings = {
        "metric": ("recall_at_3", "'recall_at_3' is not evaluated"),
        "validation_fraction": ("1.0", "must be in"),
        "trials": ("0", "must be positive"),
    }
    for key, (value, message) in settings.items():
        with pytest.raises(RecipeError, match=message):
            recipes.load_recipe("emoji", [f"tuning.{key}={value}"])
    # A tuning section of its own, without spaces (not extending emoji's).
    raw = {**recipes.load_raw("emoji"), "name": "odd", "tuning": {"trials": 2}}
    with pytest.raises(RecipeError, match=r"missing keys \['spaces'\]"):
        recipes.load_recipe(str(write_recipe(tmp_path, raw)))
    raw["tuning"] = {"spaces": {}}
    with pytest.raises(RecipeError, match="at least one space"):
        recipes.load_recipe(str(write_recipe(tmp_path, raw)))
    for argv, message in (
        (["--recipe", "cub_512"], "recipe 'cub_512' has no tuning section"),
        (["--recipe", "emoji", "--space", "nope"], "no tuning space 'nope'; it has shared"),
        (["--recipe", "emoji", "--trials", "999"], "fewer than the 998 trials"),
    ):
        with pytest.raises(SystemExit, match=message):
            tune.main([*argv, "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()

"""Tune a recipe on validation classes, the same number of trials for every space.

    python -m benchmarks.tune --recipe emoji                        # every space of the recipe
    python -m benchmarks.tune --recipe emoji --space proxygml proxyanchor --trials 4
    python -m benchmarks.run --recipe runs/emoji_tuning/tuned.json  # the choice, on test classes

The recipe's ``tuning`` section (:class:`benchmarks.core.recipes.TuningConfig`) names the
spaces, tuned in order, each on top of the earlier ones' choices. Trial 0 of a space is the
recipe's own values, the others a seeded sample of its grid without replacement, as many for
every space. A trial trains each loss the space scores with one seed on the training classes
left after holding out ``tuning.validation_fraction`` of them, and scores the mean over those
losses of the final epoch's ``tuning.metric`` on the held-out validation classes; the test
classes are never evaluated. The best trial wins (ties: the earlier one, so trial 0 keeps the
recipe's values against equals). Each run is one harness call of the runner
(:func:`benchmarks.run.train_one`), checkpointed every epoch: the same command resumes an
interrupted tuning and skips finished trials.

Outputs in ``--out`` (default ``runs/<recipe>_tuning/``, git-ignored): ``<space>/trial<i>/``
(the trial's ``recipe.json``, ``runs/`` and ``checkpoints/``, as the runner writes them),
``tuning.{json,md}`` (every trial's settings, scores and seconds, the choices, the split and
the environment), ``tuned.json`` (a recipe that extends the tuned one with the chosen values
and the ``--set`` overrides) and ``tune.log``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import run
from .core import cli, models, recipes, registry, report, summary
from .core.datasets import Splits, open_splits
from .core.errors import RecipeError

LOGGER = logging.getLogger(__name__)

TUNING_STEM = "tuning"
TUNED_FILE = "tuned.json"
LOG_FILE = "tune.log"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tune",
        description=__doc__.split("\n", 1)[0],
        parents=[cli.common_flags("out", "device", "data_root", "overrides")],
    )
    parser.add_argument(
        "--recipe", required=True, help="a recipe name or a .json file with a tuning section"
    )
    parser.add_argument(
        "--space",
        nargs="+",
        metavar="SPACE",
        help="tune only these spaces, in this order (default: all, in the recipe's order)",
    )
    parser.add_argument("--trials", type=int, help="trials per space (default: the recipe's)")
    return parser.parse_args(argv)


@dataclasses.dataclass
class Trial:
    """One trial of a space: its settings and, per loss, the final epoch's metric (None where
    the loss did not finish: ``error`` says why)."""

    space: str
    index: int
    settings: dict[str, Any]
    scores: dict[str, float | None]
    seconds: float
    error: str | None = None

    @property
    def score(self) -> float | None:
        """The mean of the losses' scores; None unless every loss finished."""
        values = list(self.scores.values())
        return None if None in values else sum(values) / len(values)


def load_tunable(args: argparse.Namespace) -> recipes.Recipe:
    """The recipe with ``--set`` and ``--trials`` applied; it must have a tuning section."""
    recipe = recipes.load_recipe(args.recipe, args.overrides)
    if recipe.tuning is None:
        raise RecipeError(f"recipe {recipe.name!r} has no tuning section (emoji's is an example)")
    if args.trials is None:
        return recipe
    return recipes.load_recipe(args.recipe, [*args.overrides, f"tuning.trials={args.trials}"])


def trial_recipe(recipe: recipes.Recipe, values: Mapping[str, Any], name: str) -> recipes.Recipe:
    """What a trial trains: ``recipe`` for the tuning's epochs with ``values`` set, one seed,
    evaluated on the validation classes."""
    tuning = recipe.tuning
    assert tuning is not None
    raw = recipe.to_dict()
    if tuning.epochs is not None:
        raw["train"]["epochs"] = tuning.epochs
    raw = recipes.apply_values(raw, values, name)
    raw["dataset"]["validation_fraction"] = tuning.validation_fraction
    raw["train"]["seeds"] = [tuning.seed]
    return recipes.Recipe.from_dict({**raw, "name": name, "tuning": None})


def train_trial(
    recipe: recipes.Recipe,
    space: str,
    index: int,
    settings: dict[str, Any],
    chosen: Mapping[str, Any],
    splits: Splits,
    out: Path,
    device: str,
    environment: Mapping[str, Any],
) -> Trial:
    """Train (or resume, or skip) every loss of one trial, on the earlier spaces' ``chosen``
    values, in ``<out>/<space>/trial<index>/``."""
    assert recipe.tuning is not None
    folder = out / space / f"trial{index}"
    trial = trial_recipe(recipe, {**chosen, **settings}, f"{recipe.name}/{space}/trial{index}")
    LOGGER.info("%s: %s", trial.name, json.dumps(settings))
    folder.mkdir(parents=True, exist_ok=True)
    report.write_text(folder / run.RECIPE_FILE, json.dumps(trial.to_dict(), indent=2) + "\n")
    seed = trial.train.seeds[0]
    datasets = splits.datasets(trial.data, models.BACKBONES[trial.model.backbone].pixels, seed)
    scores: dict[str, float | None] = dict.fromkeys(recipe.tuning.spaces[space].losses)
    seconds = 0.0
    for loss in scores:
        try:
            result = run.train_one(trial, loss, seed, splits, datasets, folder, device, environment)
        except FloatingPointError as error:  # a diverging trial loses; the others go on
            LOGGER.warning("%s: %s", trial.name, error)
            return Trial(space, index, settings, scores, seconds, str(error))
        scores[loss] = result.final[recipe.tuning.metric]
        seconds += result.final["cumulative_seconds"]
    return Trial(space, index, settings, scores, seconds)


def best_trial(trials: Sequence[Trial]) -> Trial | None:
    """The highest score, the earliest trial among equals; None when no trial finished."""
    scored = [trial for trial in trials if trial.score is not None]
    return max(scored, key=lambda trial: trial.score, default=None)


def names_hash(names: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()


def split_record(splits: Splits) -> dict[str, Any]:
    """The validation split every trial used, and what shows the test classes stayed out."""
    validation = splits.info["validation_split"]
    return {
        "evaluated": splits.eval_name,
        "dataset": splits.describe(),
        "validation_fraction": validation["fraction"],
        "split_seed": validation["seed"],
        "validation_classes": splits.eval.class_names,
        "validation_classes_sha256": names_hash(splits.eval.class_names),
        "train_classes": splits.train.num_classes,
        "train_classes_sha256": names_hash(splits.train.class_names),
    }


def trial_row(trial: Trial, chosen: Trial | None) -> dict[str, Any]:
    return {
        "space": trial.space,
        "trial": trial.index,
        "settings": trial.settings,
        "scores": trial.scores,
        "score": trial.score,
        "seconds": trial.seconds,
        "chosen": trial is chosen,
        "error": trial.error,
    }


def space_table(recipe: recipes.Recipe, trials: Sequence[Trial], chosen: Trial | None) -> str:
    """One space's trials as a markdown table: settings, scores per loss, mean, seconds."""
    assert recipe.tuning is not None
    label = summary.metric_label(recipe.tuning.metric)
    losses = list(trials[0].scores)
    columns = {
        "trial": "trial",
        **{key: f"`{key}`" for key in trials[0].settings},
        **{loss: f"{registry.LOSSES[loss].label} {label}" for loss in losses},
        "score": "score",
        "seconds": "train s",
        "chosen": "chosen (or error)",
    }
    rows = [
        {
            "trial": trial.index,
            **trial.settings,
            **trial.scores,
            "score": trial.score,
            "seconds": trial.seconds,
            "chosen": "**yes**" if trial is chosen else trial.error,
        }
        for trial in trials
    ]
    return report.markdown_table(rows, columns)


def counts(numbers: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {number}" for name, number in numbers.items())


def write_tuning(
    out: Path,
    recipe: recipes.Recipe,
    results: Mapping[str, tuple[list[Trial], Trial | None, dict[str, Any]]],
    split: Mapping[str, Any],
    environment: Mapping[str, Any],
    elapsed: float,
) -> str:
    """``tuning.json`` and ``tuning.md``: protocol, split, every trial, the choices; returns
    the tables."""
    tuning = recipe.tuning
    assert tuning is not None
    per_space = {space: len(trials) for space, (trials, _, _) in results.items()}
    per_loss: dict[str, int] = {}
    for space in results:
        for loss in tuning.spaces[space].losses:
            per_loss[loss] = per_loss.get(loss, 0) + per_space[space]
    epochs = tuning.epochs or recipe.train.epochs
    spaces = {
        space: {
            "losses": list(tuning.spaces[space].losses),
            "grid": {key: list(values) for key, values in tuning.spaces[space].grid.items()},
            "on_earlier_choices": before,
            "chosen_trial": None if best is None else best.index,
            "chosen_settings": None if best is None else best.settings,
            "chosen_score": None if best is None else best.score,
        }
        for space, (_, best, before) in results.items()
    }
    protocol = {
        "metric": tuning.metric,
        "seed": tuning.seed,
        "epochs": epochs,
        "trials_per_space": per_space,
        "trials_per_loss": per_loss,
    }
    rows = [trial_row(t, best) for trials, best, _ in results.values() for t in trials]
    extra = {
        "recipe": recipe.name,
        "protocol": protocol,
        "split": split,
        "spaces": spaces,
        "wall_seconds": elapsed,
    }
    report.write_json(out / f"{TUNING_STEM}.json", rows, environment, extra)

    label = summary.metric_label(tuning.metric)
    choices = "; ".join(f"{space}: trial {info['chosen_trial']}" for space, info in spaces.items())
    notes = (
        f"Command: `{environment['command']}` ({elapsed:.0f} s wall time; trials found "
        "finished are not retrained).\n\n"
        f"- Split: {len(split['validation_classes'])} validation classes, "
        f"{split['validation_fraction']:g} of the training classes (split seed "
        f"{split['split_seed']}), held out; every trial trains on the other "
        f"{split['train_classes']} and is evaluated on the validation classes only, never "
        "on the test classes.\n"
        f"- Protocol: trials per space: {counts(per_space)}; per loss: {counts(per_loss)}; "
        f"seed {tuning.seed}; {epochs} epochs; score: the final epoch's {label}, the mean "
        "over the space's losses. Trial 0 is the recipe's own values, the others a seeded "
        "sample of the grid without replacement; the spaces run in this order, each on the "
        "earlier choices.\n"
        f"- Chosen: {choices}. On the test classes: `python -m benchmarks.run --recipe "
        f"{report.relative(out / TUNED_FILE)}`.\n"
    )
    tables = "\n".join(
        f"## Space `{space}`\n\n{space_table(recipe, trials, best)}"
        for space, (trials, best, _) in results.items()
    )
    title = f"Tuning on validation classes: {recipe.name}"
    report.write_markdown(out / f"{TUNING_STEM}.md", title, tables, environment, notes)
    return tables


def tuned_recipe(
    recipe_arg: str,
    recipe: recipes.Recipe,
    overrides: Sequence[str],
    chosen: Mapping[str, Any],
    out: Path,
    command: str,
) -> dict[str, Any]:
    """A recipe file extending ``recipe_arg`` with the ``--set`` overrides and the chosen
    values: the runner trains it on the test classes."""
    path = recipes.recipe_path(recipe_arg).resolve()
    if path.parent == recipes.RECIPES_DIR:
        extends = path.stem
    else:
        extends = Path(os.path.relpath(path, out.resolve())).as_posix()
    raw = recipe.to_dict()
    values = {key: recipes.get_value(raw, key) for key in (o.split("=")[0] for o in overrides)}
    tree: dict[str, Any] = {}
    for key, value in {**values, **chosen}.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    note = (
        f"Tuned on validation classes by `{command}` ({TUNING_STEM}.md beside this file): "
        f"{json.dumps(dict(chosen))}"
    )
    return {
        "extends": extends,
        "name": f"{recipe.name}_tuned",
        "description": f"{recipe.description}; tuned on validation classes",
        **tree,
        "notes": [*recipe.notes, note],
    }


def tune(args: argparse.Namespace, argv: Sequence[str]) -> None:
    recipe = load_tunable(args)
    tuning = recipe.tuning
    assert tuning is not None
    spaces = list(dict.fromkeys(args.space or tuning.spaces))
    for space in spaces:
        if space not in tuning.spaces:
            raise RecipeError(
                f"recipe {recipe.name!r} has no tuning space {space!r}; it has "
                f"{', '.join(tuning.spaces)}"
            )
    cli.configure_logging()
    start = time.perf_counter()
    command = report.command_line("benchmarks.tune", argv)
    environment = report.capture_environment(args.device, command)
    out = report.output_folder(args.out, f"{recipe.name}_tuning")
    # Open the data before creating the output folder: a wrong --data-root leaves nothing.
    dataset = dataclasses.replace(recipe.dataset, validation_fraction=tuning.validation_fraction)
    splits = open_splits(dataset, args.data_root)
    out.mkdir(parents=True, exist_ok=True)
    with run.log_to(out / LOG_FILE):
        LOGGER.info("%s\n%s: %s", command, recipe.name, json.dumps(splits.describe()))
        chosen: dict[str, Any] = {}
        results = {}
        for space in spaces:
            grid = tuning.spaces[space]
            current = recipes.apply_values(recipe.to_dict(), chosen, "tuning")
            draws = grid.draw(recipes.tuning_defaults(current, grid), tuning.trials, tuning.seed)
            trials = [
                train_trial(
                    recipe, space, i, settings, chosen, splits, out, args.device, environment
                )
                for i, settings in enumerate(draws)
            ]
            best = best_trial(trials)
            results[space] = (trials, best, dict(chosen))
            if best is None:
                LOGGER.warning("%s: no trial finished; the recipe's values stay", space)
            else:
                chosen.update(best.settings)
        elapsed = time.perf_counter() - start
        tables = write_tuning(out, recipe, results, split_record(splits), environment, elapsed)
        tuned = tuned_recipe(args.recipe, recipe, args.overrides, chosen, out, command)
        report.write_text(out / TUNED_FILE, json.dumps(tuned, indent=2) + "\n")
    print(tables)
    print(f"tuning took {elapsed:.0f} s; the chosen settings: {report.relative(out / TUNED_FILE)}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parse_args, tune, argv)


if __name__ == "__main__":
    raise SystemExit(main())

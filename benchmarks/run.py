"""Train and compare metric-learning losses on a dataset, from a recipe: the one experiment runner.

    python -m benchmarks.run --recipe emoji_quick                   # ProxyGML vs ProxyAnchor, emoji
    python -m benchmarks.run --recipe folder --data-root DIR        # your own images
    python -m benchmarks.run --recipe cub_512 --data-root data/cub --loss proxygml
    python -m benchmarks.run --recipe emoji --show                  # the resolved recipe
    python -m benchmarks.run --table                                # every summary under runs/
    python -m benchmarks.run --recipe sop_512 --throughput          # images/s, peak memory

For each seed and each loss, one call of the harness trains the whole run (schedule,
evaluation epochs, frozen-trunk warm-up), checkpointing after every epoch: the same command
resumes an interrupted run, skips finished ones and ends with the numbers of an uninterrupted
run. Outputs in ``--out`` (default ``runs/<recipe>/``, git-ignored): ``recipe.json`` (the
resolved recipe), ``runs/<loss>/seed<s>/results.{json,csv}`` (one row per epoch),
``checkpoints/`` (git-ignored), ``summary.{md,json}`` (ending with the raw-pixel floor),
``recall_vs_epoch.png``, ``recall_vs_seconds.png``, ``retrieval_<loss>.png`` and ``run.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_metric_learning import testers
from pytorch_metric_learning.utils import common_functions as c_f

from .core import cli, harness, measure, models, recipes, registry, report, summary
from .core.datasets import Splits, open_splits
from .core.datasets.common import ImageDataset
from .core.errors import RecipeError

LOGGER = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
LOG_FILE = "run.log"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n", 1)[0],
        epilog="recipes (benchmarks/recipes/<name>.json):\n" + recipes.describe_all(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[cli.common_flags("out", "device", "data_root", "overrides")],
    )
    parser.add_argument("--recipe", help="a recipe name (listed below) or a .json file")
    parser.add_argument(
        "--loss",
        nargs="+",
        metavar="LOSS",
        help=f"losses to train, of {', '.join(registry.LOSSES)} (default: the recipe's)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the recipe's)")
    parser.add_argument("--epochs", type=int, help="epochs (default: the recipe's)")
    parser.add_argument("--download", action="store_true", help="let PML download a paper dataset")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--show", action="store_true", help="print the resolved recipe and exit")
    mode.add_argument(
        "--throughput",
        type=int,
        metavar="STEPS",
        help="time STEPS training steps per loss on random images of the recipe's size and "
        "classes (weights not pretrained), after 3 untimed ones; no data needed",
    )
    mode.add_argument(
        "--table",
        action="store_true",
        help="print every summary under --out (default runs/) beside the published numbers",
    )
    args = parser.parse_args(argv)
    if args.recipe is None and not args.table:
        parser.error("give --recipe (or --table)")
    return args


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[None]:
    """Also write the benchmarks' log lines to ``path`` during the block."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("benchmarks")
    level = logger.level
    logger.setLevel(logging.INFO)  # also where the root logger is quieter (e.g. under pytest)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def checkpoint_file(out: Path, loss: str, seed: int) -> Path:
    """``<out>/checkpoints/<loss>_seed<s>.pt``, in a git-ignored folder (large, rewritten
    every epoch)."""
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return folder / f"{loss}_seed{seed}.pt"


def run_identity(recipe: recipes.Recipe, loss: str, splits: Splits) -> dict[str, Any]:
    """What makes a run what it is beyond its plan: a checkpoint with other facts is refused."""
    facts = splits.describe()
    return {
        "loss": loss,
        "loss_settings": recipe.loss(loss).settings,
        "model": dataclasses.asdict(recipe.model),
        "data": dataclasses.asdict(recipe.data),
        "dataset": dataclasses.asdict(recipe.dataset),
        "evaluation": dataclasses.asdict(recipe.evaluation),
        "classes": {key: facts[key] for key in ("train", splits.eval_name)},
    }


def train_one(
    recipe: recipes.Recipe,
    loss: str,
    seed: int,
    splits: Splits,
    datasets: tuple[ImageDataset, ImageDataset],
    out: Path,
    device: str,
    environment: Mapping[str, Any],
) -> harness.RunResult:
    """Train (or resume, or skip) one (loss, seed) run with one harness call."""
    # Seeded before building: equal seeds give every loss the same initial trunk and embedder.
    harness.seed_everything(seed)
    size = recipe.model.embedding_size
    try:
        trunk, embedder = models.build_models(**dataclasses.asdict(recipe.model))
        loss_func = registry.build_loss(
            loss, splits.train.num_classes, size, recipe.loss(loss).settings
        )
    except ValueError as error:  # settings the recipe's format accepts but the model or loss not
        raise RecipeError(f"{recipe.name}, {loss}: {error}") from None
    return harness.train_and_evaluate(
        trunk,
        embedder,
        loss_func,
        *datasets,
        recipe.plan(loss, seed),
        out / "runs" / loss / f"seed{seed}",
        identity=run_identity(recipe, loss, splits),
        checkpoint_path=checkpoint_file(out, loss, seed),
        calculator=harness.accuracy_calculator(
            recipe.evaluation.recall_ks, recipe.evaluation.metrics
        ),
        device=device,
        info={
            "loss": loss,
            "seed": seed,
            "recipe": recipe.name,
            "embedding_size": size,
            "evaluated_split": splits.eval_name,
            "validation_split": splits.info.get("validation_split"),  # None: test classes
        },
        environment=environment,
        eval_name=splits.eval_name,
        label=f"{loss} seed {seed}",
    )


def retrieval_picture(
    recipe: recipes.Recipe,
    loss: str,
    seed: int,
    eval_set: ImageDataset,
    out: Path,
    eval_name: str,
    device: str,
) -> Path:
    """``retrieval_<loss>.png`` of the run's final weights."""
    trunk, embedder = models.build_models(**dataclasses.asdict(recipe.model))
    harness.load_models(checkpoint_file(out, loss, seed), trunk, embedder)
    tester = testers.GlobalEmbeddingSpaceTester(
        batch_size=recipe.train.eval_batch_size, dataloader_num_workers=0, data_device=device
    )
    embeddings, _ = tester.get_all_embeddings(eval_set, trunk.to(device), embedder.to(device))
    path = out / f"retrieval_{loss}.png"
    title = (
        f"{registry.LOSSES[loss].label}: {eval_name} queries and their top-5 neighbours "
        "(green = same class)"
    )
    summary.plot_retrieval(embeddings, eval_set.source, path, title)
    return path


def step_throughput(recipe: recipes.Recipe, loss: str, steps: int, device: str) -> dict[str, Any]:
    """Seconds and peak memory of one training step (forward, loss, backward, optimizer steps)
    of ``loss`` on a random batch of the recipe's shape, weights not pretrained."""
    classes = recipe.dataset.train_classes
    if classes is None:
        raise RecipeError("--throughput needs dataset.train_classes in the recipe")
    model = dataclasses.replace(recipe.model, pretrained=False, weights=None)
    batch, side = recipe.train.batch_size, recipe.data.crop
    harness.seed_everything(0)
    trunk, embedder = models.build_models(**dataclasses.asdict(model))
    loss_func = registry.build_loss(loss, classes, model.embedding_size, recipe.loss(loss).settings)
    state = harness.TrainingState.build(trunk, embedder, loss_func, recipe.plan(loss, 0), device)
    trunk.train()
    if recipe.train.freeze_trunk_batchnorm:
        c_f.set_layers_to_eval("BatchNorm")(trunk)
    images = torch.randn(batch, 3, side, side, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        for optimizer in state.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss_func(embedder(trunk(images)), labels).backward()
        for optimizer in state.optimizers.values():
            optimizer.step()

    memory = measure.PeakMemory(device).start()
    seconds = measure.median_seconds(step, steps, warmup=3, device=device)
    return {
        "loss": loss,
        "batch_size": batch,
        "image_size": side,
        "classes": classes,
        "images_per_second": batch / seconds,
        "seconds_per_step": seconds,
        "peak_memory_gib": memory.extra_bytes() / 2**30,
    }


def write_throughput(
    recipe: recipes.Recipe,
    losses: Sequence[str],
    steps: int,
    device: str,
    out: Path,
    environment: Mapping[str, Any],
) -> str:
    """``throughput.{json,md}`` of every loss; returns the table."""
    rows = [step_throughput(recipe, loss, steps, device) for loss in losses]
    columns = {key: key for key in rows[0]}
    notes = (
        f"Median of {steps} training steps after 3 untimed ones: forward, loss, backward and "
        "optimizer steps on a random batch of the recipe's shape. Peak memory: "
        f"{'CUDA allocations' if device.startswith('cuda') else 'resident set'} over the "
        "baseline (benchmarks/core/measure.py).\n"
    )
    title = f"Training-step throughput: {recipe.name}"
    report.write_results(
        out, "throughput", rows, environment, title=title, columns=columns, notes=notes
    )
    return report.markdown_table(rows, columns)


def train_all(
    recipe: recipes.Recipe,
    losses: Sequence[str],
    splits: Splits,
    out: Path,
    device: str,
    environment: Mapping[str, Any],
) -> tuple[dict[str, list[list[dict[str, Any]]]], dict[int, tuple[ImageDataset, ImageDataset]]]:
    """Every (seed, loss) run: ``{loss: [rows of each seed]}`` and the datasets of each seed."""
    LOGGER.info("%s\n%s: %s", environment["command"], recipe.name, json.dumps(splits.describe()))
    expected = recipe.dataset.train_classes
    if expected is not None and expected != splits.train.num_classes:
        LOGGER.warning(
            "%d train classes, the recipe expects %d", splits.train.num_classes, expected
        )
    pixels = models.BACKBONES[recipe.model.backbone].pixels
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    datasets = {}
    for seed in recipe.train.seeds:
        datasets[seed] = splits.datasets(recipe.data, pixels, seed)
        for loss in losses:
            result = train_one(recipe, loss, seed, splits, datasets[seed], out, device, environment)
            runs.setdefault(loss, []).append(result.rows)
    return runs, datasets


def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    if args.table:
        print(summary.results_table(args.out or report.RUNS_ROOT))
        return
    recipe = recipes.load_recipe(args.recipe, args.overrides, args.epochs, args.seeds)
    losses = tuple(args.loss or recipe.losses_to_run)
    for name in losses:
        recipe.loss(registry.check_name(name))
    if args.show:
        print(json.dumps(recipe.to_dict(), indent=2))
        return
    cli.configure_logging()
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input size
    start = time.perf_counter()
    command = report.command_line("benchmarks.run", argv)
    environment = report.capture_environment(args.device, command)
    out = report.output_folder(args.out, recipe.name)
    if args.throughput:
        print(write_throughput(recipe, losses, args.throughput, args.device, out, environment))
        return
    # Open the data before creating the output folder: a wrong --data-root leaves nothing.
    splits = open_splits(recipe.dataset, args.data_root, args.download)
    out.mkdir(parents=True, exist_ok=True)
    report.write_text(out / RECIPE_FILE, json.dumps(recipe.to_dict(), indent=2) + "\n")
    with log_to(out / LOG_FILE):
        runs, datasets = train_all(recipe, losses, splits, out, args.device, environment)
        seed = recipe.train.seeds[0]
        facts = splits.describe()
        summary.plot_curves(runs, out, facts["title"], splits.eval_name)
        eval_set = datasets[seed][1]
        retrieval_picture(recipe, losses[0], seed, eval_set, out, splits.eval_name, args.device)
        extra = summary.regularizer_note(recipe, runs, splits.train, args.device)
        calculator = harness.accuracy_calculator(
            recipe.evaluation.recall_ks, recipe.evaluation.metrics
        )
        tester = harness.make_tester(recipe.plan(losses[0], seed), calculator, args.device)
        raw_pixels = harness.evaluate_raw_pixels(tester, eval_set, splits.eval_name)
        elapsed = time.perf_counter() - start
        table = summary.write_summary(
            out,
            recipe,
            facts,
            splits.eval_name,
            runs,
            harness.metric_order(calculator),
            environment,
            elapsed,
            extra,
            raw_pixels,
        )
    print(table)
    print(f"total wall time {time.perf_counter() - start:.0f} s; results in {report.relative(out)}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

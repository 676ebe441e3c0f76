"""Paper reproduction kit: ProxyGML (and Proxy-Anchor) on CUB-200-2011, Cars196 and SOP.

One command per run, through PML's trainer and tester (the shared harness,
:mod:`benchmarks.training`)::

    python -m benchmarks.reproduce --dataset cub --dim 512 --loss proxygml --data-root data/cub
    python -m benchmarks.reproduce --dataset cub --dim 512 --loss proxyanchor --data-root data/cub
    python -m benchmarks.reproduce --recipe proxyanchor_cub_512 --loss proxyanchor --data-root ...
    python -m benchmarks.reproduce --table          # paper vs ours vs Proxy-Anchor, markdown
    python -m benchmarks.reproduce --synthetic --dataset sop --dim 512   # GPU throughput

Recipes are data: ``benchmarks/recipes/<dataset>_<dim>.json`` is the official ProxyGML recipe
(``run.sh`` / ``train.py`` of YuehuaZhu/ProxyGML, see ``shared/spec`` section 2) with the loss
hyper-parameters of ProxyGML and of Proxy-Anchor, so ``--loss proxyanchor`` trains Proxy-Anchor
under exactly ProxyGML's recipe; ``proxyanchor_<dataset>_512.json`` is Proxy-Anchor's own
recipe (its official README / train.py). ``--show`` prints the resolved recipe; any value can
be overridden, e.g. ``--set train.epochs=30 losses.proxygml.r=0.1 model.backbone=resnet50``.

What a run does: loads the splits with PML's datasets (labels remapped to 0..C-1, official
transforms, :mod:`benchmarks.paper_data`), builds the backbone and head
(:mod:`benchmarks.backbones`; BN-Inception's ImageNet weights are downloaded once and cached),
then trains with :func:`benchmarks.training.train_and_evaluate`: Adam groups, lr decay, frozen
BatchNorm, checkpoints with resume. On top of the harness, this module evaluates exactly at the
recipe's ``eval_epochs`` (official: 1, 2, 35-50) and freezes the backbone during its
``frozen_trunk_epochs`` (official warm-up: epoch 2 trains only the head and the proxies), by
calling the harness once per segment of epochs (:func:`plan_segments`); an interrupted run
resumes from its last finished epoch when the same command is run again. Evaluation: PML's
``AccuracyCalculator`` extended by :func:`pml_proxygml.evaluation.paper_metrics` (Recall@K with
the paper's K list, NMI, precision@1, R-precision, MAP@R; cosine retrieval).

Outputs: ``<results>/runs/<recipe>/<loss>_seed<s>/`` (``results.{json,csv}`` per epoch,
``reproduce.log``, ``config.json``, ``checkpoints/``), and one entry per run in
``<results>/<dataset>_<dim>_<loss>.json`` (final and best evaluated epoch, all evaluations,
environment, resolved recipe), which ``--table`` reads. Default ``<results>``:
``benchmarks/results/paper``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shlex
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pytorch_metric_learning import losses, trainers
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f
from torch import nn

from pml_proxygml import ProxyGMLLoss
from pml_proxygml.evaluation import paper_metrics, recall_key, recall_ks_for

from . import backbones, paper_data, reporting, training

LOGGER = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
RESULTS_DIR = reporting.REPO_ROOT / "benchmarks" / "results" / "paper"
LOSSES: dict[str, type[BaseMetricLossFunction]] = {
    "proxygml": ProxyGMLLoss,
    "proxyanchor": losses.ProxyAnchorLoss,
}
METHODS = {"proxygml": "ProxyGML", "proxyanchor": "ProxyAnchor"}  # table labels
DIMS = (64, 384, 512)
CONFIG_NAME = "config.json"
LOG_NAME = "reproduce.log"
# Recipe keys that may change when a run is resumed (they do not change the trained weights).
RESUMABLE_KEYS = frozenset({"train.epochs", "train.eval_epochs", "train.eval_batch_size"})

# ProxyGML paper (BN-Inception), in %: NMI then the dataset's first three Recall@K.
PAPER: dict[str, dict[int, tuple[float, float, float, float]]] = {
    "cub": {
        64: (65.1, 59.4, 70.1, 80.4),
        384: (68.4, 65.2, 76.4, 84.3),
        512: (69.8, 66.6, 77.6, 86.4),
    },
    "cars": {
        64: (67.9, 78.9, 87.5, 91.9),
        384: (70.9, 84.5, 90.4, 94.5),
        512: (72.4, 85.5, 91.8, 95.3),
    },
    "sop": {
        64: (89.8, 76.2, 89.4, 95.4),
        384: (90.1, 77.9, 90.0, 96.0),
        512: (90.2, 78.0, 90.6, 96.2),
    },
}
PROXY_ANCHOR_PAPER_R1 = {"cub": 68.4, "cars": 86.1, "sop": 79.1}  # Proxy-Anchor paper, 512-d


# ----------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class ModelConfig:
    """Backbone (``backbones.BACKBONES``), ImageNet weights (``weights``: a local file instead
    of the download), embedding size, pooling (``avg`` / ``avg+max``), head init."""

    backbone: str
    pretrained: bool
    weights: str | None
    embedding_size: int
    pooling: str
    embedding_init: str


@dataclass(frozen=True)
class DataConfig:
    """Test: short side to ``resize``, centre ``crop``; train: random resized ``crop`` with
    ``crop_scale`` / ``crop_ratio``, horizontal ``flip`` probability."""

    resize: int
    crop: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip: float


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; epoch lists are text such as ``"1,2,35-50"`` (1-based epochs).

    ``milestones``: epochs after which every lr is multiplied by ``gamma`` (the official "x0.1
    at epochs 20 and 40" is milestones 19 and 39: epochs 20 and 40 run at the decayed lr).
    Optimizers: :class:`benchmarks.training.OptimizerSpec` fields, one for the network (trunk
    and head) and one for the loss's proxies.
    """

    epochs: int
    batch_size: int
    backbone_optimizer: dict[str, Any]
    loss_optimizer: dict[str, Any]
    milestones: tuple[int, ...]
    gamma: float
    freeze_trunk_batchnorm: bool
    frozen_trunk_epochs: str
    eval_epochs: str
    seed: int
    num_workers: int
    eval_batch_size: int


@dataclass(frozen=True)
class PaperRecipe:
    """One recipe file: a dataset, a model, data and training settings, and the
    hyper-parameters of each loss it can train (keyword arguments of the PML loss)."""

    name: str
    description: str
    dataset: str
    train_classes: int
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    losses: dict[str, dict[str, Any]]
    notes: tuple[str, ...]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PaperRecipe:
        section_types = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        data = _fields(cls, raw, "recipe")
        for key, section in section_types.items():
            data[key] = section(**_fields(section, data[key], key))
        recipe = cls(**data)
        recipe.validate()
        return recipe

    def validate(self) -> None:
        if self.dataset not in paper_data.DATASETS:
            raise ValueError(f"dataset must be one of {sorted(paper_data.DATASETS)}")
        if self.model.backbone not in backbones.BACKBONES:
            raise ValueError(f"model.backbone must be one of {sorted(backbones.BACKBONES)}")
        unknown = set(self.losses) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; known: {sorted(LOSSES)}")
        parse_epochs(self.train.eval_epochs)
        parse_epochs(self.train.frozen_trunk_epochs)
        self.harness_recipe(self.train.epochs, 1)  # checks optimizers, sizes and the schedule

    def loss_settings(self, loss: str) -> dict[str, Any]:
        """Keyword arguments of PML loss ``loss`` in this recipe."""
        if loss not in self.losses:
            raise ValueError(
                f"recipe {self.name!r} has no settings for loss {loss!r}; it defines "
                f"{sorted(self.losses)}"
            )
        return self.losses[loss]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, like a file

    def harness_recipe(self, epochs: int, eval_every: int) -> training.Recipe:
        """The shared harness's recipe for one call that trains up to ``epochs``."""
        t = self.train
        return training.Recipe(
            epochs=epochs,
            batch_size=t.batch_size,
            backbone=training.OptimizerSpec(**t.backbone_optimizer),
            loss=training.OptimizerSpec(**t.loss_optimizer),
            milestones=tuple(t.milestones),
            gamma=t.gamma,
            seed=t.seed,
            eval_every=eval_every,
            freeze_trunk_batchnorm=t.freeze_trunk_batchnorm,
            num_workers=t.num_workers,
            eval_batch_size=t.eval_batch_size,
        )


def _fields(cls: type, raw: Any, where: str) -> dict[str, Any]:
    """``raw`` as keyword arguments of dataclass ``cls``; names missing or unknown keys."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected an object, got {raw!r}")
    names = {field.name for field in dataclasses.fields(cls)}
    missing, unknown = names - raw.keys(), raw.keys() - names
    if missing or unknown:
        raise ValueError(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    data = dict(raw)
    for field in dataclasses.fields(cls):
        if isinstance(data[field.name], list):
            data[field.name] = tuple(data[field.name])
    return data


def parse_epochs(text: str) -> tuple[int, ...]:
    """``"1,2,35-50"`` -> (1, 2, 35, 36, ..., 50); ``""`` -> ()."""
    epochs: set[int] = set()
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"bad epoch list {text!r}: expected e.g. '1,2,35-50'") from None
        if not 1 <= low <= high:
            raise ValueError(f"bad epoch range {part!r} in {text!r}")
        epochs.update(range(low, high + 1))
    return tuple(sorted(epochs))


def recipe_path(name_or_path: str) -> Path:
    """A recipe file: an existing path, or ``benchmarks/recipes/<name>.json``."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return path
    path = RECIPES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.json")))
        raise FileNotFoundError(f"no recipe {name_or_path!r}; known recipes: {known}")
    return path


def _coerce(key: str, old: Any, text: str) -> Any:
    """``text`` as a value of ``old``'s type: strings as typed, anything else as JSON."""
    if isinstance(old, str):
        return text  # names and epoch lists such as "1,2,35-50"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if old is None:
            return text  # e.g. model.weights=/path/to/bn_inception.pth
        raise ValueError(f"--set {key}={text}: not a JSON value") from None
    if old is None or value is None:
        return value
    if isinstance(old, float) and type(value) is int:
        return float(value)
    if type(value) is not type(old):
        raise ValueError(f"--set {key}={text}: expected a {type(old).__name__} like {old!r}")
    return value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with ``KEY=VALUE`` overrides (dotted keys, JSON values) applied.

    Only existing keys can be set (typos fail), except new keys under ``losses.<loss>``
    (keyword arguments of the PML loss).
    """
    data = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=30")
        *parents, leaf = key.split(".")
        node = data
        for depth, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"--set {key}: no {'.'.join(parents[: depth + 1])!r} in recipe")
            node = node[part]
        loss_kwargs = len(parents) == 2 and parents[0] == "losses"
        if not isinstance(node, dict) or (leaf not in node and not loss_kwargs):
            known = ", ".join(sorted(node)) if isinstance(node, dict) else ""
            raise ValueError(f"--set {key}: unknown key {leaf!r} (known: {known})")
        node[leaf] = _coerce(key, node.get(leaf), text)
    return data


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> PaperRecipe:
    """A recipe file with command-line overrides applied, validated."""
    raw = json.loads(recipe_path(name_or_path).read_text())
    return PaperRecipe.from_dict(apply_overrides(raw, overrides))


# ----------------------------------------------------------------------------- building


def build_models(
    recipe: PaperRecipe, amp: str = "off", pretrained: bool | None = None
) -> tuple[backbones.Trunk, backbones.EmbeddingHead]:
    m = recipe.model
    return backbones.build_models(
        m.backbone,
        m.embedding_size,
        pretrained=m.pretrained if pretrained is None else pretrained,
        weights=m.weights,
        pooling=m.pooling,
        init=m.embedding_init,
        amp=amp,
    )


def build_loss(recipe: PaperRecipe, loss: str, num_classes: int) -> BaseMetricLossFunction:
    settings = recipe.loss_settings(loss)
    return LOSSES[loss](num_classes, recipe.model.embedding_size, **settings)


def transforms(recipe: PaperRecipe) -> tuple[paper_data.TrainTransform, paper_data.EvalTransform]:
    pixels = backbones.BACKBONES[recipe.model.backbone].pixels
    d = recipe.data
    train = paper_data.TrainTransform(pixels, d.crop, d.crop_scale, d.crop_ratio, d.flip)
    return train, paper_data.EvalTransform(pixels, d.resize, d.crop)


# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Segment:
    """One harness call: train up to epoch ``last``; evaluate every epoch of the segment
    (``eval_all``) or only ``last``; with the trunk frozen (``frozen``) or not."""

    last: int
    eval_all: bool
    frozen: bool


def plan_segments(
    epochs: int, eval_epochs: Sequence[int], frozen_epochs: Sequence[int]
) -> list[Segment]:
    """Harness calls that evaluate at ``eval_epochs`` and the last epoch, and freeze the trunk
    exactly during ``frozen_epochs``.

    The harness evaluates every ``eval_every`` epochs and always at its last one, so a call
    ends at every evaluated epoch and wherever freezing changes (such a boundary is evaluated
    too); runs of consecutive single-epoch calls are merged into one ``eval_every=1`` call.
    """
    frozen = set(frozen_epochs)
    stops = {e for e in eval_epochs if e <= epochs} | {epochs}
    stops |= {e for e in range(1, epochs) if (e in frozen) != (e + 1 in frozen)}
    segments: list[Segment] = []
    previous = 0
    for stop in sorted(stops):
        single = stop == previous + 1
        last = segments[-1] if segments else None
        if single and last and last.eval_all and last.frozen == (stop in frozen):
            segments[-1] = dataclasses.replace(last, last=stop)
        else:
            segments.append(Segment(stop, single, stop in frozen))
        previous = stop
    return segments


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """No gradient for ``module``'s trainable parameters inside the block (their optimizer
    then skips them: no update, no weight decay, no momentum)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- results


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_config(run_dir: Path, config: Mapping[str, Any]) -> None:
    """Refuse to resume ``run_dir`` with settings other than its own; record them."""
    path = run_dir / CONFIG_NAME
    if path.exists():
        saved, wanted = _flat(json.loads(path.read_text())), _flat(config)
        changed = {
            key: (saved.get(key), wanted.get(key))
            for key in saved.keys() | wanted.keys()
            if not key.endswith(tuple(RESUMABLE_KEYS)) and saved.get(key) != wanted.get(key)
        }
        if changed:
            raise ValueError(
                f"{run_dir} holds a run with other settings (saved, requested): {changed}; "
                "pass another --work-dir to train this one"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")


def summarize(rows: Sequence[Mapping[str, Any]], key_metric: str) -> dict[str, Any]:
    """``final`` (last evaluated epoch), ``best`` (highest ``key_metric``) and all
    ``evaluations``, metrics only plus epoch."""
    evaluated = [
        {k: v for k, v in row.items() if k not in training.RUN_COLUMNS or k == "epoch"}
        for row in rows
        if key_metric in row
    ]
    return {
        "final": evaluated[-1],
        "best": max(evaluated, key=lambda row: row[key_metric]),
        "evaluations": evaluated,
    }


def results_file(results_dir: Path, dataset: str, dim: int, loss: str) -> Path:
    return results_dir / f"{dataset}_{dim}_{loss}.json"


def record_run(path: Path, entry: Mapping[str, Any]) -> None:
    """Add ``entry`` to the runs in ``path``, replacing an earlier entry of the same run."""
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    runs = [run for run in runs if run["run_dir"] != entry["run_dir"]] + [dict(entry)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[None]:
    """Also write this package's log lines to ``path`` for the duration of the block."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger(__package__)
    level = logger.level
    logger.setLevel(logging.INFO)  # also where the root logger is quieter (e.g. under pytest)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def train(args: argparse.Namespace, recipe: PaperRecipe) -> dict[str, Any]:
    """Train (or resume, or skip) one run; record and return its entry."""
    loss_name, dataset, dim = args.loss, recipe.dataset, recipe.model.embedding_size
    seed = recipe.train.seed
    run_dir = args.work_dir or args.results_dir / "runs" / recipe.name / f"{loss_name}_seed{seed}"
    config = {"recipe": recipe.to_dict(), "loss": loss_name, "amp": args.amp}
    # Find the data before creating the run folder, so a missing dataset leaves nothing behind.
    train_tf, eval_tf = transforms(recipe)
    train_set = paper_data.load_split(dataset, args.data_root, "train", train_tf, args.download)
    test_set = paper_data.load_split(dataset, args.data_root, "test", eval_tf)
    check_config(run_dir, config)
    checkpoint = run_dir / "checkpoints" / training.CHECKPOINT_NAME
    checkpoint.parent.mkdir(exist_ok=True)
    (checkpoint.parent / ".gitignore").write_text("*\n")  # large, rewritten every epoch
    with log_to(run_dir / LOG_NAME):
        LOGGER.info(
            "%s\n%s, loss %s, seed %d: %s", args.command, recipe.name, loss_name, seed, run_dir
        )
        classes = training.num_classes(train_set)
        LOGGER.info(
            "train: %d images, %d classes; test: %d images, %d classes",
            len(train_set),
            classes,
            len(test_set),
            training.num_classes(test_set),
        )
        if classes != recipe.train_classes:
            LOGGER.warning("%d train classes, the recipe expects %d", classes, recipe.train_classes)
        training.seed_everything(seed)  # same initial weights for every loss with this seed
        trunk, embedder = build_models(recipe, args.amp)
        loss = build_loss(recipe, loss_name, classes)
        calculator = paper_metrics(dataset)
        info = {
            "dataset": dataset,
            "dim": dim,
            "loss": loss_name,
            "recipe": recipe.name,
            "seed": seed,
            "amp": args.amp,
        }
        plan = plan_segments(
            recipe.train.epochs,
            parse_epochs(recipe.train.eval_epochs),
            parse_epochs(recipe.train.frozen_trunk_epochs),
        )
        for segment in plan:
            freeze = frozen_parameters(trunk) if segment.frozen else contextlib.nullcontext()
            with freeze:
                result = training.train_and_evaluate(
                    trunk,
                    embedder,
                    loss,
                    train_set,
                    test_set,
                    recipe.harness_recipe(segment.last, 1 if segment.eval_all else segment.last),
                    run_dir,
                    accuracy_calculator=calculator,
                    device=args.device,
                    info=info,
                    checkpoint_path=checkpoint,
                    label=f"{recipe.name} {loss_name}{' (trunk frozen)' if segment.frozen else ''}",
                )
        entry = {
            **info,
            "finished": result.rows[-1]["epoch"] >= recipe.train.epochs,
            "epochs_done": result.rows[-1]["epoch"],
            "train_seconds": result.rows[-1]["cumulative_seconds"],
            **summarize(result.rows, recall_key(1)),
            "run_dir": str(_relative(run_dir)),
            "environment": reporting.capture_environment(args.device),
            "config": config,
        }
        record_run(results_file(args.results_dir, dataset, dim, loss_name), entry)
        LOGGER.info("last epoch: %s", _percentages(entry["final"]))
        LOGGER.info("best epoch: %s", _percentages(entry["best"]))
    return entry


def _relative(path: Path) -> Path:
    path = path.resolve()
    return path.relative_to(reporting.REPO_ROOT) if reporting.REPO_ROOT in path.parents else path


def _percentages(row: Mapping[str, Any]) -> str:
    return "  ".join(f"{k} {100 * v:.1f}" if k != "epoch" else f"epoch {v}" for k, v in row.items())


# ----------------------------------------------------------------------------- table


def table_metrics(dataset: str) -> list[tuple[str, str]]:
    """``(metric key, header)`` of the paper's columns: NMI and the first three Recall@K."""
    ks = recall_ks_for(dataset)[:3]
    return [("NMI", "NMI"), *((recall_key(k), f"R@{k}") for k in ks)]


def _latest_finished(results_dir: Path, dataset: str, dim: int, loss: str) -> dict[str, dict]:
    """``{recipe: entry}``: the latest finished run of each recipe."""
    path = results_file(results_dir, dataset, dim, loss)
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    return {run["recipe"]: run for run in runs if run["finished"]}


def _ours_rows(
    results_dir: Path, dataset: str, dim: int, loss: str, recipes: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per recipe: the expected ``recipes`` (saying "not run yet" when they were not)
    and any other recipe with a finished run."""
    runs = _latest_finished(results_dir, dataset, dim, loss)
    metrics = [m for m, _ in table_metrics(dataset)]
    rows = []
    for recipe in dict.fromkeys([*recipes, *runs]):
        row: dict[str, Any] = {"dim": dim, "method": METHODS[loss]}
        run = runs.get(recipe)
        if run is None:
            row["source"] = f"ours, recipe `{recipe}`: not run yet"
        else:
            final, best = run["final"], run["best"]
            row["source"] = (
                f"ours, recipe `{recipe}`, seed {run['seed']}: epoch {final['epoch']} / "
                f"best epoch {best['epoch']}"
            )
            row.update({m: f"{100 * final[m]:.1f} / {100 * best[m]:.1f}" for m in metrics})
        rows.append(row)
    return rows


def results_table(results_dir: Path = RESULTS_DIR) -> str:
    """Markdown: per dataset, ProxyGML's paper numbers, ours, and Proxy-Anchor's, in %.

    "Ours" cells read "last epoch / best evaluated epoch" (best by Recall@1, the usual test-set
    selection of DML papers; the official ProxyGML code evaluates epochs 1, 2 and 35-50
    without choosing one). Each recipe shows its latest finished run.
    """
    parts = []
    for dataset, info in paper_data.DATASETS.items():
        metrics = table_metrics(dataset)
        rows: list[dict[str, Any]] = []
        for dim in DIMS:
            own = f"{dataset}_{dim}"
            paper = {m: f"{v:.1f}" for (m, _), v in zip(metrics, PAPER[dataset][dim])}
            rows.append({"dim": dim, "method": "ProxyGML", "source": "paper", **paper})
            rows += _ours_rows(results_dir, dataset, dim, "proxygml", [own])
            anchor_recipes = [own]
            if dim == 512:
                r1 = {recall_key(1): f"{PROXY_ANCHOR_PAPER_R1[dataset]:.1f}"}
                rows.append({"dim": dim, "method": "ProxyAnchor", "source": "paper", **r1})
                anchor_recipes.append(f"proxyanchor_{dataset}_{dim}")
            rows += _ours_rows(results_dir, dataset, dim, "proxyanchor", anchor_recipes)
        columns = {"dim": "Dim", "method": "Method", "source": "Source", **dict(metrics)}
        parts.append(f"### {info.title}\n\n" + reporting.markdown_table(rows, columns))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- throughput


class SyntheticImages(torch.utils.data.Dataset):
    """``length`` random full-size images (a pool of 16, reused) with random labels."""

    POOL = 16

    def __init__(self, length: int, size: int, num_classes: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(self.POOL, 3, size, size, generator=generator)
        self.labels = torch.randint(0, num_classes, (length,), generator=generator).numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.images[idx % self.POOL], int(self.labels[idx])


def measure_throughput(
    recipe: PaperRecipe, loss_name: str, device: str, iterations: int, warmup: int, amp: str
) -> dict[str, Any]:
    """Training images/second and peak GPU memory of ``recipe`` with ``loss_name`` on synthetic
    images, through PML's ``MetricLossOnly`` (``warmup`` iterations untimed)."""
    if iterations < 1 or warmup < 1:
        raise ValueError("--iterations and --warmup must be positive")
    training.seed_everything(recipe.train.seed)
    trunk, embedder = build_models(recipe, amp, pretrained=False)  # weights do not change speed
    loss = build_loss(recipe, loss_name, recipe.train_classes).to(device)
    models = {"trunk": trunk.to(device), "embedder": embedder.to(device)}
    network = training.OptimizerSpec(**recipe.train.backbone_optimizer)
    optimizers = {f"{name}_optimizer": network.build(m.parameters()) for name, m in models.items()}
    proxies = training.OptimizerSpec(**recipe.train.loss_optimizer)
    optimizers["metric_loss_optimizer"] = proxies.build(loss.parameters())
    batch = recipe.train.batch_size
    total = warmup + iterations
    stamps: list[float] = []
    cuda = device.startswith("cuda")

    def stamp(_: trainers.BaseTrainer) -> None:
        if cuda:
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    trainer = trainers.MetricLossOnly(
        models=models,
        optimizers=optimizers,
        batch_size=batch,
        loss_funcs={"metric_loss": loss},
        dataset=SyntheticImages(total * batch, recipe.data.crop, recipe.train_classes),
        iterations_per_epoch=total,
        data_device=device,
        freeze_trunk_batchnorm=recipe.train.freeze_trunk_batchnorm,
        dataloader_num_workers=recipe.train.num_workers,
        end_of_iteration_hook=stamp,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings():
        # PML formats the loss tensor for its progress bar; torch >= 2.13 warns about that.
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        trainer.train(1, 1)
    seconds = (stamps[-1] - stamps[warmup - 1]) / iterations
    return {
        "loss": loss_name,
        "batch_size": batch,
        "image_size": recipe.data.crop,
        "classes": recipe.train_classes,
        "images_per_second": batch / seconds,
        "seconds_per_iteration": seconds,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }


def throughput(args: argparse.Namespace, recipe: PaperRecipe) -> str:
    """Every requested loss at ``recipe``: a markdown table, also written to the results."""
    names = [args.loss] if args.loss else list(recipe.losses)
    rows = [
        measure_throughput(recipe, name, args.device, args.iterations, args.warmup, args.amp)
        for name in names
    ]
    columns = {
        "loss": "Loss",
        "batch_size": "Batch",
        "classes": "Classes",
        "images_per_second": "Images/s",
        "seconds_per_iteration": "s/iteration",
        "peak_gpu_memory_gib": "Peak GPU memory (GiB)",
    }
    table = reporting.markdown_table(rows, columns)
    environment = reporting.capture_environment(args.device)
    extra = {"recipe": recipe.to_dict(), "amp": args.amp, "iterations": args.iterations}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"throughput_{recipe.name}_{args.amp}.json"
    reporting.write_json(path, rows, environment, extra=extra)
    return table


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reproduce",
        description="Reproduce the ProxyGML paper's tables (and Proxy-Anchor's) with PML.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--table", action="store_true", help="print paper vs ours and exit")
    mode.add_argument("--show", action="store_true", help="print the resolved recipe and exit")
    mode.add_argument(
        "--synthetic", action="store_true", help="throughput on synthetic images instead"
    )
    parser.add_argument("--dataset", choices=sorted(paper_data.DATASETS))
    parser.add_argument("--dim", type=int, choices=DIMS)
    parser.add_argument("--loss", choices=sorted(LOSSES))
    parser.add_argument("--recipe", help="recipe name or .json path (default: <dataset>_<dim>)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides, e.g. train.epochs=30 model.backbone=resnet50",
    )
    parser.add_argument("--seed", type=int, help="shorthand for --set train.seed=N")
    parser.add_argument("--data-root", type=Path, help="the dataset's folder (PML's layout)")
    parser.add_argument("--download", action="store_true", help="let PML download the dataset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--amp",
        choices=sorted(backbones.AMP_DTYPES),
        default="off",
        help="autocast of the backbone (bf16 recommended; fp16 uses a static gradient scale)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work-dir", type=Path, help="run folder (default: under results)")
    parser.add_argument("--iterations", type=int, default=50, help="--synthetic: timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="--synthetic: untimed steps")
    args = parser.parse_args(argv)
    if args.table:
        return args
    if args.recipe is None:
        if args.dataset is None or args.dim is None:
            parser.error("give --dataset and --dim, or --recipe")
        args.recipe = f"{args.dataset}_{args.dim}"
    if args.seed is not None:
        args.overrides.append(f"train.seed={args.seed}")
    if not (args.show or args.synthetic) and (args.loss is None or args.data_root is None):
        parser.error("training needs --loss and --data-root")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the command; returns the run's results entry when it trained."""
    args = parse_args(argv)
    args.command = shlex.join(
        ["python", "-m", "benchmarks.reproduce", *(sys.argv[1:] if argv is None else argv)]
    )
    if args.table:
        print(results_table(args.results_dir))
        return None
    recipe = load_recipe(args.recipe, args.overrides)
    dim = recipe.model.embedding_size
    if args.dataset not in (None, recipe.dataset) or args.dim not in (None, dim):
        raise ValueError(
            f"recipe {recipe.name!r} is for {recipe.dataset}, {dim}-d, "
            f"not --dataset {args.dataset} --dim {args.dim}"
        )
    if args.loss is not None:
        recipe.loss_settings(args.loss)  # fail before any work if the recipe lacks this loss
    if args.show:
        print(json.dumps(recipe.to_dict(), indent=2))
        return None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger(c_f.LOGGER_NAME).setLevel(logging.WARNING)  # PML's per-step chatter
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input size, as the official code
    if args.synthetic:
        print(throughput(args, recipe))
        return None
    return train(args, recipe)


if __name__ == "__main__":
    try:
        main()
    except paper_data.DatasetNotFoundError as error:  # a message for the user, not a traceback
        sys.exit(f"error: {error}")

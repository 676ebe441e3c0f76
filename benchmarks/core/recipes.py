"""Recipes as data: ``benchmarks/recipes/<name>.json``, or any JSON file in that format.

A recipe says everything that changes a run's numbers, in sections (each a dataclass below):

* ``dataset``: which data (:data:`benchmarks.core.datasets.DATASETS`) and how its classes split;
* ``model``: backbone, pretrained weights, pooling and embedding head;
* ``data``: image size and augmentation (one random resized crop, optional flip);
* ``train``: epochs, batch size, optimizers, learning-rate schedule, evaluation epochs,
  frozen-trunk (warm-up) epochs, seeds;
* ``evaluation``: the Recall@K list and the other metrics;
* ``losses``: the losses the recipe can train, each with its keyword arguments (``settings``)
  and, where it differs from ``train.loss_optimizer``, its own proxy ``optimizer``;
* ``reported``: published numbers to compare with (``--table``); ``notes``: free text;
* ``tuning``: optional, what ``python -m benchmarks.tune`` tries on validation classes.

``"extends": "<recipe>"`` starts from another recipe and changes only what it names (objects
merge key by key). Epoch lists are text: ``"1,2,35-50"``, ``"all"``, ``""`` (none) or
percentages of the run's epochs, ``"40%,80%"`` (rounded; kept when strictly inside the run).
``--set KEY=VALUE`` changes any existing key (dotted path, JSON value) and may add keys under
``losses.<loss>.settings`` (loss keyword arguments) and new losses under ``losses``. A
relative ``.json`` path in ``extends`` is relative to the extending file's folder.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pml_proxygml.evaluation import recall_key

from . import datasets, models, registry
from .datasets.common import seeded_order
from .errors import RecipeError
from .harness import OptimizerSpec, TrainPlan

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def parse_epochs(text: str, epochs: int) -> tuple[int, ...]:
    """The epochs (1-based) of an epoch list in a run of ``epochs`` epochs."""
    text = str(text).strip()
    if text == "all":
        return tuple(range(1, epochs + 1))
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if part.endswith("%"):
                epoch = round(float(part[:-1]) / 100 * epochs)
                chosen.update([epoch] if 0 < epoch < epochs else [])
                continue
            first, _, last = part.partition("-")
            low, high = int(first), int(last or first)
        except ValueError:
            raise RecipeError(
                f"bad epoch list {text!r}: expected e.g. '1,2,35-50', 'all' or '40%,80%'"
            ) from None
        if not 1 <= low <= high:
            raise RecipeError(f"bad epoch range {part!r} in {text!r}")
        chosen.update(range(low, high + 1))
    return tuple(sorted(chosen))


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DatasetConfig:
    """``name``: a key of ``datasets.DATASETS``. ``test_fraction`` and ``split_seed``: the
    class-disjoint train/test split of a folder without ``train/`` and ``test/``.
    ``validation_fraction``: when set, that fraction of the *training* classes is held out
    and evaluated instead of the test classes (for tuning; test classes stay unseen).
    ``train_classes``: how many training classes the recipe expects (a warning otherwise;
    ``--throughput`` builds that many)."""

    name: str
    test_fraction: float = 0.5
    split_seed: int = 0
    validation_fraction: float | None = None
    train_classes: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Backbone (``models.BACKBONES``), ImageNet weights (``weights``: a local file instead of
    the download), embedding size, pooling (``avg`` / ``avg+max``), head init, whether the head
    L2-normalises its output, and the backbone's autocast (``off``, ``bf16``, ``fp16``)."""

    backbone: str
    embedding_size: int
    pretrained: bool = False
    weights: str | None = None
    pooling: str = "avg"
    embedding_init: str = "pytorch"
    normalize_embeddings: bool = True
    amp: str = "off"


@dataclass(frozen=True)
class DataConfig:
    """Evaluation: short side to ``resize``, centre ``crop``. Training: a random resized crop
    to ``crop`` (area fraction in ``crop_scale``, aspect ratio in ``crop_ratio``), then a
    horizontal flip with probability ``flip``."""

    resize: int
    crop: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """The training schedule; ``milestones``, ``eval_epochs`` and ``frozen_trunk_epochs`` are
    epoch lists (module docstring). ``milestones``: epochs after which every lr is multiplied
    by ``gamma``. ``frozen_trunk_epochs``: the warm-up, where only the embedding head and the
    loss's proxies train. The last epoch is always evaluated. ``sampler``: ``random`` or
    ``m_per_class``."""

    epochs: int
    batch_size: int
    backbone_optimizer: OptimizerSpec
    loss_optimizer: OptimizerSpec | None = None
    milestones: str = ""
    gamma: float = 0.1
    freeze_trunk_batchnorm: bool = False
    frozen_trunk_epochs: str = ""
    eval_epochs: str = "all"
    seeds: tuple[int, ...] = (0,)
    sampler: str = "random"
    m_per_class: int = 4
    num_workers: int = 0
    eval_batch_size: int = 256


@dataclass(frozen=True)
class EvaluationConfig:
    """Recall@K for ``recall_ks`` and PML's ``metrics`` (``NMI``, ``precision_at_1``,
    ``r_precision``, ``mean_average_precision_at_r``, ...)."""

    recall_ks: tuple[int, ...] = (1, 2, 4, 8)
    metrics: tuple[str, ...] = ("NMI", "mean_average_precision_at_r")


@dataclass(frozen=True)
class LossConfig:
    """A loss's keyword arguments, its proxy optimizer where it differs from the recipe's
    ``train.loss_optimizer``, and where these choices come from."""

    settings: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerSpec | None = None
    source: str = ""


@dataclass(frozen=True)
class Reported:
    """Published numbers (percent) of ``loss`` under this recipe, and where they are from."""

    loss: str
    source: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class TuningSpace:
    """Trials scored on ``losses`` (the mean of the metric): each sets every dotted recipe key
    of ``grid`` (the keys ``--set`` takes) to one of its candidate values. Several losses and
    shared keys tune the shared recipe; one loss and its own keys, that loss."""

    losses: tuple[str, ...]
    grid: dict[str, tuple[Any, ...]]

    def draw(self, defaults: Sequence[Any], trials: int, seed: int) -> list[dict[str, Any]]:
        """``trials`` settings: the recipe's own values (``defaults``, one per grid key), then
        distinct others from the grid in a seeded order (a sample without replacement)."""
        others = [
            values
            for values in itertools.product(*self.grid.values())
            if list(values) != list(defaults)
        ]
        order = seeded_order([json.dumps(values) for values in others], seed)
        if len(order) < trials - 1:
            raise RecipeError(
                f"the grid has {len(order)} combinations besides the recipe's own values, "
                f"fewer than the {trials - 1} trials after trial 0"
            )
        picked = [defaults, *(others[i] for i in order[: trials - 1])]
        return [dict(zip(self.grid, values)) for values in picked]


# Keys no trial may change: every trial evaluates the same validation split with one seed.
UNTUNABLE_KEYS = re.compile(r"^(dataset|tuning)(\.|$)|^train\.seeds$")
SPACE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class TuningConfig:
    """How ``python -m benchmarks.tune`` tunes this recipe: ``trials`` settings per space,
    each trained with one ``seed`` (which also seeds the draw of the trials) for ``epochs``
    (None: the recipe's) on the training classes left after holding out
    ``validation_fraction`` of them, and scored by the final epoch's ``metric`` on those
    validation classes. ``spaces`` are tuned in order, each on top of the earlier ones'
    choices."""

    spaces: dict[str, TuningSpace]
    validation_fraction: float = 0.2
    trials: int = 6
    seed: int = 0
    epochs: int | None = None
    metric: str = recall_key(1)

    def validate(self, recipe: Recipe) -> None:
        if not 0 < self.validation_fraction < 1:
            raise RecipeError("tuning.validation_fraction must be in (0, 1)")
        if self.trials < 1 or (self.epochs is not None and self.epochs < 1):
            raise RecipeError("tuning.trials and tuning.epochs must be positive")
        e = recipe.evaluation
        evaluated = [*map(recall_key, e.recall_ks), *e.metrics]
        if self.metric not in evaluated:
            raise RecipeError(
                f"tuning.metric: {self.metric!r} is not evaluated; the recipe evaluates "
                f"{', '.join(evaluated)}"
            )
        if not isinstance(self.spaces, Mapping) or not self.spaces:
            raise RecipeError("tuning.spaces: expected an object naming at least one space")
        raw = recipe.to_dict()
        for name, space in self.spaces.items():
            where = f"tuning.spaces.{name}"
            if not SPACE_NAME.match(name):
                raise RecipeError(f"{where}: a space name is letters, digits, '_' and '-'")
            check_space(recipe, raw, space, where)
            try:
                space.draw(tuning_defaults(raw, space), self.trials, self.seed)
            except RecipeError as error:
                raise RecipeError(f"{where}.grid: {error}") from None


def check_space(recipe: Recipe, raw: Mapping[str, Any], space: TuningSpace, where: str) -> None:
    """Its losses are the recipe's, and every candidate value, alone, makes a valid recipe
    whose scored losses build (``raw``: the recipe as a dict): a setting a loss refuses
    fails here, not at its trial, hours into a tuning."""
    if not space.losses:
        raise RecipeError(f"{where}.losses is empty")
    for loss in space.losses:
        try:
            recipe.loss(registry.check_name(loss))
        except RecipeError as error:
            raise RecipeError(f"{where}.losses: {error}") from None
    if not space.grid:
        raise RecipeError(f"{where}.grid is empty")
    scored = {recipe.entry_of(loss) for loss in space.losses}
    for key, values in space.grid.items():
        at = f"{where}.grid.{key}"
        parts = key.split(".")
        if UNTUNABLE_KEYS.match(key):
            raise RecipeError(f"{at}: the tuning protocol fixes the split, the seed and itself")
        if parts[0] == "losses" and (len(parts) < 3 or parts[1] not in scored):
            raise RecipeError(f"{at}: a space tunes only the losses it scores ({space.losses})")
        if not values:
            raise RecipeError(f"{at}: no candidate values")
        for value in values:
            candidate = apply_values(raw, {key: value}, f"{at}={json.dumps(value)}")
            try:
                built = Recipe.from_dict({**candidate, "tuning": None})
                for loss in space.losses:
                    check_builds(built, loss)
            except RecipeError as error:
                raise RecipeError(f"{at}={json.dumps(value)}: {error}") from None


# Enough classes to build any loss; a check never trains, so the dataset's number is moot.
CHECK_CLASSES = 4


def check_builds(recipe: Recipe, loss: str) -> None:
    """Loss ``loss`` accepts the recipe's settings for it (its constructor's own checks;
    its warnings about the number of classes concern a number the check made up)."""
    settings = recipe.loss(loss).settings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            registry.build_loss(loss, CHECK_CLASSES, recipe.model.embedding_size, settings)
    except ValueError as error:
        raise RecipeError(f"losses.{loss}.settings: {error}") from None


def tuning_defaults(raw: Mapping[str, Any], space: TuningSpace) -> list[Any]:
    """The recipe's own values of the space's keys: its trial 0."""
    return [get_value(raw, key) for key in space.grid]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    dataset: DatasetConfig
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    losses: dict[str, LossConfig]
    evaluation: EvaluationConfig = EvaluationConfig()
    default_losses: tuple[str, ...] = ()
    reported: tuple[Reported, ...] = ()
    notes: tuple[str, ...] = ()
    tuning: TuningConfig | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Recipe:
        recipe = _build(cls, raw, "recipe")
        recipe.validate()
        return recipe

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, like a file

    def validate(self) -> None:
        if self.dataset.name not in datasets.DATASETS:
            raise RecipeError(f"dataset.name must be one of {sorted(datasets.DATASETS)}")
        if self.model.backbone not in models.BACKBONES:
            raise RecipeError(f"model.backbone must be one of {sorted(models.BACKBONES)}")
        if not self.losses:
            raise RecipeError("the recipe has no losses")
        for name in [*self.losses, *self.default_losses, *(r.loss for r in self.reported)]:
            registry.check_name(name)
            self.loss(name)
        for epoch_list in ("milestones", "eval_epochs", "frozen_trunk_epochs"):
            parse_epochs(getattr(self.train, epoch_list), self.train.epochs)
        if not self.train.seeds:
            raise RecipeError("train.seeds is empty")
        for name in self.losses:
            try:
                plan = self.plan(name, self.train.seeds[0])
            except ValueError as error:
                raise RecipeError(f"train: {error}") from None
            if plan.loss_optimizer is None:  # every registered loss owns proxies
                raise RecipeError(f"{name} needs train.loss_optimizer or losses.{name}.optimizer")
        if self.tuning is not None:
            self.tuning.validate(self)

    def entry_of(self, name: str) -> str:
        """The ``losses`` entry that loss ``name`` takes its settings from: its own, or for a
        registry variant the recipe does not name, the loss it varies (``name`` if neither)."""
        spec = registry.LOSSES.get(name)
        if name not in self.losses and spec is not None and spec.variant_of in self.losses:
            return spec.variant_of
        return name

    def loss(self, name: str) -> LossConfig:
        """``losses.<name>``; for a registry variant the recipe does not name, the entry of the
        loss it varies, with the variant's settings added."""
        entry = self.entry_of(name)
        if entry in self.losses:
            base = self.losses[entry]
            added = registry.LOSSES[name].settings if entry != name else {}
            return dataclasses.replace(base, settings={**base.settings, **added})
        raise RecipeError(
            f"recipe {self.name!r} has no settings for loss {name!r}; it defines "
            f"{', '.join(self.losses)}"
        )

    @property
    def losses_to_run(self) -> tuple[str, ...]:
        return self.default_losses or tuple(self.losses)

    def plan(self, loss: str, seed: int) -> TrainPlan:
        """What the harness trains for ``loss`` with ``seed``."""
        t = self.train
        return TrainPlan(
            epochs=t.epochs,
            batch_size=t.batch_size,
            backbone_optimizer=t.backbone_optimizer,
            loss_optimizer=self.loss(loss).optimizer or t.loss_optimizer,
            milestones=parse_epochs(t.milestones, t.epochs),
            gamma=t.gamma,
            seed=seed,
            sampler=t.sampler,
            m_per_class=t.m_per_class,
            eval_epochs=parse_epochs(t.eval_epochs, t.epochs),
            frozen_trunk_epochs=parse_epochs(t.frozen_trunk_epochs, t.epochs),
            freeze_trunk_batchnorm=t.freeze_trunk_batchnorm,
            num_workers=t.num_workers,
            eval_batch_size=t.eval_batch_size,
        )


def _build(cls: Any, raw: Any, where: str) -> Any:
    """Dataclass ``cls`` from the mapping ``raw``: unknown keys and missing required keys fail;
    values are converted by ``_CONVERTERS[cls]`` (sections, optimizers, lists to tuples)."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: expected an object, got {raw!r}")
    fields = dataclasses.fields(cls)
    required = {
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    known = {f.name for f in fields}
    missing, unknown = required - raw.keys(), raw.keys() - known
    if missing or unknown:
        raise RecipeError(
            f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
        )
    converters = _CONVERTERS.get(cls, {})
    annotations = {f.name: f.type for f in fields}
    values = {
        key: _check_scalar(annotations[key], value, f"{where}.{key}")
        if key not in converters or value is None
        else converters[key](value, f"{where}.{key}")
        for key, value in raw.items()
    }
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{where}: {error}") from None


_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,)}
_SCALARS["str"] = (str,)


def _check_scalar(annotation: Any, value: Any, where: str) -> Any:
    """``value`` if it fits a scalar annotation such as ``"int"`` or ``"float | None"``
    (ints become floats where a float is due); other annotations pass unchecked."""
    kinds = [kind.strip() for kind in str(annotation).split("|")]
    if not set(kinds) <= {*_SCALARS, "None"} or (value is None and "None" in kinds):
        return value
    types = tuple(t for kind in kinds for t in _SCALARS.get(kind, ()))
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise RecipeError(f"{where}: expected {annotation}, got {value!r}")
    return float(value) if "float" in kinds and type(value) is int else value


def _tuple(value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise RecipeError(f"{where}: expected a list, got {value!r}")
    return tuple(value)


def _section(cls: Any) -> Any:
    return lambda value, where: _build(cls, value, where)


def _sections(cls: Any) -> Any:
    """A dict of sections keyed by name, or a list of sections."""

    def convert(value: Any, where: str) -> Any:
        if isinstance(value, Mapping):
            return {key: _build(cls, item, f"{where}.{key}") for key, item in value.items()}
        return tuple(
            _build(cls, item, f"{where}[{i}]") for i, item in enumerate(_tuple(value, where))
        )

    return convert


def _grid(value: Any, where: str) -> dict[str, tuple[Any, ...]]:
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: expected an object of dotted keys to value lists")
    return {key: _tuple(values, f"{where}.{key}") for key, values in value.items()}


_CONVERTERS: dict[Any, dict[str, Any]] = {
    DataConfig: {"crop_scale": _tuple, "crop_ratio": _tuple},
    TrainConfig: {
        "backbone_optimizer": _section(OptimizerSpec),
        "loss_optimizer": _section(OptimizerSpec),
        "seeds": _tuple,
    },
    EvaluationConfig: {"recall_ks": _tuple, "metrics": _tuple},
    LossConfig: {"optimizer": _section(OptimizerSpec)},
    TuningSpace: {"losses": _tuple, "grid": _grid},
    TuningConfig: {"spaces": _sections(TuningSpace)},
    Recipe: {
        "dataset": _section(DatasetConfig),
        "model": _section(ModelConfig),
        "data": _section(DataConfig),
        "train": _section(TrainConfig),
        "evaluation": _section(EvaluationConfig),
        "losses": _sections(LossConfig),
        "default_losses": _tuple,
        "reported": _sections(Reported),
        "notes": _tuple,
        "tuning": _section(TuningConfig),
    },
}


# ----------------------------------------------------------------------------- loading


def recipe_path(name_or_path: str) -> Path:
    """A recipe file: an existing ``.json`` path, or ``benchmarks/recipes/<name>.json``."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return path
    path = RECIPES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise RecipeError(f"no recipe {name_or_path!r}; known recipes: {', '.join(names())}")
    return path


def names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))


def _merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            value = _merge(merged[key], value)
        merged[key] = value
    return merged


def load_raw(name_or_path: str, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a dict, its ``extends`` chain resolved."""
    path = recipe_path(name_or_path)
    if path.resolve() in _seen:
        raise RecipeError(f"recipe {_seen[0].name}: 'extends' loops through {name_or_path!r}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path.name}: not valid JSON ({error})") from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if parent.endswith(".json"):
        parent = str(path.parent / parent)
    return _merge(load_raw(parent, (*_seen, path.resolve())), raw)


def _typed(where: str, old: Any, value: Any) -> Any:
    """``value`` in place of ``old``: of its type (an int where a float is due becomes one),
    anything where ``old`` is None."""
    if old is None or value is None:
        return value
    if isinstance(old, float) and type(value) is int:
        return float(value)
    if type(value) is not type(old):
        raise RecipeError(f"{where}: expected a {type(old).__name__} like {old!r}")
    return value


def _coerce(key: str, old: Any, text: str) -> Any:
    """``text`` as a value of ``old``'s type: strings as typed, anything else as JSON."""
    if isinstance(old, str):
        return text  # names and epoch lists such as "1,2,35-50"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if old is None:
            return text  # e.g. model.weights=/path/to/bn_inception.pth
        raise RecipeError(f"--set {key}={text}: not a JSON value") from None
    return _typed(f"--set {key}={text}", old, value)


def _locate(data: Any, key: str, where: str, new_keys: bool) -> tuple[dict[str, Any], str]:
    """The object holding dotted ``key`` in a recipe dict, and the key's last part. Only with
    ``new_keys`` may that part be new, and only under ``losses`` or a loss's ``settings``."""
    *parents, leaf = key.split(".")
    node = data
    for depth, part in enumerate(parents):
        if not isinstance(node, dict) or part not in node:
            raise RecipeError(f"{where}: no {'.'.join(parents[: depth + 1])!r} in recipe")
        node = node[part]
    loss_setting = len(parents) == 3 and parents[0] == "losses" and parents[2] == "settings"
    open_keys = new_keys and (parents == ["losses"] or loss_setting)
    if not isinstance(node, dict) or (leaf not in node and not open_keys):
        known = ", ".join(sorted(node)) if isinstance(node, dict) else ""
        raise RecipeError(f"{where}: unknown key {leaf!r} (known: {known})")
    return node, leaf


def get_value(raw: Mapping[str, Any], key: str) -> Any:
    """The value of dotted ``key`` in a recipe dict."""
    node, leaf = _locate(raw, key, key, new_keys=False)
    return node[leaf]


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with ``KEY=VALUE`` overrides (dotted keys, JSON values) applied."""
    data = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=30")
        node, leaf = _locate(data, key, f"--set {key}", new_keys=True)
        node[leaf] = _coerce(key, node.get(leaf), text)
    return data


def apply_values(raw: Mapping[str, Any], values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A copy of ``raw`` with existing dotted keys set to ``values`` (of their types)."""
    data = json.loads(json.dumps(raw))
    for key, value in values.items():
        node, leaf = _locate(data, key, where, new_keys=False)
        node[leaf] = _typed(where, node[leaf], value)
    return data


def load_recipe(
    name_or_path: str,
    overrides: Sequence[str] = (),
    epochs: int | None = None,
    seeds: Sequence[int] | None = None,
) -> Recipe:
    """A recipe with ``--set`` overrides, then ``--epochs`` and ``--seeds``, applied; validated.
    Overrides apply to the recipe with its defaults filled in, so they may set any field."""
    raw = apply_overrides(_build(Recipe, load_raw(name_or_path), "recipe").to_dict(), overrides)
    if not isinstance(raw.get("train"), dict):
        raise RecipeError("recipe: no 'train' section")
    if epochs is not None:
        raw["train"]["epochs"] = epochs
    if seeds is not None:
        raw["train"]["seeds"] = list(seeds)
    return Recipe.from_dict(raw)


def describe_all() -> str:
    """One line per shipped recipe: name and description (for ``--help``)."""
    lines = []
    for name in names():
        try:
            description = load_raw(name).get("description", "")
        except RecipeError as error:
            description = f"(broken: {error})"
        lines.append(f"  {name:<22} {description}")
    return "\n".join(lines)

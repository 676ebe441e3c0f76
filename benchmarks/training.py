"""Shared training harness: PML ``MetricLossOnly`` training with per-epoch retrieval metrics,
checkpoints and resume.

Model- and dataset-agnostic, for the emoji benchmark and the paper-reproduction kits alike. The
caller builds the models (``trunk`` and ``embedder``), the loss and the datasets; a
:class:`Recipe` says how to train them. :func:`train_and_evaluate` then

* trains one epoch at a time with PML's ``trainers.MetricLossOnly`` (its tqdm bar per epoch),
  with one optimizer per model and, for losses that own parameters (proxies), a
  ``metric_loss_optimizer`` with its own learning rate, epsilon and weight decay;
* steps every learning rate by ``gamma`` at the recipe's epoch ``milestones``;
* evaluates with PML's ``testers.GlobalEmbeddingSpaceTester`` and our
  :class:`~pml_proxygml.evaluation.DMLAccuracyCalculator` (default: Recall@1/2/4/8, NMI and
  MAP@R; the eval set is its own query and reference set, the DML protocol);
* logs one line per epoch and writes ``results.json`` / ``results.csv`` (one row per epoch:
  metrics, epoch training seconds, cumulative training seconds, evaluation seconds and the
  machine's load average, since other processes distort timings on a shared machine);
* saves a checkpoint after every epoch (models, loss state incl. proxies, optimizers,
  schedulers, epoch, rows so far and the Python/numpy/torch RNG states) and, when called again
  with the same recipe, resumes after the last saved epoch, or returns at once if the run is
  finished. Asking for more epochs than a finished run has continues it.

Determinism: a fresh run calls :func:`seed_everything` (``recipe.seed``) right before its first
epoch, so the data order and augmentation depend on the seed only, and every loss trained with
the same seed sees the same batches. Seed again before building the models for a reproducible
initialisation. On CPU a resumed run then reproduces an uninterrupted one bit for bit (same
thread count); on CUDA that also needs ``torch.use_deterministic_algorithms(True)``.

Dataset protocol: items are ``(input, label)`` with labels ``0..C-1``; a ``labels`` array is
needed for the ``m_per_class`` sampler and for :class:`ClassSubset`; ``set_epoch(epoch)``, when
present, is called before every epoch (fresh augmentation per epoch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning import samplers, testers, trainers
from pytorch_metric_learning.losses import BaseMetricLossFunction
from torch.optim.lr_scheduler import MultiStepLR

from pml_proxygml.evaluation import DMLAccuracyCalculator, as_float_dict, recall_key

from . import reporting

LOGGER = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RECALL_KS: tuple[int, ...] = (1, 2, 4, 8)
METRICS: tuple[str, ...] = (
    *(recall_key(k) for k in RECALL_KS),
    "NMI",
    "mean_average_precision_at_r",
)
# The 1-minute load average at the end of each epoch shows whether other processes slowed it.
RUN_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_seconds",
    "cumulative_seconds",
    "eval_seconds",
    "load_average",
)
# Recipe fields that may change between a run and its resumption (they leave the weights alone).
RESUMABLE_FIELDS = frozenset({"epochs", "eval_every", "eval_batch_size"})
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: ``name`` in ``OPTIMIZERS``; ``eps`` for Adam(W), ``momentum`` for SGD."""

    name: str
    lr: float
    weight_decay: float = 0.0
    eps: float = 1e-8
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.name!r}")

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.name == "sgd":
            kwargs["momentum"] = self.momentum
        else:
            kwargs["eps"] = self.eps
        return OPTIMIZERS[self.name](params, **kwargs)


@dataclass(frozen=True)
class Recipe:
    """How to train: everything that changes the numbers, so it is saved with each run.

    Attributes:
        epochs: epochs to train (a finished run asked for more continues).
        batch_size: training batch size (the last incomplete batch is dropped, as in PML).
        backbone: optimizer of the trunk and of the embedder (one each, same settings).
        loss: optimizer of the loss's own parameters (proxies); None for parameter-free losses.
        milestones: epochs after which every learning rate is multiplied by ``gamma``.
        gamma: learning-rate decay factor.
        seed: seed of the data order and augmentation (see the module docstring).
        sampler: ``"random"`` (shuffled epochs) or ``"m_per_class"`` (PML's MPerClassSampler,
            ``m_per_class`` images per class, about one pass over the data per epoch).
        eval_every: evaluate every this many epochs, and always after the last one.
        freeze_trunk_batchnorm: keep the trunk's BatchNorm layers in eval mode while training
            (the official ProxyGML recipe's ``--freeze_BN`` for pretrained backbones).
        num_workers: DataLoader workers for training and evaluation.
        eval_batch_size: batch size of the embedding pass during evaluation.
    """

    epochs: int
    batch_size: int
    backbone: OptimizerSpec
    loss: OptimizerSpec | None = None
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    seed: int = 0
    sampler: str = "random"
    m_per_class: int = 4
    eval_every: int = 1
    freeze_trunk_batchnorm: bool = False
    num_workers: int = 0
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("epochs, batch_size and eval_every must be positive")
        if self.sampler not in ("random", "m_per_class"):
            raise ValueError(f"sampler must be 'random' or 'm_per_class', got {self.sampler!r}")
        # Tuples, not lists, so that equal recipes compare equal after a JSON round trip.
        object.__setattr__(self, "milestones", tuple(sorted(self.milestones)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        data = dict(data)
        for key in ("backbone", "loss"):
            if data.get(key) is not None:
                data[key] = OptimizerSpec(**data[key])
        data["milestones"] = tuple(data.get("milestones", ()))
        return cls(**data)

    def differences(self, other: Recipe) -> dict[str, tuple[Any, Any]]:
        """Fields, other than ``RESUMABLE_FIELDS``, where ``other`` differs: ``(self, other)``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {
            key: (mine[key], theirs[key])
            for key in mine
            if key not in RESUMABLE_FIELDS and mine[key] != theirs[key]
        }


@dataclass
class RunResult:
    """What :func:`train_and_evaluate` did: all rows so far and the epochs this call trained."""

    rows: list[dict[str, Any]]
    trained_epochs: list[int]
    resumed_from: int
    out_dir: Path
    checkpoint: Path

    @property
    def final(self) -> dict[str, Any]:
        """The last row (the final epoch's metrics and times)."""
        return self.rows[-1]


# ----------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed Python, numpy (PML's samplers use its global RNG) and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- data


def class_disjoint_split(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted class ids ``(kept, held_out)``; about ``fraction`` of the classes are held out.

    Classes are ordered by a seeded SHA-256 of their id, so the split is stable across numpy
    versions. For hyper-parameter tuning on classes disjoint from the test classes.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    classes = np.unique(np.asarray(labels))
    order = sorted(classes, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    held = max(1, min(len(classes) - 1, round(fraction * len(classes))))
    return np.sort(order[held:]), np.sort(order[:held])


class ClassSubset(torch.utils.data.Dataset):
    """The items of ``dataset`` whose label is in ``classes``, relabelled ``0..len(classes)-1``.

    ``dataset`` needs a ``labels`` array; ``set_epoch`` is forwarded to it.
    """

    def __init__(self, dataset: Any, classes: Sequence[int] | np.ndarray) -> None:
        self.dataset = dataset
        self.classes = np.sort(np.asarray(classes))
        source = np.asarray(dataset.labels)
        self.indices = np.flatnonzero(np.isin(source, self.classes))
        self.labels = np.searchsorted(self.classes, source[self.indices])

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> tuple[Any, int]:
        item, _ = self.dataset[int(self.indices[idx])]
        return item, int(self.labels[idx])


def num_classes(dataset: Any) -> int:
    """C of a dataset with ``labels`` in ``0..C-1``."""
    return int(np.max(np.asarray(dataset.labels))) + 1


# ----------------------------------------------------------------------------- evaluation


def default_accuracy_calculator() -> DMLAccuracyCalculator:
    """Recall@1/2/4/8, NMI and MAP@R with cosine retrieval (the CUB/Cars table)."""
    return DMLAccuracyCalculator(RECALL_KS, include=METRICS)


def evaluate(
    tester: testers.GlobalEmbeddingSpaceTester,
    dataset: Any,
    name: str,
    epoch: int,
    trunk: torch.nn.Module,
    embedder: torch.nn.Module,
) -> dict[str, float]:
    """PML's tester on ``dataset`` as its own query and reference set; ``{metric: value}``."""
    accuracies = tester.test({name: dataset}, epoch, trunk, embedder)[name]
    # PML names metrics "<metric>_level0" (label hierarchy level 0) and adds the epoch.
    return as_float_dict(
        {
            key.removesuffix("_level0"): value
            for key, value in accuracies.items()
            if key.endswith("_level0")
        }
    )


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`train_and_evaluate` (tensors, plain types)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_models(
    path: Path,
    trunk: torch.nn.Module,
    embedder: torch.nn.Module,
    loss: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Load a checkpoint's weights into freshly built models (and loss); return it."""
    checkpoint = load_checkpoint(path)
    trunk.load_state_dict(checkpoint["models"]["trunk"])
    embedder.load_state_dict(checkpoint["models"]["embedder"])
    if loss is not None:
        loss.load_state_dict(checkpoint["loss"])
    return checkpoint


# ----------------------------------------------------------------------------- training


def _sampler(dataset: Any, recipe: Recipe) -> torch.utils.data.Sampler | None:
    if recipe.sampler == "random":
        return None  # PML's trainer shuffles
    return samplers.MPerClassSampler(
        np.asarray(dataset.labels),
        recipe.m_per_class,
        batch_size=recipe.batch_size,
        length_before_new_iter=len(dataset),
    )


def _format_row(row: Mapping[str, Any]) -> str:
    shown = {recall_key(1): "R@1", "NMI": "NMI", "mean_average_precision_at_r": "MAP@R"}
    metrics = "  ".join(f"{label} {row[key]:.4f}" for key, label in shown.items() if key in row)
    return (
        f"loss {row['train_loss']:.4f}  {metrics or 'no eval'}  "
        f"train {row['train_seconds']:.1f} s (total {row['cumulative_seconds']:.1f} s)  "
        f"eval {row['eval_seconds']:.1f} s"
    )


def _optimizers_and_schedulers(
    models: Mapping[str, torch.nn.Module], loss: torch.nn.Module, recipe: Recipe
) -> tuple[dict[str, torch.optim.Optimizer], dict[str, MultiStepLR]]:
    """Optimizers and epoch schedulers under the keys PML's trainer expects."""
    optimizers = {
        f"{name}_optimizer": recipe.backbone.build(params)
        for name, model in models.items()
        if (params := list(model.parameters()))  # e.g. no optimizer for an Identity embedder
    }
    loss_params = list(loss.parameters())
    if loss_params:
        if recipe.loss is None:
            raise ValueError("the loss has parameters, so the recipe needs a loss optimizer")
        optimizers["metric_loss_optimizer"] = recipe.loss.build(loss_params)
    schedulers = {
        f"{key.removesuffix('_optimizer')}_scheduler_by_epoch": MultiStepLR(
            optimizer, milestones=list(recipe.milestones), gamma=recipe.gamma
        )
        for key, optimizer in optimizers.items()
    }
    return optimizers, schedulers


def write_results(
    out_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    recipe: Recipe,
    info: Mapping[str, Any],
    environment: Mapping[str, Any],
    metrics: Sequence[str],
) -> None:
    """``results.json`` (info, recipe, progress, environment, rows) and ``results.csv``."""
    done = rows[-1]["epoch"] if rows else 0
    extra = {
        "run": dict(info),
        "recipe": recipe.to_dict(),
        "epochs_done": done,
        "finished": done >= recipe.epochs,
    }
    reporting.write_json(out_dir / RESULTS_JSON, rows, environment, extra=extra)
    reporting.write_csv(out_dir / RESULTS_CSV, rows, [*RUN_COLUMNS, *metrics])


def train_and_evaluate(
    trunk: torch.nn.Module,
    embedder: torch.nn.Module,
    loss: BaseMetricLossFunction,
    train_set: Any,
    eval_set: Any,
    recipe: Recipe,
    out_dir: Path,
    *,
    eval_name: str = "test",
    accuracy_calculator: DMLAccuracyCalculator | None = None,
    device: str | torch.device = "cpu",
    info: Mapping[str, Any] | None = None,
    checkpoint_path: Path | None = None,
    label: str = "",
) -> RunResult:
    """Train, evaluate after each epoch, checkpoint, write results; resume if a checkpoint exists.

    Args:
        trunk, embedder: the models; ``embedder`` maps trunk outputs to embeddings.
        loss: a PML loss; its parameters (if any) get ``recipe.loss``'s optimizer.
        train_set, eval_set: see the module docstring; ``eval_set`` is evaluated against
            itself after each evaluated epoch and reported under ``eval_name``.
        recipe: the training recipe; a resumed run must have the same recipe up to
            ``RESUMABLE_FIELDS``.
        out_dir: where ``results.json`` and ``results.csv`` go.
        accuracy_calculator: defaults to :func:`default_accuracy_calculator`.
        device: where the models, the loss and the batches live.
        info: extra facts about the run (loss name, seed, ...) for ``results.json``.
        checkpoint_path: defaults to ``out_dir / "checkpoint.pt"``.
        label: prefix of the per-epoch log line, e.g. ``"proxygml seed 0"``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = checkpoint_path or out_dir / CHECKPOINT_NAME
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    calculator = accuracy_calculator or default_accuracy_calculator()
    # PML lists metrics in its own order; put the usual table order first.
    metric_names = sorted(
        calculator.get_curr_metrics(),
        key=lambda m: (METRICS.index(m) if m in METRICS else len(METRICS), m),
    )
    info = dict(info or {})
    environment = reporting.capture_environment(str(device))
    models = {"trunk": trunk.to(device), "embedder": embedder.to(device)}
    loss = loss.to(device)

    optimizers, schedulers = _optimizers_and_schedulers(models, loss, recipe)

    rows: list[dict[str, Any]] = []
    start = 1
    if checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path, device)
        changed = Recipe.from_dict(checkpoint["recipe"]).differences(recipe)
        if changed:
            raise ValueError(
                f"{checkpoint_path} was trained with another recipe (saved, requested): "
                f"{changed}; use another output folder to train this one"
            )
        for name, model in models.items():
            model.load_state_dict(checkpoint["models"][name])
        loss.load_state_dict(checkpoint["loss"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(checkpoint["schedulers"][name])
        set_rng_state(checkpoint["rng"])
        rows = list(checkpoint["rows"])
        start = checkpoint["epoch"] + 1
        if start > recipe.epochs:
            LOGGER.info("%s: finished (%d epochs), skipped", label or out_dir, start - 1)
            return RunResult(rows[: recipe.epochs], [], start - 1, out_dir, checkpoint_path)
        LOGGER.info("%s: resuming after epoch %d", label or out_dir, start - 1)
    else:
        seed_everything(recipe.seed)

    epoch_losses: list[float] = []

    def end_of_iteration(trainer: trainers.BaseTrainer) -> None:
        total = trainer.losses["total_loss"]
        value = total.item() if torch.is_tensor(total) else float(total)
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{label}: non-finite loss at epoch {trainer.epoch}, iteration {trainer.iteration}"
            )
        epoch_losses.append(value)

    trainer = trainers.MetricLossOnly(
        models=models,
        optimizers=optimizers,
        batch_size=recipe.batch_size,
        loss_funcs={"metric_loss": loss},
        dataset=train_set,
        sampler=_sampler(train_set, recipe),
        data_device=device,
        lr_schedulers=schedulers,
        freeze_trunk_batchnorm=recipe.freeze_trunk_batchnorm,
        dataloader_num_workers=recipe.num_workers,
        end_of_iteration_hook=end_of_iteration,
    )
    tester = testers.GlobalEmbeddingSpaceTester(
        batch_size=recipe.eval_batch_size,
        dataloader_num_workers=recipe.num_workers,
        data_device=device,
        accuracy_calculator=calculator,
        end_of_testing_hook=lambda _: None,  # PML would log the whole dict at INFO
    )

    trained: list[int] = []
    cumulative = rows[-1]["cumulative_seconds"] if rows else 0.0
    for epoch in range(start, recipe.epochs + 1):
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        epoch_losses.clear()
        lr = next(iter(optimizers.values())).param_groups[0]["lr"]  # the backbone's
        tick = time.perf_counter()
        # One epoch per call: a resumed run rebuilds its DataLoader at the same point as an
        # uninterrupted one, so both draw the same batches.
        with warnings.catch_warnings():
            # PML formats the loss tensor for its progress bar; torch >= 2.13 warns about that.
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
            trainer.train(start_epoch=epoch, num_epochs=epoch)
        train_seconds = time.perf_counter() - tick
        cumulative += train_seconds
        row: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(np.mean(epoch_losses)) if epoch_losses else math.nan,
            "train_seconds": train_seconds,
            "cumulative_seconds": cumulative,
        }
        tick = time.perf_counter()
        if epoch % recipe.eval_every == 0 or epoch == recipe.epochs:
            row.update(evaluate(tester, eval_set, eval_name, epoch, trunk, embedder))
        row["eval_seconds"] = time.perf_counter() - tick
        row["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        rows.append(row)
        trained.append(epoch)
        save_checkpoint(
            checkpoint_path,
            {
                "epoch": epoch,
                "recipe": recipe.to_dict(),
                "info": info,
                "models": {name: model.state_dict() for name, model in models.items()},
                "loss": loss.state_dict(),
                "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
                "rng": rng_state(),
                "rows": rows,
            },
        )
        write_results(out_dir, rows, recipe, info, environment, metric_names)
        LOGGER.info("%s epoch %d/%d  %s", label, epoch, recipe.epochs, _format_row(row))
    return RunResult(rows, trained, start - 1, out_dir, checkpoint_path)

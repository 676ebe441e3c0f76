"""The training harness: one call of :func:`train_and_evaluate` trains a whole run.

PML's ``trainers.MetricLossOnly`` trains one epoch at a time (its tqdm bar per epoch), with one
optimizer per model and, for losses that own parameters (proxies), a ``metric_loss_optimizer``
with its own settings. A :class:`TrainPlan` says the rest: every learning rate is multiplied by
``gamma`` after each of the ``milestones``; during ``frozen_trunk_epochs`` (the warm-up) the
trunk gets no gradient, so only the embedding head and the proxies train; evaluation (PML's
``GlobalEmbeddingSpaceTester``, the eval set as its own query and reference set) runs after
each of the ``eval_epochs`` and after the last epoch. Each epoch adds a row (metrics, lr, mean
training loss, training and evaluation seconds, load average) to ``results.json`` /
``results.csv``.

Crash safety: after every epoch the whole training state (models, loss and proxies,
optimizers, schedulers, RNG states, rows so far) goes to the checkpoint, written atomically
(temporary file, fsync, rename), then the results files, also atomically. A run killed at any
moment (SIGKILL included) resumes with the same call after its last saved epoch and ends with
the same numbers as an uninterrupted run: on CPU bit for bit (same thread count); on CUDA that
also needs ``torch.use_deterministic_algorithms(True)``. A checkpoint that cannot be read, or
that belongs to another run (other identity, seed, optimizers, schedule, evaluation history,
or tensors of other shapes), is refused with a :class:`~.errors.CheckpointError` before
anything is loaded. A finished run returns at once (its results files repaired if a crash
left them behind the checkpoint); asking for more epochs continues it when the epochs already
trained are those the longer run would have trained.

Determinism: a fresh run calls :func:`seed_everything` (``plan.seed``) right before its first
epoch, so the data order depends on the seed only and every loss trained with the same seed
sees the same batches; seed again before building the models for a reproducible
initialisation. Evaluation draws from torch's global RNG (PML's tester builds a DataLoader),
so which epochs are evaluated is part of a run's history.

Dataset protocol: items are ``(input, label)`` with labels ``0..C-1``; a ``labels`` array is
needed by the ``m_per_class`` sampler; ``set_epoch(epoch)``, when present, is called before
every epoch (fresh augmentation per epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning import samplers, testers, trainers
from pytorch_metric_learning.losses import BaseMetricLossFunction
from torch.optim.lr_scheduler import MultiStepLR

from pml_proxygml.evaluation import DMLAccuracyCalculator, as_float_dict, recall_key

from . import measure, report
from .errors import CheckpointError

LOGGER = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = frozenset(
    {
        "format",
        "identity",
        "plan",
        "epoch",
        "models",
        "loss",
        "optimizers",
        "schedulers",
        "rng",
        "rows",
    }
)
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RUN_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_seconds",
    "cumulative_seconds",
    "eval_seconds",
    "load_average",
)
# Plan fields that may change when a run is resumed; the epochs already trained are checked
# separately (:func:`resume_conflicts`).
RESUMABLE_FIELDS = frozenset(
    {"epochs", "eval_epochs", "frozen_trunk_epochs", "eval_batch_size", "num_workers"}
)
METRIC_ORDER = ("NMI", "precision_at_1", "r_precision", "mean_average_precision_at_r")
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
class TrainPlan:
    """How one run trains (see the module docstring). ``sampler``: ``"random"`` (shuffled
    epochs) or ``"m_per_class"`` (PML's MPerClassSampler, ``m_per_class`` images per class,
    about one pass over the data per epoch)."""

    epochs: int
    batch_size: int
    backbone_optimizer: OptimizerSpec
    loss_optimizer: OptimizerSpec | None = None
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    seed: int = 0
    sampler: str = "random"
    m_per_class: int = 4
    eval_epochs: tuple[int, ...] = ()
    frozen_trunk_epochs: tuple[int, ...] = ()
    freeze_trunk_batchnorm: bool = False
    num_workers: int = 0
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be positive")
        if self.sampler not in ("random", "m_per_class"):
            raise ValueError(f"sampler must be 'random' or 'm_per_class', got {self.sampler!r}")
        for name in ("milestones", "eval_epochs", "frozen_trunk_epochs"):
            object.__setattr__(self, name, tuple(sorted(getattr(self, name))))

    def evaluates(self, epoch: int) -> bool:
        return epoch in self.eval_epochs or epoch == self.epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainPlan:
        data = dict(data)
        for key in ("backbone_optimizer", "loss_optimizer"):
            if data.get(key) is not None:
                data[key] = OptimizerSpec(**data[key])
        return cls(**data)


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


# ----------------------------------------------------------------------------- evaluation


def accuracy_calculator(
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    metrics: Sequence[str] = ("NMI", "mean_average_precision_at_r"),
) -> DMLAccuracyCalculator:
    """Recall@K for ``recall_ks`` and PML's ``metrics``, cosine retrieval."""
    return DMLAccuracyCalculator(
        tuple(recall_ks), include=(*(recall_key(k) for k in recall_ks), *metrics)
    )


def metric_order(calculator: DMLAccuracyCalculator) -> list[str]:
    """The calculator's metrics in table order: Recall@K by K, then ``METRIC_ORDER``, then
    any others alphabetically."""
    recall = [m for m in calculator.recall_keys if m in calculator.get_curr_metrics()]
    others = sorted(
        set(calculator.get_curr_metrics()) - set(recall),
        key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER else len(METRIC_ORDER), m),
    )
    return recall + others


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


def evaluate_raw_pixels(
    tester: testers.GlobalEmbeddingSpaceTester, dataset: Any, name: str
) -> dict[str, float]:
    """:func:`evaluate` with the normalised pixels themselves as embeddings: the floor that a
    trained embedding has to clear on ``dataset``."""
    return evaluate(tester, dataset, name, 0, torch.nn.Flatten(), torch.nn.Identity())


# ----------------------------------------------------------------------------- state


@dataclass
class TrainingState:
    """Everything a checkpoint restores: models, loss, optimizers and schedulers."""

    models: dict[str, torch.nn.Module]
    loss: BaseMetricLossFunction
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, MultiStepLR]

    @classmethod
    def build(
        cls,
        trunk: torch.nn.Module,
        embedder: torch.nn.Module,
        loss: BaseMetricLossFunction,
        plan: TrainPlan,
        device: str | torch.device,
    ) -> TrainingState:
        """Models and loss on ``device``; optimizers and epoch schedulers under the keys PML's
        trainer expects (no optimizer for a model without parameters)."""
        models = {"trunk": trunk.to(device), "embedder": embedder.to(device)}
        loss = loss.to(device)
        optimizers = {
            f"{name}_optimizer": plan.backbone_optimizer.build(params)
            for name, model in models.items()
            if (params := list(model.parameters()))
        }
        loss_params = list(loss.parameters())
        if loss_params:
            if plan.loss_optimizer is None:
                raise ValueError("the loss has parameters, so the plan needs a loss optimizer")
            optimizers["metric_loss_optimizer"] = plan.loss_optimizer.build(loss_params)
        schedulers = {
            f"{key.removesuffix('_optimizer')}_scheduler_by_epoch": MultiStepLR(
                optimizer, milestones=list(plan.milestones), gamma=plan.gamma
            )
            for key, optimizer in optimizers.items()
        }
        return cls(models, loss, optimizers, schedulers)

    def state_dict(self) -> dict[str, Any]:
        return {
            "models": {name: model.state_dict() for name, model in self.models.items()},
            "loss": self.loss.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
        }

    def layout_conflicts(self, saved: Mapping[str, Any]) -> list[str]:
        """Where ``saved`` does not fit this state: other tensor names or shapes in the models
        and the loss, other optimizers or parameter groups, other schedulers."""
        mine = self.state_dict()
        conflicts = [
            conflict
            for part in ("models", "loss")
            for conflict in _tensor_conflicts(mine[part], saved[part], part)
        ]
        groups = {
            name: [len(group["params"]) for group in optimizer.get("param_groups", [])]
            for name, optimizer in saved["optimizers"].items()
        }
        expected = {
            name: [len(group["params"]) for group in optimizer["param_groups"]]
            for name, optimizer in mine["optimizers"].items()
        }
        if groups != expected:
            conflicts.append(f"optimizer parameter groups: saved {groups}, expected {expected}")
        if saved["schedulers"].keys() != mine["schedulers"].keys():
            conflicts.append(f"schedulers: saved {sorted(saved['schedulers'])}")
        return conflicts

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        for name, model in self.models.items():
            model.load_state_dict(saved["models"][name])
        self.loss.load_state_dict(saved["loss"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(saved["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(saved["schedulers"][name])


def _tensor_conflicts(mine: Any, saved: Any, where: str) -> list[str]:
    """Names and tensor shapes of the (nested) state dict ``saved`` that differ from ``mine``."""
    if torch.is_tensor(mine):
        if torch.is_tensor(saved) and saved.shape == mine.shape:
            return []
        shape = tuple(saved.shape) if torch.is_tensor(saved) else type(saved).__name__
        return [f"{where}: saved {shape}, expected {tuple(mine.shape)}"]
    if not isinstance(mine, Mapping):
        return []
    if not isinstance(saved, Mapping) or saved.keys() != mine.keys():
        names = sorted(map(str, saved)) if isinstance(saved, Mapping) else saved
        return [f"{where}: saved {str(names)[:80]}, expected {sorted(map(str, mine))}"[:200]]
    return [c for key in mine for c in _tensor_conflicts(mine[key], saved[key], f"{where}.{key}")]


@contextlib.contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
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


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, contents: Mapping[str, Any]) -> None:
    """``torch.save`` atomically: a crash leaves the previous checkpoint or this one."""
    with report.atomic_file(path, "wb") as file:
        torch.save(dict(contents), file)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`train_and_evaluate`, or :class:`CheckpointError`."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle and unpickling errors alike
        raise CheckpointError(
            f"{report.relative(path)} is not a readable checkpoint "
            f"({type(error).__name__}); delete it to train this run from the start"
        ) from None
    if not isinstance(checkpoint, dict) or not checkpoint.keys() >= CHECKPOINT_KEYS:
        raise CheckpointError(
            f"{report.relative(path)} is not a checkpoint of this harness; "
            "delete it or use another output folder"
        )
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{report.relative(path)} has checkpoint format {checkpoint['format']!r}, this "
            f"harness reads {CHECKPOINT_FORMAT}; use another output folder"
        )
    return checkpoint


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


def resume_conflicts(
    checkpoint: Mapping[str, Any],
    identity: Mapping[str, Any],
    plan: TrainPlan,
    evaluated: Sequence[bool],
) -> list[str]:
    """Why ``checkpoint`` cannot continue as the run (``identity``, ``plan``), whose saved
    epochs were evaluated as ``evaluated`` says: [] when it can."""
    conflicts = []
    saved_identity = checkpoint.get("identity", {})
    for key in sorted(saved_identity.keys() | identity.keys()):
        if saved_identity.get(key) != json.loads(json.dumps(identity.get(key))):
            conflicts.append(f"{key}: saved {saved_identity.get(key)!r}, now {identity.get(key)!r}")
    saved_plan = TrainPlan.from_dict(checkpoint["plan"])
    mine, theirs = plan.to_dict(), saved_plan.to_dict()
    conflicts += [
        f"{key}: saved {theirs[key]!r}, now {mine[key]!r}"
        for key in mine
        if key not in RESUMABLE_FIELDS and mine[key] != theirs[key]
    ]
    for epoch in range(1, min(len(evaluated), plan.epochs) + 1):
        if evaluated[epoch - 1] != plan.evaluates(epoch):
            conflicts.append(f"epoch {epoch} was {'' if evaluated[epoch - 1] else 'not '}evaluated")
        if (epoch in saved_plan.frozen_trunk_epochs) != (epoch in plan.frozen_trunk_epochs):
            conflicts.append(f"the trunk's freezing at epoch {epoch} differs")
    return conflicts


# ----------------------------------------------------------------------------- training


def _sampler(dataset: Any, plan: TrainPlan) -> torch.utils.data.Sampler | None:
    if plan.sampler == "random":
        return None  # PML's trainer shuffles
    return samplers.MPerClassSampler(
        np.asarray(dataset.labels),
        plan.m_per_class,
        batch_size=plan.batch_size,
        length_before_new_iter=len(dataset),
    )


def make_trainer(
    state: TrainingState,
    train_set: Any,
    plan: TrainPlan,
    device: str | torch.device,
    batch_losses: list[float],
    label: str,
) -> trainers.MetricLossOnly:
    """PML's trainer; each batch's loss goes to ``batch_losses`` (a non-finite one stops)."""

    def end_of_iteration(trainer: trainers.BaseTrainer) -> None:
        total = trainer.losses["total_loss"]
        value = total.item() if torch.is_tensor(total) else float(total)
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{label}: non-finite loss at epoch {trainer.epoch}, iteration {trainer.iteration}"
            )
        batch_losses.append(value)

    return trainers.MetricLossOnly(
        models=state.models,
        optimizers=state.optimizers,
        batch_size=plan.batch_size,
        loss_funcs={"metric_loss": state.loss},
        dataset=train_set,
        sampler=_sampler(train_set, plan),
        data_device=device,
        lr_schedulers=state.schedulers,
        freeze_trunk_batchnorm=plan.freeze_trunk_batchnorm,
        dataloader_num_workers=plan.num_workers,
        end_of_iteration_hook=end_of_iteration,
    )


def make_tester(
    plan: TrainPlan, calculator: DMLAccuracyCalculator, device: str | torch.device
) -> testers.GlobalEmbeddingSpaceTester:
    return testers.GlobalEmbeddingSpaceTester(
        batch_size=plan.eval_batch_size,
        dataloader_num_workers=plan.num_workers,
        data_device=device,
        accuracy_calculator=calculator,
        end_of_testing_hook=lambda _: None,  # PML would log the whole dict at INFO
    )


def train_epoch(
    trainer: trainers.MetricLossOnly,
    state: TrainingState,
    train_set: Any,
    plan: TrainPlan,
    epoch: int,
    batch_losses: list[float],
) -> dict[str, Any]:
    """One epoch (the trunk frozen if the plan says so); its row without metrics."""
    if hasattr(train_set, "set_epoch"):
        train_set.set_epoch(epoch)
    batch_losses.clear()
    lr = next(iter(state.optimizers.values())).param_groups[0]["lr"]  # the backbone's
    trunk = state.models["trunk"]
    freeze = (
        frozen_parameters(trunk) if epoch in plan.frozen_trunk_epochs else contextlib.nullcontext()
    )
    tick = time.perf_counter()
    # One epoch per call: a resumed run rebuilds its DataLoader at the same point as an
    # uninterrupted one, so both draw the same batches.
    with freeze, warnings.catch_warnings():
        # PML formats the loss tensor for its progress bar; torch >= 2.13 warns about that.
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        trainer.train(start_epoch=epoch, num_epochs=epoch)
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": float(np.mean(batch_losses)) if batch_losses else math.nan,
        "train_seconds": time.perf_counter() - tick,
    }


def write_results(
    out_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    plan: TrainPlan,
    info: Mapping[str, Any],
    environment: Mapping[str, Any],
    metrics: Sequence[str],
) -> None:
    """``results.json`` (info, plan, progress, environment, rows) and ``results.csv``."""
    done = rows[-1]["epoch"] if rows else 0
    extra = {
        "run": dict(info),
        "plan": plan.to_dict(),
        "epochs_done": done,
        "finished": done >= plan.epochs,
    }
    report.write_json(out_dir / RESULTS_JSON, rows, environment, extra=extra)
    report.write_csv(out_dir / RESULTS_CSV, rows, [*RUN_COLUMNS, *metrics])


def _results_behind(out_dir: Path, rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``results.json`` is missing or holds other rows (a crash between writes)."""
    try:
        saved = json.loads((out_dir / RESULTS_JSON).read_text())
    except (OSError, ValueError):
        return True
    return [r.get("epoch") for r in saved.get("rows", [])] != [r["epoch"] for r in rows]


def _format_row(row: Mapping[str, Any]) -> str:
    shown = {recall_key(1): "R@1", "NMI": "NMI", "mean_average_precision_at_r": "MAP@R"}
    metrics = "  ".join(f"{label} {row[key]:.4f}" for key, label in shown.items() if key in row)
    return (
        f"loss {row['train_loss']:.4f}  {metrics or 'no eval'}  "
        f"train {row['train_seconds']:.1f} s (total {row['cumulative_seconds']:.1f} s)  "
        f"eval {row['eval_seconds']:.1f} s"
    )


def restore(
    checkpoint_path: Path,
    state: TrainingState,
    identity: Mapping[str, Any],
    plan: TrainPlan,
    metrics: Sequence[str],
    device: str | torch.device,
) -> list[dict[str, Any]]:
    """The rows of the saved run, its state loaded into ``state`` and its RNG restored;
    [] (and a freshly seeded RNG) without a checkpoint. Checks everything before loading."""
    if not checkpoint_path.exists():
        seed_everything(plan.seed)
        return []
    checkpoint = load_checkpoint(checkpoint_path, device)
    try:
        rows = list(checkpoint["rows"])
        evaluated = [any(m in row for m in metrics) for row in rows]
        conflicts = resume_conflicts(checkpoint, identity, plan, evaluated)
        conflicts += state.layout_conflicts(checkpoint)
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # malformed contents
        raise CheckpointError(
            f"{report.relative(checkpoint_path)} is malformed ({type(error).__name__}: {error}); "
            "delete it to train this run from the start"
        ) from None
    if conflicts:
        raise CheckpointError(
            f"{report.relative(checkpoint_path)} holds another run ({'; '.join(conflicts[:4])}); "
            "use another output folder for this one"
        )
    state.load_state_dict(checkpoint)
    set_rng_state(checkpoint["rng"])
    return rows


def train_and_evaluate(
    trunk: torch.nn.Module,
    embedder: torch.nn.Module,
    loss: BaseMetricLossFunction,
    train_set: Any,
    eval_set: Any,
    plan: TrainPlan,
    out_dir: Path,
    *,
    identity: Mapping[str, Any] | None = None,
    checkpoint_path: Path | None = None,
    calculator: DMLAccuracyCalculator | None = None,
    device: str | torch.device = "cpu",
    info: Mapping[str, Any] | None = None,
    environment: Mapping[str, Any] | None = None,
    eval_name: str = "test",
    label: str = "",
) -> RunResult:
    """Train the whole run (or resume it, or return a finished one); see the module docstring.

    Args:
        trunk, embedder: the models; ``embedder`` maps trunk outputs to embeddings.
        loss: a PML loss; its parameters (if any) get ``plan.loss_optimizer``.
        train_set, eval_set: see the module docstring; ``eval_set`` is evaluated against
            itself and reported under ``eval_name``.
        out_dir: where ``results.json`` and ``results.csv`` go.
        identity: JSON-able facts that make this run what it is beyond the plan (model,
            data, loss settings...); a checkpoint with other facts is refused.
        checkpoint_path: defaults to ``out_dir / "checkpoint.pt"``.
        calculator: the metrics; defaults to :func:`accuracy_calculator`.
        info: extra facts about the run (loss name, seed, ...) for ``results.json``.
        environment: the ``environment`` entry of ``results.json`` (default: captured now).
        label: prefix of the per-epoch log line, e.g. ``"proxygml seed 0"``.
    """
    checkpoint_path = checkpoint_path or out_dir / CHECKPOINT_NAME
    calculator = calculator or accuracy_calculator()
    metrics = metric_order(calculator)
    info = dict(info or {})
    environment = environment or report.capture_environment(str(device), "")
    identity = dict(identity or {})
    state = TrainingState.build(trunk, embedder, loss, plan, device)
    rows = restore(checkpoint_path, state, identity, plan, metrics, device)
    resumed_from = len(rows)
    if resumed_from >= plan.epochs:
        LOGGER.info("%s: finished (%d epochs), skipped", label or out_dir, resumed_from)
        if _results_behind(out_dir, rows[: plan.epochs]):
            write_results(out_dir, rows[: plan.epochs], plan, info, environment, metrics)
        return RunResult(rows[: plan.epochs], [], resumed_from, out_dir, checkpoint_path)
    if rows:
        LOGGER.info("%s: resuming after epoch %d", label or out_dir, resumed_from)

    batch_losses: list[float] = []
    trainer = make_trainer(state, train_set, plan, device, batch_losses, label)
    tester = make_tester(plan, calculator, device)
    trained: list[int] = []
    for epoch in range(resumed_from + 1, plan.epochs + 1):
        row = train_epoch(trainer, state, train_set, plan, epoch, batch_losses)
        row["cumulative_seconds"] = (rows[-1]["cumulative_seconds"] if rows else 0.0) + row[
            "train_seconds"
        ]
        tick = time.perf_counter()
        if plan.evaluates(epoch):
            trunk, embedder = state.models["trunk"], state.models["embedder"]
            row.update(evaluate(tester, eval_set, eval_name, epoch, trunk, embedder))
        row["eval_seconds"] = time.perf_counter() - tick
        row["load_average"] = (measure.load_average() or [None])[0]
        rows.append(row)
        trained.append(epoch)
        contents = {
            "format": CHECKPOINT_FORMAT,
            "identity": json.loads(json.dumps(identity)),
            "plan": plan.to_dict(),
            "info": info,
            "epoch": epoch,
            **state.state_dict(),
            "rng": rng_state(),
            "rows": rows,
        }
        save_checkpoint(checkpoint_path, contents)
        write_results(out_dir, rows, plan, info, environment, metrics)
        LOGGER.info("%s epoch %d/%d  %s", label, epoch, plan.epochs, _format_row(row))
    return RunResult(rows, trained, resumed_from, out_dir, checkpoint_path)

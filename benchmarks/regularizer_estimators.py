"""ProxyGML's cheaper regulariser estimators: cost per step and gradient error, measured.

``python -m benchmarks.regularizer_estimators`` measures, at the ProxyGML shapes of two
recipes (``benchmarks/recipes``), ``emoji`` (its C=818 training classes, N=12, d=128) and
``sop_512`` (C=11,318, N=1, d=512), each with its recipe's batch size (32) and r (0.05) and
the emoji recipe's lambda (0.3), for each ``regularizer_estimator`` setting of
``ProxyGMLLoss`` (and two row samplers measured here only, to decide against them):

* **cost**: the loss step (forward + backward) in ms, averaged over whole periods of the
  estimator (one exact refresh and m - 1 cheap steps), in interleaved rounds, median over the
  rounds; the load average is recorded, and the loss without regulariser is the floor.
* **gradient error** along a trajectory: at every step t, the gradient the estimator applies
  to the raw proxies, a_t, against the exact regulariser's gradient at that step, g_t:
  cosine and ``|a_t - g_t| / |g_t|``, mean and spread over the steps. The estimators keep
  their state (cached gradient, schedule) along the trajectory, so a lazy or cached gradient
  is judged at the steps where it is applied. Also the **Adam-update error**: each estimator
  feeds a shadow of the proxies' Adam (same settings, same starting state) with the
  classification gradient plus lambda * a_t; its update is compared with the real update of
  the exact run. This is what a gradient arriving every m-th step does to Adam's moments.

Trajectories:

* emoji: a real run, the emoji recipe's ProxyGML training (its models, dataset, optimizers
  and schedule, built by ``benchmarks.core`` as ``benchmarks.run`` builds them; seed 0) for
  the first ``--epochs`` epochs, with the exact regulariser. Its loss is ``ProxyGMLLoss``
  with lambda 0 plus lambda times the exact regulariser (``functional.linearized_regularizer``
  around the current proxies: value and gradient exact), which is the exact ProxyGML loss
  with its regulariser's value and gradient at hand for the comparison.
* SOP shape: no SOP data here, so a synthetic run: the SOP recipe's proxy optimizer (the
  official one: Adam lr 0.3, eps 0.01, weight decay 1e-4) trains the officially initialised
  proxies with the exact regulariser (lambda 0.3, the CUB/Cars weight: the official SOP
  recipe uses 0) on embeddings of fixed random class centres plus noise, 32 distinct classes
  a batch, for the first ``--sop-steps`` steps.

The per-step estimators here reuse ``functional``'s building blocks and the loss's schedule
(the exact regulariser on steps 0, m, 2m, ...); ``tests/test_regularizer_estimators.py``
checks that they apply what ``ProxyGMLLoss`` applies.

``--recipe`` and ``--sop-recipe`` take another recipe name or a ``.json`` recipe file (a tiny
one runs the whole script in seconds). Outputs in ``--out`` (default
``runs/regularizer_estimators/``; the committed results: ``--out
benchmarks/results/regularizer_estimators``): ``results.json`` and ``results.md``. Timings
come from whatever machine runs it; on a shared machine they are indicative (the load average
says how shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pml_proxygml import ProxyGMLLoss
from pml_proxygml import functional as gml

from .core import cli, datasets, harness, measure, models, recipes, registry, report
from .core.errors import RecipeError
from .core.harness import OptimizerSpec

SYNTHETIC_NOISE = 1.0  # embedding = normalize(centre + noise * N(0, I/d)): cosine ~0.7
WARMUP_PERIOD = 32


@dataclass(frozen=True)
class Shape:
    """Where a measurement runs: ProxyGML's size, the batch size, r and lambda."""

    name: str
    num_classes: int
    proxies_per_class: int
    embedding_size: int
    batch_size: int
    r: float
    weight_lambda: float

    @classmethod
    def of(cls, recipe: recipes.Recipe, num_classes: int, weight_lambda: float) -> Shape:
        """ProxyGML's shape under ``recipe`` with ``num_classes`` classes."""
        settings = recipe.loss("proxygml").settings
        return cls(
            recipe.dataset.name,
            num_classes,
            settings["proxies_per_class"],
            recipe.model.embedding_size,
            recipe.train.batch_size,
            settings["r"],
            weight_lambda,
        )


def proxygml_loss(shape: Shape, **kwargs: Any) -> ProxyGMLLoss:
    """ProxyGML at ``shape`` (its r) with ``kwargs`` (lambda, estimator)."""
    return ProxyGMLLoss(
        shape.num_classes, shape.embedding_size, shape.proxies_per_class, r=shape.r, **kwargs
    )


# Row samplers measured here only (stratified: samples // C rows of every class; whole
# classes: samples // N classes with all their proxies), against "uniform" at equal rows.
EXTRA_SAMPLERS = ("stratified", "whole_classes")


@dataclass(frozen=True)
class Setting:
    """A ``regularizer_estimator`` with its parameters, or one of the extra row samplers;
    ``"none"`` is the loss without regulariser (the cost floor)."""

    estimator: str
    period: int | None = None
    samples: int | None = None

    @property
    def name(self) -> str:
        parts = [self.estimator]
        parts += [f"m={self.period}"] if self.period else []
        parts += [f"s={self.samples}"] if self.samples else []
        return " ".join(parts)

    @property
    def is_loss_option(self) -> bool:
        return self.estimator not in EXTRA_SAMPLERS

    def loss_kwargs(self, weight_lambda: float) -> dict[str, Any]:
        if self.estimator == "none":
            return {"weight_lambda": 0.0}
        kwargs: dict[str, Any] = {"weight_lambda": weight_lambda}
        kwargs["regularizer_estimator"] = self.estimator
        if self.period is not None:
            kwargs["regularizer_period"] = self.period
        if self.samples is not None:
            kwargs["regularizer_samples"] = self.samples
        return kwargs


def settings_for(shape: Shape) -> list[Setting]:
    """The measured settings: periods 4-32 (4-16 at the SOP shape, whose run is measured
    over 16 steps), samples about a tenth of the emoji proxies."""
    periodic = [
        *(Setting("lazy", m) for m in (4, 8, 16)),
        *(Setting("cached", m) for m in (4, 8, 16)),
        Setting("svrg", 8, 1024),
    ]
    if shape.proxies_per_class == 1:  # stratified and whole-class rows are uniform rows
        return [Setting("exact"), Setting("uniform", samples=1024), *periodic]
    periodic.insert(-1, Setting("cached", 32))
    rows = shape.num_classes  # one per class, so that stratified rows are comparable
    return [
        Setting("exact"),
        Setting("uniform", samples=1024),
        *(Setting(sampler, samples=rows) for sampler in ("uniform", *EXTRA_SAMPLERS)),
        *periodic,
    ]


def timed_settings(settings: Sequence[Setting], shape: Shape) -> list[Setting]:
    """The loss options among ``settings``, after the floor (no regulariser). Where the exact
    regulariser takes seconds (SOP shape), lazy is timed at one period only: its cost is
    the exact one's over m plus the floor's, which that period shows."""
    timed = [s for s in settings if s.is_loss_option]
    if shape.proxies_per_class == 1:
        longest = max(s.period for s in timed if s.estimator == "lazy")
        timed = [s for s in timed if s.estimator != "lazy" or s.period == longest]
    return [Setting("none"), *timed]


# ----------------------------------------------------------------------------- estimators


def sample_rows(setting: Setting, shape: Shape, generator: torch.Generator) -> torch.Tensor:
    classes, per_class = shape.num_classes, shape.proxies_per_class
    if setting.estimator == "stratified":
        chosen = torch.rand(classes, per_class, generator=generator).argsort(dim=1)
        offsets = chosen[:, : setting.samples // classes]
        return (torch.arange(classes).unsqueeze(1) * per_class + offsets).flatten()
    if setting.estimator == "whole_classes":
        chosen = torch.randperm(classes, generator=generator)[: setting.samples // per_class]
        return (chosen.unsqueeze(1) * per_class + torch.arange(per_class)).flatten()
    return torch.randperm(classes * per_class, generator=generator)[: setting.samples]


@dataclass
class Exact:
    """The exact regulariser at one step: value and gradient w.r.t. the normalised and the
    raw proxies."""

    unit: torch.Tensor
    value: torch.Tensor
    unit_gradient: torch.Tensor
    gradient: torch.Tensor


def through_normalization(proxies: torch.Tensor, unit_gradient: torch.Tensor) -> torch.Tensor:
    """The raw proxies' gradient of a function whose gradient w.r.t. F.normalize(proxies) is
    ``unit_gradient``."""
    proxies = proxies.detach().requires_grad_()
    return torch.autograd.grad(F.normalize(proxies, dim=1), proxies, unit_gradient)[0]


class AppliedGradient:
    """The regulariser gradient one setting applies to the raw proxies, step after step."""

    def __init__(self, setting: Setting, shape: Shape, seed: int) -> None:
        self.setting = setting
        self.shape = shape
        self.generator = torch.Generator().manual_seed(seed)
        self.anchor: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, step: int, proxies: torch.Tensor, exact: Exact) -> torch.Tensor:
        setting, per_class = self.setting, self.shape.proxies_per_class
        refresh = setting.period is not None and step % setting.period == 0
        if setting.estimator == "exact":
            return exact.gradient
        if setting.estimator == "lazy":
            return setting.period * exact.gradient if refresh else torch.zeros_like(proxies)
        if refresh:  # cached, svrg
            self.anchor = (exact.unit, exact.value, exact.unit_gradient)
            return exact.gradient
        raw = proxies.detach().requires_grad_()
        if setting.estimator == "cached":
            estimate = gml.linearized_regularizer(raw, *self.anchor)
        else:
            rows = sample_rows(setting, self.shape, self.generator)
            if setting.estimator == "svrg":
                estimate = gml.variance_reduced_regularizer(raw, *self.anchor, per_class, rows)
            else:
                estimate = gml.proxy_regularizer(F.normalize(raw, dim=1), per_class, rows=rows)
        return torch.autograd.grad(estimate, raw)[0]


class ShadowAdam:
    """An Adam like the proxies' own, fed another gradient at the trajectory's proxies;
    ``state``: the proxies' Adam state to start from (None: a fresh one)."""

    def __init__(
        self, make_optimizer: Callable, like: torch.Tensor, state: dict | None = None
    ) -> None:
        self.parameter = torch.nn.Parameter(torch.zeros_like(like))
        self.optimizer = make_optimizer([self.parameter])
        if state is not None:
            self.optimizer.state[self.parameter] = {k: v.clone() for k, v in state.items()}

    def update(self, proxies: torch.Tensor, gradient: torch.Tensor, lr: float) -> torch.Tensor:
        with torch.no_grad():
            self.parameter.copy_(proxies)
        self.parameter.grad = gradient
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return self.parameter.detach() - proxies


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """In float64: float32 sums over millions of entries drift by 1e-3."""
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


class ErrorMeter:
    """Each setting's applied gradient and Adam update against the exact run's, per step."""

    def __init__(
        self,
        settings: Sequence[Setting],
        shape: Shape,
        make_optimizer: Callable,
        seed: int,
        initial_state: dict | None = None,
    ) -> None:
        self.settings = list(settings)
        self.initial_state = initial_state
        self.shape = shape
        self.make_optimizer = make_optimizer
        self.applied = {s: AppliedGradient(s, shape, seed + i) for i, s in enumerate(settings)}
        self.shadows: dict[Setting, ShadowAdam] = {}
        self.records: dict[Setting, list[dict[str, Any]]] = {s: [] for s in settings}
        self.step = 0
        self.proxies: torch.Tensor | None = None  # the last step's, before its update
        self._updates: dict[Setting, torch.Tensor] = {}

    def before_step(
        self,
        proxies: torch.Tensor,
        exact: Exact,
        classification_gradient: torch.Tensor,
        lr: float,
        phase: str,
    ) -> None:
        self.proxies = proxies
        for setting in self.settings:
            applied = self.applied[setting](self.step, proxies, exact)
            if setting not in self.shadows:
                self.shadows[setting] = ShadowAdam(self.make_optimizer, proxies, self.initial_state)
            gradient = classification_gradient + self.shape.weight_lambda * applied
            self._updates[setting] = self.shadows[setting].update(proxies, gradient, lr)
            self.records[setting].append(
                {
                    "phase": phase,
                    "cosine": cosine(applied, exact.gradient),
                    "relative_error": relative_error(applied, exact.gradient),
                }
            )

    def after_step(self, real_update: torch.Tensor) -> None:
        for setting, update in self._updates.items():
            record = self.records[setting][-1]
            record["adam_cosine"] = cosine(update, real_update)
            record["adam_relative_error"] = relative_error(update, real_update)
        self.step += 1

    def second_moments(self) -> dict[str, float]:
        """Median over the proxies' coordinates of sqrt(v) of each setting's Adam over that of
        the exact one (lazy's m-fold spikes inflate it), and the share of coordinates where
        the exact run's bias-corrected sqrt(v) exceeds Adam's eps (below it, Adam is close to
        momentum SGD with lr / eps, and the spikes average out)."""
        exact = self.shadows[Setting("exact")]
        state = exact.optimizer.state[exact.parameter]
        exact_v, group = state["exp_avg_sq"], exact.optimizer.param_groups[0]
        corrected = (exact_v / (1 - group["betas"][1] ** float(state["step"]))).sqrt()
        ratios: dict[str, float] = {
            "share_of_sqrt_v_above_eps": (corrected > group["eps"]).double().mean().item(),
            "median_sqrt_v_over_eps": (corrected.median() / group["eps"]).item(),
        }
        for setting, shadow in self.shadows.items():
            v = shadow.optimizer.state[shadow.parameter]["exp_avg_sq"]
            ratio = (v / exact_v.clamp_min(torch.finfo(v.dtype).tiny)).sqrt()
            ratios[setting.name] = ratio.median().item()
        return ratios

    def summary(self, phases: Sequence[str | None]) -> list[dict[str, Any]]:
        """Mean, std, 10th and 90th percentiles of every metric, per setting and phase
        (None: all steps)."""
        rows = []
        for phase in phases:
            for setting, records in self.records.items():
                chosen = [r for r in records if phase is None or r["phase"] == phase]
                row: dict[str, Any] = {
                    "setting": setting.name,
                    "phase": phase or "all",
                    "steps": len(chosen),
                }
                for metric in ("cosine", "relative_error", "adam_cosine", "adam_relative_error"):
                    values = np.array([r[metric] for r in chosen])
                    row[f"{metric}_mean"] = float(values.mean())
                    row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
                    row[f"{metric}_p10"] = float(np.percentile(values, 10))
                    row[f"{metric}_p90"] = float(np.percentile(values, 90))
                rows.append(row)
        return rows


# ----------------------------------------------------------------------------- trajectories


def exact_step(
    loss: ProxyGMLLoss,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    optimizers: Sequence[torch.optim.Optimizer],
    proxy_optimizer: torch.optim.Optimizer,
    meter: ErrorMeter,
    phase: str,
) -> float:
    """One training step of exact ProxyGML (``loss`` has lambda 0; the regulariser is added
    here, exactly), with the meter's measurements around the proxies' update."""
    proxies, weight_lambda = loss.proxies, meter.shape.weight_lambda
    unit = F.normalize(proxies.detach(), dim=1)
    value, unit_gradient = gml.regularizer_value_and_gradient(
        unit, loss.proxies_per_class, loss.regularizer_block_elements
    )
    for optimizer in optimizers:
        optimizer.zero_grad()
    regularizer = gml.linearized_regularizer(proxies, unit, value, unit_gradient)
    total = loss(embeddings, labels) + weight_lambda * regularizer
    total.backward()
    exact = Exact(unit, value, unit_gradient, through_normalization(proxies, unit_gradient))
    before = proxies.detach().clone()
    lr = proxy_optimizer.param_groups[0]["lr"]
    meter.before_step(before, exact, proxies.grad - weight_lambda * exact.gradient, lr, phase)
    for optimizer in optimizers:
        optimizer.step()
    meter.after_step(proxies.detach() - before)
    return total.item()


def emoji_trajectory(
    settings: Sequence[Setting],
    shape: Shape,
    recipe: recipes.Recipe,
    splits: datasets.Splits,
    epochs: int,
    seed: int,
) -> tuple[ErrorMeter, dict[str, Any]]:
    """The recipe's ProxyGML training on ``splits``, first ``epochs`` epochs, measured."""
    pixels = models.BACKBONES[recipe.model.backbone].pixels
    train_set, _ = splits.datasets(recipe.data, pixels, seed)
    plan = recipe.plan("proxygml", seed)
    harness.seed_everything(seed)  # as the benchmark runner: models, then proxies
    trunk, embedder = models.build_models(**dataclasses.asdict(recipe.model))
    loss_settings = {**recipe.loss("proxygml").settings, "weight_lambda": 0.0}
    loss = registry.build_loss("proxygml", shape.num_classes, shape.embedding_size, loss_settings)
    state = harness.TrainingState.build(trunk, embedder, loss, plan, "cpu")
    optimizers = list(state.optimizers.values())
    proxy_optimizer = state.optimizers["metric_loss_optimizer"]
    meter = ErrorMeter(settings, shape, plan.loss_optimizer.build, seed)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=shape.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    trunk.train()
    embedder.train()
    epoch_losses = []
    for epoch in range(1, epochs + 1):
        train_set.set_epoch(epoch)
        values = [
            exact_step(
                loss,
                embedder(trunk(images)),
                labels,
                optimizers,
                proxy_optimizer,
                meter,
                f"epoch {epoch}",
            )
            for images, labels in loader
        ]
        epoch_losses.append(statistics.fmean(values))
        for scheduler in state.schedulers.values():
            scheduler.step()
        print(f"emoji epoch {epoch}/{epochs}: mean loss {epoch_losses[-1]:.4f}", flush=True)
    description = {
        "kind": "real run",
        "what": f"the {recipe.name} recipe's ProxyGML training (models, dataset, optimizers, "
        f"schedule), exact regulariser, seed {seed}, epochs 1-{epochs} of {plan.epochs}",
        "steps": meter.step,
        "mean_loss_per_epoch": epoch_losses,
        "proxy_optimizer": vars(plan.loss_optimizer),
    }
    return meter, description


def synthetic_trajectory(
    settings: Sequence[Setting],
    shape: Shape,
    proxy_optimizer: OptimizerSpec,
    steps: int,
    warmup: int,
    seed: int,
) -> tuple[ErrorMeter, dict[str, Any]]:
    """Proxies alone, trained by ``proxy_optimizer`` on synthetic clustered embeddings:
    ``warmup`` steps of lazy
    ProxyGML (period ``WARMUP_PERIOD``: the exact regulariser is what makes this run slow),
    then ``steps`` measured steps of exact ProxyGML.

    The first steps from the official initialisation (norms about 0.1, Adam lr 0.3) turn the
    normalised proxies round fast, which no stale gradient follows; the warm-up measures past
    them, as the emoji run's second epoch does.
    """
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(
        torch.randn(shape.num_classes, shape.embedding_size, generator=generator), dim=1
    )

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        classes = torch.randperm(shape.num_classes, generator=generator)[: shape.batch_size]
        noise = torch.randn(len(classes), shape.embedding_size, generator=generator)
        scale = SYNTHETIC_NOISE / math.sqrt(shape.embedding_size)
        return F.normalize(centres[classes] + scale * noise, dim=1), classes

    harness.seed_everything(seed)
    loss = proxygml_loss(shape, weight_lambda=0.0)
    optimizer = proxy_optimizer.build(loss.parameters())
    warmup_loss = proxygml_loss(
        shape,
        weight_lambda=shape.weight_lambda,
        regularizer_estimator="lazy",
        regularizer_period=WARMUP_PERIOD,
    )
    warmup_loss.proxies = loss.proxies  # the same parameter, hence the same optimizer
    for _ in range(warmup):
        optimizer.zero_grad()
        warmup_loss(*batch()).backward()
        optimizer.step()
    # The shadows start from the proxies' Adam state, as the real optimizer's next step does.
    meter = ErrorMeter(settings, shape, proxy_optimizer.build, seed, optimizer.state[loss.proxies])
    for step in range(steps):
        exact_step(loss, *batch(), [optimizer], optimizer, meter, "all")
        print(f"{shape.name} step {step + 1}/{steps}", flush=True)
    description = {
        "kind": "synthetic run",
        "what": f"proxies alone trained from the official initialisation on fixed random unit "
        f"class centres + noise {SYNTHETIC_NOISE}/sqrt(d), {shape.batch_size} distinct classes "
        f"a batch (lambda {shape.weight_lambda}): {warmup} steps of lazy ProxyGML "
        f"(m={WARMUP_PERIOD}), "
        f"then steps {warmup + 1}-{warmup + steps} with the exact regulariser, measured; "
        f"seed {seed}",
        "steps": meter.step,
        "proxy_optimizer": vars(proxy_optimizer),
    }
    return meter, description


# ----------------------------------------------------------------------------- timing


def time_settings(
    settings: Sequence[Setting],
    shape: Shape,
    proxies: torch.Tensor,
    rounds: int,
    steps_per_round: int,
    exact_steps_per_round: int,
    seed: int,
) -> list[dict[str, Any]]:
    """ms per loss step (forward + backward, the shape's batch) of each setting; rounds
    interleave the settings, each running one period of a periodic estimator,
    ``exact_steps_per_round`` exact steps or ``steps_per_round`` steps of the others; medians
    over rounds."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(
        torch.randn(shape.batch_size, shape.embedding_size, generator=generator), dim=1
    ).requires_grad_()
    labels = torch.randint(0, shape.num_classes, (shape.batch_size,), generator=generator)
    losses = {}
    for setting in settings:
        loss = proxygml_loss(shape, **setting.loss_kwargs(shape.weight_lambda))
        with torch.no_grad():
            loss.proxies.copy_(proxies)
        losses[setting] = loss

    def run(setting: Setting, steps: int) -> list[float]:
        """Seconds of each of ``steps`` consecutive steps (gradients cleared untimed)."""
        loss = losses[setting]

        def clear() -> None:
            embeddings.grad = loss.proxies.grad = None

        step = {setting.name: lambda: loss(embeddings, labels).backward()}
        return measure.time_steps(step, repeats=steps, warmup=0, before=clear)[setting.name]

    def steps(setting: Setting) -> int:
        if setting.period is not None:
            return setting.period
        return exact_steps_per_round if setting.estimator == "exact" else steps_per_round

    for setting in settings:  # warm-up
        run(setting, setting.period or 1)
    samples: dict[Setting, list[list[float]]] = {s: [] for s in settings}
    loads = []
    for _ in range(rounds):
        for setting in settings:
            samples[setting].append(run(setting, steps(setting)))
        loads.append(measure.load_average()[0])
    rows = []
    for setting in settings:
        per_round = samples[setting]
        row: dict[str, Any] = {
            "setting": setting.name,
            "ms_per_step": 1e3 * statistics.median(statistics.fmean(t) for t in per_round),
            "steps_per_round": len(per_round[0]),
            "rounds": rounds,
        }
        if setting.period:
            firsts = [t[i] for t in per_round for i in range(0, len(t), setting.period)]
            others = [t[i] for t in per_round for i in range(len(t)) if i % setting.period]
            row["refresh_ms"] = 1e3 * statistics.median(firsts)
            row["between_ms"] = 1e3 * statistics.median(others) if others else None
        rows.append(row)
    by_name = {row["setting"]: row for row in rows}
    for row in rows:
        row["x_exact"] = row["ms_per_step"] / by_name["exact"]["ms_per_step"]
        row["x_floor"] = row["ms_per_step"] / by_name["none"]["ms_per_step"]
    rows.append({"setting": "max load average over rounds", "ms_per_step": max(loads)})
    return rows


# ----------------------------------------------------------------------------- report


def _mean_std(row: dict[str, Any], metric: str) -> str:
    std = row[f"{metric}_std"]
    return f"{row[f'{metric}_mean']:.3f}" + ("" if std is None else f" ± {std:.3f}")


def shape_table(timing: Sequence[dict[str, Any]], errors: Sequence[dict[str, Any]]) -> str:
    """One row per setting: cost, then gradient and Adam-update errors over all steps."""
    costs = {row["setting"]: row for row in timing}
    rows = []
    for error in errors:
        cost = costs.get(error["setting"], {})
        rows.append(
            {
                "setting": error["setting"],
                "ms": cost.get("ms_per_step"),
                "x_exact": cost.get("x_exact"),
                "x_floor": cost.get("x_floor"),
                "cosine": _mean_std(error, "cosine"),
                "cosine_p10": error["cosine_p10"],
                "relative_error": _mean_std(error, "relative_error"),
                "adam_cosine": _mean_std(error, "adam_cosine"),
                "adam_relative_error": _mean_std(error, "adam_relative_error"),
            }
        )
    floor = costs["none"]
    rows.insert(0, {"setting": "none (no regulariser)", **_cost_cells(floor)})
    columns = {
        "setting": "estimator",
        "ms": "ms/step",
        "x_exact": "× exact",
        "x_floor": "× no-reg",
        "cosine": "grad cosine",
        "cosine_p10": "cosine p10",
        "relative_error": "grad rel. error",
        "adam_cosine": "Adam-update cosine",
        "adam_relative_error": "Adam-update rel. error",
    }
    return report.markdown_table(rows, columns)


def _cost_cells(row: dict[str, Any]) -> dict[str, Any]:
    return {"ms": row["ms_per_step"], "x_exact": row["x_exact"], "x_floor": row["x_floor"]}


def measure_shape(
    shape_name: str, args: argparse.Namespace, recipe: recipes.Recipe, sop_recipe: recipes.Recipe
) -> dict[str, Any]:
    """Trajectory errors, then timings at the trajectory's last proxies."""
    weight_lambda = recipe.loss("proxygml").settings["weight_lambda"]
    if shape_name == "emoji":
        splits = datasets.open_splits(recipe.dataset, args.data_root)
        shape = Shape.of(recipe, splits.train.num_classes, weight_lambda)
        settings = settings_for(shape)
        tick = time.perf_counter()
        meter, trajectory = emoji_trajectory(
            settings, shape, recipe, splits, args.epochs, args.seed
        )
        phases = [None, f"epoch {args.epochs}"]
    else:
        classes = sop_recipe.dataset.train_classes
        if classes is None:
            raise RecipeError(f"{sop_recipe.name}: the SOP shape needs dataset.train_classes")
        shape = Shape.of(sop_recipe, classes, weight_lambda)
        settings = settings_for(shape)
        proxy_optimizer = sop_recipe.plan("proxygml", args.seed).loss_optimizer
        tick = time.perf_counter()
        meter, trajectory = synthetic_trajectory(
            settings, shape, proxy_optimizer, args.sop_steps, args.sop_warmup, args.seed
        )
        phases = [None]
    trajectory["seconds"] = time.perf_counter() - tick
    errors = meter.summary(phases)
    emoji_shape = shape_name == "emoji"
    timing = time_settings(
        timed_settings(settings, shape),
        shape,
        meter.proxies,
        rounds=args.emoji_rounds if emoji_shape else args.sop_rounds,
        steps_per_round=16,
        exact_steps_per_round=4 if emoji_shape else 1,
        seed=args.seed,
    )
    result = {
        "shape": vars(shape),
        "k": gml.num_selected(shape.r, shape.num_classes, shape.proxies_per_class),
        "trajectory": trajectory,
        "timing": timing,
        "errors": errors,
        "adam_second_moments": meter.second_moments(),
    }
    print(shape_table(timing, [e for e in errors if e["phase"] == "all"]), flush=True)
    return result


def second_moment_notes(moments: dict[str, float]) -> str:
    """The Adam second-moment line of a shape (see ``ErrorMeter.second_moments``)."""
    ratios = ", ".join(
        f"{name} {value:.2f}"
        for name, value in moments.items()
        if not name.startswith(("share", "median"))
    )
    return (
        f"Adam's second moment at the end: the exact run's bias-corrected sqrt(v) exceeds eps "
        f"on {100 * moments['share_of_sqrt_v_above_eps']:.1f}% of the proxies' coordinates "
        f"(median sqrt(v) / eps {moments['median_sqrt_v_over_eps']:.3f}); median ratio of each "
        f"estimator's sqrt(v) to the exact one's: {ratios}.\n"
    )


def notes(results: dict[str, Any]) -> str:
    lines = [
        "Per estimator: loss step cost (forward + backward; median over "
        "interleaved rounds of the mean over whole periods) and, along a trajectory, the "
        "error of the regulariser gradient it applies at each step against the exact one "
        "(cosine and |a - g| / |g|, mean ± std over steps; p10 = 10th percentile of the "
        "cosine), and of the resulting Adam update of the proxies against the exact run's "
        "(same Adam state, same classification gradient).\n",
        "The Adam-update error is a norm over all proxies, dominated by the rows the "
        "classification gradient moves; the gradient error is the regulariser's alone.\n",
        "Timings are comparable only inside this run, and only where nothing else ran: the "
        "load averages per shape and in the environment say whether other jobs did.\n",
    ]
    for name, result in results.items():
        shape = result["shape"]
        trajectory = result["trajectory"]
        lines.append(
            f"- **{name}** (C={shape['num_classes']}, N={shape['proxies_per_class']}, "
            f"d={shape['embedding_size']}, k={result['k']}, batch {shape['batch_size']}, "
            f"lambda {shape['weight_lambda']}): {trajectory['kind']}, "
            f"{trajectory['what']}; {trajectory['steps']} steps."
        )
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out: Path, environment: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    environment["load_average_at_end"] = measure.load_average()
    report.write_json(out / "results.json", [], environment, extra={"shapes": results})
    sections = []
    for name, result in results.items():
        errors = result["errors"]
        sections.append(f"## {name}: all {result['trajectory']['steps']} steps\n")
        sections.append(shape_table(result["timing"], [e for e in errors if e["phase"] == "all"]))
        for phase in sorted({e["phase"] for e in errors} - {"all"}):
            sections.append(f"\n## {name}: {phase} only\n")
            sections.append(
                shape_table(result["timing"], [e for e in errors if e["phase"] == phase])
            )
        load = result["timing"][-1]["ms_per_step"]
        sections.append(f"\nHighest 1-minute load average during the {name} timing: {load:.2f}.\n")
        sections.append(second_moment_notes(result["adam_second_moments"]))
    report.write_markdown(
        out / "results.md",
        "ProxyGML regulariser estimators: cost and gradient error",
        "\n".join(sections),
        environment,
        notes(results),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.regularizer_estimators",
        description="Cost and gradient error of ProxyGML's regulariser estimators.",
        parents=[cli.common_flags("out", "data_root")],
    )
    parser.add_argument("--shapes", nargs="+", choices=["emoji", "sop"], default=["emoji", "sop"])
    parser.add_argument(
        "--recipe",
        default="emoji",
        help="the emoji run's recipe, a name or a .json file (its lambda is every shape's)",
    )
    parser.add_argument(
        "--sop-recipe", default="sop_512", help="the SOP shape's recipe, a name or a .json file"
    )
    parser.add_argument("--epochs", type=int, default=2, help="emoji trajectory epochs")
    parser.add_argument("--sop-steps", type=int, default=16, help="SOP-shape measured steps")
    parser.add_argument(
        "--sop-warmup", type=int, default=160, help="SOP-shape lazy steps before them"
    )
    parser.add_argument("--emoji-rounds", type=int, default=5, help="timing rounds, emoji")
    parser.add_argument("--sop-rounds", type=int, default=3, help="timing rounds, SOP shape")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    recipe = recipes.load_recipe(args.recipe)
    sop_recipe = recipes.load_recipe(args.sop_recipe)
    out = report.output_folder(args.out, "regularizer_estimators")
    command = report.command_line("benchmarks.regularizer_estimators", argv)
    environment = report.capture_environment("cpu", command)
    environment["torch_threads"] = torch.get_num_threads()
    start = time.perf_counter()
    results = {name: measure_shape(name, args, recipe, sop_recipe) for name in args.shapes}
    environment["wall_seconds"] = round(time.perf_counter() - start)
    write_results(results, out, environment)
    print(f"results in {report.relative(out)}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

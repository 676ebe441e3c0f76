"""ProxyGML against PML's proxy losses, trained end to end on the emoji retrieval dataset.

Every loss trains the same small CNN (:class:`SmallCNN` trunk + linear 128-d embedder, from
scratch) through PML's ``MetricLossOnly`` trainer (:mod:`benchmarks.training`) with the same
epochs, batch size (32), backbone optimizer (Adam, lr 1e-3, weight decay 1e-4), schedule (lr
x0.1 after 40% and 80% of the epochs), sampling (shuffled), augmentation (random resized crop,
``EmojiDataset(augment=True)``) and seeds; seed s also fixes the initial weights and the batches,
so every loss sees the same data. Test: the 818 test classes (disjoint from the 818 train
classes), each image querying all others by cosine similarity: Recall@1/2/4/8, NMI, MAP@R.

Each loss keeps its own paper's loss hyper-parameters and proxy learning-rate rule (proxy lr =
multiplier x backbone lr, with that paper's optimizer settings for the proxies); see
``LOSSES`` and the table written into ``summary.md``:

============ ============================= ===== ========================================
loss         hyper-parameters              proxy source
============ ============================= ===== ========================================
ProxyGML     N=12, r=0.05, lambda=0.3      x300  official run.sh (CUB/Cars): centerlr 0.03
                                                 vs modellr 1e-4, Adam eps 0.01
ProxyAnchor  margin 0.1, alpha 32          x100  official train.py: proxies lr x100, AdamW
SoftTriple   K=10, la=20, gamma=0.1,       x100  official train.py: centerlr 0.01 vs
             margin 0.01, tau=0.2                modellr 1e-4, Adam eps 0.01
NormSoftmax  temperature 0.05              x1    official code (Zhai & Wu 2019): one
                                                 optimizer for network and class weights
ProxyNCA     softmax scale 1, unit vectors x1    Movshovitz-Attias et al. 2017: one lr (as
                                                 in Proxy-Anchor's ProxyNCA baseline)
============ ============================= ===== ========================================

All use weight decay 1e-4 on the proxies, as the ProxyGML, Proxy-Anchor, SoftTriple and
NormSoftmax codes do. Warm-up epochs with a frozen backbone (Proxy-Anchor, NormSoftmax) are not
used: the schedule is shared.

ProxyGML's regulariser costs C*N*C*d = 818*12*818*128 ~ 1e9 multiply-adds a step (forward),
several times the loss itself; it is kept exact (the official recipe) and its cost per epoch is
measured and written into the summary. SoftTriple's tau regulariser is computed by
:class:`BlockSparseCentersRegularizer`: the official formula (PML's ``SparseCentersRegularizer``
up to its epsilon) over the K x K same-class blocks only, where PML's builds the full (CK)^2
similarity matrix (0.74 s a step here).

Tuning: nothing was tuned on test classes, and nothing per loss. The shared settings above were
fixed before any run (common Adam settings for a small CNN trained from scratch; epochs from the
time budget). ``--tune`` runs the protocol for the shared backbone lr: a validation split of 20%
of the *train* classes (class-disjoint from the rest and from test), seed 0, the same lr grid
and epochs for every loss, and the lr with the best mean validation Recall@1 across losses.

Outputs in ``--out``: ``runs/<loss>/seed<s>/results.{json,csv}`` (per epoch: metrics, epoch
training seconds, cumulative seconds), ``summary.{md,json}`` (final metrics, mean +- std over
seeds, seconds per epoch, environment, command line), ``recall_vs_epoch.png``,
``recall_vs_seconds.png`` and ``retrieval_proxygml.png``. Checkpoints (one per run, rewritten
every epoch) go to ``<out>/checkpoints/`` (git-ignored). Re-running the same command skips
finished runs and resumes an interrupted one after its last finished epoch; other ``--epochs``
move the lr milestones, so such a run is refused: use another ``--out``.

CLI: ``python -m benchmarks.emoji`` (all five losses, 3 seeds), ``--quick`` (ProxyGML and
ProxyAnchor, one seed, a few epochs: under 15 minutes on 2 CPU cores, dataset build included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, testers
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import DivisorReducer
from pytorch_metric_learning.regularizers import BaseRegularizer
from pytorch_metric_learning.utils import common_functions as c_f
from torch import nn

from pml_proxygml import ProxyGMLLoss

from . import reporting, training
from .datasets import emoji as emoji_data

LOGGER = logging.getLogger(__name__)

RESULTS_ROOT = reporting.REPO_ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS_ROOT / "emoji"
QUICK_OUT = RESULTS_ROOT / "emoji_quick"
DEFAULT_DATA = emoji_data.DEFAULT_CACHE

EPOCHS = 20
SEEDS = 3
QUICK_EPOCHS = 10
QUICK_LOSSES = ("proxygml", "proxyanchor")
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 64  # the fastest CPU inference batch for this CNN (measured: 64 < 32, 128, 256)
EMBEDDING_SIZE = 128
BACKBONE_LR = 1e-3
WEIGHT_DECAY = 1e-4
MILESTONE_FRACTIONS = (0.4, 0.8)  # the official ProxyGML schedule: decay after 20 and 40 of 50
TUNE_LRS = (3e-4, 1e-3, 3e-3)
VAL_FRACTION = 0.2
PROXYGML_KWARGS: dict[str, Any] = {"proxies_per_class": 12, "r": 0.05, "weight_lambda": 0.3}
SOFTTRIPLE_CENTERS = 10
SOFTTRIPLE_SQRT_EPS = 1e-5  # official SoftTriple code, keeps the regulariser's gradient finite

METRIC_LABELS = {
    "recall_at_1": "R@1",
    "recall_at_2": "R@2",
    "recall_at_4": "R@4",
    "recall_at_8": "R@8",
    "NMI": "NMI",
    "mean_average_precision_at_r": "MAP@R",
}


# ----------------------------------------------------------------------------- models


class SmallCNN(nn.Sequential):
    """Conv3x3-BN-ReLU stages with 2x2 max-pooling between them, then global average pooling.

    With the default widths a 48x48 image is seen at 48, 24, 12 and 6 pixels; about 34M
    multiply-adds per image.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256)) -> None:
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.output_size = channels


def build_models(embedding_size: int) -> tuple[SmallCNN, nn.Linear]:
    """The trunk and the linear embedder every loss trains."""
    trunk = SmallCNN()
    return trunk, nn.Linear(trunk.output_size, embedding_size)


# ----------------------------------------------------------------------------- losses


class BlockSparseCentersRegularizer(BaseRegularizer):
    """SoftTriple's tau regulariser, as in the official code and PML's ``SparseCentersRegularizer``:
    the mean of sqrt(2 + 1e-5 - 2 cos) over same-class centre pairs.

    Only same-class pairs enter it, so this computes the C blocks of K x K similarities,
    O(C K^2 d), where PML's materialises all (CK)^2. The 1e-5 is the official code's; PML's uses
    the float's smallest normal number there, whose sqrt gradient overflows once two
    same-class centres merge (NaN after ~100 steps here). Takes the (C*K, d) centres, row j of
    class j // K, as ``SoftTripleLoss`` passes them.
    """

    def __init__(self, num_classes: int, centers_per_class: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.centers_per_class = centers_per_class

    def compute_loss(self, weights: torch.Tensor) -> dict[str, Any]:
        k = self.centers_per_class
        centers = F.normalize(weights, dim=1).view(self.num_classes, k, -1)
        rows, cols = torch.triu_indices(k, k, offset=1, device=weights.device)
        similarities = (centers @ centers.transpose(1, 2))[:, rows, cols].flatten()
        reg = torch.sqrt(2.0 + SOFTTRIPLE_SQRT_EPS - torch.clamp(2.0 * similarities, max=2))
        return {
            "loss": {
                "losses": reg,
                "indices": c_f.torch_arange_from_size(reg),
                "reduction_type": "element",
                "divisor": 2 * len(reg),  # the official mean over ordered pairs
            }
        }

    def get_default_reducer(self) -> DivisorReducer:
        return DivisorReducer()


def _softtriple(num_classes: int, embedding_size: int) -> losses.SoftTripleLoss:
    return losses.SoftTripleLoss(
        num_classes,
        embedding_size,
        centers_per_class=SOFTTRIPLE_CENTERS,
        la=20,
        gamma=0.1,
        margin=0.01,
        weight_regularizer=BlockSparseCentersRegularizer(num_classes, SOFTTRIPLE_CENTERS),
        weight_reg_weight=0.2,
    )


@dataclass(frozen=True)
class LossRecipe:
    """A loss with its paper's hyper-parameters and proxy optimizer rule."""

    label: str
    build: Callable[[int, int], BaseMetricLossFunction]  # (num_classes, embedding_size)
    hyperparameters: str
    lr_multiplier: float  # proxy lr / backbone lr
    optimizer: str
    eps: float
    source: str


LOSSES: dict[str, LossRecipe] = {
    "proxygml": LossRecipe(
        "ProxyGML",
        lambda c, d: ProxyGMLLoss(c, d, **PROXYGML_KWARGS),
        "N=12, r=0.05, λ=0.3",
        300,
        "adam",
        0.01,
        "official code (YuehuaZhu/ProxyGML run.sh, CUB/Cars): centerlr 0.03 vs modellr 1e-4, "
        "one Adam with eps 0.01, weight decay 1e-4",
    ),
    "proxyanchor": LossRecipe(
        "ProxyAnchor",
        lambda c, d: losses.ProxyAnchorLoss(c, d, margin=0.1, alpha=32),
        "margin δ=0.1, α=32",
        100,
        "adamw",
        1e-8,
        "official code (tjddus9597/Proxy-Anchor-CVPR2020 train.py): proxies lr ×100, AdamW, "
        "weight decay 1e-4",
    ),
    "softtriple": LossRecipe(
        "SoftTriple",
        _softtriple,
        "K=10, λ=20, γ=0.1, δ=0.01, τ=0.2",
        100,
        "adam",
        0.01,
        "official code (idstcv/SoftTriple train.py): centerlr 0.01 vs modellr 1e-4, "
        "one Adam with eps 0.01, weight decay 1e-4",
    ),
    "normsoftmax": LossRecipe(
        "NormalizedSoftmax",
        lambda c, d: losses.NormalizedSoftmaxLoss(c, d, temperature=0.05),
        "temperature 0.05",
        1,
        "adam",
        1e-8,
        "Zhai & Wu, BMVC 2019, official code (azgo14/classification_metric_learning): one "
        "optimizer and lr for network and class weights after warm-up",
    ),
    "proxynca": LossRecipe(
        "ProxyNCA",
        lambda c, d: losses.ProxyNCALoss(c, d, softmax_scale=1),
        "unit-norm embeddings and proxies, softmax scale 1",
        1,
        "adam",
        1e-8,
        "Movshovitz-Attias et al., ICCV 2017 (PML's ProxyNCALoss defaults): one lr for all "
        "parameters, as in the Proxy-Anchor authors' ProxyNCA baseline (lr ×1)",
    ),
}


def default_milestones(epochs: int) -> tuple[int, ...]:
    """Epochs after which the lr decays: 40% and 80% of the run, within 1..epochs-1."""
    return tuple(sorted({m for f in MILESTONE_FRACTIONS if 0 < (m := round(f * epochs)) < epochs}))


def make_recipe(
    loss: str, *, lr: float, epochs: int, batch_size: int, seed: int
) -> training.Recipe:
    """The shared recipe, with ``loss``'s own proxy optimizer."""
    spec = LOSSES[loss]
    return training.Recipe(
        epochs=epochs,
        batch_size=batch_size,
        backbone=training.OptimizerSpec("adam", lr, WEIGHT_DECAY),
        loss=training.OptimizerSpec(
            spec.optimizer, lr * spec.lr_multiplier, WEIGHT_DECAY, eps=spec.eps
        ),
        milestones=default_milestones(epochs),
        seed=seed,
        eval_batch_size=EVAL_BATCH_SIZE,
    )


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Settings:
    """The shared settings of one command."""

    data: Path
    lr: float
    epochs: int
    batch_size: int
    embedding_size: int
    device: str


def run_one(
    loss: str,
    seed: int,
    settings: Settings,
    train_set: Any,
    eval_set: Any,
    run_dir: Path,
    checkpoint: Path,
    eval_name: str = "test",
) -> training.RunResult:
    """Train (or resume, or skip) one (loss, seed) run."""
    recipe = make_recipe(
        loss, lr=settings.lr, epochs=settings.epochs, batch_size=settings.batch_size, seed=seed
    )
    # Seeded before building: equal seeds give every loss the same initial trunk and embedder.
    training.seed_everything(seed)
    trunk, embedder = build_models(settings.embedding_size)
    loss_func = LOSSES[loss].build(training.num_classes(train_set), settings.embedding_size)
    return training.train_and_evaluate(
        trunk,
        embedder,
        loss_func,
        train_set,
        eval_set,
        recipe,
        run_dir,
        eval_name=eval_name,
        device=settings.device,
        info={"loss": loss, "seed": seed, "embedding_size": settings.embedding_size},
        checkpoint_path=checkpoint,
        label=f"{loss} seed {seed}",
    )


def checkpoint_file(out: Path, tag: str) -> Path:
    """``<out>/checkpoints/<tag>.pt``; the folder is git-ignored (large files, rewritten every
    epoch)."""
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("*\n")
    return folder / f"{tag}.pt"


def run_comparison(
    names: Sequence[str], seeds: int, settings: Settings, out: Path
) -> dict[str, list[list[dict[str, Any]]]]:
    """Every (loss, seed) run; ``{loss: [rows of seed 0, rows of seed 1, ...]}``."""
    test_set = emoji_data.EmojiDataset(settings.data, "test", normalize=True)
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for seed in range(seeds):
        train_set = emoji_data.EmojiDataset(
            settings.data, "train", augment=True, normalize=True, seed=seed
        )
        for name in names:
            result = run_one(
                name,
                seed,
                settings,
                train_set,
                test_set,
                out / "runs" / name / f"seed{seed}",
                checkpoint_file(out, f"{name}_seed{seed}"),
            )
            runs.setdefault(name, []).append(result.rows)
    return runs


# ----------------------------------------------------------------------------- summary


def aggregate(runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per loss: mean and sample std (ddof=1; None for one seed) over seeds of each
    final-epoch metric, the mean training and evaluation seconds per epoch and the highest
    load average seen."""
    table = []
    for name, seeds in runs.items():
        finals = [rows[-1] for rows in seeds]
        row: dict[str, Any] = {"loss": name, "seeds": len(seeds), "epochs": finals[0]["epoch"]}
        for metric in training.METRICS:
            values = [final[metric] for final in finals]
            row[f"{metric}_mean"] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        every = [r for rows in seeds for r in rows]
        row["seconds_per_epoch"] = statistics.fmean(r["train_seconds"] for r in every)
        row["eval_seconds_per_epoch"] = statistics.fmean(r["eval_seconds"] for r in every)
        row["train_seconds"] = statistics.fmean(final["cumulative_seconds"] for final in finals)
        loads = [r["load_average"] for r in every if r.get("load_average") is not None]
        row["max_load_average"] = max(loads, default=None)
        table.append(row)
    return table


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`aggregate`'s rows."""
    cells = [
        {
            "loss": LOSSES[row["loss"]].label,
            "seeds": row["seeds"],
            "epochs": row["epochs"],
            **{m: _mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in training.METRICS},
            "seconds_per_epoch": row["seconds_per_epoch"],
            "eval_seconds_per_epoch": row["eval_seconds_per_epoch"],
            "max_load_average": row["max_load_average"],
        }
        for row in rows
    ]
    columns = {
        "loss": "Loss",
        "seeds": "seeds",
        "epochs": "epochs",
        **{m: METRIC_LABELS.get(m, m) for m in training.METRICS},
        "seconds_per_epoch": "train s/epoch",
        "eval_seconds_per_epoch": "eval s/epoch",
        "max_load_average": "max load",
    }
    return reporting.markdown_table(cells, columns)


def recipe_table(names: Sequence[str], lr: float) -> str:
    """Markdown table of the per-loss recipes."""
    rows = [
        {
            "loss": LOSSES[n].label,
            "hyper": LOSSES[n].hyperparameters,
            "proxy_lr": f"{LOSSES[n].lr_multiplier:g}× = {lr * LOSSES[n].lr_multiplier:g}",
            "optimizer": f"{LOSSES[n].optimizer}, eps {LOSSES[n].eps:g}, wd {WEIGHT_DECAY:g}",
            "source": LOSSES[n].source,
        }
        for n in names
    ]
    columns = {
        "loss": "Loss",
        "hyper": "loss hyper-parameters",
        "proxy_lr": "proxy lr",
        "optimizer": "proxy optimizer",
        "source": "source",
    }
    return reporting.markdown_table(rows, columns)


def regularizer_seconds_per_step(
    num_classes: int, embedding_size: int, batch_size: int, repeats: int = 5
) -> dict[str, float]:
    """Median seconds of one ProxyGML loss step (forward + backward) with and without its
    regulariser, at this benchmark's shape."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, embedding_size, generator=generator, requires_grad=True)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator)
    medians = {}
    for key, weight in (("with", PROXYGML_KWARGS["weight_lambda"]), ("without", 0.0)):
        loss = ProxyGMLLoss(
            num_classes, embedding_size, **{**PROXYGML_KWARGS, "weight_lambda": weight}
        )
        loss(x, y).backward()  # warm-up
        times = []
        for _ in range(repeats):
            tick = time.perf_counter()
            loss(x, y).backward()
            times.append(time.perf_counter() - tick)
        medians[key] = statistics.median(times)
    return medians


def regularizer_note(settings: Settings, train_size: int, num_classes: int) -> str:
    steps = train_size // settings.batch_size
    step = regularizer_seconds_per_step(num_classes, settings.embedding_size, settings.batch_size)
    n = PROXYGML_KWARGS["proxies_per_class"]
    flops = num_classes * n * num_classes * settings.embedding_size
    return (
        "## ProxyGML regulariser cost\n\n"
        f"Exact, as in the official recipe: C·N·C·d = {num_classes}·{n}·{num_classes}·"
        f"{settings.embedding_size} = {flops:.2g} multiply-adds per step (forward). Measured "
        f"loss step (forward + backward, batch {settings.batch_size}): "
        f"{step['with'] * 1e3:.1f} ms with the regulariser, {step['without'] * 1e3:.1f} ms "
        f"without, i.e. about {(step['with'] - step['without']) * steps:.1f} s per epoch of "
        f"{steps} steps (compare the train s/epoch column).\n"
    )


def curve(
    seeds: Sequence[Sequence[Mapping[str, Any]]], metric: str = "recall_at_1"
) -> dict[str, np.ndarray]:
    """Mean and std over seeds of ``metric`` per evaluated epoch, with the mean cumulative
    training seconds at that epoch."""
    evaluated = [{r["epoch"]: r for r in rows if metric in r} for rows in seeds]
    epochs = sorted(set.intersection(*(set(e) for e in evaluated)))
    values = np.array([[e[ep][metric] for ep in epochs] for e in evaluated])
    seconds = np.array([[e[ep]["cumulative_seconds"] for ep in epochs] for e in evaluated])
    return {
        "epoch": np.array(epochs),
        "mean": values.mean(axis=0),
        "std": values.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(len(epochs)),
        "seconds": seconds.mean(axis=0),
    }


def plot_curves(runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], out: Path) -> None:
    """``recall_vs_epoch.png`` and ``recall_vs_seconds.png``: mean over seeds, shaded ± std."""
    curves = {name: curve(seeds) for name, seeds in runs.items()}
    for x, xlabel, file in (
        ("epoch", "epoch", "recall_vs_epoch.png"),
        ("seconds", "cumulative training wall-clock seconds", "recall_vs_seconds.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, c in curves.items():
            ax.plot(c[x], c["mean"], marker="o", markersize=3, label=LOSSES[name].label)
            ax.fill_between(c[x], c["mean"] - c["std"], c["mean"] + c["std"], alpha=0.2)
        seeds = max(len(s) for s in runs.values())
        ax.set(
            xlabel=xlabel, ylabel="test Recall@1", title=f"Emoji, mean ± std over {seeds} seed(s)"
        )
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / file, dpi=120)
        plt.close(fig)


def plot_retrieval(
    checkpoint: Path,
    settings: Settings,
    path: Path,
    queries: int = 6,
    k: int = 5,
    seed: int = 0,
) -> None:
    """Random test queries and their top-k neighbours (green border: same class, red: not)."""
    test_set = emoji_data.EmojiDataset(settings.data, "test", normalize=True)
    trunk, embedder = build_models(settings.embedding_size)
    training.load_models(checkpoint, trunk, embedder)
    tester = testers.GlobalEmbeddingSpaceTester(
        batch_size=EVAL_BATCH_SIZE, dataloader_num_workers=0, data_device=settings.device
    )
    embeddings, _ = tester.get_all_embeddings(
        test_set, trunk.to(settings.device), embedder.to(settings.device)
    )
    picks = np.random.default_rng(seed).choice(len(test_set), size=queries, replace=False)
    similarities = embeddings[picks] @ embeddings.T
    similarities[np.arange(queries), picks] = -torch.inf  # not its own neighbour
    neighbours = similarities.topk(k, dim=1).indices.cpu().numpy()
    manifest = json.loads((settings.data / emoji_data.MANIFEST_NAME).read_text(encoding="utf-8"))
    names = {c["id"]: c["short_name"] for c in manifest.get("classes", [])}

    fig, axes = plt.subplots(queries, k + 1, figsize=(1.5 * (k + 1), 1.6 * queries), squeeze=False)
    for row, query in enumerate(picks):
        label = test_set.labels[query]
        for col, index in enumerate([query, *neighbours[row]]):
            ax = axes[row, col]
            ax.imshow(test_set.images[index].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            color = "black" if col == 0 else ("green" if test_set.labels[index] == label else "red")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(1 if col == 0 else 4)
            if row == 0:
                ax.set_title("query" if col == 0 else f"#{col}", fontsize=9)
        class_id = int(test_set.class_ids[label])
        axes[row, 0].set_ylabel(names.get(class_id, str(class_id)), fontsize=7)
    fig.suptitle("ProxyGML: test queries and top-5 neighbours (green = same emoji)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(
    runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    settings: Settings,
    seeds: int,
    out: Path,
    elapsed: float,
    quick: bool,
    command: str,
) -> str:
    """``summary.md`` and ``summary.json``; returns the results table."""
    rows = aggregate(runs)
    table = summary_table(rows)
    train_set = emoji_data.EmojiDataset(settings.data, "train")
    test_set = emoji_data.EmojiDataset(settings.data, "test")
    num_classes = training.num_classes(train_set)
    environment = {**reporting.capture_environment(settings.device), "command": command}
    milestones = default_milestones(settings.epochs)
    setup = (
        f"- Dataset: emoji ({settings.data}), train {num_classes} classes / {len(train_set)} "
        f"images, test {training.num_classes(test_set)} classes / {len(test_set)} images "
        "(class-disjoint), 48×48 RGB.\n"
        f"- Model (every loss): SmallCNN (conv-BN-ReLU 32-64-128-256, max-pool, global average "
        f"pool) + linear {settings.embedding_size}-d embedder, from scratch.\n"
        f"- Shared recipe: {settings.epochs} epochs, batch {settings.batch_size} (shuffled), "
        f"random resized crop (area 0.8-1), backbone Adam lr {settings.lr:g}, weight decay "
        f"{WEIGHT_DECAY:g}, every lr ×0.1 after epochs {list(milestones)}; seeds 0..{seeds - 1} "
        "(a seed fixes the initial weights and the batches, equal for every loss).\n"
        "- Test: every test image queries all the others (cosine); Recall@K, NMI (faiss "
        "k-means, one cluster per class), MAP@R; PML GlobalEmbeddingSpaceTester + "
        "DMLAccuracyCalculator. Final epoch, mean ± sample std over seeds.\n"
        "- Times: training seconds per epoch (data loading included, evaluation excluded) on "
        "this machine. Max load: the highest 1-minute load average seen at the end of an "
        "epoch; above the core count, other processes slowed the run and its times.\n"
    )
    tuning = (
        "Nothing was tuned on test classes and nothing per loss: the loss hyper-parameters and "
        "proxy learning-rate rules are the papers' (table above); the shared settings were fixed "
        "before any run. `python -m benchmarks.emoji --tune` runs the tuning protocol for the "
        f"shared backbone lr on a validation split ({VAL_FRACTION:.0%} of the train classes, "
        "class-disjoint), with the same grid and epochs for every loss.\n"
    )
    notes = (
        f"Command: `{environment['command']}` ({elapsed:.0f} s wall time, runs found finished "
        "were skipped).\n\n"
        + ("**Quick mode**: a short time budget, not a converged comparison.\n\n" if quick else "")
        + "## Setup\n\n"
        + setup
        + "\n## Per-loss recipes\n\n"
        + recipe_table(list(runs), settings.lr)
        + "\n## Tuning\n\n"
        + tuning
        + "\n"
        + (
            regularizer_note(settings, len(train_set), num_classes) + "\n"
            if "proxygml" in runs
            else ""
        )
        + "## Results\n"
    )
    reporting.write_markdown(
        out / "summary.md", "Emoji retrieval: ProxyGML vs proxy losses", table, environment, notes
    )
    reporting.write_json(
        out / "summary.json",
        rows,
        environment,
        extra={
            "command_seconds": elapsed,
            "quick": quick,
            "settings": {
                "epochs": settings.epochs,
                "batch_size": settings.batch_size,
                "backbone_lr": settings.lr,
                "embedding_size": settings.embedding_size,
                "milestones": list(milestones),
                "seeds": seeds,
                "data": str(settings.data),
            },
            "losses": {
                name: {
                    "label": LOSSES[name].label,
                    "hyperparameters": LOSSES[name].hyperparameters,
                    "recipe": make_recipe(
                        name,
                        lr=settings.lr,
                        epochs=settings.epochs,
                        batch_size=settings.batch_size,
                        seed=0,
                    ).to_dict(),
                    "source": LOSSES[name].source,
                }
                for name in runs
            },
            "tuning": tuning,
        },
    )
    return table


# ----------------------------------------------------------------------------- tuning


def tune(
    names: Sequence[str], lrs: Sequence[float], settings: Settings, out: Path, command: str
) -> str:
    """Validation Recall@1 of every (loss, backbone lr) on held-out train classes, seed 0."""
    train_full = emoji_data.EmojiDataset(settings.data, "train", augment=True, normalize=True)
    kept, held = training.class_disjoint_split(train_full.labels, VAL_FRACTION)
    train_set = training.ClassSubset(train_full, kept)
    val_set = training.ClassSubset(
        emoji_data.EmojiDataset(settings.data, "train", normalize=True), held
    )
    folder = out / "tuning"
    scores: dict[str, dict[float, float]] = {}
    for lr in lrs:
        lr_settings = dataclasses.replace(settings, lr=lr)
        for name in names:
            result = run_one(
                name,
                0,
                lr_settings,
                train_set,
                val_set,
                folder / "runs" / f"lr{lr:g}" / name,
                checkpoint_file(folder, f"lr{lr:g}_{name}"),
                eval_name="val",
            )
            scores.setdefault(name, {})[lr] = result.final["recall_at_1"]
    mean = {lr: statistics.fmean(scores[n][lr] for n in names) for lr in lrs}
    best = max(lrs, key=lambda lr: mean[lr])
    rows = [{"loss": LOSSES[n].label, **{f"{lr:g}": scores[n][lr] for lr in lrs}} for n in names]
    rows.append({"loss": "mean", **{f"{lr:g}": mean[lr] for lr in lrs}})
    table = reporting.markdown_table(
        rows, {"loss": "Loss", **{f"{lr:g}": f"lr {lr:g}" for lr in lrs}}
    )
    environment = {**reporting.capture_environment(settings.device), "command": command}
    notes = (
        f"Validation Recall@1 after {settings.epochs} epochs, seed 0: {len(kept)} train classes, "
        f"{len(held)} validation classes held out of the train split (test classes untouched). "
        f"Best mean: lr {best:g}.\n\n"
    )
    reporting.write_markdown(
        folder / "tuning.md", "Emoji: backbone lr tuning", table, environment, notes
    )
    reporting.write_json(
        folder / "tuning.json",
        rows,
        environment,
        extra={"best_lr": best, "epochs": settings.epochs},
    )
    return table + f"\nbest mean validation Recall@1: lr {best:g}\n"


# ----------------------------------------------------------------------------- CLI


def ensure_dataset(data: Path) -> Path:
    """``data``, built with the dataset builder first if it has no ``emoji.npz``."""
    if not (data / emoji_data.NPZ_NAME).is_file():
        LOGGER.info("no %s in %s: building the emoji dataset", emoji_data.NPZ_NAME, data)
        emoji_data.build_dataset(data)
    return data


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.emoji",
        description="Train ProxyGML and PML's proxy losses on the emoji dataset and compare.",
    )
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), help="default: all five")
    parser.add_argument("--seeds", type=int, help=f"seeds 0..N-1 (default {SEEDS})")
    parser.add_argument(
        "--epochs", type=int, help=f"default {EPOCHS} ({QUICK_EPOCHS} with --quick)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{' vs '.join(QUICK_LOSSES)}, one seed, {QUICK_EPOCHS} epochs, out {QUICK_OUT.name}/",
    )
    parser.add_argument(
        "--out", type=Path, help=f"default {DEFAULT_OUT} ({QUICK_OUT} with --quick)"
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="built dataset folder (built if missing)"
    )
    parser.add_argument("--lr", type=float, default=BACKBONE_LR, help="backbone learning rate")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--embedding-size", type=int, default=EMBEDDING_SIZE)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tune", action="store_true", help="tune the backbone lr on validation classes"
    )
    parser.add_argument("--tune-lrs", type=float, nargs="+", default=list(TUNE_LRS))
    args = parser.parse_args(argv)
    args.losses = args.losses or list(QUICK_LOSSES if args.quick else LOSSES)
    args.seeds = args.seeds or (1 if args.quick else SEEDS)
    args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join(
        ["python", "-m", "benchmarks.emoji", *(sys.argv[1:] if argv is None else argv)]
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger(c_f.LOGGER_NAME).setLevel(logging.WARNING)  # PML's per-step chatter
    start = time.perf_counter()
    settings = Settings(
        data=ensure_dataset(args.data),
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        embedding_size=args.embedding_size,
        device=args.device,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tune:
        print(tune(args.losses, args.tune_lrs, settings, args.out, command))
        return
    runs = run_comparison(args.losses, args.seeds, settings, args.out)
    plot_curves(runs, args.out)
    if "proxygml" in runs:
        plot_retrieval(
            checkpoint_file(args.out, "proxygml_seed0"),
            settings,
            args.out / "retrieval_proxygml.png",
        )
    elapsed = time.perf_counter() - start
    table = write_summary(runs, settings, args.seeds, args.out, elapsed, args.quick, command)
    print(table)
    print(f"total wall time {time.perf_counter() - start:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()

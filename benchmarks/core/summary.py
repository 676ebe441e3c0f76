"""What a command writes about its finished runs: ``summary.{md,json}``, curves, a retrieval
picture, and the cross-recipe table of ``--table``.

Every summary names the dataset it ran on and holds relative paths only. Metrics are the final
epoch's, mean and sample standard deviation (ddof=1) over seeds; "best" is the evaluated epoch
with the highest Recall@1, the usual test-set selection of DML papers, reported beside it.
"""

from __future__ import annotations

import inspect
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pml_proxygml import ProxyGMLLoss
from pml_proxygml.evaluation import recall_key

from . import measure, report
from .harness import RESULTS_JSON, RUN_COLUMNS
from .registry import LOSSES

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
KEY_METRIC = recall_key(1)
METRIC_LABELS = {"NMI": "NMI", "mean_average_precision_at_r": "MAP@R", "precision_at_1": "P@1"}
METRIC_LABELS["r_precision"] = "RP"

Runs = Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]  # {loss: [rows of each seed]}

# The loss the others are measured against where it ran: per second in a summary, and seed
# by seed (ProxyGML rows) in ``--table``.
REFERENCE_LOSS = "proxyanchor"
RAW_PIXELS_LABEL = "Raw pixels (no training)"


def metric_label(metric: str) -> str:
    if metric.startswith("recall_at_"):
        return f"R@{metric.removeprefix('recall_at_')}"
    return METRIC_LABELS.get(metric, metric)


# ----------------------------------------------------------------------------- numbers


def evaluations(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The evaluated epochs of one run: metrics and epoch only."""
    return [
        {k: v for k, v in row.items() if k == "epoch" or k not in RUN_COLUMNS}
        for row in rows
        if KEY_METRIC in row
    ]


def run_entry(loss: str, seed: int, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One run's final and best evaluated epochs, and all its evaluations."""
    evaluated = evaluations(rows)
    return {
        "loss": loss,
        "seed": seed,
        "epochs": rows[-1]["epoch"],
        "train_seconds": rows[-1]["cumulative_seconds"],
        "final": evaluated[-1],
        "best": max(evaluated, key=lambda row: row[KEY_METRIC]),
        "evaluations": evaluated,
    }


def aggregate(runs: Runs, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per loss: mean and sample std (None for one seed) over seeds of each
    final-epoch metric, the mean training and evaluation seconds per epoch and the highest
    load average seen."""
    table = []
    for name, seeds in runs.items():
        finals = [rows[-1] for rows in seeds]
        row: dict[str, Any] = {"loss": name, "seeds": len(seeds), "epochs": finals[0]["epoch"]}
        for metric in metrics:
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


def seconds_to_reach(seeds: Sequence[Sequence[Mapping[str, Any]]], level: float) -> float | None:
    """Mean cumulative training seconds at the first evaluated epoch whose Recall@1, mean over
    seeds, reaches ``level`` (None if none does): read off the curve of ``recall_vs_seconds``,
    without interpolation between evaluated epochs."""
    c = curve(seeds)
    reached = np.flatnonzero(c["mean"] >= level)
    return float(c["seconds"][reached[0]]) if len(reached) else None


def per_second(runs: Runs, reference: str = REFERENCE_LOSS) -> list[dict[str, Any]]:
    """Per loss: training seconds per epoch and when its mean curve reaches the reference
    loss's final Recall@1 (mean over seeds), each also as a ratio to the reference's own
    seconds per epoch and total training seconds. Empty without the reference loss."""
    if reference not in runs:
        return []
    rows = aggregate(runs, [KEY_METRIC])
    by_loss = {row["loss"]: row for row in rows}
    target = by_loss[reference][f"{KEY_METRIC}_mean"]
    reference_row = by_loss[reference]
    table = []
    for row in rows:
        reached = seconds_to_reach(runs[row["loss"]], target)
        table.append(
            {
                "loss": row["loss"],
                "recall": row[f"{KEY_METRIC}_mean"],
                "seconds_per_epoch": row["seconds_per_epoch"],
                "x_reference_epoch": row["seconds_per_epoch"] / reference_row["seconds_per_epoch"],
                "seconds_to_reference_recall": reached,
                "x_reference_total": None
                if reached is None
                else reached / reference_row["train_seconds"],
            }
        )
    return table


def per_second_text(rows: Sequence[Mapping[str, Any]], reference: str) -> str:
    """The summary's per-second section from :func:`per_second`'s rows ("" without them)."""
    if not rows:
        return ""
    label = LOSSES[reference].label
    target = next(row["recall"] for row in rows if row["loss"] == reference)
    cells = [
        {**row, "loss": LOSSES[row["loss"]].label, "recall": f"{row['recall']:.3f}"} for row in rows
    ]
    columns = {
        "loss": "Loss",
        "recall": "final R@1",
        "seconds_per_epoch": "train s/epoch",
        "x_reference_epoch": f"x {label} s/epoch",
        "seconds_to_reference_recall": f"s to R@1 {target:.3f}",
        "x_reference_total": f"x {label} total s",
    }
    return (
        "## Per second\n\n"
        f"When each loss's Recall@1 curve (mean over seeds, evaluated epochs) first reaches "
        f"{label}'s final Recall@1 ({target:.3f}), in cumulative training seconds, and that "
        f"time over {label}'s whole training; empty where it never does.\n\n"
        + report.markdown_table(cells, columns)
        + "\n\n"
    )


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def summary_table(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    raw_pixels: Mapping[str, float] | None = None,
) -> str:
    """Markdown table of :func:`aggregate`'s rows, and last the untrained floor
    (``raw_pixels``: the metrics of the pixels themselves as embeddings) where given."""
    cells = [
        {
            "loss": LOSSES[row["loss"]].label,
            "seeds": row["seeds"],
            "epochs": row["epochs"],
            **{m: _mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics},
            "seconds_per_epoch": row["seconds_per_epoch"],
            "eval_seconds_per_epoch": row["eval_seconds_per_epoch"],
            "max_load_average": row["max_load_average"],
        }
        for row in rows
    ]
    if raw_pixels is not None:
        floor = {m: f"{raw_pixels[m]:.3f}" for m in metrics}
        cells.append({"loss": RAW_PIXELS_LABEL, "seeds": "", "epochs": 0, **floor})
    columns = {
        "loss": "Loss",
        "seeds": "seeds",
        "epochs": "epochs",
        **{m: metric_label(m) for m in metrics},
        "seconds_per_epoch": "train s/epoch",
        "eval_seconds_per_epoch": "eval s/epoch",
        "max_load_average": "max load",
    }
    return report.markdown_table(cells, columns)


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items()) or "PML defaults"


def loss_table(recipe: Any, names: Sequence[str]) -> str:
    """Markdown table of each loss's settings, proxy optimizer and their source."""
    rows = []
    for name in names:
        plan = recipe.plan(name, 0)
        optimizer = plan.loss_optimizer
        rows.append(
            {
                "loss": LOSSES[name].label,
                "settings": _settings_text(recipe.loss(name).settings),
                "optimizer": "—"
                if optimizer is None
                else f"{optimizer.name}, lr {optimizer.lr:g}, eps {optimizer.eps:g}, "
                f"wd {optimizer.weight_decay:g}",
                "source": recipe.loss(name).source or "—",
            }
        )
    columns = {
        "loss": "Loss",
        "settings": "loss settings",
        "optimizer": "proxy optimizer",
        "source": "source",
    }
    return report.markdown_table(rows, columns)


def regularizer_note(recipe: Any, runs: Runs, train: Any, device: str) -> str:
    """The measured cost of ProxyGML's exact proxy regulariser at this recipe's shape, where
    ProxyGML ran with one ("" otherwise)."""
    settings = dict(recipe.loss("proxygml").settings) if "proxygml" in runs else {}
    default_lambda = inspect.signature(ProxyGMLLoss).parameters["weight_lambda"].default
    if not settings.get("weight_lambda", default_lambda) or "proxygml" not in runs:
        return ""
    num_classes, train_size = train.num_classes, len(train)
    batch, dim = recipe.train.batch_size, recipe.model.embedding_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()
    y = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    seconds = {}
    for key, weight in (("with", settings.get("weight_lambda", default_lambda)), ("without", 0.0)):
        loss = ProxyGMLLoss(num_classes, dim, **{**settings, "weight_lambda": weight}).to(device)
        seconds[key] = measure.median_seconds(
            lambda loss=loss: loss(x, y).backward(), 5, 1, None, device
        )
    steps = train_size // batch
    n = settings.get("proxies_per_class", 12)
    flops = num_classes * n * num_classes * dim
    return (
        "## ProxyGML regulariser cost\n\n"
        f"Exact, as in the official recipe: C·N·C·d = {num_classes}·{n}·{num_classes}·{dim} = "
        f"{flops:.2g} multiply-adds per step (forward). Measured loss step (forward + backward, "
        f"batch {batch}): {seconds['with'] * 1e3:.1f} ms with the regulariser, "
        f"{seconds['without'] * 1e3:.1f} ms without, i.e. about "
        f"{(seconds['with'] - seconds['without']) * steps:.1f} s per epoch of {steps} steps "
        "(compare the train s/epoch column).\n\n"
    )


# ----------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def curve(
    seeds: Sequence[Sequence[Mapping[str, Any]]], metric: str = KEY_METRIC
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


def plot_curves(runs: Runs, out: Path, dataset: str, eval_name: str) -> None:
    """``recall_vs_epoch.png`` and ``recall_vs_seconds.png``: mean over seeds, shaded ± std."""
    plt = _pyplot()
    curves = {name: curve(seeds) for name, seeds in runs.items()}
    seeds = max(len(s) for s in runs.values())
    for x, xlabel, file in (
        ("epoch", "epoch", "recall_vs_epoch.png"),
        ("seconds", "cumulative training wall-clock seconds", "recall_vs_seconds.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, c in curves.items():
            ax.plot(c[x], c["mean"], marker="o", markersize=3, label=LOSSES[name].label)
            ax.fill_between(c[x], c["mean"] - c["std"], c["mean"] + c["std"], alpha=0.2)
        ax.set(
            xlabel=xlabel,
            ylabel=f"{eval_name} Recall@1",
            title=f"{dataset}, mean ± std over {seeds} seed(s)",
        )
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        report.save_figure(fig, out / file, dpi=120)
        plt.close(fig)


def plot_retrieval(
    embeddings: torch.Tensor,
    source: Any,
    path: Path,
    title: str,
    queries: int = 6,
    k: int = 5,
    seed: int = 0,
) -> None:
    """Random queries and their top-k neighbours (green border: same class, red: not)."""
    plt = _pyplot()
    queries = min(queries, len(source))
    picks = np.random.default_rng(seed).choice(len(source), size=queries, replace=False)
    similarities = embeddings[picks] @ embeddings.T
    similarities[np.arange(queries), picks] = -torch.inf  # not its own neighbour
    neighbours = similarities.topk(min(k, len(source) - 1), dim=1).indices.cpu().numpy()
    columns = neighbours.shape[1] + 1
    fig, axes = plt.subplots(
        queries, columns, figsize=(1.5 * columns, 1.6 * queries), squeeze=False
    )
    for row, query in enumerate(picks):
        label = source.labels[query]
        for col, index in enumerate([query, *neighbours[row]]):
            ax = axes[row, col]
            ax.imshow(source.display(index))
            ax.set_xticks([])
            ax.set_yticks([])
            color = "black" if col == 0 else ("green" if source.labels[index] == label else "red")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(1 if col == 0 else 4)
            if row == 0:
                ax.set_title("query" if col == 0 else f"#{col}", fontsize=9)
        axes[row, 0].set_ylabel(source.class_names[label], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    report.save_figure(fig, path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- files


def setup_text(recipe: Any, dataset: Mapping[str, Any], eval_name: str) -> str:
    """The shared setup of a summary, in words, from the recipe and the dataset's facts."""
    m, d, t, e = recipe.model, recipe.data, recipe.train, recipe.evaluation
    seeds = t.seeds
    plan = recipe.plan(recipe.losses_to_run[0], seeds[0])
    frozen = list(plan.frozen_trunk_epochs)
    train, evaluated = dataset["train"], dataset[eval_name]
    return (
        f"- Dataset: {dataset['title']} (`{dataset['root']}`), train {train['classes']} classes "
        f"/ {train['images']} images, {eval_name} {evaluated['classes']} classes / "
        f"{evaluated['images']} images (class-disjoint).\n"
        f"- Model (every loss): {m.backbone}, "
        f"{'ImageNet-pretrained' if m.pretrained else 'from scratch'}, {m.pooling} pooling, "
        f"linear {m.embedding_size}-d embedding"
        f"{', L2-normalised' if m.normalize_embeddings else ''}.\n"
        f"- Shared recipe: {t.epochs} epochs, batch {t.batch_size} ({t.sampler}), random resized "
        f"crop to {d.crop} px (area {d.crop_scale[0]:g}-{d.crop_scale[1]:g}"
        f"{f', flip {d.flip:g}' if d.flip else ''}), backbone {t.backbone_optimizer.name} lr "
        f"{t.backbone_optimizer.lr:g}, weight decay {t.backbone_optimizer.weight_decay:g}, every "
        f"lr ×{t.gamma:g} after epochs {list(plan.milestones)}"
        f"{f', trunk frozen in epochs {frozen}' if frozen else ''}"
        f"; seeds {list(seeds)} (a seed fixes the initial weights and the batches, equal for "
        "every loss).\n"
        f"- Evaluation: every {eval_name} image queries all the others (cosine): "
        f"{', '.join(metric_label(recall_key(k)) for k in e.recall_ks)}, "
        f"{', '.join(metric_label(m) for m in e.metrics)} (PML GlobalEmbeddingSpaceTester + "
        "DMLAccuracyCalculator). Final epoch, mean ± sample std over seeds.\n"
        "- Times: training seconds per epoch (data loading included, evaluation excluded) on "
        "this machine. Max load: the highest 1-minute load average seen at the end of an "
        "epoch; above the core count, other processes slowed the run and its times.\n"
    )


def write_summary(
    out: Path,
    recipe: Any,
    dataset: Mapping[str, Any],
    eval_name: str,
    runs: Runs,
    metrics: Sequence[str],
    environment: Mapping[str, Any],
    elapsed: float,
    extra_sections: str = "",
    raw_pixels: Mapping[str, float] | None = None,
) -> str:
    """``summary.md`` and ``summary.json``; returns the results table."""
    seeds = recipe.train.seeds
    rows = aggregate(runs, metrics)
    speed = per_second(runs)
    table = summary_table(rows, metrics, raw_pixels)
    labels = " vs ".join(LOSSES[name].label for name in runs)
    notes = (
        f"Command: `{environment['command']}` ({elapsed:.0f} s wall time, runs found finished "
        f"were skipped). Recipe `{recipe.name}`: {recipe.description}\n\n"
        + "".join(f"- {note}\n" for note in recipe.notes)
        + "\n## Setup\n\n"
        + setup_text(recipe, dataset, eval_name)
        + "\n## Per-loss recipes\n\n"
        + loss_table(recipe, list(runs))
        + "\n"
        + extra_sections
        + per_second_text(speed, REFERENCE_LOSS)
        + "## Results\n"
    )
    report.write_markdown(
        out / SUMMARY_MD, f"{dataset['title']} retrieval: {labels}", table, environment, notes
    )
    t, plan = recipe.train, recipe.plan(next(iter(runs)), seeds[0])
    extra = {
        "command_seconds": elapsed,
        "per_second": {"reference": REFERENCE_LOSS, "rows": speed},
        "raw_pixels": None if raw_pixels is None else dict(raw_pixels),
        "dataset": dict(dataset),
        "settings": {
            "epochs": t.epochs,
            "batch_size": t.batch_size,
            "backbone_lr": t.backbone_optimizer.lr,
            "embedding_size": recipe.model.embedding_size,
            "milestones": list(plan.milestones),
            "seeds": list(seeds),
            "data": dataset["root"],
        },
        "recipe": recipe.to_dict(),
        "losses": {
            name: {
                "label": LOSSES[name].label,
                "settings": recipe.loss(name).settings,
                "plan": recipe.plan(name, seeds[0]).to_dict(),
                "source": recipe.loss(name).source,
            }
            for name in runs
        },
        "runs": [
            run_entry(name, seed, seed_rows)
            for name, per_seed in runs.items()
            for seed, seed_rows in zip(seeds, per_seed)
        ],
    }
    report.write_json(out / SUMMARY_JSON, rows, environment, extra)
    return table


# ----------------------------------------------------------------------------- --table


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}"


def results_table(root: Path) -> str:
    """Markdown, one table per dataset: every summary under ``root`` (final / best evaluated
    epoch, mean over seeds, in %) beside the numbers its recipe reports from the literature."""
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    columns: dict[str, dict[str, str]] = {}
    summaries = []
    for path in sorted(Path(root).rglob(SUMMARY_JSON)):
        summary = json.loads(path.read_text())
        if "recipe" not in summary:
            continue  # written before summaries carried their recipe
        summaries.append(path)
        recipe = summary["recipe"]
        title = summary["dataset"]["title"]
        metrics = [recall_key(k) for k in recipe["evaluation"]["recall_ks"]]
        metrics += recipe["evaluation"]["metrics"]
        columns.setdefault(title, {m: metric_label(m) for m in metrics})
        rows = by_dataset.setdefault(title, [])
        for reported in recipe.get("reported", []):
            rows.append(
                {
                    "method": LOSSES[reported["loss"]].label,
                    "source": reported["source"],
                    **{m: f"{v:.1f}" for m, v in reported["metrics"].items()},
                }
            )
        raw_pixels = summary.get("raw_pixels")
        if raw_pixels is not None and not any(r["method"] == RAW_PIXELS_LABEL for r in rows):
            rows.append(
                {
                    "method": RAW_PIXELS_LABEL,
                    "source": f"cosine on the normalised {recipe['data']['crop']} px test images",
                    **{m: _percent(raw_pixels[m]) for m in metrics},
                }
            )
        for loss in summary["losses"]:
            entries = [run for run in summary["runs"] if run["loss"] == loss]
            cells = {}
            for m in metrics:
                final = statistics.fmean(run["final"][m] for run in entries)
                best = statistics.fmean(run["best"][m] for run in entries)
                cells[m] = f"{_percent(final)} / {_percent(best)}"
            seeds = ", ".join(str(run["seed"]) for run in entries)
            rows.append(
                {
                    "method": LOSSES[loss].label,
                    "source": f"ours, recipe `{recipe['name']}`, seeds {seeds}, "
                    f"{entries[0]['epochs']} epochs (`{report.relative(path.parent)}`)",
                    **cells,
                }
            )
    parts = [
        f"### {title}\n\n"
        + report.markdown_table(rows, {"method": "Method", "source": "Source", **columns[title]})
        for title, rows in by_dataset.items()
    ]
    if not parts:
        return f"no summaries with recipes under {report.relative(root)}\n"
    loaded = [json.loads(path.read_text()) for path in summaries]
    across, across_columns = across_datasets(loaded)
    parts.append(
        "### Across datasets: final Recall@1 / MAP@R, mean ± std over seeds, in %\n\n"
        + report.markdown_table(across, across_columns)
    )
    paired = [row for path, saved in zip(summaries, loaded) for row in paired_rows(saved, path)]
    if paired:
        parts.append(
            f"### Paired by seed: each ProxyGML row minus {LOSSES[REFERENCE_LOSS].label}\n\n"
            + report.markdown_table(paired, {key: key for key in paired[0]})
        )
    compute = compute_rows(root)
    if compute:
        parts.append(
            "### Compute: the training and evaluation time every epoch recorded, in hours\n\n"
            + report.markdown_table(compute, {key: key for key in compute[0]})
        )
    return "\n".join(parts) + "\nOurs: final epoch / best evaluated epoch (by R@1), in %.\n"


def compute_rows(root: Path) -> list[dict[str, Any]]:
    """One row per folder under ``root`` holding runs (a comparison, or a tuning with all its
    trials), then their sum: runs, epochs, and the hours its epochs recorded for training and
    evaluation, whether they ran in one command or over resumed ones. Dataset building,
    set-up and the loss-speed benchmarks are not counted."""
    root = Path(root)
    folders: dict[str, list[float]] = {}  # runs, epochs, training and evaluation seconds
    for path in sorted(root.rglob(RESULTS_JSON)):
        saved = json.loads(path.read_text())
        if "plan" not in saved:
            continue  # another benchmark's results, not a training run's
        rows = saved["rows"]
        counts = folders.setdefault(path.relative_to(root).parts[0], [0, 0, 0.0, 0.0])
        counts[0] += 1
        counts[1] += len(rows)
        counts[2] += sum(row["train_seconds"] for row in rows)
        counts[3] += sum(row.get("eval_seconds") or 0.0 for row in rows)
    labelled = [(f"`{name}`", counts) for name, counts in folders.items()]
    if labelled:
        labelled.append(("all", [sum(column) for column in zip(*folders.values())]))
    return [
        {
            "results": label,
            "runs": runs,
            "epochs": epochs,
            "training h": f"{train / 3600:.2f}",
            "evaluation h": f"{evaluation / 3600:.2f}",
            "total h": f"{(train + evaluation) / 3600:.2f}",
        }
        for label, (runs, epochs, train, evaluation) in labelled
    ]


def across_datasets(
    summaries: Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One row per loss (and the raw pixels, last), one column per summary (its recipe): the
    final epoch's Recall@1 and MAP@R, mean ± sample std over seeds, in %; and the columns."""
    columns = {"loss": "Loss"}
    cells: dict[str, dict[str, Any]] = {}

    def text(finals: Sequence[Mapping[str, float]]) -> str:
        parts = []
        for metric in (KEY_METRIC, "mean_average_precision_at_r"):
            values = [100 * final[metric] for final in finals if metric in final]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            parts.append(f"{statistics.fmean(values):.1f}{spread}" if values else "—")
        return " / ".join(parts)

    for summary in summaries:
        name = summary["recipe"]["name"]
        columns[name] = f"{summary['dataset']['title']} (`{name}`)"
        for loss in summary["losses"]:
            finals = [run["final"] for run in summary["runs"] if run["loss"] == loss]
            cells.setdefault(LOSSES[loss].label, {"loss": LOSSES[loss].label})[name] = text(finals)
        if summary.get("raw_pixels") is not None:
            row = cells.setdefault(RAW_PIXELS_LABEL, {"loss": RAW_PIXELS_LABEL})
            row[name] = text([summary["raw_pixels"]])
    floor = cells.pop(RAW_PIXELS_LABEL, None)
    return [*cells.values(), *([floor] if floor else [])], columns


def paired_differences(
    summary: Mapping[str, Any], loss: str, reference: str, metric: str = KEY_METRIC
) -> list[float]:
    """Final-epoch ``metric`` of ``loss`` minus ``reference``'s, one per seed both ran
    (equal seeds: the same initial network and batches)."""
    finals: dict[str, dict[int, float]] = {loss: {}, reference: {}}
    for run in summary["runs"]:
        if run["loss"] in finals and metric in run["final"]:
            finals[run["loss"]][run["seed"]] = run["final"][metric]
    seeds = sorted(finals[loss].keys() & finals[reference].keys())
    return [finals[loss][seed] - finals[reference][seed] for seed in seeds]


def paired_rows(summary: Mapping[str, Any], path: Path) -> list[dict[str, Any]]:
    """One row per ProxyGML variant of a summary that also ran the paired reference: the
    Recall@1 and MAP@R differences, mean ± sample std over the paired seeds."""
    losses = summary.get("losses", {})
    if REFERENCE_LOSS not in losses:
        return []
    rows = []
    for loss in (name for name in losses if name.startswith("proxygml")):
        row = {
            "dataset": summary["dataset"]["title"],
            "recipe": summary["recipe"]["name"],
            "loss": LOSSES[loss].label,
            "seeds": len(paired_differences(summary, loss, REFERENCE_LOSS)),
        }
        for metric in (KEY_METRIC, "mean_average_precision_at_r"):
            differences = paired_differences(summary, loss, REFERENCE_LOSS, metric)
            spread = statistics.stdev(differences) if len(differences) > 1 else None
            if differences:
                row[f"Δ {metric_label(metric)}"] = _mean_std(statistics.fmean(differences), spread)
        row["summary"] = report.relative(path.parent)
        rows.append(row)
    return rows

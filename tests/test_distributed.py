"""pml_proxygml.distributed against the single-process ProxyGMLLoss on the concatenated batch.

The multi-process tests spawn 2 or 4 workers (torch.multiprocessing, gloo on CPU, a file
store in tmp_path: no ports), each bounded by SPAWN_TIMEOUT_S. Workers compute in float64
and return tensors; the assertions run here, against ``ProxyGMLLoss`` in this process.
"""

from __future__ import annotations

import gc
import itertools
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning.reducers import DoNothingReducer
from pytorch_metric_learning.regularizers import LpRegularizer
from torch.nn.parallel import DistributedDataParallel

from pml_proxygml import ProxyGMLLoss
from pml_proxygml.distributed import (
    ShardedProxyGMLLoss,
    class_ranges,
    data_parallel_loss,
    reshard_rows,
    reshard_state_dicts,
)
from tests.golden import CASE_IDS, CASES, loss_for_case, tensor

SPAWN_TIMEOUT_S = 120
# Everything is float64; the distributed sums differ from the single-process ones in order only.
TOLERANCE = {"rtol": 1e-9, "atol": 1e-12}

_store_names = itertools.count()


def _run_worker(rank, world_size, store, out_dir, target, args):
    torch.set_num_threads(1)  # the workers share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.save(target(rank, world_size, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # DDP modules sit in reference cycles that hold the process group and gloo's pending
        # work: collected only at interpreter exit, they abort the worker (SIGABRT).
        gc.collect()
        dist.destroy_process_group()


def run_ranks(directory: Path, world_size: int, target: Callable, *args) -> list:
    """``target(rank, world_size, *args)`` in ``world_size`` spawned gloo workers; their results."""
    out_dir = directory / f"run{next(_store_names)}"
    out_dir.mkdir()
    context = mp.start_processes(
        _run_worker,
        args=(world_size, str(out_dir / "store"), str(out_dir), target, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} workers of {target.__name__} ran past {SPAWN_TIMEOUT_S}s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


def split(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(tensor.split(sizes))


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def dense(grad: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if grad is None:
        return torch.zeros(shape, dtype=torch.float64)
    return grad.to_dense() if grad.is_sparse else grad


# ----------------------------------------------------------------------------------------
# Data parallel: DDP(model) + data_parallel_loss(ProxyGMLLoss)

DP = {"num_classes": 7, "dim": 8, "inputs": 6, "batch_per_rank": 6, "steps": 4}
DP_LAMBDAS = [0.0, 0.3]


def dp_setup(weight_lambda: float) -> tuple[torch.nn.Module, ProxyGMLLoss]:
    torch.manual_seed(0)
    model = torch.nn.Linear(DP["inputs"], DP["dim"]).double()
    loss = ProxyGMLLoss(
        DP["num_classes"],
        DP["dim"],
        proxies_per_class=3,
        top_k=5,
        weight_lambda=weight_lambda,
    ).double()
    return model, loss


def dp_batch(step: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step; rank r takes rows [r * b, (r + 1) * b)."""
    generator = torch.Generator().manual_seed(100 + step)
    size = DP["batch_per_rank"] * world_size
    inputs = torch.randn(size, DP["inputs"], generator=generator, dtype=torch.float64)
    return inputs, torch.randint(DP["num_classes"], (size,), generator=generator)


def dp_optimizers(model, loss_parameters):
    return [
        torch.optim.Adam(model.parameters(), lr=1e-3, eps=0.01, weight_decay=1e-4),
        torch.optim.Adam(loss_parameters, lr=0.03, eps=0.01, weight_decay=1e-4),
    ]


def _data_parallel_worker(rank, world_size):
    rows = slice(rank * DP["batch_per_rank"], (rank + 1) * DP["batch_per_rank"])
    one_step = []
    for weight_lambda in DP_LAMBDAS:
        model, loss = dp_setup(weight_lambda)
        with torch.no_grad():
            loss.proxies.add_(rank)  # the wrapper must start every rank from rank 0's proxies
        ddp_model, loss_fn = DistributedDataParallel(model), data_parallel_loss(loss)
        inputs, labels = dp_batch(0, world_size)
        embeddings = ddp_model(inputs[rows])
        embeddings.retain_grad()
        value = loss_fn(embeddings, labels[rows])
        value.backward()
        one_step.append(
            {
                "loss": value.detach(),
                "embeddings": embeddings.grad,
                "model": [p.grad for p in model.parameters()],
                "proxies": loss.proxies.grad,
            }
        )

    model, loss = dp_setup(0.3)
    ddp_model, loss_fn = DistributedDataParallel(model), data_parallel_loss(loss)
    optimizers = dp_optimizers(ddp_model, loss_fn.parameters())
    for step in range(DP["steps"]):
        inputs, labels = dp_batch(step, world_size)
        loss_fn(ddp_model(inputs[rows]), labels[rows]).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    trained = {"proxies": loss.proxies.detach(), "model": [p.detach() for p in model.parameters()]}
    return {"one_step": one_step, "trained": trained}


@pytest.fixture(scope="module")
def data_parallel_results(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("dp"), 2, _data_parallel_worker)


@pytest.mark.slow
@pytest.mark.parametrize("variant", range(len(DP_LAMBDAS)), ids=[f"lambda{x}" for x in DP_LAMBDAS])
def test_data_parallel_step_equals_single_process(data_parallel_results, variant):
    world_size = len(data_parallel_results)
    model, loss = dp_setup(DP_LAMBDAS[variant])
    inputs, labels = dp_batch(0, world_size)
    embeddings = model(inputs)
    embeddings.retain_grad()
    expected = loss(embeddings, labels)
    expected.backward()
    expected_embeddings = split(embeddings.grad, [DP["batch_per_rank"]] * world_size)
    for rank, result in enumerate(data_parallel_results):
        got = result["one_step"][variant]
        # DistributedLossWrapper's factor: W times the loss and the embeddings' gradient...
        assert_close(got["loss"] / world_size, expected.detach())
        assert_close(got["embeddings"] / world_size, expected_embeddings[rank])
        # ...which DDP's averaging turns into the exact gradient of the model...
        for actual, reference in zip(got["model"], model.parameters()):
            assert_close(actual, reference.grad)
        # ...and data_parallel_loss gives the proxies their exact gradient too.
        assert_close(got["proxies"], loss.proxies.grad)


@pytest.mark.slow
def test_data_parallel_training_keeps_proxies_identical(data_parallel_results):
    world_size = len(data_parallel_results)
    trained = [result["trained"] for result in data_parallel_results]
    for other in trained[1:]:
        assert torch.equal(other["proxies"], trained[0]["proxies"])
        assert all(map(torch.equal, other["model"], trained[0]["model"]))

    model, loss = dp_setup(0.3)
    optimizers = dp_optimizers(model, loss.parameters())
    for step in range(DP["steps"]):
        inputs, labels = dp_batch(step, world_size)
        loss(model(inputs), labels).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert not torch.equal(loss.proxies, dp_setup(0.3)[1].proxies)  # it did train
    assert_close(trained[0]["proxies"], loss.proxies.detach())
    for actual, reference in zip(trained[0]["model"], model.parameters()):
        assert_close(actual, reference.detach())


# ----------------------------------------------------------------------------------------
# Sharded proxies against the single-process loss


def loss_step(loss: ProxyGMLLoss, embeddings: torch.Tensor, labels: torch.Tensor) -> dict:
    """Loss (or per-sample losses), the embeddings' and the proxies' gradients of one step."""
    embeddings = embeddings.clone().requires_grad_()
    output = loss(embeddings, labels)
    value = output if torch.is_tensor(output) else output["loss"]["losses"]
    value.sum().backward()
    grad = loss.proxies.grad
    return {
        "loss": value.detach(),
        "embeddings": embeddings.grad,
        "proxies": dense(grad, loss.proxies.shape),
        "proxy_rows": None if grad is None or not grad.is_sparse else grad._indices()[0],
    }


def assert_matches_single_process(results, expected, sizes, world_size):
    """Same loss on every rank; W x the embeddings' rows; each shard's rows of the proxies."""
    expected_embeddings = split(expected["embeddings"], sizes)
    for rank, got in enumerate(results):
        assert_close(got["loss"], expected["loss"])
        assert_close(got["embeddings"] / world_size, expected_embeddings[rank])
    shard_sizes = [len(got["proxies"]) for got in results]
    assert_close(torch.cat([got["proxies"] for got in results]), expected["proxies"])
    if expected["proxy_rows"] is not None:  # a sparse gradient: the same rows, no more
        starts = [0, *itertools.accumulate(shard_sizes)]
        rows = [
            got["proxy_rows"] + start
            for got, start in zip(results, starts)
            if got["proxy_rows"] is not None
        ]
        assert torch.equal(torch.cat(rows).sort().values, expected["proxy_rows"].sort().values)


def uneven_sizes(batch_size: int, world_size: int) -> list[int]:
    """Unequal local batches on purpose: rank 0 takes a row of rank 1's share."""
    sizes = [batch_size // world_size] * world_size
    sizes[0] += batch_size - sum(sizes)
    if world_size > 1 and sizes[1] > 0:
        sizes[0], sizes[1] = sizes[0] + 1, sizes[1] - 1
    return sizes


def sharded_loss_for_case(case: dict) -> ShardedProxyGMLLoss:
    """A float64 sharded loss configured as a golden case, holding this rank's proxy rows."""
    loss = ShardedProxyGMLLoss(
        int(case["C"]),
        int(case["dim"]),
        int(case["N"]),
        r=float(case["r"]),
        weight_lambda=float(case["weight_lambda"]),
    ).double()
    loss.load_full_state_dict({"proxies": tensor(case, "proxies").T})
    return loss


def _golden_worker(rank, world_size):
    results = []
    for case in CASES:
        loss = sharded_loss_for_case(case)
        sizes = uneven_sizes(int(case["batch_size"]), world_size)
        embeddings = split(tensor(case, "embeddings_raw"), sizes)[rank]
        labels = split(torch.as_tensor(case["labels"]), sizes)[rank]
        results.append(loss_step(loss, embeddings, labels))
    return results


@pytest.fixture(scope="module")
def golden_results(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("golden"), 2, _golden_worker)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_sharded_golden_cases_on_two_ranks(golden_results, index):
    case = CASES[index]
    expected = loss_step(
        loss_for_case(case), tensor(case, "embeddings_raw"), torch.as_tensor(case["labels"])
    )
    sizes = uneven_sizes(int(case["batch_size"]), len(golden_results))
    results = [rank_results[index] for rank_results in golden_results]
    assert_matches_single_process(results, expected, sizes, len(golden_results))
    # And therefore the official code's numbers.
    torch.testing.assert_close(
        results[0]["loss"], torch.tensor(float(case["loss_total"]), dtype=torch.float64)
    )


# Configurations on 4 ranks: C not divisible by W, k not divisible by W, every sample's
# positives on one rank and most of its negatives on others, k < N, k = C * N, a rank with
# no samples, ranks that own no kept proxy (dense and sparse gradients), a reducer.
SYNTHETIC = {
    "C10_N3_k7_lam0.3_embedding_regularizer": {
        "num_classes": 10,
        "proxies_per_class": 3,
        "top_k": 7,
        "weight_lambda": 0.3,
        "embedding_regularizer": "lp",
    },
    "C10_N3_k7_lam0.3": {
        "num_classes": 10,
        "proxies_per_class": 3,
        "top_k": 7,
        "weight_lambda": 0.3,
    },
    "C10_N3_k7_per_sample": {
        "num_classes": 10,
        "proxies_per_class": 3,
        "top_k": 7,
        "weight_lambda": 0.0,
        "reducer": "none",
    },
    "C10_N3_k7_certified_bf16": {
        "num_classes": 10,
        "proxies_per_class": 3,
        "top_k": 7,
        "weight_lambda": 0.0,
        "selection_precision": "bf16",
    },
    "C6_N4_k3_positives_only": {
        "num_classes": 6,
        "proxies_per_class": 4,
        "top_k": 3,
        "weight_lambda": 0.0,
    },
    "C5_N2_r1_all_kept": {"num_classes": 5, "proxies_per_class": 2, "r": 1.0, "weight_lambda": 0.3},
    "C8_N2_k3_idle_ranks": {
        "num_classes": 8,
        "proxies_per_class": 2,
        "top_k": 3,
        "weight_lambda": 0.0,
        "idle": True,
    },
    "C8_N2_k3_idle_ranks_sparse": {
        "num_classes": 8,
        "proxies_per_class": 2,
        "top_k": 3,
        "weight_lambda": 0.0,
        "idle": True,
        "sparse_proxy_grad": True,
    },
    # Positives only, of classes 1 and 3: no rank keeps its first proxy, a sparse gradient
    # must not hold it.
    "C8_N2_k2_sparse_first_rows_unkept": {
        "num_classes": 8,
        "proxies_per_class": 2,
        "top_k": 2,
        "weight_lambda": 0.0,
        "idle": True,
        "label_classes": [1, 3],
        "sparse_proxy_grad": True,
    },
}
SYNTHETIC_DIM, SYNTHETIC_SIZES = 6, [5, 3, 0, 4]


def synthetic_case(name: str):
    """(loss kwargs, full proxies, global embeddings, global labels) of a configuration."""
    config = dict(SYNTHETIC[name])
    idle = config.pop("idle", False)
    label_classes = torch.tensor(config.pop("label_classes", [0, 1, 2, 3]))
    if config.pop("reducer", None) == "none":
        config["reducer"] = DoNothingReducer()
    if config.pop("embedding_regularizer", None) == "lp":
        config["embedding_regularizer"] = LpRegularizer()
    generator = torch.Generator().manual_seed(7)
    num_proxies = config["num_classes"] * config["proxies_per_class"]
    proxies = torch.randn(num_proxies, SYNTHETIC_DIM, generator=generator, dtype=torch.float64)
    embeddings = torch.randn(
        sum(SYNTHETIC_SIZES), SYNTHETIC_DIM, generator=generator, dtype=torch.float64
    )
    labels = torch.randint(config["num_classes"], (len(embeddings),), generator=generator)
    if idle:
        # Samples of classes 0-3, far from the proxies of classes 4-7 (ranks 2 and 3 of 4):
        # those ranks own no kept proxy.
        embeddings[:, 0] += 5.0
        proxies[: num_proxies // 2, 0] += 5.0
        proxies[num_proxies // 2 :, 0] -= 5.0
        labels = label_classes[labels % len(label_classes)]
    return config, proxies, embeddings, labels


def _synthetic_worker(rank, world_size, names):
    results = []
    for name in names:
        config, proxies, embeddings, labels = synthetic_case(name)
        loss = ShardedProxyGMLLoss(embedding_size=SYNTHETIC_DIM, **config).double()
        loss.load_full_state_dict({"proxies": proxies})
        results.append(
            loss_step(
                loss,
                split(embeddings, SYNTHETIC_SIZES)[rank],
                split(labels, SYNTHETIC_SIZES)[rank],
            )
        )
    return results


@pytest.fixture(scope="module")
def synthetic_results(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("synthetic"), 4, _synthetic_worker, list(SYNTHETIC))


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SYNTHETIC)), ids=list(SYNTHETIC))
def test_sharded_matches_single_process_on_four_ranks(synthetic_results, index):
    name = list(SYNTHETIC)[index]
    config, proxies, embeddings, labels = synthetic_case(name)
    single = ProxyGMLLoss(embedding_size=SYNTHETIC_DIM, **config).double()
    with torch.no_grad():
        single.proxies.copy_(proxies)
    expected = loss_step(single, embeddings, labels)
    results = [rank_results[index] for rank_results in synthetic_results]
    assert_matches_single_process(results, expected, SYNTHETIC_SIZES, len(results))
    if "idle" in SYNTHETIC[name]:
        assert all(got["proxies"].abs().sum() == 0 for got in results[2:])
        if config.get("sparse_proxy_grad"):
            assert all(got["proxy_rows"] is None for got in results[2:])


# ----------------------------------------------------------------------------------------
# A model in DDP, sharded proxies, and checkpoints across world sizes

CKPT = {"num_classes": 9, "proxies_per_class": 2, "top_k": 5, "weight_lambda": 0.3}
CKPT_DIM, CKPT_INPUTS, CKPT_BATCH = 8, 5, 12


def ckpt_setup():
    torch.manual_seed(3)
    model = torch.nn.Linear(CKPT_INPUTS, CKPT_DIM).double()
    proxies = torch.randn(CKPT["num_classes"] * CKPT["proxies_per_class"], CKPT_DIM)
    return model, proxies.double()


def ckpt_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(200 + step)
    inputs = torch.randn(CKPT_BATCH, CKPT_INPUTS, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(CKPT["num_classes"], (CKPT_BATCH,), generator=generator)


def _ddp_model_and_save_worker(rank, world_size):
    """One training step of DDP(model) + sharded proxies; then the loss of a second batch."""
    model, proxies = ckpt_setup()
    ddp_model = DistributedDataParallel(model)
    loss = ShardedProxyGMLLoss(embedding_size=CKPT_DIM, **CKPT).double()
    loss.load_full_state_dict({"proxies": proxies})
    rows = split(torch.arange(CKPT_BATCH), [CKPT_BATCH // world_size] * world_size)[rank]
    inputs, labels = ckpt_batch(0)
    value = loss(ddp_model(inputs[rows]), labels[rows])
    value.backward()
    step = {"loss": value.detach(), "model": [p.grad.clone() for p in model.parameters()]}
    with torch.no_grad():
        loss.proxies.sub_(0.1 * loss.proxies.grad)
    inputs, labels = ckpt_batch(1)
    with torch.no_grad():
        after = loss(inputs[rows] @ model.weight.T, labels[rows])
    torch.manual_seed(0)
    initial = ShardedProxyGMLLoss(embedding_size=CKPT_DIM, **CKPT).proxies.detach()
    return {
        "step": step,
        "state": loss.state_dict(),
        "full": loss.full_state_dict(),
        "after": after,
        "initial": initial,
        "next_random": torch.rand(1),
    }


def _load_resharded_worker(rank, world_size, states):
    loss = ShardedProxyGMLLoss(embedding_size=CKPT_DIM, **CKPT).double()
    wrong = states[(rank + 1) % world_size]
    before = loss.proxies.detach().clone()
    try:
        loss.load_state_dict(wrong)
        refused = False
    except ValueError:
        refused = torch.equal(loss.proxies, before)  # refused before touching the proxies
    loss.load_state_dict(states[rank])
    model, _ = ckpt_setup()
    rows = split(torch.arange(CKPT_BATCH), [CKPT_BATCH // world_size] * world_size)[rank]
    inputs, labels = ckpt_batch(1)
    with torch.no_grad():
        after = loss(inputs[rows] @ model.weight.T, labels[rows])
    return {"after": after, "refused_wrong_shard": refused}


@pytest.mark.slow
def test_ddp_model_with_sharded_proxies_and_resharded_checkpoint(tmp_path):
    two = run_ranks(tmp_path, 2, _ddp_model_and_save_worker)

    # The step: loss and the model's gradient (averaged by DDP) equal the single process's.
    model, proxies = ckpt_setup()
    single = ProxyGMLLoss(embedding_size=CKPT_DIM, **CKPT).double()
    with torch.no_grad():
        single.proxies.copy_(proxies)
    inputs, labels = ckpt_batch(0)
    expected = single(model(inputs), labels)
    expected.backward()
    for result in two:
        assert_close(result["step"]["loss"], expected.detach())
        for actual, reference in zip(result["step"]["model"], model.parameters()):
            assert_close(actual, reference.grad)

    # Ranks seeded alike initialise different shards, and their random streams stay in step.
    assert not torch.equal(two[0]["initial"][:8], two[1]["initial"][:8])
    assert torch.equal(two[0]["next_random"], two[1]["next_random"])

    # full_state_dict is a ProxyGMLLoss state, the same on every rank, and it holds the step.
    stepped = proxies - 0.1 * single.proxies.grad
    assert torch.equal(two[0]["full"]["proxies"], two[1]["full"]["proxies"])
    single.load_state_dict(two[0]["full"])
    assert_close(single.proxies.detach(), stepped)
    inputs, labels = ckpt_batch(1)
    with torch.no_grad():
        after = single(inputs @ model.weight.T, labels)
    assert_close(two[0]["after"], after)

    # 2 -> 4 ranks: the resharded checkpoint gives the same loss; a wrong shard is refused.
    states = [result["state"] for result in two]
    paths = [tmp_path / f"shard{r}-of-4.pt" for r in range(4)]
    for state, path in zip(reshard_state_dicts(states, 4), paths):
        torch.save(state, path)
    four = run_ranks(tmp_path, 4, _load_resharded_worker, [torch.load(path) for path in paths])
    for result in four:
        assert_close(result["after"], after)
        assert result["refused_wrong_shard"]


# ----------------------------------------------------------------------------------------
# Inputs that differ between ranks: the same ValueError on every rank, then a working step

MISMATCH = {"num_classes": 7, "embedding_size": 8, "proxies_per_class": 3, "top_k": 5}


def mismatch_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(300 + rank)
    embeddings = torch.randn(6, MISMATCH["embedding_size"], generator=generator)
    labels = torch.randint(MISMATCH["num_classes"], (6,), generator=generator)
    return embeddings.double(), labels


def mismatched_inputs(rank: int) -> dict:
    """What rank 1 passes differently from rank 0, by name."""
    embeddings, labels = mismatch_batch(rank)
    other = rank == 1
    return {
        "unequal_batch_sizes": (embeddings[: 6 - rank], labels[: 6 - rank]),
        "embedding_dtypes": (embeddings.float() if other else embeddings, labels),
        "label_dtypes": (embeddings, labels.int() if other else labels),
        "labels_not_a_tensor": (embeddings, labels.tolist() if other else labels),
    }


MISMATCH_CASES = [
    ("data_parallel", "unequal_batch_sizes", r"ranks \[1\]: embeddings float64 \(5, 8\)"),
    ("data_parallel", "embedding_dtypes", r"ranks \[1\]: embeddings float32 \(6, 8\)"),
    ("data_parallel", "label_dtypes", r"ranks \[1\]: .*labels int32 \(6,\)"),
    ("sharded", "embedding_dtypes", r"ranks \[1\]: embeddings float32 \(6, 8\)"),
    ("sharded", "label_dtypes", r"ranks \[1\]: .*labels int32 \(6,\)"),
    ("sharded", "labels_not_a_tensor", r"ranks \[1\]: .*labels not a tensor"),
]
MISMATCH_MESSAGES = {
    "data_parallel": "data_parallel_loss needs embeddings and labels of the same shape and dtype",
    "sharded": r"every rank must pass embeddings of shape \(batch_size, 8\) and one label per row",
}


def _mismatch_worker(rank, world_size):
    torch.manual_seed(0)
    losses = {
        "data_parallel": ProxyGMLLoss(**MISMATCH).double(),
        "sharded": ShardedProxyGMLLoss(**MISMATCH).double(),
    }
    losses["sharded"].load_full_state_dict({"proxies": mismatch_proxies()})
    with torch.no_grad():
        losses["data_parallel"].proxies.copy_(mismatch_proxies())
    loss_fns = {**losses, "data_parallel": data_parallel_loss(losses["data_parallel"])}
    before = {mode: loss.proxies.detach().clone() for mode, loss in losses.items()}
    errors = []
    for mode, name, _ in MISMATCH_CASES:
        try:
            loss_fns[mode](*mismatched_inputs(rank)[name])
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    unchanged = all(
        torch.equal(loss.proxies, before[mode]) and loss.proxies.grad is None
        for mode, loss in losses.items()
    )
    # The loss still works, on every rank, after the errors.
    values = {}
    for mode, loss_fn in loss_fns.items():
        value = loss_fn(*mismatch_batch(rank))
        value.backward()
        values[mode] = value.detach()
    return {"errors": errors, "unchanged": unchanged, "values": values}


def mismatch_proxies() -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    rows = MISMATCH["num_classes"] * MISMATCH["proxies_per_class"]
    return torch.randn(rows, MISMATCH["embedding_size"], generator=generator, dtype=torch.float64)


@pytest.fixture(scope="module")
def mismatch_results(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("mismatch"), 2, _mismatch_worker)


@pytest.mark.slow
@pytest.mark.parametrize(
    "index", range(len(MISMATCH_CASES)), ids=[f"{m}-{n}" for m, n, _ in MISMATCH_CASES]
)
def test_inputs_that_differ_between_ranks_raise_the_same_error_everywhere(mismatch_results, index):
    """No abort, no hang, no garbage labels: every rank raises one ValueError naming the
    ranks and what they passed (and run_ranks saw every worker exit normally)."""
    mode, _, detail = MISMATCH_CASES[index]
    messages = [result["errors"][index] for result in mismatch_results]
    assert messages[0] is not None and messages == [messages[0]] * len(messages)
    assert re.search(MISMATCH_MESSAGES[mode], messages[0]), messages[0]
    assert re.search(detail, messages[0]), messages[0]


@pytest.mark.slow
def test_nothing_changes_and_the_next_step_works_after_mismatched_inputs(mismatch_results):
    assert all(result["unchanged"] for result in mismatch_results)
    single = ProxyGMLLoss(**MISMATCH).double()
    with torch.no_grad():
        single.proxies.copy_(mismatch_proxies())
    batches = [mismatch_batch(rank) for rank in range(len(mismatch_results))]
    expected = single(*(torch.cat(parts) for parts in zip(*batches)))
    for result in mismatch_results:
        assert_close(result["values"]["data_parallel"] / len(mismatch_results), expected.detach())
        assert_close(result["values"]["sharded"], expected.detach())


# ----------------------------------------------------------------------------------------
# Layout and checkpoint helpers, and one rank in this process


def test_class_ranges_cover_every_class_once():
    assert class_ranges(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert class_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert class_ranges(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="at least one class per rank"):
        class_ranges(3, 4)


def test_reshard_rows_round_trip_and_owned_memory():
    full = torch.arange(10 * 3 * 2, dtype=torch.float64).view(30, 2)
    two = reshard_rows([full], proxies_per_class=3, world_size=2)
    four = reshard_rows(two, proxies_per_class=3, world_size=4)
    assert [len(shard) for shard in four] == [9, 9, 6, 6]
    assert torch.equal(torch.cat(four), full)
    assert torch.equal(torch.cat(reshard_rows(four, 3, 1)), full)
    assert all(shard.untyped_storage().nbytes() == shard.nbytes for shard in four)


def test_reshard_state_dicts_needs_every_rank_in_order():
    layout = {"num_classes": 4, "proxies_per_class": 1, "world_size": 2}
    states = [
        {"proxies": torch.zeros(2, 3), "_extra_state": {**layout, "rank": rank}} for rank in (0, 1)
    ]
    assert len(reshard_state_dicts(states, 4)) == 4
    with pytest.raises(ValueError, match="every rank of one run, in rank order"):
        reshard_state_dicts(states[::-1], 4)
    with pytest.raises(ValueError, match="every rank of one run, in rank order"):
        reshard_state_dicts(states[:1], 4)


def test_sharded_loss_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"torch\.distributed"):
        ShardedProxyGMLLoss(10, 8)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_sharded_loss_on_one_rank_is_the_loss(one_rank_group, index):
    case = CASES[index]
    loss = sharded_loss_for_case(case)
    embeddings, labels = tensor(case, "embeddings_raw"), torch.as_tensor(case["labels"])
    got = loss_step(loss, embeddings, labels)
    expected = loss_step(loss_for_case(case), embeddings, labels)
    for key in ("loss", "embeddings", "proxies"):
        assert_close(got[key], expected[key])


def test_sharded_loss_rejects_what_needs_all_proxies(one_rank_group):
    for kwargs in ({"regularizer_samples": 4}, {"weight_regularizer": torch.nn.Identity()}):
        with pytest.raises(ValueError, match="does not support"):
            ShardedProxyGMLLoss(10, 8, **kwargs)
    # It computes the exact regulariser over its shard: an estimator would be ignored.
    for estimator in ("lazy", "cached"):
        with pytest.raises(ValueError, match="computes the exact regulariser only"):
            ShardedProxyGMLLoss(10, 8, regularizer_estimator=estimator)
    loss = ShardedProxyGMLLoss(10, 8, proxies_per_class=2)
    assert loss.proxies.shape == (20, 8) and loss.proxies.device.type == "cpu"
    assert loss.proxies.abs().max() <= 1 / 20**0.5
    embeddings, labels = torch.randn(4, 8), torch.arange(4)
    with pytest.raises(ValueError, match="takes embeddings and labels only"):
        loss(embeddings, labels, ref_emb=embeddings)
    with pytest.raises(ValueError, match=r"shape \(batch_size, 8\)"):
        loss(torch.randn(4, 5), labels)
    with pytest.raises(NotImplementedError):
        loss.get_logits(embeddings)


def test_data_parallel_loss_needs_dense_proxy_gradients(one_rank_group):
    with pytest.raises(ValueError, match="sparse_proxy_grad=False"):
        data_parallel_loss(ProxyGMLLoss(10, 8, weight_lambda=0, sparse_proxy_grad=True))

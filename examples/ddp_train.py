"""Train an embedding network with ProxyGML on several processes, proxies replicated or sharded.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py            # data parallel
    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --sharded  # sharded proxies

One process per CPU share (gloo) or per GPU (NCCL, one GPU per process by LOCAL_RANK),
chosen by ``torch.cuda.is_available()``; nothing else changes between the two. The task is
the one of ``drop_in_swap.py`` (scikit-learn's bundled digits at random shifts, nothing
downloaded): train on digits 0-4, report Recall@1 among the unseen digits 5-9.

* Data parallel (default): the model in DDP, ``data_parallel_loss(ProxyGMLLoss(...))``: every
  rank holds all proxies and they stay identical.
* ``--sharded``: the model in DDP, ``ShardedProxyGMLLoss(...)``: rank r holds the proxies of
  its block of classes only; with 5 classes on 2 ranks, 3 and 2.

Both compute the loss of the global batch (every rank's samples) with the same gradients as
one process would. ``--checkpoint DIR`` saves the proxies at the end: ``proxies.pt`` (a
ProxyGMLLoss state) in data-parallel mode, one ``proxies.rank<r>-of-<W>.pt`` per rank when
sharded (``pml_proxygml.distributed.reshard_state_dicts`` converts them to another world size).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from drop_in_swap import EMBEDDING_SIZE, ShiftedDigits, small_cnn  # this script's directory
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from pml_proxygml import ProxyGMLLoss
from pml_proxygml.distributed import ShardedProxyGMLLoss, data_parallel_loss

TRAIN_CLASSES = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sharded", action="store_true", help="shard the proxies by class")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--proxies-per-class", type=int, default=4)
    parser.add_argument("--r", type=float, default=0.5, help="fraction of proxies kept")
    parser.add_argument("--lr", type=float, default=1e-3, help="network learning rate")
    parser.add_argument("--proxy-lr", type=float, default=0.1)
    parser.add_argument("--checkpoint", type=Path, help="directory to save the proxies in")
    return parser.parse_args()


@torch.no_grad()
def recall_at_1(model: DistributedDataParallel, dataset: ShiftedDigits) -> float:
    """Cosine nearest-neighbour Recall@1 (on one rank: the module, not the DDP wrapper)."""
    device = next(model.parameters()).device
    embeddings = F.normalize(model.module(dataset.images.to(device)), dim=1)
    similarities = embeddings @ embeddings.T
    similarities.fill_diagonal_(float("-inf"))
    nearest = similarities.argmax(dim=1).cpu()
    return (dataset.labels[nearest] == dataset.labels).float().mean().item()


def train(args: argparse.Namespace, device: torch.device) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same model on every rank (DDP would broadcast rank 0's anyway)
    model = torch.nn.Sequential(small_cnn(), torch.nn.Linear(64, EMBEDDING_SIZE)).to(device)
    loss_args = (TRAIN_CLASSES, EMBEDDING_SIZE, args.proxies_per_class, args.r)
    if args.sharded:
        loss = ShardedProxyGMLLoss(*loss_args).to(device)
        loss_fn, proxies = loss, loss.proxies
        scale = 1.0  # the sharded loss returns the global-batch loss itself
    else:
        loss = ProxyGMLLoss(*loss_args).to(device)
        loss_fn, proxies = data_parallel_loss(loss), loss.proxies
        scale = 1.0 / world_size  # DistributedLossWrapper returns world_size x that loss
    model = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    # The official recipe: Adam with eps 0.01 and weight decay 1e-4, proxies at a far larger lr.
    optimizer = torch.optim.Adam(
        [{"params": model.parameters()}, {"params": [proxies], "lr": args.proxy_lr}],
        lr=args.lr,
        eps=0.01,
        weight_decay=1e-4,
    )

    train_set, test_set = ShiftedDigits(range(0, TRAIN_CLASSES)), ShiftedDigits(range(5, 10))
    # drop_last: every rank steps with a batch of the same size (PML's gather needs it).
    sampler = DistributedSampler(train_set, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    if rank == 0:
        mode = "sharded proxies" if args.sharded else "data parallel"
        print(
            f"{world_size} ranks ({dist.get_backend()}, {device}), {mode}: rank 0 holds "
            f"{len(proxies)} of {TRAIN_CLASSES * args.proxies_per_class} proxies, "
            f"k={loss.top_k}, global batch {args.batch_size * world_size}"
        )
        print(f"Recall@1 on digits 5-9 before training: {recall_at_1(model, test_set):.3f}")

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        start, total, steps = time.perf_counter(), 0.0, 0
        for images, labels in loader:
            value = loss_fn(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            total, steps = total + value.item() * scale, steps + 1
        if rank == 0:
            print(
                f"epoch {epoch}: loss {total / steps:.4f} ({steps} steps, "
                f"{time.perf_counter() - start:.1f}s)"
            )

    if rank == 0:
        print(f"Recall@1 on digits 5-9 after training: {recall_at_1(model, test_set):.3f}")
    if args.checkpoint is not None:
        args.checkpoint.mkdir(parents=True, exist_ok=True)
        if args.sharded:
            torch.save(
                loss.state_dict(), args.checkpoint / f"proxies.rank{rank}-of-{world_size}.pt"
            )
        elif rank == 0:
            torch.save(loss.state_dict(), args.checkpoint / "proxies.pt")


def main() -> None:
    args = parse_args()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        train(args, device)
    finally:
        # DDP modules linger in reference cycles holding the process group; collect them while
        # it can still shut down cleanly (gloo can abort at interpreter exit otherwise).
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

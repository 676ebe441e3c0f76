"""ProxyGML over several processes (``torch.distributed``): two supported patterns.

* **Data parallel**, ``data_parallel_loss``: every rank holds all C * N proxies; PML's
  ``DistributedLossWrapper`` gathers the batch, and the loss is wrapped in DDP so that the
  proxies stay identical on every rank, with the world-size factor of their gradient undone.
* **Sharded proxies** (model parallel), ``ShardedProxyGMLLoss``: each rank owns the proxies of
  a contiguous block of classes; selection, class logits and the regulariser are combined
  across ranks so that loss and gradients equal the single-process loss on the whole batch.

In both, the model is wrapped in DDP as usual and receives exactly the gradient of the loss
of the global batch (every rank's samples). Checkpoints of the sharded mode are per-rank
``state_dict()`` shards; ``reshard_state_dicts`` converts them to another world size and
``ShardedProxyGMLLoss.full_state_dict`` gives a ``ProxyGMLLoss`` state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
from torch.nn.parallel import DistributedDataParallel

from . import functional as gml
from .losses import ProxyGMLLoss

# torch 2.13 renamed the tensor collectives (the old names warn); torch < 2.13 has only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# ----------------------------------------------------------------------------------------
# Data parallel


def _mean_over_ranks_divided_by_world_size(process_group, bucket):
    """DDP communication hook: the mean of the ranks' gradients, divided by the world size."""
    group = process_group if process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    gradients = bucket.buffer().div_(world_size * world_size)
    future = dist.all_reduce(gradients, group=group, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def data_parallel_loss(
    loss: BaseMetricLossFunction, process_group: Any = None, **ddp_kwargs: Any
) -> DistributedDataParallel:
    """``DistributedDataParallel(DistributedLossWrapper(loss))`` with exact proxy gradients.

    The supported data-parallel pattern: the model in DDP, the loss through this function.

    * DDP on the loss (PML issue #710): the proxies are parameters, so every rank must start
      from the same values (DDP broadcasts rank 0's at construction) and apply the same
      gradient (DDP averages them). Without it the replicas drift apart: each rank sums the
      gathered batch in its own order (PML puts its own rows first), so the ranks' proxy
      gradients differ in the last bits even from equal proxies, and the differences grow.
    * The world-size factor: ``DistributedLossWrapper(efficient=False)`` returns W times the
      global-batch loss on every rank, which is what DDP's averaging of the *model's*
      gradients needs (each rank differentiates only through its own embeddings). But every
      rank differentiates the full loss with respect to the proxies, so their gradient is W
      times the single-process one on every rank, and averaging keeps that factor: with SGD
      it multiplies the learning rate, with the official Adam (eps 0.01, coupled weight
      decay 1e-4) it changes the step. A DDP communication hook divides it out.

    Result, on every rank: the returned loss is W times the loss of the global batch (divide
    by W to log it), each rank's embeddings get W times their single-process gradient, the
    model (in DDP) gets exactly the single-process gradient, and the proxies get exactly the
    single-process gradient, bit-identical on all ranks, so they stay identical.

    Every rank must pass the same number of samples (PML's gather) and call ``backward``. Put
    the loss on its device before wrapping it. Works for any PML loss with parameters, except
    ``sparse_proxy_grad=True`` (DDP expects dense gradients outside ``nn.Embedding``; the
    sharded mode supports it).

    Args:
        loss: the loss, e.g. ``ProxyGMLLoss(...)``; its proxies are ``loss.proxies`` and also
            ``wrapped.parameters()`` (give those to the proxy optimizer).
        process_group: the group to average over; the default group when None.
        **ddp_kwargs: more arguments of ``DistributedDataParallel``.
    """
    if getattr(loss, "sparse_proxy_grad", False):
        raise ValueError("data_parallel_loss needs dense proxy gradients (sparse_proxy_grad=False)")
    wrapped = DistributedDataParallel(
        DistributedLossWrapper(loss, efficient=False), process_group=process_group, **ddp_kwargs
    )
    wrapped.register_comm_hook(process_group, _mean_over_ranks_divided_by_world_size)
    return wrapped


# ----------------------------------------------------------------------------------------
# Sharded proxies: layout and checkpoints


def class_ranges(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """The contiguous block ``[start, stop)`` of classes each rank owns, in rank order.

    The first ``num_classes % world_size`` ranks own one class more than the others.
    """
    if num_classes < world_size:
        raise ValueError(f"need at least one class per rank, got {num_classes} < {world_size}")
    base, extra = divmod(num_classes, world_size)
    starts = [rank * base + min(rank, extra) for rank in range(world_size + 1)]
    return list(zip(starts[:-1], starts[1:]))


def reshard_rows(
    shards: Sequence[torch.Tensor], proxies_per_class: int, world_size: int
) -> list[torch.Tensor]:
    """Per-rank row blocks (proxies, or an optimizer's moments of them) for another world size.

    ``shards`` are every rank's tensor of one layout, in rank order (rows class-major, N per
    class). Each returned shard owns its memory, so saving one does not save the others.
    """
    full = torch.cat(list(shards))
    num_classes = len(full) // proxies_per_class
    return [
        full[start * proxies_per_class : stop * proxies_per_class].clone()
        for start, stop in class_ranges(num_classes, world_size)
    ]


def _shard_layout(num_classes: int, proxies_per_class: int, world_size: int, rank: int) -> dict:
    """What a shard's ``state_dict`` records about the layout it belongs to."""
    return {
        "num_classes": num_classes,
        "proxies_per_class": proxies_per_class,
        "world_size": world_size,
        "rank": rank,
    }


def reshard_state_dicts(
    states: Sequence[Mapping[str, Any]], world_size: int
) -> list[dict[str, Any]]:
    """``ShardedProxyGMLLoss.state_dict()`` of every rank, in rank order, for ``world_size`` ranks.

    Runs offline (no process group): load each rank's saved shard, convert, and let rank r of
    the new run ``load_state_dict(result[r])``.
    """
    layouts = [state["_extra_state"] for state in states]
    num_classes, per_class = layouts[0]["num_classes"], layouts[0]["proxies_per_class"]
    expected = [_shard_layout(num_classes, per_class, len(states), r) for r in range(len(states))]
    if layouts != expected:
        raise ValueError(
            "reshard_state_dicts needs the shards of every rank of one run, in rank order; "
            f"got layouts {layouts}"
        )
    shards = reshard_rows([state["proxies"] for state in states], per_class, world_size)
    return [
        {"proxies": shard, "_extra_state": _shard_layout(num_classes, per_class, world_size, r)}
        for r, shard in enumerate(shards)
    ]


# ----------------------------------------------------------------------------------------
# Sharded proxies: collectives


def _pad_rows(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    if len(rows) == num_rows:
        return rows.contiguous()
    return torch.cat([rows, rows.new_zeros((num_rows - len(rows), *rows.shape[1:]))])


def _all_gather_rows(rows: torch.Tensor, sizes: Sequence[int], group: Any) -> torch.Tensor:
    """Every rank's rows concatenated in rank order; rank r holds ``sizes[r]`` rows."""
    padded = max(sizes)
    gathered = rows.new_empty((len(sizes) * padded, *rows.shape[1:]))
    _all_gather_single(gathered, _pad_rows(rows, padded), group=group)
    if all(size == padded for size in sizes):
        return gathered
    return torch.cat([gathered[r * padded : r * padded + n] for r, n in enumerate(sizes)])


class _GatherRows(torch.autograd.Function):
    """``_all_gather_rows`` whose backward is its adjoint when the ranks' losses are summed.

    Every rank differentiates its own loss with respect to all gathered rows; rank r's rows
    receive the sum over ranks of those gradients (a reduce-scatter).
    """

    @staticmethod
    def forward(ctx, rows, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_rows(rows, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, padded = ctx.sizes, max(ctx.sizes)
        stacked = torch.cat([_pad_rows(piece, padded) for piece in grad.split(sizes)])
        own = grad.new_empty((padded, *grad.shape[1:]))
        _reduce_scatter_single(own, stacked, group=ctx.group)
        return own[: sizes[dist.get_rank(ctx.group)]], None, None


class _ScaleGradient(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, tensor, scale):
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _leave_uninitialised(tensor: torch.Tensor) -> None:
    """The initialisation of ProxyGMLLoss's placeholder proxies: they are replaced."""


# ----------------------------------------------------------------------------------------
# Sharded proxies: the loss


class ShardedProxyGMLLoss(ProxyGMLLoss):
    """ProxyGMLLoss with its proxies sharded by class over the ranks of a process group.

    Rank r owns the proxies of classes ``class_ranges(C, W)[r]`` (its ``proxies`` parameter,
    ``(C_r * N, d)``), so proxy memory and selection work per rank follow C / W. Each rank
    passes its own embeddings and labels (ranks may pass different numbers of rows); the
    loss gathers them (differentiably) and computes, on every rank, exactly the loss of
    ``ProxyGMLLoss`` on the whole batch in rank order:

    1. every rank takes the top-k of the gathered batch over its shard (positives first for
       the samples whose class it owns) and the candidates are all-gathered;
    2. the global top-k is merged from them, positives first, ties towards the lower proxy
       index, identically on every rank;
    3. every rank builds the class logits, masked softmax and cross-entropy of the whole
       batch from the merged similarities (``functional`` as in ``ProxyGMLLoss``), with a
       gradient through the kept entries it owns only;
    4. the regulariser gathers the (C, d) class sums, each rank sums the cross-entropy of its
       own proxies, and the sums are all-reduced.

    Gradients: each rank's ``proxies`` get exactly the single-process gradient of their rows.
    Each rank's embeddings get W times their single-process gradient, as under PML's
    ``DistributedLossWrapper``, so that DDP's averaging gives the model (wrap it in DDP, not
    this loss) exactly the gradient of the global-batch loss. The returned loss is that loss
    itself, the same on every rank. Every rank must call the loss and ``backward`` together.

    Arguments are those of ``ProxyGMLLoss`` (``num_classes`` is the total C) plus
    ``process_group`` (the default group when None), which must be initialised first.
    Not supported: ``regularizer_samples``, ``weight_regularizer`` (both need all proxies),
    a ``regularizer_estimator`` other than ``"exact"``,
    miners' ``indices_tuple``, ``ref_emb``, and ``get_logits`` (load ``full_state_dict()``
    into a ``ProxyGMLLoss`` for inference). Reducers and ``embedding_regularizer`` see the
    gathered batch. The default proxy initialisation is the official U(-1/sqrt(CN), 1/sqrt(CN))
    with the total CN.

    Checkpoints: ``state_dict()`` holds this rank's shard and its layout, and loading checks
    the layout; ``reshard_state_dicts`` converts the shards of a run to another world size;
    ``full_state_dict()`` / ``load_full_state_dict()`` convert from and to the state of a
    single-process ``ProxyGMLLoss``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int = 12,
        r: float = 0.05,
        top_k: int | None = None,
        weight_lambda: float = 0.3,
        process_group: Any = None,
        **kwargs: Any,
    ):
        for name in ("regularizer_samples", "regularizer_period", "weight_regularizer"):
            if kwargs.get(name) is not None:
                raise ValueError(f"ShardedProxyGMLLoss does not support {name}")
        if kwargs.get("regularizer_estimator") not in (None, "exact"):
            raise ValueError("ShardedProxyGMLLoss computes the exact regulariser only")
        if not dist.is_initialized():
            raise RuntimeError("ShardedProxyGMLLoss needs torch.distributed to be initialised")
        init = kwargs.pop("weight_init_func", None)
        # ProxyGMLLoss validates the arguments and allocates all C * N proxies: on the meta
        # device that costs no memory, and this rank's shard replaces them below.
        with torch.device("meta"):
            super().__init__(
                num_classes,
                embedding_size,
                proxies_per_class,
                r,
                top_k,
                weight_lambda,
                weight_init_func=_leave_uninitialised,
                **kwargs,
            )
        self.weight_init_func = self._official_uniform_init if init is None else init
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        ranges = class_ranges(self.num_classes, self.world_size)
        self.class_start, self.class_stop = ranges[self.rank]
        self.shard_sizes = [(stop - start) * self.proxies_per_class for start, stop in ranges]
        self.proxies = torch.nn.Parameter(
            torch.empty(self.shard_sizes[self.rank], self.embedding_size)
        )
        self.weight_init_func(self.proxies)

    def _official_uniform_init(self, proxies: torch.Tensor) -> None:
        """U(-1/sqrt(CN), 1/sqrt(CN)) with the total CN, the scale of the unsharded loss.

        Ranks usually seed alike, which would give every shard the same values: each rank
        draws from its own generator, seeded by the default one (advanced alike on every
        rank, so the ranks' random streams stay in step) plus its rank.
        """
        bound = 1.0 / math.sqrt(self.num_classes * self.proxies_per_class)
        seed = int(torch.randint(2**62, (), device="cpu")) + self.rank
        generator = torch.Generator(proxies.device).manual_seed(seed)
        with torch.no_grad():
            proxies.uniform_(-bound, bound, generator=generator)

    # -- forward -----------------------------------------------------------------------

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """Loss of every rank's batch together; ``embeddings`` and ``labels`` are this rank's."""
        if indices_tuple is not None or ref_emb is not None or ref_labels is not None:
            raise ValueError(
                "ShardedProxyGMLLoss takes embeddings and labels only (no indices_tuple, "
                "ref_emb or ref_labels)"
            )
        c_f.labels_required(labels)
        embeddings, labels = self._gather_batch(embeddings, labels.to(embeddings.device))
        return super().forward(embeddings, labels)

    def _gather_batch(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's embeddings (differentiably) and labels, in rank order.

        Shapes are exchanged first, so a bad shape on any rank raises on every rank instead
        of leaving the others waiting in a collective.
        """
        width = embeddings.shape[1] if embeddings.ndim == 2 else -1
        shape = torch.tensor([[len(embeddings), width, labels.numel()]], device=labels.device)
        shapes = _all_gather_rows(shape, [1] * self.world_size, self.process_group).tolist()
        bad = [
            r
            for r, (rows, dim, count) in enumerate(shapes)
            if (dim, count) != (self.embedding_size, rows)
        ]
        if bad:
            raise ValueError(
                f"every rank must pass embeddings of shape (batch_size, {self.embedding_size}) "
                f"and one label per row; (rows, dim, labels) of ranks {bad}: "
                f"{[shapes[r] for r in bad]}"
            )
        sizes = [rows for rows, _, _ in shapes]
        if sum(sizes) == 0:
            raise ValueError("embeddings is an empty batch on every rank")
        gathered = _GatherRows.apply(embeddings, sizes, self.process_group)
        return gathered, _all_gather_rows(labels.reshape(-1), sizes, self.process_group)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self._validate(embeddings, labels)
        with gml.full_precision(embeddings.device):
            x, proxies = self._inputs_in_compute_dtype(embeddings)
            indices, values = self._select(x, proxies, labels)
            kept = self._kept_similarities(x, proxies, indices, values)
            per_sample, present = gml.subgraph_loss(
                kept,
                indices // self.proxies_per_class,
                labels,
                classes_are_distinct=self.proxies_per_class == 1,
            )
            loss_dict = {
                "loss": {
                    "losses": per_sample,
                    "indices": c_f.torch_arange_from_size(embeddings),
                    "reduction_type": "element",
                    "divisor": len(embeddings),
                },
                "proxy_reg_loss": self._proxy_regularization(proxies),
            }
            if self.collect_stats:
                self.avg_classes_per_subgraph = present.sum(dim=1).float().mean().item()
        return loss_dict

    @torch.no_grad()
    def _select(
        self, x: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``gml.select_topk`` over all C * N proxies, from each rank's top-k over its shard.

        The global selection keeps the sample's positives (all N if k >= N, else the k most
        similar) and the k - N most similar negatives. The positives all live on the rank
        owning the sample's class, whose local selection keeps them as the global one would;
        each rank's local top-k holds all of its negatives or at least k - N of them, so the
        union of the candidates holds the global k - N best. The merge ranks positives first,
        then by similarity, ties towards the lower proxy index.
        """
        per_class, start = self.proxies_per_class, self.class_start * self.proxies_per_class
        local_k = min(self.top_k, len(proxies))
        width = min(self.top_k, max(self.shard_sizes))  # the same on every rank
        candidates = torch.full((len(x), width), -1, dtype=torch.long, device=x.device)
        values = x.new_full((len(x), width), float("-inf"))
        owns_class = (labels >= self.class_start) & (labels < self.class_stop)
        for rows, with_labels in ((owns_class.nonzero(), True), ((~owns_class).nonzero(), False)):
            rows = rows.squeeze(1)
            if len(rows) == 0:
                continue
            local_labels = labels[rows] - self.class_start if with_labels else None
            found, similarities = gml.select_topk(
                x[rows], proxies, local_labels, per_class, local_k, self.selection_block_bytes
            )
            candidates[rows, :local_k] = found + start
            values[rows, :local_k] = similarities

        def from_every_rank(tensor: torch.Tensor) -> torch.Tensor:
            gathered = _all_gather_rows(tensor, [len(x)] * self.world_size, self.process_group)
            return gathered.view(self.world_size, len(x), width).transpose(0, 1).flatten(1)

        candidates, values = from_every_rank(candidates), from_every_rank(values)
        by_index = candidates.argsort(dim=1)
        candidates, values = candidates.gather(1, by_index), values.gather(1, by_index)
        positive = candidates // per_class == labels.unsqueeze(1)  # padding (-1) never is
        priority = values.masked_fill(positive, float("inf"))
        keep = priority.sort(dim=1, descending=True, stable=True).indices[:, : self.top_k]
        return candidates.gather(1, keep), values.gather(1, keep)

    def _kept_similarities(
        self, x: torch.Tensor, proxies: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """The (B, k) kept similarities, differentiable in the entries of this rank's proxies.

        The other entries are constants: their owners differentiate them. Since DDP averages
        the model's gradients over ranks, the gradient towards the embeddings is scaled by W
        here (the proxies' is not), as if every rank differentiated the whole loss.
        """
        local = indices - self.class_start * self.proxies_per_class
        owned = (local >= 0) & (local < len(proxies))
        # Entries of other ranks point at a proxy this rank keeps anyway (row 0 if none) and
        # get a zero gradient, so neither gradient changes, not even a sparse one's rows.
        local = torch.where(owned, local, torch.where(owned, local, 0).amax())
        if self.sparse_proxy_grad and not bool(owned.any()):
            proxies = proxies.detach()  # no row of this shard is kept: no gradient at all
        kept = gml.kept_similarities(
            _ScaleGradient.apply(x, self.world_size), proxies, local, values, self.sparse_proxy_grad
        )
        return torch.where(owned, kept, values)

    def _proxy_regularization(self, proxies: torch.Tensor) -> dict:
        """lambda * L^p: this rank's proxies against the class sums of all C classes."""
        if self.weight_lambda == 0:
            return self.zero_loss()
        per_class = self.proxies_per_class
        unit = F.normalize(proxies, p=2, dim=1)
        class_sizes = [size // per_class for size in self.shard_sizes]
        own_sums = unit.view(-1, per_class, unit.shape[1]).sum(dim=1)
        class_sums = _GatherRows.apply(own_sums, class_sizes, self.process_group)
        own_classes = torch.arange(self.class_start, self.class_stop, device=unit.device)
        own = gml.regularizer_sum(
            unit,
            class_sums,
            own_classes.repeat_interleave(per_class),
            self.regularizer_block_elements,
        )
        total = own.detach().clone()
        dist.all_reduce(total, group=self.process_group)
        # The value of every rank's terms, the gradient of this rank's (exactly: own - own = 0).
        reg = (own - own.detach() + total) / (self.num_classes * per_class)
        if self.collect_stats:
            self.proxy_reg_value = reg.item()
        return {
            "losses": self.weight_lambda * reg,
            "indices": None,
            "reduction_type": "already_reduced",
        }

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "ShardedProxyGMLLoss has no get_logits; load full_state_dict() into a ProxyGMLLoss"
        )

    # -- checkpoints -------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return _shard_layout(self.num_classes, self.proxies_per_class, self.world_size, self.rank)

    def set_extra_state(self, state: dict) -> None:
        """Nothing to set: the layout is fixed at construction and checked before loading."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "_extra_state")
        if saved is not None and saved != self.get_extra_state():
            raise ValueError(
                f"this checkpoint shard has layout {saved}, this loss {self.get_extra_state()}; "
                "convert the shards with reshard_state_dicts"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The state of a ``ProxyGMLLoss`` with all C * N proxies (a collective: every rank)."""
        gathered = _all_gather_rows(self.proxies.detach(), self.shard_sizes, self.process_group)
        return {"proxies": gathered}

    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load this rank's rows of a ``ProxyGMLLoss`` state (or of ``full_state_dict()``)."""
        full = state["proxies"]
        expected = (self.num_classes * self.proxies_per_class, self.embedding_size)
        if tuple(full.shape) != expected:
            raise ValueError(f"proxies must have shape {expected}, got {tuple(full.shape)}")
        start = self.class_start * self.proxies_per_class
        with torch.no_grad():
            self.proxies.copy_(full[start : start + len(self.proxies)])

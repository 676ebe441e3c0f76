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
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
from torch.nn.parallel import DistributedDataParallel

from . import functional as gml
from .losses import ProxyGMLLoss
from .losses.proxy_gml_loss import check_layout

# torch 2.13 renamed the tensor collectives (the old names warn); torch < 2.13 has only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# ----------------------------------------------------------------------------------------
# What every rank passes, checked before the collectives that depend on it

# Every dtype torch knows, in a fixed order: a dtype crosses ranks as its position.
_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


class _TensorDescription(NamedTuple):
    """A tensor argument as integers; ndim -1 when it is not a tensor (or None)."""

    ndim: int = -1
    numel: int = -1
    rows: int = -1
    width: int = -1
    dtype: int = -1

    @classmethod
    def of(cls, value: Any) -> _TensorDescription:
        if not torch.is_tensor(value):
            return cls()
        shape = (*value.shape, -1, -1)
        return cls(value.ndim, value.numel(), shape[0], shape[1], _DTYPES.index(value.dtype))

    def __str__(self) -> str:
        if self.ndim < 0:
            return "not a tensor"
        rows, width = self.rows, self.width
        shape = {0: "()", 1: f"({rows},)", 2: f"({rows}, {width})"}.get(
            self.ndim, f"({rows}, {width}, ...)"
        )
        return f"{str(_DTYPES[self.dtype]).replace('torch.', '')} {shape}"


class _RankInputs(NamedTuple):
    embeddings: _TensorDescription
    labels: _TensorDescription

    def __str__(self) -> str:
        return f"embeddings {self.embeddings}, labels {self.labels}"


def _inputs_of_every_rank(
    embeddings: Any, labels: Any, device: torch.device, group: Any
) -> list[_RankInputs]:
    """Shapes and dtypes of every rank's embeddings and labels: one small all-gather."""
    mine = [*_TensorDescription.of(embeddings), *_TensorDescription.of(labels)]
    world_size = dist.get_world_size(group)
    gathered = _all_gather_rows(torch.tensor([mine], device=device), [1] * world_size, group)
    half = len(_TensorDescription._fields)
    return [
        _RankInputs(_TensorDescription(*row[:half]), _TensorDescription(*row[half:]))
        for row in gathered.tolist()
    ]


def _by_rank(inputs: Sequence[_RankInputs]) -> str:
    """Each distinct description with the ranks that passed it."""
    ranks: dict[_RankInputs, list[int]] = {}
    for rank, each in enumerate(inputs):
        ranks.setdefault(each, []).append(rank)
    return "; ".join(f"ranks {which}: {each}" for each, which in ranks.items())


# ----------------------------------------------------------------------------------------
# Data parallel


def _mean_over_ranks_divided_by_world_size(process_group, bucket):
    """DDP communication hook: the mean of the ranks' gradients, divided by the world size."""
    group = process_group if process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    gradients = bucket.buffer().div_(world_size * world_size)
    future = dist.all_reduce(gradients, group=group, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


class _SameInputsLossWrapper(DistributedLossWrapper):
    """PML's ``DistributedLossWrapper``, checking first that its gather can work.

    The gather needs embeddings and labels of one shape and dtype on every rank; otherwise
    the collective aborts every process. The shapes and dtypes are exchanged first (one small
    all-gather over the default group, as PML's gather), so every rank raises the same
    ValueError instead, before anything else happens.
    """

    def forward(self, embeddings, labels=None, *args, **kwargs):
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = next(self.parameters()).device
            inputs = _inputs_of_every_rank(embeddings, labels, device, group=None)
            if len(set(inputs)) > 1:
                raise ValueError(
                    "data_parallel_loss needs embeddings and labels of the same shape and "
                    f"dtype on every rank, got {_by_rank(inputs)}"
                )
        return super().forward(embeddings, labels, *args, **kwargs)


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

    Every rank must pass embeddings and labels of the same shape and dtype (PML's gather:
    checked first, with a ValueError on every rank otherwise, at the cost of one small
    all-gather and host sync per call) and call ``backward``. Put the loss on its device
    before wrapping it. Works for any PML loss with parameters, except
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
        _SameInputsLossWrapper(loss, efficient=False), process_group=process_group, **ddp_kwargs
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


def reshard_state_dicts(
    states: Sequence[Mapping[str, Any]], world_size: int
) -> list[dict[str, Any]]:
    """``ShardedProxyGMLLoss.state_dict()`` of every rank, in rank order, for ``world_size`` ranks.

    Runs offline (no process group): load each rank's saved shard, convert, and let rank r of
    the new run ``load_state_dict(result[r])``.
    """
    layouts = [dict(state["_extra_state"]) for state in states]
    run = {key: value for key, value in layouts[0].items() if key not in ("world_size", "rank")}
    if layouts != [{**run, "world_size": len(states), "rank": r} for r in range(len(states))]:
        raise ValueError(
            "reshard_state_dicts needs the shards of every rank of one run, in rank order; "
            f"got layouts {layouts}"
        )
    shards = reshard_rows(
        [state["proxies"] for state in states], run["proxies_per_class"], world_size
    )
    return [
        {"proxies": shard, "_extra_state": {**run, "world_size": world_size, "rank": r}}
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


# ----------------------------------------------------------------------------------------
# Sharded proxies: the loss


class ShardedProxyGMLLoss(ProxyGMLLoss):
    """ProxyGMLLoss with its proxies sharded by class over the ranks of a process group.

    Rank r owns the proxies of classes ``class_ranges(C, W)[r]`` (its ``proxies`` parameter,
    ``(C_r * N, d)``), so proxy memory and selection work per rank follow C / W. Each rank
    passes its own embeddings and labels (ranks may pass different numbers of rows, of one
    dtype); the loss gathers them (differentiably) and computes, on every rank, exactly the
    loss of ``ProxyGMLLoss`` on the whole batch in rank order. It is ``ProxyGMLLoss`` with
    these hooks overridden:

    * ``_create_proxies`` / ``_layout``: this rank's shard, and a layout that names the world
      size and rank;
    * ``_select``: every rank takes the top-k of the gathered batch over its shard (positives
      first for the samples whose class it owns), the candidates are all-gathered and the
      global top-k is merged from them, positives first, ties towards the lower proxy index,
      identically on every rank;
    * ``_kept_similarities``: the merged similarities, with a gradient through the kept
      entries this rank owns only; class logits, masked softmax and cross-entropy of the
      whole batch then follow on every rank as in ``ProxyGMLLoss``;
    * ``_proxy_regularization``: the (C, d) class sums are gathered, each rank sums the
      cross-entropy of its own proxies, and the sums are all-reduced.

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

    _LAYOUT_HINT = "; convert the shards with reshard_state_dicts"

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any):
        if not dist.is_initialized():
            raise RuntimeError("ShardedProxyGMLLoss needs torch.distributed to be initialised")
        # Read by _create_proxies, which ProxyGMLLoss.__init__ calls.
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        super().__init__(*args, **kwargs)
        for name in ("regularizer_samples", "weight_regularizer"):
            if getattr(self, name) is not None:
                raise ValueError(f"ShardedProxyGMLLoss does not support {name}")
        if self.regularizer_estimator != "exact":
            raise ValueError("ShardedProxyGMLLoss computes the exact regulariser only")

    def _create_proxies(self) -> torch.nn.Parameter:
        """This rank's (C_r * N, d) rows of the proxies."""
        ranges = class_ranges(self.num_classes, self.world_size)
        self.class_start, self.class_stop = ranges[self.rank]
        self.shard_sizes = [(stop - start) * self.proxies_per_class for start, stop in ranges]
        return torch.nn.Parameter(torch.empty(self.shard_sizes[self.rank], self.embedding_size))

    def _layout(self) -> dict[str, int]:
        return {**super()._layout(), "world_size": self.world_size, "rank": self.rank}

    def get_default_weight_init_func(self):
        return self._official_uniform_init

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
        return super().forward(*self._gather_batch(embeddings, labels))

    def _gather_batch(self, embeddings: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's embeddings (differentiably) and labels, in rank order.

        Shapes and dtypes are exchanged first, so a bad shape or a dtype that differs between
        ranks raises the same ValueError on every rank instead of leaving the others waiting
        in a collective, or reinterpreting one rank's bytes as another dtype.
        """
        inputs = _inputs_of_every_rank(embeddings, labels, self.proxies.device, self.process_group)
        shapes_fit = all(
            (each.embeddings.ndim, each.embeddings.width, each.labels.numel)
            == (2, self.embedding_size, each.embeddings.rows)
            for each in inputs
        )
        one_dtype = all(
            (each.embeddings.dtype, each.labels.dtype)
            == (inputs[0].embeddings.dtype, inputs[0].labels.dtype)
            for each in inputs
        )
        if not (shapes_fit and one_dtype):
            raise ValueError(
                f"every rank must pass embeddings of shape (batch_size, {self.embedding_size}) "
                "and one label per row, each of one dtype on every rank; got "
                f"{_by_rank(inputs)}"
            )
        sizes = [each.embeddings.rows for each in inputs]
        if sum(sizes) == 0:
            raise ValueError("embeddings is an empty batch on every rank")
        gathered = _GatherRows.apply(embeddings, sizes, self.process_group)
        labels = labels.reshape(-1).to(embeddings.device)
        return gathered, _all_gather_rows(labels, sizes, self.process_group)

    @torch.no_grad()
    def _select(
        self, x: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_select_top`` over all C * N proxies, from each rank's top-k over its shard.

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
            found, similarities = self._select_top(x[rows], proxies, local_labels, local_k, norms)
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
        self,
        x: torch.Tensor,
        proxies: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
        norms: torch.Tensor,
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
            _ScaleGradient.apply(x, self.world_size),
            proxies,
            local,
            values,
            self.sparse_proxy_grad,
            self.selection_block_bytes,
            norms=norms,
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

    def full_state_dict(self) -> dict[str, Any]:
        """The state of a ``ProxyGMLLoss`` with all C * N proxies (a collective: every rank)."""
        gathered = _all_gather_rows(self.proxies.detach(), self.shard_sizes, self.process_group)
        return {"proxies": gathered, "_extra_state": super()._layout()}

    def load_full_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load this rank's rows of a ``ProxyGMLLoss`` state (or of ``full_state_dict()``)."""
        check_layout(state.get("_extra_state"), super()._layout(), "")
        full = state["proxies"]
        expected = (self.num_classes * self.proxies_per_class, self.embedding_size)
        if tuple(full.shape) != expected:
            raise ValueError(f"proxies must have shape {expected}, got {tuple(full.shape)}")
        start = self.class_start * self.proxies_per_class
        with torch.no_grad():
            self.proxies.copy_(full[start : start + len(self.proxies)])

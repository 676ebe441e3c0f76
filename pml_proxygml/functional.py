"""The ProxyGML method as small pure tensor functions.

Notation (as in the paper and ``docs/method.md``): B samples, d embedding dims, C classes,
N proxies per class, CN = C * N proxies in total, k proxies kept per sample.
Proxies are stored row-wise, ``(CN, d)``; row ``j`` belongs to class ``j // N``.

Nothing here owns state or touches PML: the loss class composes these functions, and
every one of them runs unchanged on CPU and CUDA without host synchronisation.
Nothing of size (CN, C) or (CN, CN) is ever built: class logits are segment sums over
the B * k kept entries, and the regulariser goes through per-class proxy sums.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

# The official code's epsilons: 1e-8 in the softmax denominator, 1e-20 inside the log.
SOFTMAX_DENOMINATOR_EPS = 1e-8
LOG_EPS = 1e-20

# F.normalize's lower clamp of norms.
NORM_EPS = 1e-12

# Bytes of one (B, block) similarity block while selecting; more proxies are streamed.
DEFAULT_SELECTION_BLOCK_BYTES = 16 << 20

# Elements of one (rows, C) logits block of the regulariser; larger problems are chunked.
DEFAULT_REGULARIZER_BLOCK_ELEMENTS = 1 << 24

# Elements per numpy argpartition call of the CPU top-k: rows go in chunks this large (its
# (rows, n) int64 result stays small) spread over torch's intra-op thread count.
PARTITION_CHUNK_ELEMENTS = 1 << 16


def full_precision(device: torch.device):
    """Autocast off, so that the loss computes in float32 or float64 whatever the caller's."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def num_selected(
    r: float, num_classes: int, proxies_per_class: int, top_k: int | None = None
) -> int:
    """k, the number of proxies kept per sample.

    ``top_k`` wins when given; otherwise ``ceil(r * C * N)`` evaluated left to right in
    Python floats, exactly as the official code rounds it (0.2 * 24 * 5 gives 25).
    Never more than ``C * N``.
    """
    total = num_classes * proxies_per_class
    k = top_k if top_k is not None else math.ceil(r * num_classes * proxies_per_class)
    return min(k, total)


def positive_proxy_indices(labels: torch.Tensor, proxies_per_class: int) -> torch.Tensor:
    """(B, N) row indices of each sample's own-class proxies."""
    offsets = torch.arange(proxies_per_class, device=labels.device)
    return labels.unsqueeze(1) * proxies_per_class + offsets


def proxy_norms(proxies: torch.Tensor) -> torch.Tensor:
    """(CN,) L2 norms clamped below at 1e-12, as ``F.normalize`` divides by them."""
    return torch.linalg.vector_norm(proxies, dim=1).clamp_min(NORM_EPS)


def selection_block_rows(batch_size: int, element_size: int, block_bytes: int) -> int:
    """Proxies per block so that one (B, block) similarity block fits in ``block_bytes``."""
    return max(1, block_bytes // (batch_size * element_size))


@functools.cache
def _partition_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="proxygml-topk")


# A forked child has the pools' objects but not their threads.
os.register_at_fork(after_in_child=_partition_pool.cache_clear)


def _largest(block: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) of the ``count`` largest entries of each row of ``block``, unordered.

    ``torch.topk``, except on CPU outside ``torch.compile``, where numpy's argpartition (a
    SIMD introselect) is several times faster (``python -m benchmarks.scale_checks
    topk``); it releases the GIL, so chunks of rows run on torch's intra-op thread count.
    Tensors without storage of their own (``torch.func`` transforms wrap their inputs)
    have no numpy view and take ``torch.topk`` too.
    """
    width = block.shape[1]
    if (
        block.device.type != "cpu"
        or count >= width
        or torch.compiler.is_compiling()
        or not torch._C._has_storage(block)
    ):
        return block.topk(count, dim=1, sorted=False)
    array, kth = block.numpy(), width - count
    columns = np.empty((len(block), count), dtype=np.int64)
    chunk_rows = max(1, PARTITION_CHUNK_ELEMENTS // width)

    def partition(start: int) -> None:
        chunk = slice(start, start + chunk_rows)
        columns[chunk] = np.argpartition(array[chunk], kth, axis=1)[:, kth:]

    starts = range(0, len(block), chunk_rows)
    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1:
        list(_partition_pool(workers).map(partition, starts))
    else:
        for start in starts:
            partition(start)
    indices = torch.from_numpy(columns)
    return block.gather(1, indices), indices


def _merge_running_topk(
    best_values: torch.Tensor,
    best_indices: torch.Tensor,
    block: torch.Tensor,
    block_start: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``best_values.shape[1]`` of the running best and a new block of columns."""
    num_best = best_values.shape[1]
    values, positions = _largest(torch.cat([best_values, block], dim=1), num_best)
    from_running = positions < num_best
    previous = best_indices.gather(1, positions.clamp(max=num_best - 1))
    indices = torch.where(from_running, previous, positions - num_best + block_start)
    return values, indices


def _exclude_columns(block: torch.Tensor, columns: torch.Tensor) -> None:
    """Set ``block[i, columns[i, n]]`` to -inf in place, ignoring columns outside the block.

    A (B, n) scatter instead of a (B, block) comparison mask: the positives are few.
    Out-of-range columns are clamped onto the block with a +inf that ``amin`` ignores.
    """
    width = block.shape[1]
    inside = (columns >= 0) & (columns < width)
    fill = torch.full(columns.shape, float("inf"), dtype=block.dtype, device=block.device)
    fill.masked_fill_(inside, float("-inf"))
    block.scatter_reduce_(1, columns.clamp(0, width - 1), fill, reduce="amin")


@torch.no_grad()
def select_topk(
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    labels: torch.Tensor | None,
    proxies_per_class: int,
    k: int,
    block_bytes: int = DEFAULT_SELECTION_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k proxies kept per sample, positives first, and their cosine similarities.

    Equivalent to the official ``topk(S + 1000 * positive_mask, k)`` with S the similarity to
    the normalised proxies, without relying on |S| <= 1: if k >= N every positive proxy is
    kept plus the k - N most similar negative ones; if k < N only the k most similar
    positives are kept (and no negatives at all). With ``labels=None`` it is a plain top-k.

    S is streamed over blocks of proxies with a running top-k, so the extra memory is
    O(B * (k + block)) whatever CN; the proxies are never copied in normalised form.
    No gradient flows through it (see ``kept_similarities``).

    Args:
        embeddings: (B, d) embeddings (normalised or not, as the distance says).
        proxies: (CN, d) raw proxies, class-major.
        labels: (B,) classes in [0, C), or None.
        proxies_per_class: N.
        k: proxies kept per sample, 1 <= k <= CN.
        block_bytes: memory budget of one (B, block) block of similarities.

    Returns:
        ``(indices, similarities)``, each (B, k), in no meaningful order.
    """
    batch_size, num_proxies = embeddings.shape[0], proxies.shape[0]
    inverse_norms = proxy_norms(proxies).reciprocal()
    if labels is None:
        kept_positives = embeddings.new_empty(batch_size, 0, dtype=torch.long)
    else:
        kept_positives = positive_proxy_indices(labels, proxies_per_class)
    positive_values = torch.einsum("bd,bnd->bn", embeddings, proxies[kept_positives])
    positive_values *= inverse_norms[kept_positives]
    if k <= kept_positives.shape[1]:
        values, best = positive_values.topk(k, dim=1, sorted=False)
        return kept_positives.gather(1, best), values

    num_negatives = k - kept_positives.shape[1]
    rows = max(
        num_negatives, selection_block_rows(batch_size, embeddings.element_size(), block_bytes)
    )
    best_values = best_indices = None
    for start in range(0, num_proxies, rows):
        stop = min(start + rows, num_proxies)
        block = embeddings @ proxies[start:stop].T
        block *= inverse_norms[start:stop]
        _exclude_columns(block, kept_positives - start)
        if best_values is None:  # the first block holds at least num_negatives columns
            best_values, positions = _largest(block, num_negatives)
            best_indices = positions + start
        else:
            best_values, best_indices = _merge_running_topk(best_values, best_indices, block, start)
    indices = torch.cat([kept_positives, best_indices], dim=1)
    return indices, torch.cat([positive_values, best_values], dim=1)


def _weighted_bag_sums(
    bag_starts: torch.Tensor, members: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """``out[b] = sum_m weights[m] * rows[members[m]]`` over bag b's entries, in CSR layout.

    Bag b holds entries ``bag_starts[b]:bag_starts[b + 1]``; an empty bag sums to zero.
    This is a sparse-times-dense product; ``embedding_bag`` runs it 2-3x faster on CPU
    than ``torch.sparse.mm`` with a CSR matrix (benchmarks/scale_checks.py, ``backward``).
    """
    return F.embedding_bag(
        members,
        rows,
        bag_starts,
        mode="sum",
        per_sample_weights=weights,
        include_last_offset=True,
    )


def _proxy_gradient_layout(
    flat_indices: torch.Tensor, num_proxies: int, sparse: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Where the B * k kept entries land in the proxies' gradient.

    Returns ``(order, rows, entry_rows, row_starts)``: the entries sorted by proxy, the
    gradient's rows (the touched proxies when ``sparse``, else None for all CN), each sorted
    entry's row, and the CSR starts of every row's entries.
    """
    order = flat_indices.argsort(stable=True)
    sorted_proxies = flat_indices[order]
    if not sparse:
        boundaries = torch.arange(num_proxies + 1, device=flat_indices.device)
        return order, None, sorted_proxies, torch.searchsorted(sorted_proxies, boundaries)
    # Only the touched rows; their number is data-dependent (a host sync on GPU).
    rows, entry_rows, counts = torch.unique_consecutive(
        sorted_proxies, return_inverse=True, return_counts=True
    )
    return order, rows, entry_rows, F.pad(counts.cumsum(0), (1, 0))


def _proxy_gradient(
    grad_rows: torch.Tensor, rows: torch.Tensor | None, shape: torch.Size
) -> torch.Tensor:
    """The proxies' gradient from its rows: dense as is, or a coalesced sparse COO tensor."""
    if rows is None:
        return grad_rows
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0),
        grad_rows,
        shape,
        device=grad_rows.device,
        is_coalesced=True,
        check_invariants=False,
    )


def _differentiable_kept_gradients(
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    indices: torch.Tensor,
    grad: torch.Tensor,
    needs_input_grad: tuple[bool, ...],
    sparse_proxy_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``_KeptSimilarities``'s two gradients as a graph of x, the proxies and g.

    Per kept entry (i, m) of proxy j: the x term g_im p_hat_j and the proxy term
    g_im (x_i - S_im p_hat_j) / n_j, with S and n recomputed here; the proxy terms are
    summed into rows with ``index_add``. Costs O(B * k * d) memory.
    """
    dim = proxies.shape[1]
    norms = proxy_norms(proxies)[indices]  # clamp_min: no derivative below NORM_EPS
    unit = proxies[indices] / norms.unsqueeze(-1)
    grad_embeddings = grad_proxies = None
    if needs_input_grad[0]:
        grad_embeddings = torch.einsum("bk,bkd->bd", grad, unit)
    if needs_input_grad[1]:
        similarities = torch.einsum("bd,bkd->bk", embeddings, unit)
        radial = torch.where(norms > NORM_EPS, similarities, 0).unsqueeze(-1) * unit
        entries = (grad / norms).unsqueeze(-1) * (embeddings.unsqueeze(1) - radial)
        order, rows, entry_rows, _ = _proxy_gradient_layout(
            indices.reshape(-1), proxies.shape[0], sparse_proxy_grad
        )
        num_rows = proxies.shape[0] if rows is None else len(rows)
        grad_rows = entries.new_zeros(num_rows, dim).index_add(
            0, entry_rows, entries.reshape(-1, dim)[order]
        )
        grad_proxies = _proxy_gradient(grad_rows, rows, proxies.shape)
    return grad_embeddings, grad_proxies


class _KeptSimilarities(torch.autograd.Function):
    """Similarities of the kept proxies, with a backward that touches only B * k entries.

    With n_j = max(|p_j|, 1e-12), p_hat_j = p_j / n_j, S_im = x_i . p_hat_j(m) and g the
    incoming (B, k) gradient:
    dL/dx_i = sum_m g_im p_hat_j(m), a sparse (B x CN) product with the proxies, and
    dL/dp_j = (A_j - c_j p_hat_j) / n_j with A = g^T x (a sparse (CN x B) product) and
    c_j = sum_i g_ij S_ij (0 where |p_j| <= 1e-12, below ``F.normalize``'s clamp): the
    gradient through the normalisation without any dense (B, CN) tensor or a backward
    pass of ``F.normalize`` over all proxies.

    Twice differentiable: when the backward itself is recorded (``create_graph=True``,
    ``torch.func.grad``), the same two formulas are built from differentiable (B, k, d)
    gathers with S recomputed from x and the proxies, so that the second derivatives see
    S's own dependence on them (the saved S are constants). Otherwise the fused path
    below runs, recording nothing.
    """

    @staticmethod
    def forward(embeddings, proxies, indices, similarities, sparse_proxy_grad):
        return similarities.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        embeddings, proxies, indices, similarities, sparse_proxy_grad = inputs
        ctx.save_for_backward(embeddings, proxies, indices, similarities)
        ctx.sparse_proxy_grad = sparse_proxy_grad

    @staticmethod
    def backward(ctx, grad):
        embeddings, proxies, indices, similarities = ctx.saved_tensors
        if torch.is_grad_enabled() and any(
            tensor.requires_grad for tensor in (grad, embeddings, proxies)
        ):
            grads = _differentiable_kept_gradients(
                embeddings, proxies, indices, grad, ctx.needs_input_grad, ctx.sparse_proxy_grad
            )
            return *grads, None, None, None
        (batch_size, k), num_proxies = indices.shape, proxies.shape[0]
        norms = proxy_norms(proxies)
        flat_indices = indices.reshape(-1)
        scaled = (grad / norms[indices]).reshape(-1)  # g_im / |p_j|: both products need it
        grad_embeddings = grad_proxies = None
        if ctx.needs_input_grad[0]:
            row_starts = torch.arange(0, batch_size * k + 1, k, device=grad.device)
            grad_embeddings = _weighted_bag_sums(row_starts, flat_indices, scaled, proxies)
        if ctx.needs_input_grad[1]:
            order, rows, entry_rows, row_starts = _proxy_gradient_layout(
                flat_indices, num_proxies, ctx.sparse_proxy_grad
            )
            row_proxies, row_norms = (
                (proxies, norms) if rows is None else (proxies[rows], norms[rows])
            )
            # A_j / |p_j|, then minus c_j p_j / |p_j|^2: one pass over the (rows, d) result,
            # in place, because at a million proxies every (rows, d) temporary is gigabytes.
            grad_rows = _weighted_bag_sums(row_starts, order // k, scaled[order], embeddings)
            radial = torch.zeros_like(row_norms).index_add_(
                0, entry_rows, (grad * similarities).reshape(-1)[order]
            )
            # F.normalize's clamp: below NORM_EPS the map is p / eps, with no radial term.
            radial = torch.where(row_norms > NORM_EPS, radial / row_norms.square(), 0)
            grad_rows.addcmul_(radial.unsqueeze(1), row_proxies, value=-1)
            grad_proxies = _proxy_gradient(grad_rows, rows, proxies.shape)
        return grad_embeddings, grad_proxies, None, None, None


def kept_similarities(
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    indices: torch.Tensor,
    similarities: torch.Tensor,
    sparse_proxy_grad: bool = False,
) -> torch.Tensor:
    """Differentiable (B, k) similarities of the kept proxies (values from ``select_topk``).

    Gradients flow to ``embeddings`` and to the raw ``proxies`` (through their
    normalisation) only through the B * k kept entries. With ``sparse_proxy_grad`` the
    proxies' gradient is a sparse COO tensor holding only the rows some sample kept
    (for ``torch.optim.SparseAdam``); otherwise it is dense, zero in untouched rows.
    Differentiable twice (Hessian-vector products, ``torch.func.grad``), sparse or not.
    """
    return _KeptSimilarities.apply(embeddings, proxies, indices, similarities, sparse_proxy_grad)


def class_logits(
    kept_similarities: torch.Tensor, kept_classes: torch.Tensor, classes_are_distinct: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class **sum** of the kept similarities ("reverse label propagation").

    A segment sum over each row's k kept entries, so its cost is O(B * k log k) whatever C.

    Args:
        kept_similarities: (B, k) similarities of the kept proxies.
        kept_classes: (B, k) class of each kept proxy.
        classes_are_distinct: no row keeps two proxies of one class (true with one proxy
            per class): every entry is its own class's sum, returned as is, unsorted.

    Returns:
        ``(logits, classes, present)``, each (B, k): slot ``m`` of row ``i`` holds the
        summed similarity ``logits[i, m]`` of class ``classes[i, m]`` when
        ``present[i, m]``; slots past the row's number of distinct classes are empty
        (logit 0, class -1, present False).
    """
    if classes_are_distinct:
        return kept_similarities, kept_classes, torch.ones_like(kept_classes, dtype=torch.bool)
    sorted_classes, order = kept_classes.sort(dim=1)
    sorted_values = kept_similarities.gather(1, order)
    starts_segment = torch.ones_like(sorted_classes, dtype=torch.bool)
    starts_segment[:, 1:] = sorted_classes[:, 1:] != sorted_classes[:, :-1]
    segment = starts_segment.cumsum(dim=1) - 1
    logits = torch.zeros_like(sorted_values).scatter_add(1, segment, sorted_values)
    # Every entry of a segment carries the same class, so duplicate writes agree.
    classes = torch.full_like(sorted_classes, -1).scatter(1, segment, sorted_classes)
    slots = torch.arange(segment.shape[1], device=segment.device)
    present = slots < starts_segment.sum(dim=1, keepdim=True)
    return logits, classes, present


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official masked softmax ``exp(Z) * M / (1e-8 + sum(exp(Z) * M))``.

    Computed max-shifted, ``exp(Z - m) / (1e-8 * exp(-m) + sum(exp(Z - m)))``, which is the
    same function (same value and gradient, the 1e-8 included) without overflow.
    A row with an empty mask gives all-zero probabilities, as in the official code.
    """
    neg_inf = torch.finfo(logits.dtype).min
    shift = logits.detach().masked_fill(~mask, neg_inf).amax(dim=1, keepdim=True)
    shift = torch.where(mask.any(dim=1, keepdim=True), shift, torch.zeros_like(shift))
    exp = torch.exp((logits - shift).masked_fill(~mask, float("-inf")))
    denominator = SOFTMAX_DENOMINATOR_EPS * torch.exp(-shift) + exp.sum(dim=1, keepdim=True)
    return exp / denominator


def classification_loss(probabilities: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-log(P[target] + 1e-20)``, shape (B,); a missing target costs 46.05."""
    target_probability = (probabilities * is_target).sum(dim=1)
    return -torch.log(target_probability + LOG_EPS)


def subgraph_loss(
    kept_similarities: torch.Tensor,
    kept_classes: torch.Tensor,
    labels: torch.Tensor,
    classes_are_distinct: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss of each sample's sub-graph, and its (B, k) slots of present classes.

    Class logits are the per-class sums of the kept similarities; classes whose logit is
    exactly 0 drop out of the masked softmax, as in the official code.
    ``classes_are_distinct`` is ``class_logits``'s shortcut for one proxy per class.
    """
    logits, classes, present = class_logits(kept_similarities, kept_classes, classes_are_distinct)
    probabilities = masked_softmax(logits, present & (logits != 0))
    return classification_loss(probabilities, classes == labels.unsqueeze(1)), present


def _regularizer_blocks(
    anchors: torch.Tensor,
    class_sums: torch.Tensor,
    anchor_classes: torch.Tensor,
    rows_per_block: int,
    with_gradients: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sum over anchors of CE(anchor . class_sums^T, class), block by block of anchors.

    With ``with_gradients`` it also returns the gradients of that sum with respect to the
    anchors and the class sums, taken in the same pass while each block of logits is at
    hand: 3 matrix products per block instead of the 4 that recomputing it in backward
    would cost.
    """
    total = anchors.new_zeros(())
    grad_anchors = torch.empty_like(anchors) if with_gradients else None
    grad_class_sums = torch.zeros_like(class_sums) if with_gradients else None
    for start in range(0, len(anchors), rows_per_block):
        block = anchors[start : start + rows_per_block]
        classes = anchor_classes[start : start + rows_per_block].unsqueeze(1)
        logits = block @ class_sums.T
        log_normalizer = torch.logsumexp(logits, dim=1, keepdim=True)
        total += (log_normalizer - logits.gather(1, classes)).sum()
        if with_gradients:
            # d CE / d logits = softmax - one_hot, formed in place in the logits' memory.
            logits.sub_(log_normalizer).exp_()
            logits.scatter_add_(1, classes, logits.new_full(classes.shape, -1.0))
            torch.mm(logits, class_sums, out=grad_anchors[start : start + rows_per_block])
            grad_class_sums.addmm_(logits.T, block)
    return total, grad_anchors, grad_class_sums


def _differentiable_regularizer_gradients(
    anchors: torch.Tensor,
    class_sums: torch.Tensor,
    anchor_classes: torch.Tensor,
    rows_per_block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_regularizer_blocks``'s gradients as a graph of the anchors and class sums.

    With R = softmax(A U^T) - one_hot (per block of anchors A): d/dA = R U and
    d/dU = sum over blocks of R^T A, from out-of-place ops, for a double backward.
    """
    grad_anchors, grad_class_sums = [], torch.zeros_like(class_sums)
    for start in range(0, len(anchors), rows_per_block):
        block = anchors[start : start + rows_per_block]
        classes = anchor_classes[start : start + rows_per_block].unsqueeze(1)
        probabilities = torch.softmax(block @ class_sums.T, dim=1)
        residual = probabilities.scatter_add(
            1, classes, probabilities.new_full(classes.shape, -1.0)
        )
        grad_anchors.append(residual @ class_sums)
        grad_class_sums = grad_class_sums + residual.T @ block
    return torch.cat(grad_anchors), grad_class_sums


class _ProxyRegularizerSum(torch.autograd.Function):
    """The regulariser's summed cross-entropy T, with gradients computed in forward.

    T = sum_a [logsumexp_c(a . U_c) - a . U_class(a)] has dT/dA = R U and dT/dU = R^T A,
    R = softmax(A U^T) - one_hot. The fused forward keeps both; a recorded backward
    (``create_graph=True``) recomputes them from A and U instead, so that their own
    derivatives (through the softmax) reach the graph: T is twice differentiable.
    """

    @staticmethod
    def forward(anchors, class_sums, anchor_classes, rows_per_block):
        return _regularizer_blocks(
            anchors, class_sums, anchor_classes, rows_per_block, with_gradients=True
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        anchors, class_sums, anchor_classes, ctx.rows_per_block = inputs
        _, grad_anchors, grad_class_sums = output
        ctx.mark_non_differentiable(grad_anchors, grad_class_sums)
        ctx.set_materialize_grads(False)  # no zero gradients for those two
        ctx.save_for_backward(anchors, class_sums, anchor_classes, grad_anchors, grad_class_sums)

    @staticmethod
    def backward(ctx, grad, _grad_anchors, _grad_class_sums):
        if grad is None:  # grads are not materialised: nothing flows into T
            return None, None, None, None
        anchors, class_sums, anchor_classes, grad_anchors, grad_class_sums = ctx.saved_tensors
        if torch.is_grad_enabled() and any(
            tensor.requires_grad for tensor in (grad, anchors, class_sums)
        ):
            grad_anchors, grad_class_sums = _differentiable_regularizer_gradients(
                anchors, class_sums, anchor_classes, ctx.rows_per_block
            )
        return grad_anchors * grad, grad_class_sums * grad, None, None


def regularizer_sum(
    anchors: torch.Tensor,
    class_sums: torch.Tensor,
    anchor_classes: torch.Tensor,
    block_elements: int = DEFAULT_REGULARIZER_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Sum over anchors of CE(anchor . class_sums^T, anchor's class), block by block.

    The building block of ``proxy_regularizer`` (and of its sharded version): when a
    gradient is needed it is computed in the same pass, keeping the anchors, the class
    sums and their gradients for backward (the inputs for a possible double backward).
    """
    rows_per_block = max(1, block_elements // len(class_sums))
    if torch.is_grad_enabled() and (anchors.requires_grad or class_sums.requires_grad):
        summed, _, _ = _ProxyRegularizerSum.apply(
            anchors, class_sums, anchor_classes, rows_per_block
        )
        return summed
    summed, _, _ = _regularizer_blocks(
        anchors, class_sums, anchor_classes, rows_per_block, with_gradients=False
    )
    return summed


def proxy_regularizer(
    normalized_proxies: torch.Tensor,
    proxies_per_class: int,
    block_elements: int = DEFAULT_REGULARIZER_BLOCK_ELEMENTS,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The proxy regulariser L^p: mean over the CN proxies of a C-way cross-entropy.

    Proxy j's logit for class c is the sum of its cosines to every proxy of c (itself
    included), i.e. ``p_j . U_c`` with ``U_c`` the sum of class c's proxies, so the cost is
    O(CN * C * d) time and never a (CN, C) or (CN, CN) matrix: rows are processed in
    blocks of about ``block_elements`` logits (see ``regularizer_sum``).

    Args:
        normalized_proxies: (CN, d) unit-norm proxies, class-major.
        proxies_per_class: N.
        block_elements: memory budget of one block of logits, in elements.
        rows: average over these proxies only (e.g. a uniform sample, which gives an
            unbiased estimate of L^p and of its gradient at cost O(len(rows) * C * d));
            all CN proxies, the exact L^p, when None.
    """
    total, dim = normalized_proxies.shape
    num_classes = total // proxies_per_class
    class_sums = normalized_proxies.view(num_classes, proxies_per_class, dim).sum(dim=1)
    if rows is None:
        rows = torch.arange(total, device=normalized_proxies.device)
    anchors, anchor_classes = normalized_proxies[rows], rows // proxies_per_class
    return regularizer_sum(anchors, class_sums, anchor_classes, block_elements) / len(rows)


def regularizer_value_and_gradient(
    normalized_proxies: torch.Tensor,
    proxies_per_class: int,
    block_elements: int = DEFAULT_REGULARIZER_BLOCK_ELEMENTS,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``proxy_regularizer`` and its gradient with respect to the normalised proxies.

    Both are detached: they are the state the cheaper estimators keep between steps
    (``linearized_regularizer``, ``variance_reduced_regularizer``).
    """
    with torch.enable_grad():
        anchor = normalized_proxies.detach().requires_grad_()
        value = proxy_regularizer(anchor, proxies_per_class, block_elements, rows)
        (gradient,) = torch.autograd.grad(value, anchor)
    return value.detach(), gradient


class _NormalizedInnerProduct(torch.autograd.Function):
    """``sum_j <G_j, p_hat_j>`` with p_hat_j = p_j / |p_j|, for a constant direction G.

    Its gradient, dL/dp_j = (G_j - <G_j, p_hat_j> p_hat_j) / |p_j|, is formed in two passes
    over the (CN, d) proxies, where autograd through ``F.normalize`` makes several times as
    many: this is the whole cost of a cached regulariser step.
    """

    @staticmethod
    def forward(ctx, proxies, direction):
        norms = proxy_norms(proxies)
        cosines = torch.linalg.vecdot(direction, proxies) / norms
        ctx.save_for_backward(proxies, direction, norms, cosines)
        return cosines.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        proxies, direction, norms, cosines = ctx.saved_tensors
        scale = grad / norms
        # F.normalize's clamp: below NORM_EPS the map is p / eps, with no radial term.
        radial = torch.where(norms > NORM_EPS, cosines * scale / norms, 0)
        grad_proxies = direction * scale.unsqueeze(1)
        grad_proxies.addcmul_(radial.unsqueeze(1), proxies, value=-1)
        return grad_proxies, None


def _gradient_only(direction: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """A term worth exactly 0 whose gradient with respect to the raw ``proxies`` is the
    gradient ``direction`` with respect to their normalised form, carried through it."""
    term = _NormalizedInnerProduct.apply(proxies, direction)
    return term - term.detach()


def linearized_regularizer(
    proxies: torch.Tensor,
    anchor_proxies: torch.Tensor,
    anchor_value: torch.Tensor,
    anchor_gradient: torch.Tensor,
) -> torch.Tensor:
    """L^p to first order around the normalised proxies ``anchor_proxies`` of an earlier step.

    Takes the raw (CN, d) proxies p. Value ``R~ + <G~, p_hat - p~>`` and gradient ``G~``
    carried through the current normalisation, with ``R~, G~`` from
    ``regularizer_value_and_gradient`` at the anchor: an O(C * N * d) stand-in for the exact
    L^p between its refreshes. Applied on every step, the stale gradient stays close to the
    exact one, where lazy regularisation applies nothing, then ``m`` times it.
    """
    offset = torch.dot(anchor_gradient.flatten(), anchor_proxies.flatten())
    return anchor_value - offset + _NormalizedInnerProduct.apply(proxies, anchor_gradient)


def variance_reduced_regularizer(
    proxies: torch.Tensor,
    anchor_proxies: torch.Tensor,
    anchor_value: torch.Tensor,
    anchor_gradient: torch.Tensor,
    proxies_per_class: int,
    rows: torch.Tensor | None,
    block_elements: int = DEFAULT_REGULARIZER_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """SVRG's control variate for L^p: an unbiased estimate with a low variance near the anchor.

    Takes the raw (CN, d) proxies p. With ``R_S`` the mean over the sampled ``rows``
    (``proxy_regularizer``) and ``R~, G~`` the exact value and gradient at the anchor: value
    ``R~ + R_S(p_hat) - R_S(p~)``, gradient ``G~ + grad R_S(p_hat) - grad R_S(p~)`` (with
    respect to p_hat, then through the normalisation). Both have the expectation of the exact
    L^p over uniform rows, and their error shrinks with ``|p_hat - p~|``: the rows left out
    still get the anchor's gradient, where a plain row sample gives them nothing.
    Cost: two row samples, O(len(rows) * C * d).
    """
    unit = F.normalize(proxies, p=2, dim=1)
    sampled = proxy_regularizer(unit, proxies_per_class, block_elements, rows)
    anchor_sampled, anchor_sampled_gradient = regularizer_value_and_gradient(
        anchor_proxies, proxies_per_class, block_elements, rows
    )
    correction = _gradient_only(anchor_gradient - anchor_sampled_gradient, proxies)
    return anchor_value - anchor_sampled + sampled + correction

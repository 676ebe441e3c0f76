"""The ProxyGML method as small pure tensor functions.

Notation (as in the paper and ``docs/method.md``): B samples, d embedding dims, C classes,
N proxies per class, CN = C * N proxies in total, k proxies kept per sample.
Proxies are stored row-wise, ``(CN, d)``; row ``j`` belongs to class ``j // N``.

Nothing here owns state (but caches of measured timings, see ``_fastest_screening`` and
``_similarity_block``) or touches PML: the loss class composes these functions, and every
one of them runs unchanged on CPU and CUDA, without host synchronisation but for one read
of counts in the certified selection (``select_kept``).
Nothing of size (CN, C) or (CN, CN) is ever built: class logits are a scatter of the B * k
kept entries into (B, C) while that is small, segment sums over them beyond, and the
regulariser goes through per-class proxy sums.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

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

# Largest (B, CN) scatter of the kept entries' weights that the backward multiplies densely
# for the proxies' gradient (see ``kept_similarities``): on a 2-core CPU the GEMM was a few
# percent faster than sorting the entries by proxy up to a few hundred thousand elements,
# and slower at millions.
DENSE_WEIGHTS_MAX_ELEMENTS = 1 << 19

# Largest (B, C) matrix of class logits the sub-graph loss sums densely, as the official
# code does (one scatter); larger problems take per-row segment sums over the kept entries.
# On a 2-core CPU (k = 0.05 C N) the dense loss and slope took about half the segment sums'
# time up to here, and as long at a million elements.
DENSE_CLASS_LOGITS_MAX_ELEMENTS = 1 << 19

# Elements of one (rows, C) logits block of the regulariser; larger problems are chunked.
DEFAULT_REGULARIZER_BLOCK_ELEMENTS = 1 << 24

# How ``select_kept`` screens all proxies before rescoring its candidates exactly.
SELECTION_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOW_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Devices whose bf16 / fp16 GEMMs sum in float32 (CUDA: once told to, see
# ``_float32_accumulation``); meta has no data and runs any path.
LOW_PRECISION_DEVICES = ("cpu", "cuda", "meta")

# Fewest entries beyond the k-th a screening keeps as candidates (compute dtype: max(this,
# k / 16); low precision: max(this, 2 k)); a row needing more is redone (see select_kept).
EXACT_MIN_MARGIN = 16
LOW_PRECISION_MIN_MARGIN = 64

# fp16 screening scales rows and proxies to norm ~2^7: no overflow (scores < 2^14 < 65504)
# and only elements below ~2^-21 of the norm reach fp16's subnormals.
FP16_INPUT_EXPONENT = 7

# Below this many multiply-adds (B * CN * d) "auto" screens in the compute dtype unmeasured.
AUTO_MIN_MULTIPLY_ADDS = 1 << 27

# Below this many multiply-adds (B * block * d) a CPU similarity block is X P^T unmeasured
# (see ``_similarity_block``); the other orientation runs over slices of this many proxies,
# so that it needs one (B, block) block and a small slice, not two blocks (as fast as whole
# blocks at the SOP shape with B = 32).
ORIENTATION_MIN_MULTIPLY_ADDS = 1 << 26
TRANSPOSED_PRODUCT_ROWS = 2048

# Relative rounding of float32 GEMM inputs per matmul precision setting (see
# ``_matmul_input_unit``), and the legacy setting's names for them.
FLOAT32_MATMUL_INPUT_UNIT = {"ieee": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}
LEGACY_MATMUL_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "bf16"}
FLOAT32_UNIT = 2.0**-24

# Relative slack on every error bound (the float64 evaluation of norms and bounds), and on
# the thresholds derived from them (float64 rounding, relative to their magnitude).
BOUND_SLACK = 2.0**-20
THRESHOLD_SLACK = 2.0**-48

# Elements per numpy argpartition call of the CPU top-k: rows go in chunks this large (its
# (rows, n) int64 result stays small), spread over torch's intra-op thread count from
# PARTITION_PARALLEL_MIN_ELEMENTS on (below it a thread pool's hand-offs cost more than
# the second thread saves, as measured on a 2-core CPU).
PARTITION_CHUNK_ELEMENTS = 1 << 16
PARTITION_PARALLEL_MIN_ELEMENTS = 1 << 21


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


def _is_plain_cpu_tensor(tensor: torch.Tensor) -> bool:
    """A CPU tensor outside ``torch.compile`` with storage of its own (``torch.func``
    transforms wrap their inputs in tensors that have none, hence no numpy view): where
    the numpy fast paths apply and a product may be timed."""
    return (
        tensor.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and torch._C._has_storage(tensor)
    )


def _largest(block: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) of the ``count`` largest entries of each row of ``block``, unordered.

    ``torch.topk``, except on CPU outside ``torch.compile``, where numpy's argpartition (a
    SIMD introselect) is several times faster (``python -m benchmarks.scale_checks
    topk``); it releases the GIL, so chunks of rows of a large block run on torch's
    intra-op thread count. Other tensors (``_is_plain_cpu_tensor``) take
    ``torch.topk`` too.
    """
    width = block.shape[1]
    if count >= width or not _is_plain_cpu_tensor(block):
        return block.topk(count, dim=1, sorted=False)
    array, kth = block.numpy(), width - count
    columns = np.empty((len(block), count), dtype=np.int64)
    chunk_rows = max(1, PARTITION_CHUNK_ELEMENTS // width)

    def partition(start: int) -> None:
        chunk = slice(start, start + chunk_rows)
        columns[chunk] = np.argpartition(array[chunk], kth, axis=1)[:, kth:]

    starts = range(0, len(block), chunk_rows)
    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1 and block.numel() >= PARTITION_PARALLEL_MIN_ELEMENTS:
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


class Selection(NamedTuple):
    """What ``select_kept`` returns (see there)."""

    indices: torch.Tensor
    similarities: torch.Tensor
    fallback_rows: torch.Tensor
    screening: torch.dtype


def _positives(
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    labels: torch.Tensor | None,
    proxies_per_class: int,
    norms: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inverse_norms, positives, values)``: the proxies' inverse norms (from ``norms``,
    ``proxy_norms(proxies)`` if None), each sample's (B, N) positive proxies (none when
    ``labels`` is None) and their similarities."""
    inverse_norms = (proxy_norms(proxies) if norms is None else norms).reciprocal()
    if labels is None:
        positives = embeddings.new_empty(len(embeddings), 0, dtype=torch.long)
    else:
        positives = positive_proxy_indices(labels, proxies_per_class)
    values = torch.einsum("bd,bnd->bn", embeddings, proxies[positives])
    values *= inverse_norms[positives]
    return inverse_norms, positives, values


def _plain_product(embeddings: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return embeddings @ rows.T


def _transposed_product(embeddings: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``embeddings @ rows.T`` as ``rows @ embeddings.T`` transposed into place, in slices of
    ``TRANSPOSED_PRODUCT_ROWS`` rows: the block's memory and a small slice, not two blocks."""
    block = embeddings.new_empty(len(embeddings), len(rows))
    for start in range(0, len(rows), TRANSPOSED_PRODUCT_ROWS):
        stop = start + TRANSPOSED_PRODUCT_ROWS
        block[:, start:stop].copy_((rows[start:stop] @ embeddings.T).T)
    return block


# Whether the transposed product is the one to take, per (device, dtype, B, block, d): see
# ``_similarity_block``.
_TRANSPOSED_PRODUCT: dict[tuple, bool] = {}


def _similarity_block(embeddings: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``embeddings @ rows.T``, a contiguous (B, block) block, by the faster GEMM here.

    A BLAS picks its kernels by shape, and the product of the same two matrices can run at
    very different speeds depending on which one it takes first: MKL on a 2-core Xeon took
    2.6x as long for X P^T as for P X^T at B = 32, d = 512 (and about as long at d = 128).
    So on CPU, from ``ORIENTATION_MIN_MULTIPLY_ADDS`` on, the first block of each shape is
    taken both ways (``_transposed_is_faster``) and the faster is kept for that shape; the
    transposed one only where the two agree bit for bit, so the choice never changes a
    similarity, nor a kept set.
    """
    work = embeddings.shape[0] * rows.shape[0] * embeddings.shape[1]
    if work < ORIENTATION_MIN_MULTIPLY_ADDS or not _is_plain_cpu_tensor(embeddings):
        return _plain_product(embeddings, rows)
    key = (embeddings.device, embeddings.dtype, *embeddings.shape, len(rows))
    if key not in _TRANSPOSED_PRODUCT:
        _TRANSPOSED_PRODUCT[key] = _transposed_is_faster(embeddings, rows)
    if _TRANSPOSED_PRODUCT[key]:
        return _transposed_product(embeddings, rows)
    return _plain_product(embeddings, rows)


def _transposed_is_faster(embeddings: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether ``_transposed_product`` gives ``_plain_product``'s bits, faster (best of two
    runs each). A GEMM's order of summation does not depend on the data, so one comparison
    tells whether the two kernels round alike."""
    seconds, results = {}, {}
    for product in (_plain_product, _transposed_product):
        for _ in range(2):
            start = time.perf_counter()
            results[product] = product(embeddings, rows)
            elapsed = time.perf_counter() - start
            seconds[product] = min(seconds.get(product, elapsed), elapsed)
    same_bits = torch.equal(results[_plain_product], results[_transposed_product])
    return same_bits and seconds[_transposed_product] < seconds[_plain_product]


@torch.no_grad()
def select_topk(
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    labels: torch.Tensor | None,
    proxies_per_class: int,
    k: int,
    block_bytes: int = DEFAULT_SELECTION_BLOCK_BYTES,
    norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k proxies kept per sample, positives first, and their cosine similarities.

    Equivalent to the official ``topk(S + 1000 * positive_mask, k)`` with S the similarity to
    the normalised proxies, without relying on |S| <= 1: if k >= N every positive proxy is
    kept plus the k - N most similar negative ones; if k < N only the k most similar
    positives are kept (and no negatives at all). With ``labels=None`` it is a plain top-k.

    S is streamed over blocks of proxies with a running top-k, so the extra memory is
    O(B * (k + block)) whatever CN; the proxies are never copied in normalised form. Each
    block is one GEMM in whichever orientation is faster here, with the same bits
    (``_similarity_block``).
    No gradient flows through it (see ``kept_similarities``).

    Args:
        embeddings: (B, d) embeddings (normalised or not, as the distance says).
        proxies: (CN, d) raw proxies, class-major.
        labels: (B,) classes in [0, C), or None.
        proxies_per_class: N.
        k: proxies kept per sample, 1 <= k <= CN.
        block_bytes: memory budget of one (B, block) block of similarities.
        norms: ``proxy_norms(proxies)``, if the caller has them (computed here if None).

    Returns:
        ``(indices, similarities)``, each (B, k), in no meaningful order.
    """
    batch_size, num_proxies = embeddings.shape[0], proxies.shape[0]
    inverse_norms, kept_positives, positive_values = _positives(
        embeddings, proxies, labels, proxies_per_class, norms
    )
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
        block = _similarity_block(embeddings, proxies[start:stop])
        block *= inverse_norms[start:stop]
        _exclude_columns(block, kept_positives - start)
        if best_values is None:  # the first block holds at least num_negatives columns
            best_values, positions = _largest(block, num_negatives)
            best_indices = positions + start
        else:
            best_values, best_indices = _merge_running_topk(best_values, best_indices, block, start)
    indices = torch.cat([kept_positives, best_indices], dim=1)
    return indices, torch.cat([positive_values, best_values], dim=1)


@torch.no_grad()
def select_kept(
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    labels: torch.Tensor | None,
    proxies_per_class: int,
    k: int,
    block_bytes: int = DEFAULT_SELECTION_BLOCK_BYTES,
    precision: str = "fp32",
    norms: torch.Tensor | None = None,
) -> Selection:
    """The k proxies kept per sample, positives first, and their cosine similarities.

    Equivalent to the official ``topk(S + 1000 * positive_mask, k)`` with S the similarity to
    the normalised proxies, without relying on |S| <= 1: if k >= N every positive proxy is
    kept plus the k - N most similar negative ones; if k < N only the k most similar
    positives are kept (and no negatives at all). With ``labels=None`` it is a plain top-k.

    **Which negatives, exactly.** Rounding decides near-ties, so "most similar" needs one
    definition of each similarity: the *canonical* value ``w_ij = fl(fl(x_i . p_j) * r_j)``
    with ``r_j = fl(1 / |p_j|)``, the dot product taken by ``torch.sparse.sampled_addmm``
    (a fixed vectorised loop over d per pair, whatever other pairs are asked: the same bits
    every time) in the compute dtype. The kept negatives are the k - N largest w, ties to
    the lower proxy index, whatever ``precision`` says: the precisions differ in speed only.

    **Against ``select_topk``** (the loss's default, ``selection_precision="fp32"``), which
    ranks the GEMM's own fl(x . p_j) r_j: both values lie within ``_dot_error`` (~2 d u |x|,
    u the compute dtype's unit roundoff) of the exact (x . p_j) r_j, so the kept sets are the
    same but where the last kept and first dropped similarities differ by less than that
    bound, a near-tie the GEMM cannot order either; kept values agree to within it.

    **Screening, then exact rescoring.** A GEMM scores all proxies, with a proven bound
    ``|s_j - w_j| <= E_i + c |s_j|`` on how far a score lies from w (``_dot_error``,
    ``_low_precision_error``). Each row keeps its k - N + m best scores (m a margin) and
    checks that every proxy it dropped is certainly out: its upper bound s + E + c|s| stays
    below the (k - N)-th score's lower bound. Within the kept set, a proxy whose lower bound
    beats the (k - N + 1)-th score's upper bound is certainly in; the others with an
    interval reaching the boundary are rescored (their w computed) and decide.

    * ``"fp32"``: scores in the compute dtype (float32, or float64 for float64 inputs):
      E ~ 2 d u |x| (u its unit roundoff), so only proxies within a few ulps of the
      boundary are rescored; m = max(``EXACT_MIN_MARGIN``, k / 16). Kept values are the
      GEMM's, or w where rescored: equal to the dtype's rounding.
    * ``"bf16"``, ``"fp16"``: scores in that format, fast where the hardware has
      low-precision GEMMs: E ~ u_lp |x| + |x - lp(x)|. Every proxy that may be kept is
      rescored (all values are w), by a sampled product that reads each pair's rows in
      place, never gathering them; m = max(``LOW_PRECISION_MIN_MARGIN``, 2 (k - N)).
    * ``"auto"``: the fastest of these for the device and shape (``_fastest_screening``).

    A row that cannot be certified falls back to the ``"fp32"`` screening, or, from there,
    to the same with an 8x wider margin: at m = CN every row is certified. Scores are
    streamed over blocks of proxies with a running top-(k - N + m), so the extra memory is
    O(B * (k + m + block)) whatever CN; the proxies are never copied in normalised form at
    full precision. Reading the counts of rescored pairs and uncertified rows is one host
    synchronisation per call (one more per fallback). No gradient flows through it (see
    ``kept_similarities``).

    Args:
        embeddings: (B, d) embeddings (normalised or not, as the distance says).
        proxies: (CN, d) raw proxies, class-major.
        labels: (B,) classes in [0, C), or None.
        proxies_per_class: N.
        k: proxies kept per sample, 1 <= k <= CN.
        block_bytes: memory budget of one (B, block) block of similarities.
        precision: one of ``SELECTION_PRECISIONS``: how all proxies are screened.
        norms: ``proxy_norms(proxies)``, if the caller has them (computed here if None).

    Returns:
        ``Selection(indices, similarities, fallback_rows, screening)``: (B, k) kept
        proxies, each row's positives first, then its negatives; their (B, k) similarities;
        the number of rows the requested screening could not certify (a 0-dim tensor);
        the dtype it screened in (what ``"auto"`` chose).
    """
    if precision not in SELECTION_PRECISIONS:
        raise ValueError(f"precision must be one of {SELECTION_PRECISIONS}, got {precision!r}")
    num_proxies = proxies.shape[0]
    inverse_norms, positives, positive_values = _positives(
        embeddings, proxies, labels, proxies_per_class, norms
    )
    fallback_rows = torch.zeros((), dtype=torch.long, device=embeddings.device)
    screening = embeddings.dtype
    if k <= positives.shape[1]:
        values, best = positive_values.topk(k, dim=1, sorted=False)
        return Selection(positives.gather(1, best), values, fallback_rows, screening)

    problem = _Screening(embeddings, proxies, inverse_norms, positives, block_bytes)
    count = k - positives.shape[1]
    if count == num_proxies - positives.shape[1]:  # every negative is kept
        indices, values = _all_negatives(problem)
    else:
        screening = _screening_dtype(precision, problem, count)
        indices, values, fallback_rows = _select_negatives(problem, count, screening)
    return Selection(
        torch.cat([positives, indices], dim=1),
        torch.cat([positive_values, values], dim=1),
        fallback_rows,
        screening,
    )


class _Screening(NamedTuple):
    """The inputs every screening of one selection shares."""

    embeddings: torch.Tensor
    proxies: torch.Tensor
    inverse_norms: torch.Tensor
    excluded: torch.Tensor  # (B, n) columns never kept: the positives
    block_bytes: int

    def rows(self, rows: torch.Tensor) -> _Screening:
        return self._replace(embeddings=self.embeddings[rows], excluded=self.excluded[rows])


def _select_negatives(
    problem: _Screening, count: int, screening: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if screening == problem.embeddings.dtype:
        return _select_certified(problem, count, screening, _exact_margin(count))
    return _select_certified(problem, count, screening, max(LOW_PRECISION_MIN_MARGIN, 2 * count))


def _all_negatives(problem: _Screening) -> tuple[torch.Tensor, torch.Tensor]:
    x, proxies, inverse_norms, excluded, _ = problem
    scores = x @ proxies.T
    scores *= inverse_norms
    kept = torch.ones_like(scores, dtype=torch.bool).scatter_(1, excluded, False)
    columns = torch.arange(len(proxies), device=x.device).expand_as(scores)
    return _compact(kept, scores.shape[1] - excluded.shape[1], columns, scores)


def _screen(
    problem: _Screening, width: int, screening: torch.Tensor, proxy_scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, columns) of each row's ``width`` best screening scores, in no order.

    ``screening`` is the embeddings as the GEMM takes them: in the compute dtype (scores
    ``fl(x . p_j) * proxy_scales_j``), or rounded to bf16 / fp16, each block of proxies then
    scaled by ``proxy_scales`` and rounded likewise in one pass (scores in float32).
    Streamed over blocks of proxies with a running top-``width``; excluded columns: -inf.
    """
    proxies, excluded = problem.proxies, problem.excluded
    low_precision = screening.dtype in LOW_PRECISIONS.values()
    element_size = 4 if low_precision else screening.element_size()
    block = max(width, selection_block_rows(len(screening), element_size, problem.block_bytes))
    best_scores = best_columns = None
    for start in range(0, len(proxies), block):
        stop = min(start + block, len(proxies))
        if low_precision:
            rounded = proxies.new_empty((stop - start, proxies.shape[1]), dtype=screening.dtype)
            torch.mul(proxies[start:stop], proxy_scales[start:stop, None], out=rounded)
            with _float32_accumulation(screening.device):
                scores = (screening @ rounded.T).float()
        else:
            scores = _similarity_block(screening, proxies[start:stop])
            scores *= proxy_scales[start:stop]
        _exclude_columns(scores, excluded - start)
        if best_scores is None:  # the first block holds at least ``width`` columns
            best_scores, positions = _largest(scores, width)
            best_columns = positions + start
        else:
            best_scores, best_columns = _merge_running_topk(
                best_scores, best_columns, scores, start
            )
    return best_scores, best_columns


def _stable_argsort(keys: torch.Tensor) -> torch.Tensor:
    """Stable argsort of integer ``keys`` along their last dimension.

    Where numpy applies (``_is_plain_cpu_tensor``), for non-negative keys: a
    least-significant-digit radix sort over 16-bit digits, each pass numpy's stable
    argsort (a radix sort itself for 16-bit keys); for the B * k kept proxy and class
    indices this is several times faster than ``torch.sort`` on CPU.
    """
    if keys.numel() == 0 or not _is_plain_cpu_tensor(keys):
        return keys.argsort(dim=-1, stable=True)
    array = keys.numpy()
    if array.min() < 0:
        return keys.argsort(dim=-1, stable=True)
    order = None
    for shift in range(0, max(int(array.max()).bit_length(), 1), 16):
        digits = (array >> shift).astype(np.uint16)  # the low 16 bits
        if order is not None:
            digits = np.take_along_axis(digits, order, axis=-1)
        step = np.argsort(digits, axis=-1, kind="stable")
        order = step if order is None else np.take_along_axis(order, step, axis=-1)
    return torch.from_numpy(order)


def _csr_starts(sorted_keys: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows + 1,) CSR starts of each key's run in ``sorted_keys`` (keys in
    [0, num_rows)): counts by a scatter, which unlike ``bincount`` never reads a maximum
    back to the host on CUDA."""
    counts = torch.zeros(num_rows, dtype=torch.long, device=sorted_keys.device)
    counts.scatter_add_(0, sorted_keys, torch.ones_like(sorted_keys))
    return F.pad(counts.cumsum(0), (1, 0))


def _canonical_similarities(
    problem: _Screening, rows: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """The canonical w of the (row, column) pairs, ``rows`` ascending.

    ``torch.sparse.sampled_addmm`` reads each pair's two vectors in place and reduces over d
    in a fixed loop: no (pairs, d) gather is built, and a pair's bits depend on nothing else
    (the same in either orientation and in any subset: ``tests/test_certified_selection``).
    On CPU, pairs outnumbering the proxies go proxy-major, so each proxy is read once.
    """
    x, proxies, inverse_norms = problem.embeddings, problem.proxies, problem.inverse_norms
    if x.device.type == "meta":  # no kernel and no data: only the shape matters
        return x.new_empty(columns.shape)
    by_proxy = x.device.type == "cpu" and len(columns) > len(proxies)
    if by_proxy:
        order = _stable_argsort(columns)
        rows, columns = columns[order], rows[order]
        left, right = proxies, x
    else:
        left, right = x, proxies
    row_starts = _csr_starts(rows, len(left))
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            row_starts,
            columns,
            left.new_zeros(columns.shape),
            size=(len(left), len(right)),
            device=x.device,
            check_invariants=False,
        )
        dots = torch.sparse.sampled_addmm(pattern, left, right.T).values()
    if by_proxy:
        return torch.empty_like(dots).index_copy_(0, order, dots * inverse_norms[rows])
    return dots * inverse_norms[columns]


def _largest_two(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1) each: the ``rank``-th and (``rank`` + 1)-th largest value of each row (-inf
    when the row has only ``rank`` values).

    numpy's partition (a SIMD introselect) where it applies (``_is_plain_cpu_tensor``):
    several times faster there than ``torch.kthvalue``.
    """
    below = values.shape[1] - rank  # entries ranked after the rank-th
    if _is_plain_cpu_tensor(values):
        partitioned = torch.from_numpy(np.partition(values.numpy(), below, axis=1))
        kth, after = partitioned[:, below, None], partitioned[:, :below]
        after = after.amax(dim=1, keepdim=True) if below else torch.full_like(kth, -math.inf)
        return kth, after
    kth = values.kthvalue(below + 1, dim=1, keepdim=True).values
    if below == 0:
        return kth, torch.full_like(kth, -math.inf)
    return kth, values.kthvalue(below, dim=1, keepdim=True).values


def _top_by_key(keys: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` largest keys of each row, ties to the lower position."""
    kth, _ = _largest_two(keys, count)
    above, tied = keys > kth, keys == kth
    room = count - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=1) <= room))


def _best_pairs(
    rows: torch.Tensor, columns: torch.Tensor, keys: torch.Tensor, room: torch.Tensor
) -> torch.Tensor:
    """Mask over (row, column, key) pairs: each row's ``room[row]`` largest keys, ties to
    the lower column; stable sorts by column, then key, then row rank them within rows."""
    order = torch.argsort(columns, stable=True)
    order = order[torch.argsort(keys[order], descending=True, stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    ranked_rows = rows[order]
    row_starts = torch.searchsorted(ranked_rows, torch.arange(len(room), device=rows.device))
    rank = torch.arange(len(rows), device=rows.device) - row_starts[ranked_rows]
    return torch.empty_like(rows, dtype=torch.bool).index_copy_(0, order, rank < room[ranked_rows])


def _compact(kept: torch.Tensor, count: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor's entries where ``kept`` (``count`` per row), in their order, as (B,
    count) tensors: a scatter, so no data-dependent shape and no host synchronisation."""
    slots = torch.where(kept, kept.cumsum(dim=1) - 1, count)
    return tuple(t.new_zeros(len(t), count + 1).scatter_(1, slots, t)[:, :count] for t in tensors)


def _read_counts(counts: torch.Tensor, radix: int, on_meta: tuple[int, int]) -> tuple[int, int]:
    """Two counts (the second below ``radix``) read in one host synchronisation."""
    if counts.device.type == "meta":
        return on_meta
    return divmod(int(counts[0] * radix + counts[1]), radix)


def _exact_margin(count: int) -> int:
    """Entries beyond the k-th the compute-dtype screening keeps as possible candidates."""
    return max(EXACT_MIN_MARGIN, count // 16)


def _select_certified(
    problem: _Screening, count: int, screening: torch.dtype, margin: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(columns, values, uncertified rows) of each row's ``count`` best negatives by w.

    Screens in ``screening``, keeps the ``count + margin + 1`` best scores and certifies
    that every dropped proxy loses (its upper bound < the count-th's lower bound). Entries
    whose bounds overlap the boundary are rescored; a compute-dtype screening keeps the
    GEMM's value for entries certainly in and ranks its few rescored pairs, a low-precision
    one rescores every candidate and ranks them in place (ties to the lower column both).
    Uncertified rows are redone in the compute dtype, with an 8x wider margin if that was
    the screening already (at CN columns every row is certified). The bounds become two
    thresholds per row, rounded outwards to the scores' dtype: the (B, width) work is
    comparisons.
    """
    x, num_columns = problem.embeddings, len(problem.proxies)
    width = min(num_columns, count + margin + 1)
    screened = _screened(problem, width, screening)
    scores, columns, bound = screened.scores, screened.columns, screened.bound
    kth, after_kth = (t.double() for t in _largest_two(scores, count))
    reaching = bound.least_reaching(kth)  # may still beat the count-th
    certified = torch.ones_like(reaching, dtype=torch.bool).squeeze(1)
    if width < num_columns:  # the lowest kept score bounds every dropped one
        certified = (scores.amin(dim=1, keepdim=True) < reaching).squeeze(1)
    certainly_in = scores > bound.least_beating(after_kth)  # beats the (count + 1)-th
    rescore = scores >= reaching
    if screened.exact:  # the GEMM's values of certain entries are kept
        rescore &= ~certainly_in
    uncertified = ~certified
    num_pairs, redo = _read_counts(
        torch.stack([rescore.sum(), uncertified.sum()]), len(x) + 1, (rescore.numel(), 0)
    )
    rows, positions = torch.nonzero_static(rescore, size=num_pairs).unbind(1)
    pair_columns = columns[rows, positions]
    exact = _canonical_similarities(problem, rows, pair_columns)
    if screened.exact:  # few pairs: rank them
        room = count - certainly_in.sum(dim=1)
        chosen = _best_pairs(rows, pair_columns, exact, room)
        kept = certainly_in.index_put_((rows, positions), chosen)
        values = scores.index_put_((rows, positions), exact)
    else:  # most candidates are rescored: rank keys over the (column-sorted) set
        values = torch.full_like(scores, -math.inf, dtype=x.dtype).index_put_(
            (rows, positions), exact
        )
        kept = _top_by_key(values.masked_fill(certainly_in, math.inf), count)
    kept_columns, kept_values = _compact(kept, count, columns, values)
    if redo:
        rows = torch.nonzero_static(uncertified, size=redo).squeeze(1)
        wider = 8 * margin if screened.exact else _exact_margin(count)
        redone, redone_values, _ = _select_certified(problem.rows(rows), count, x.dtype, wider)
        kept_columns[rows], kept_values[rows] = redone, redone_values
    return kept_columns, kept_values, uncertified.sum()


class _Bound(NamedTuple):
    """|s - w| <= error + relative |s|, per row, in the units of the scores s.

    Thresholds on s derived from it are evaluated in float64 on (B, 1) tensors, then
    pushed outwards by ``THRESHOLD_SLACK`` of their magnitude, which covers float64's own
    rounding in those few operations; the (B, width) scores are compared with them exactly
    (float32 scores promote to float64 in the comparison).
    """

    error: torch.Tensor  # (B, 1) float64
    relative: float

    def _outwards(self, threshold: torch.Tensor, sign: int) -> torch.Tensor:
        return threshold.add(threshold.abs() + self.error, alpha=sign * THRESHOLD_SLACK)

    def least_reaching(self, score: torch.Tensor) -> torch.Tensor:
        """Scores s' below this have upper(s') = s' + E + c|s'| < lower(score)."""
        level = score.sub(self.error, alpha=2)
        if self.relative:  # minus c|score|, then invert s' + c |s'| (increasing)
            level = level.sub(score.abs(), alpha=self.relative)
            level = level / torch.where(level >= 0, 1 + self.relative, 1 - self.relative)
        return self._outwards(level, -1)

    def least_beating(self, score: torch.Tensor) -> torch.Tensor:
        """Scores s' above this have lower(s') = s' - E - c|s'| > upper(score)."""
        level = score.add(self.error, alpha=2)
        if self.relative:  # plus c|score|, then invert s' - c |s'| (increasing)
            level = level.add(score.abs(), alpha=self.relative)
            level = level / torch.where(level >= 0, 1 - self.relative, 1 + self.relative)
        return self._outwards(level, 1)


class _Screened(NamedTuple):
    scores: torch.Tensor  # (B, width); the GEMM's values when exact, else columns ascending
    columns: torch.Tensor
    exponents: torch.Tensor  # (B, 1): scores are 2^exponents times similarities
    bound: _Bound  # of |scores - 2^exponents w|
    exact: bool  # screened in the compute dtype


def _screened(problem: _Screening, width: int, screening: torch.dtype) -> _Screened:
    """Each row's ``width`` best screening scores, with their columns and error bound."""
    x = problem.embeddings
    if screening == x.dtype:
        scores, columns = _screen(problem, width, x, problem.inverse_norms)
        bound = _Bound(_exact_screening_error(problem), 0.0)
        return _Screened(
            scores, columns, torch.zeros_like(bound.error, dtype=torch.int), bound, True
        )
    # Rows scaled by powers of two to norm [2^(a-1), 2^a) and proxies normalised times 2^a:
    # exact, and for fp16 (a = FP16_INPUT_EXPONENT) safe from its narrow range. The scores
    # stay in these units: row i's are 2^(shift_i + a) times the similarities.
    exponent = FP16_INPUT_EXPONENT if screening == torch.float16 else 0
    _, norm_exponents = torch.frexp(torch.linalg.vector_norm(x, dim=1, keepdim=True))
    shifts = exponent - norm_exponents
    scaled = torch.ldexp(x, shifts)
    rounded = scaled.to(screening)
    proxy_scales = problem.inverse_norms * 2.0**exponent
    scores, columns = _screen(problem, width, rounded, proxy_scales)
    order = _stable_argsort(columns)  # positions in column order, for ``_top_by_key``'s ties
    scores, columns = scores.gather(1, order), columns.gather(1, order)
    exponents = shifts + exponent
    bound = _low_precision_error(problem, scaled, rounded, exponent, exponents)
    return _Screened(scores, columns, exponents, bound, False)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _gamma(terms: int, unit: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term sum."""
    return terms * unit / (1 - terms * unit)


def _matmul_input_unit(x: torch.Tensor) -> float:
    """Relative rounding a float32 GEMM on x's device may apply to its inputs: 0 in IEEE
    float32, 2^-11 in TF32 (or two bf16 terms), 2^-8 in bf16; unknown settings count as bf16.

    Read from the backend's ``fp32_precision`` (torch >= 2.9), else the global one, else
    ``torch.get_float32_matmul_precision()`` (which raises once the APIs are mixed).
    """
    if x.dtype != torch.float32:
        return 0.0
    backend = (
        torch.backends.cuda.matmul if x.device.type == "cuda" else torch.backends.mkldnn.matmul
    )
    precision = getattr(backend, "fp32_precision", "none")
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision == "none":
        try:
            precision = LEGACY_MATMUL_PRECISION[torch.get_float32_matmul_precision()]
        except RuntimeError:
            precision = "bf16"
    unit = FLOAT32_MATMUL_INPUT_UNIT.get(precision, FLOAT32_MATMUL_INPUT_UNIT["bf16"])
    if x.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        unit = max(unit, FLOAT32_MATMUL_INPUT_UNIT["tf32"])
    return unit


def _dot_error(problem: _Screening, *input_units: float) -> torch.Tensor:
    """(B, 1) float64 bound, summed over GEMMs that round their inputs by ``input_units``, on
    |fl(fl(x . p_j) * r_j) - (x . p_j) r_j| over j, whatever the GEMM.

    A GEMM may round its inputs with relative error u_in (0 unless TF32 or a bf16 float32
    mode is on), then sums d products in the compute dtype (unit u) in any order, with or
    without FMA: error <= gamma_d sum|x~_t p~_t| (Higham, Accuracy and Stability, 2002,
    Thm 3.1 and Lemma 3.3: any order); with Cauchy-Schwarz the total is at most
    (2 u_in + u_in^2 + gamma_d (1 + u_in)^2) |x| |p_j|. Scaling by r_j adds u times the
    result; |p_j| r_j <= nu = (1 + u) / (1 - gamma_{d+2}) (the norm's own rounding), and
    underflow adds at most (d r_max + 1) tiny, r_max <= 1 / NORM_EPS.
    """
    x = problem.embeddings
    dim, unit, tiny = x.shape[1], _unit_roundoff(x.dtype), torch.finfo(x.dtype).tiny
    nu = (1 + unit) / (1 - _gamma(dim + 2, unit))
    total = 0.0
    for input_unit in input_units:
        rounded = 2 * input_unit + input_unit**2 + _gamma(dim, unit) * (1 + input_unit) ** 2
        total += nu * (rounded + unit * (1 + rounded))
    underflow = (dim * (1 + unit) / NORM_EPS + 1) * tiny * len(input_units)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float64)
    return norms * (total * (1 + BOUND_SLACK)) + underflow


def _exact_screening_error(problem: _Screening) -> torch.Tensor:
    """(B, 1) bound on |GEMM score - canonical w| for the compute-dtype screening: both lie
    within ``_dot_error`` of the exact (x . p_j) r_j."""
    return _dot_error(problem, 0.0, _matmul_input_unit(problem.embeddings))


def _low_precision_error(
    problem: _Screening,
    scaled: torch.Tensor,
    rounded: torch.Tensor,
    proxy_exponent: int,
    score_exponents: torch.Tensor,
) -> _Bound:
    """|s_j - w_j| <= E_i + c |s_j| for the low-precision scores s of ``_screen``, in their
    scaled units (below).

    In row i's scaled units, x' = x 2^e (``scaled``; exact), p'_j = p_j r_j 2^a (a =
    ``proxy_exponent``) and t_j = x' . p'_j = 2^(e + a) (x . p_j) r_j, e + a being
    ``score_exponents``. The GEMM takes x~ = lp(x') (``rounded``) and p~_j = lp(fl(p'_j)),
    both rounded to nearest with unit u_lp (an element flushed to zero or subnormal is off
    by at most tiny_lp); it forms the products exactly in float32 (two lp significands need
    at most 22 bits), sums them in float32 in any order (the assumption, checked on this
    device by ``tests/test_certified_selection.py``) and rounds the sum to q in lp. With
    R = |x' - x~| (measured; the difference is exact by Sterbenz's lemma), P = 2^a nu >= |p'_j|,
    u_p = u_lp (1 + u) + u (p'_j is rounded twice) and f = tiny_lp sqrt(d):

        |x~ . p~_j - t_j| <= R (P (1 + u_p) + f) + |x'| (u_p P + f)
        |sum - x~ . p~_j| <= gamma_d(float32) (|x'| + R) (P (1 + u_p) + f), doubled as a margin
        |q - sum|         <= c |q| + (1 + c) tiny_lp,   c = u_lp / (1 - u_lp)

    E_i is the sum of these, plus the canonical value's own ``_dot_error`` times 2^(e + a)
    (``score_exponents``): comparisons stay in the scaled units, where s = q exactly.
    """
    x = problem.embeddings
    dim, unit = x.shape[1], _unit_roundoff(x.dtype)
    low_unit, low_tiny = _unit_roundoff(rounded.dtype), torch.finfo(rounded.dtype).tiny
    floor = (low_tiny + torch.finfo(x.dtype).tiny) * math.sqrt(dim)
    proxy_norm = 2.0**proxy_exponent * (1 + unit) / (1 - _gamma(dim + 2, unit))
    proxy_unit = low_unit * (1 + unit) + unit
    rounded_proxy_norm = proxy_norm * (1 + proxy_unit) + floor
    x_norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True, dtype=torch.float64)
    x_norm *= 1 + BOUND_SLACK
    residual = scaled - rounded.to(x.dtype)
    residual = torch.linalg.vector_norm(residual, dim=1, keepdim=True, dtype=torch.float64)
    residual = residual * (1 + BOUND_SLACK) + floor
    inputs = residual * rounded_proxy_norm + x_norm * (proxy_unit * proxy_norm + floor)
    float32_sum = _gamma(dim, FLOAT32_UNIT) * (x_norm + residual) * rounded_proxy_norm
    accumulation = 2 * (float32_sum + dim * torch.finfo(torch.float32).tiny)
    relative = low_unit / (1 - low_unit)
    scaled_error = inputs + accumulation + (1 + relative) * low_tiny
    error = scaled_error + torch.ldexp(_dot_error(problem, 0.0), score_exponents)
    return _Bound(error * (1 + BOUND_SLACK), relative * (1 + BOUND_SLACK))


def _screening_dtype(precision: str, problem: _Screening, count: int) -> torch.dtype:
    """The dtype the proxies are screened in: ``precision`` resolved for this device."""
    x = problem.embeddings
    if precision == "fp32":
        return x.dtype
    if precision == "auto":
        return _fastest_screening(problem, count)
    if x.device.type not in LOW_PRECISION_DEVICES:
        raise ValueError(
            f"precision={precision!r} is certified on {LOW_PRECISION_DEVICES} only (it needs "
            f"GEMMs that sum in float32), got device {x.device.type!r}"
        )
    return LOW_PRECISIONS[precision]


# The screening measured fastest per (device, dtype, shape, k): see ``_fastest_screening``.
_FASTEST_SCREENING: dict[tuple, torch.dtype] = {}


def _fastest_screening(problem: _Screening, count: int) -> torch.dtype:
    """The screening dtype that selects fastest here, measured once per shape.

    Every screening gives the same result, so the first call of a shape times each (one
    warm-up and one timed run of the whole negative selection) and remembers the winner.
    Below ``AUTO_MIN_MULTIPLY_ADDS`` (B * CN * d) the overheads dominate: compute dtype.
    """
    x, proxies = problem.embeddings, problem.proxies
    work = x.shape[0] * proxies.shape[0] * x.shape[1]
    if (
        x.device.type not in LOW_PRECISION_DEVICES
        or x.device.type == "meta"
        or work < AUTO_MIN_MULTIPLY_ADDS
        or torch.compiler.is_compiling()
    ):
        return x.dtype
    key = (x.device, x.dtype, *x.shape, len(proxies), problem.excluded.shape[1], count)
    if key not in _FASTEST_SCREENING:
        candidates = (x.dtype, *LOW_PRECISIONS.values())
        seconds = {dtype: _selection_seconds(problem, count, dtype) for dtype in candidates}
        _FASTEST_SCREENING[key] = min(seconds, key=seconds.get)
    return _FASTEST_SCREENING[key]


def _selection_seconds(problem: _Screening, count: int, screening: torch.dtype) -> float:
    synchronize = torch.cuda.synchronize if problem.embeddings.is_cuda else lambda: None
    _select_negatives(problem, count, screening)  # warm-up: kernel set-up, first touches
    synchronize()
    start = time.perf_counter()
    _select_negatives(problem, count, screening)
    synchronize()
    return time.perf_counter() - start


@contextlib.contextmanager
def _float32_accumulation(device: torch.device):
    """cuBLAS may reduce bf16 / fp16 GEMMs in low precision; the bound needs float32 sums."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = (
        matmul.allow_bf16_reduced_precision_reduction,
        matmul.allow_fp16_reduced_precision_reduction,
    )
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (
            matmul.allow_bf16_reduced_precision_reduction,
            matmul.allow_fp16_reduced_precision_reduction,
        ) = saved


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
    order = _stable_argsort(flat_indices)
    sorted_proxies = flat_indices[order]
    if not sparse:
        return order, None, sorted_proxies, _csr_starts(sorted_proxies, num_proxies)
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
    def forward(
        embeddings, proxies, indices, similarities, norms, sparse_proxy_grad, dense_weights
    ):
        return similarities.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        embeddings, proxies, indices, similarities, norms, sparse, dense_weights = inputs
        ctx.save_for_backward(embeddings, proxies, indices, similarities, norms)
        ctx.sparse_proxy_grad = sparse
        ctx.dense_weights = dense_weights

    @staticmethod
    def backward(ctx, grad):
        embeddings, proxies, indices, similarities, norms = ctx.saved_tensors
        if torch.is_grad_enabled() and any(
            tensor.requires_grad for tensor in (grad, embeddings, proxies)
        ):
            grads = _differentiable_kept_gradients(
                embeddings, proxies, indices, grad, ctx.needs_input_grad, ctx.sparse_proxy_grad
            )
            return *grads, None, None, None, None, None
        (batch_size, k), num_proxies = indices.shape, proxies.shape[0]
        if norms is None:
            norms = proxy_norms(proxies)
        flat_indices = indices.reshape(-1)
        scaled = (grad / norms[indices]).reshape(-1)  # g_im / |p_j|: both products need it
        grad_embeddings = grad_proxies = None
        if ctx.needs_input_grad[0]:
            row_starts = torch.arange(0, batch_size * k + 1, k, device=grad.device)
            grad_embeddings = _weighted_bag_sums(row_starts, flat_indices, scaled, proxies)
        if ctx.needs_input_grad[1]:
            radial_terms = (grad * similarities).reshape(-1)  # g_im S_im, summed into c_j
            if ctx.dense_weights:
                # A^T = W^T x with W the (B, CN) scatter of g / |p|: one GEMM, no sort.
                rows, entry_rows = None, flat_indices
                weights = scaled.new_zeros(batch_size, num_proxies)
                weights.scatter_add_(1, indices, scaled.view(batch_size, k))
                grad_rows = weights.T @ embeddings
            else:
                order, rows, entry_rows, row_starts = _proxy_gradient_layout(
                    flat_indices, num_proxies, ctx.sparse_proxy_grad
                )
                grad_rows = _weighted_bag_sums(row_starts, order // k, scaled[order], embeddings)
                radial_terms = radial_terms[order]
            row_proxies, row_norms = (
                (proxies, norms) if rows is None else (proxies[rows], norms[rows])
            )
            # A_j / |p_j| above, then minus c_j p_j / |p_j|^2: one pass over the (rows, d)
            # result, in place, because at a million proxies every (rows, d) temporary is
            # gigabytes.
            radial = torch.zeros_like(row_norms).index_add_(0, entry_rows, radial_terms)
            # F.normalize's clamp: below NORM_EPS the map is p / eps, with no radial term.
            radial = torch.where(row_norms > NORM_EPS, radial / row_norms.square(), 0)
            grad_rows.addcmul_(radial.unsqueeze(1), row_proxies, value=-1)
            grad_proxies = _proxy_gradient(grad_rows, rows, proxies.shape)
        return grad_embeddings, grad_proxies, None, None, None, None, None


def kept_similarities(
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    indices: torch.Tensor,
    similarities: torch.Tensor,
    sparse_proxy_grad: bool = False,
    block_bytes: int = DEFAULT_SELECTION_BLOCK_BYTES,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable (B, k) similarities of the kept proxies (values from ``select_topk``).

    Gradients flow to ``embeddings`` and to the raw ``proxies`` (through their
    normalisation) only through the B * k kept entries. With ``sparse_proxy_grad`` the
    proxies' gradient is a sparse COO tensor holding only the rows some sample kept
    (for ``torch.optim.SparseAdam``); otherwise it is dense, zero in untouched rows.
    Differentiable twice (Hessian-vector products, ``torch.func.grad``), sparse or not.

    A dense proxies' gradient sums the kept entries with one GEMM over a (B, CN) scatter
    of them when that scatter holds at most ``DENSE_WEIGHTS_MAX_ELEMENTS`` and fits
    ``block_bytes`` (the selection's own block budget): there it beats sorting the entries
    by proxy for the sparse product, which larger problems take.

    ``norms``, the proxies' ``proxy_norms`` if the caller has them (the selection's), spare
    the backward its own pass over the proxies; a recorded (second-order) backward
    recomputes them, differentiably.
    """
    weights_size = embeddings.shape[0] * proxies.shape[0]
    dense_weights = (
        not sparse_proxy_grad
        and weights_size <= DENSE_WEIGHTS_MAX_ELEMENTS
        and weights_size * embeddings.element_size() <= block_bytes
    )
    return _KeptSimilarities.apply(
        embeddings, proxies, indices, similarities, norms, sparse_proxy_grad, dense_weights
    )


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
    return _class_sums(kept_similarities, kept_classes, classes_are_distinct)[:3]


def _class_sums(
    kept_similarities: torch.Tensor, kept_classes: torch.Tensor, classes_are_distinct: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``class_logits`` and the (B, k) slot each entry is summed into (None: its own)."""
    if classes_are_distinct:
        present = torch.ones_like(kept_classes, dtype=torch.bool)
        return kept_similarities, kept_classes, present, None
    order = _stable_argsort(kept_classes)
    sorted_classes = kept_classes.gather(1, order)
    sorted_values = kept_similarities.gather(1, order)
    starts_segment = torch.ones_like(sorted_classes, dtype=torch.bool)
    starts_segment[:, 1:] = sorted_classes[:, 1:] != sorted_classes[:, :-1]
    segment = starts_segment.cumsum(dim=1) - 1
    logits = torch.zeros_like(sorted_values).scatter_add(1, segment, sorted_values)
    # Every entry of a segment carries the same class, so duplicate writes agree.
    classes = torch.full_like(sorted_classes, -1).scatter(1, segment, sorted_classes)
    slots = torch.arange(segment.shape[1], device=segment.device)
    present = slots < starts_segment.sum(dim=1, keepdim=True)
    return logits, classes, present, torch.empty_like(segment).scatter_(1, order, segment)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official masked softmax ``exp(Z) * M / (1e-8 + sum(exp(Z) * M))``.

    Computed max-shifted, ``exp(Z - m) / (1e-8 * exp(-m) + sum(exp(Z - m)))`` with m the
    row's largest unmasked logit, which is the same function (same value and gradient, the
    1e-8 included) without overflow. The mask enters as a 0/1 factor, never as a boolean
    selection: on CPU, elementwise ops that read or write booleans run several times slower
    than float arithmetic, so logits off the mask are ignored but must be finite. A row with
    an empty mask gives all-zero probabilities, as in the official code.
    """
    kept = mask.to(logits.dtype)
    lowest = torch.finfo(logits.dtype).min
    shift = (logits.detach() * kept + (1 - kept) * lowest).amax(dim=1, keepdim=True)
    shift = torch.where(shift > lowest, shift, 0)  # an empty row: no shift
    exp = torch.exp((logits - shift) * kept) * kept
    denominator = SOFTMAX_DENOMINATOR_EPS * torch.exp(-shift) + exp.sum(dim=1, keepdim=True)
    return exp / denominator


def classification_loss(probabilities: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-log(P[target] + 1e-20)``, shape (B,); a missing target costs 46.05.

    ``is_target`` marks each row's target class, boolean or 0/1 in the probabilities' dtype.
    """
    return _loss_of_target(_target_probability(probabilities, is_target))


def _loss_of_target(target: torch.Tensor) -> torch.Tensor:
    """(B,) ``-log(P_y + 1e-20)`` from the (B, 1) target probabilities."""
    return -torch.log(target + LOG_EPS).squeeze(1)


def _target_probability(probabilities: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """(B, 1) probability of each row's target class (0 where it is missing)."""
    return (probabilities * is_target).sum(dim=1, keepdim=True)


def _uses_dense_class_logits(
    batch_size: int, num_classes: int | None, classes_are_distinct: bool
) -> bool:
    """Whether the sub-graph loss sums class logits densely (see ``subgraph_loss``)."""
    return (
        not classes_are_distinct
        and num_classes is not None
        and batch_size * num_classes <= DENSE_CLASS_LOGITS_MAX_ELEMENTS
    )


def _subgraph_logits(
    kept_similarities: torch.Tensor,
    kept_classes: torch.Tensor,
    labels: torch.Tensor,
    classes_are_distinct: bool,
    num_classes: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logits, is_target, slot)``: the class logits of each row, 0/1 marks of its target
    class in the logits' dtype, and the (B, k) column each kept entry is summed into (None:
    its own). Dense (B, C) columns are the classes (see ``subgraph_loss``); otherwise the
    columns are ``class_logits``'s slots."""
    if _uses_dense_class_logits(len(kept_similarities), num_classes, classes_are_distinct):
        logits = kept_similarities.new_zeros(len(kept_similarities), num_classes)
        logits = logits.scatter_add(1, kept_classes, kept_similarities)
        is_target = torch.zeros_like(logits).scatter_(1, labels.unsqueeze(1), 1.0)
        return logits, is_target, kept_classes
    logits, classes, _, slot = _class_sums(kept_similarities, kept_classes, classes_are_distinct)
    return logits, (classes == labels.unsqueeze(1)).to(logits.dtype), slot


def _subgraph_loss_and_slope(
    kept_similarities: torch.Tensor,
    kept_classes: torch.Tensor,
    labels: torch.Tensor,
    classes_are_distinct: bool,
    num_classes: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_sample, slope)``: ``subgraph_loss`` and the (B, k) derivative of each row's
    loss in its kept similarities (see ``_SubgraphLoss``), from plain ops."""
    logits, is_target, slot = _subgraph_logits(
        kept_similarities, kept_classes, labels, classes_are_distinct, num_classes
    )
    # Classes with no kept proxy sum to 0: the official mask Z != 0 drops them with the rest.
    probabilities = masked_softmax(logits, logits != 0)
    target = _target_probability(probabilities, is_target)
    slope = (probabilities - is_target) * (target / (target + LOG_EPS))
    return _loss_of_target(target), slope if slot is None else slope.gather(1, slot)


class _SubgraphLoss(torch.autograd.Function):
    """Per-sample loss of each sub-graph from its kept similarities S, differentiated in
    closed form instead of through the ~30 ops of the class sums and the softmax.

    With z_c the class logits (sums of S over the class's kept proxies), P the masked
    softmax (0 off the mask), t_c the target indicator and P_y = sum_c P_c t_c, the loss
    L = -log(P_y + eps) has dL/dz_c = P_c (P_y - t_c) / (P_y + eps) = (P_c - t_c) P_y /
    (P_y + eps) (as P_c t_c = P_y t_c), the official epsilons' exact derivative
    (dP_c / dz_c' = P_c (delta_cc' - P_c') on the mask, the 1e-8 term included). Each kept
    entry takes its class's derivative: dL/dS_m = dL/dz_c(m). The forward computes this
    slope beside the loss; the backward scales it.

    Twice differentiable: when the backward itself is recorded, the slope is recomputed
    from S by the same ops, whose own derivative is then the loss's Hessian in z.
    """

    @staticmethod
    def forward(kept_similarities, kept_classes, labels, classes_are_distinct, num_classes):
        return _subgraph_loss_and_slope(
            kept_similarities, kept_classes, labels, classes_are_distinct, num_classes
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        kept_similarities, kept_classes, labels, classes_are_distinct, num_classes = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(kept_similarities, kept_classes, labels, output[1])
        ctx.layout = classes_are_distinct, num_classes

    @staticmethod
    def backward(ctx, grad, _grad_slope):
        kept_similarities, kept_classes, labels, slope = ctx.saved_tensors
        if torch.is_grad_enabled() and kept_similarities.requires_grad:
            _, slope = _subgraph_loss_and_slope(
                kept_similarities, kept_classes, labels, *ctx.layout
            )
        return grad.unsqueeze(1) * slope, None, None, None, None


def subgraph_loss(
    kept_similarities: torch.Tensor,
    kept_classes: torch.Tensor,
    labels: torch.Tensor,
    classes_are_distinct: bool = False,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Per-sample loss of each sample's sub-graph, shape (B,).

    Class logits are the per-class sums of the kept similarities; classes whose logit is
    exactly 0 drop out of the masked softmax (``masked_softmax``), as in the official
    code; the loss is ``classification_loss``'s. Differentiable in ``kept_similarities``
    (twice), by the closed form of ``_SubgraphLoss``.

    Given ``num_classes`` with B * C at most ``DENSE_CLASS_LOGITS_MAX_ELEMENTS``, the sums
    go into a dense (B, C) matrix by one scatter, as the official code forms them (cheaper
    than sorting each row when C is small); otherwise they are ``class_logits``'s segment
    sums, O(B * k log k) whatever C. Both give the same values up to the order of each
    class's additions. ``classes_are_distinct`` (one proxy per class) takes each kept
    entry as its own class's sum, in either case: no sum, no sort.
    """
    per_sample, _ = _SubgraphLoss.apply(
        kept_similarities, kept_classes, labels, classes_are_distinct, num_classes
    )
    return per_sample


def classes_per_subgraph(kept_classes: torch.Tensor) -> torch.Tensor:
    """(B,) number of distinct classes among each row's kept proxies."""
    ordered = kept_classes.sort(dim=1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)


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


def _anchors_per_block(block_elements: int, num_classes: int) -> int:
    """Anchors per block of logits so that a block holds about ``block_elements``."""
    return max(1, block_elements // num_classes)


def _gram_tile(block_elements: int) -> int:
    """Side of a square tile of the Gram matrix of about ``block_elements`` logits."""
    return max(1, math.isqrt(block_elements))


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
    rows_per_block = _anchors_per_block(block_elements, len(class_sums))
    if torch.is_grad_enabled() and (anchors.requires_grad or class_sums.requires_grad):
        summed, _, _ = _ProxyRegularizerSum.apply(
            anchors, class_sums, anchor_classes, rows_per_block
        )
        return summed
    summed, _, _ = _regularizer_blocks(
        anchors, class_sums, anchor_classes, rows_per_block, with_gradients=False
    )
    return summed


def _gram_regularizer_blocks(
    units: torch.Tensor, tile: int, with_gradient: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With one proxy per class, the regulariser's summed cross-entropy T and dT/dP.

    The logits are the symmetric Gram matrix L = P P^T, so T = sum_i lse_i - sum_i L_ii
    and dT/dP = (R + R^T) P with R = softmax(L) - I, where by symmetry
    (R + R^T)_ij = exp(L_ij) (exp(-lse_i) + exp(-lse_j)) - 2 delta_ij: one product with P
    per tile once the row normalisers are known. Only tiles on and above the diagonal are
    formed (a tile also gives its mirror's row sums and gradient), so the cost is two
    C x C x d products instead of ``_regularizer_blocks``'s three: half of L for the
    normalisers, half again (or none, when one tile holds L and is kept) and (R + R^T) P.
    Logits are shifted by max_i |p_i|^2, above every L_ij (Cauchy-Schwarz), so no exp
    overflows.
    """
    starts = range(0, len(units), tile)
    squared_norms = units.square().sum(dim=1)
    shift = squared_norms.amax()
    kept: dict[tuple[int, int], torch.Tensor] = {}

    def shifted_exp(row: int, column: int) -> torch.Tensor:
        if (row, column) in kept:
            return kept[row, column]
        block = units[row : row + tile] @ units[column : column + tile].T
        return block.sub_(shift).exp_()

    row_sums = torch.zeros_like(squared_norms)
    for row in starts:
        for column in (c for c in starts if c >= row):
            block = shifted_exp(row, column)
            row_sums[row : row + tile] += block.sum(dim=1)
            if column != row:
                row_sums[column : column + tile] += block.sum(dim=0)
            if len(starts) == 1:
                kept[row, column] = block
    log_normalizers = row_sums.log() + shift
    total = log_normalizers.sum() - squared_norms.sum()
    if not with_gradient:
        return total, None
    scales = (shift - log_normalizers).exp()  # exp(L_ij - lse_i) = exp(L_ij - shift) * scale_i
    grad = units.mul(-2)
    for row in starts:
        for column in (c for c in starts if c >= row):
            block = shifted_exp(row, column)
            block *= scales[row : row + tile, None] + scales[None, column : column + tile]
            grad[row : row + tile].addmm_(block, units[column : column + tile])
            if column != row:
                grad[column : column + tile].addmm_(block.T, units[row : row + tile])
    return total, grad


class _GramRegularizerSum(torch.autograd.Function):
    """``_gram_regularizer_blocks``'s T of unit proxies P (one per class), its gradient
    (R + R^T) P computed in forward; a recorded backward rebuilds it differentiably from
    the general two-matrix form (anchors and class sums both P), so T stays twice
    differentiable."""

    @staticmethod
    def forward(units, tile):
        return _gram_regularizer_blocks(units, tile, with_gradient=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        units, ctx.tile = inputs
        _, grad_units = output
        ctx.mark_non_differentiable(grad_units)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(units, grad_units)

    @staticmethod
    def backward(ctx, grad, _grad_units):
        if grad is None:
            return None, None
        units, grad_units = ctx.saved_tensors
        if torch.is_grad_enabled() and (grad.requires_grad or units.requires_grad):
            classes = torch.arange(len(units), device=units.device)
            rows_per_block = _anchors_per_block(ctx.tile**2, len(units))
            as_anchors, as_class_sums = _differentiable_regularizer_gradients(
                units, units, classes, rows_per_block
            )
            grad_units = as_anchors + as_class_sums
        return grad_units * grad, None


def gram_regularizer_sum(
    units: torch.Tensor, block_elements: int = DEFAULT_REGULARIZER_BLOCK_ELEMENTS
) -> torch.Tensor:
    """``regularizer_sum`` for one proxy per class and every proxy an anchor (anchors and
    class sums are both ``units``), through the symmetric Gram matrix: square tiles of
    about ``block_elements`` logits (see ``_gram_regularizer_blocks``)."""
    tile = _gram_tile(block_elements)
    if torch.is_grad_enabled() and units.requires_grad:
        summed, _ = _GramRegularizerSum.apply(units, tile)
        return summed
    summed, _ = _gram_regularizer_blocks(units, tile, with_gradient=False)
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
    blocks of about ``block_elements`` logits (see ``regularizer_sum``). With one proxy
    per class and no ``rows`` the logits are a symmetric Gram matrix, which costs a third
    less (``gram_regularizer_sum``).

    Args:
        normalized_proxies: (CN, d) unit-norm proxies, class-major.
        proxies_per_class: N.
        block_elements: memory budget of one block of logits, in elements.
        rows: average over these proxies only (e.g. a uniform sample, which gives an
            unbiased estimate of L^p and of its gradient at cost O(len(rows) * C * d));
            all CN proxies, the exact L^p, when None.
    """
    total, dim = normalized_proxies.shape
    if proxies_per_class == 1 and rows is None:
        return gram_regularizer_sum(normalized_proxies, block_elements) / total
    num_classes = total // proxies_per_class
    class_sums = normalized_proxies.view(num_classes, proxies_per_class, dim).sum(dim=1)
    if rows is None:  # every proxy is an anchor: no (CN, d) gather, nor its backward
        anchors, rows = normalized_proxies, torch.arange(total, device=normalized_proxies.device)
    else:
        anchors = normalized_proxies[rows]
    summed = regularizer_sum(anchors, class_sums, rows // proxies_per_class, block_elements)
    return summed / len(rows)


def _summed_regularizer_and_gradient(
    units: torch.Tensor, proxies_per_class: int, block_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """T, the regulariser's cross-entropy summed over all CN unit proxies, and dT/dP,
    without autograd: proxy j's gradient is its own as an anchor plus its class sum's
    (every proxy of a class adds into that sum)."""
    total, dim = units.shape
    if proxies_per_class == 1:
        return _gram_regularizer_blocks(units, _gram_tile(block_elements), with_gradient=True)
    num_classes = total // proxies_per_class
    class_sums = units.view(num_classes, proxies_per_class, dim).sum(dim=1)
    summed, grad_anchors, grad_class_sums = _regularizer_blocks(
        units,
        class_sums,
        torch.arange(total, device=units.device) // proxies_per_class,
        _anchors_per_block(block_elements, num_classes),
        with_gradients=True,
    )
    grad_anchors.view(num_classes, proxies_per_class, dim).add_(grad_class_sums.unsqueeze(1))
    return summed, grad_anchors


def regularizer_value_and_gradient(
    normalized_proxies: torch.Tensor,
    proxies_per_class: int,
    block_elements: int = DEFAULT_REGULARIZER_BLOCK_ELEMENTS,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``proxy_regularizer`` and its gradient with respect to the normalised proxies.

    Both are detached: they are the state the cheaper estimators keep between steps
    (``linearized_regularizer``, ``variance_reduced_regularizer``) and what
    ``exact_regularizer`` carries through the normalisation. Over all proxies the
    gradient is assembled from the fused blocks' own (``_summed_regularizer_and_gradient``);
    over sampled ``rows``, by autograd.
    """
    if rows is None:
        total = len(normalized_proxies)
        summed, gradient = _summed_regularizer_and_gradient(
            normalized_proxies.detach(), proxies_per_class, block_elements
        )
        return summed / total, gradient.div_(total)
    with torch.enable_grad():
        anchor = normalized_proxies.detach().requires_grad_()
        value = proxy_regularizer(anchor, proxies_per_class, block_elements, rows)
        (gradient,) = torch.autograd.grad(value, anchor)
    return value.detach(), gradient


def _through_normalization(
    proxies: torch.Tensor,
    norms: torch.Tensor,
    direction: torch.Tensor,
    cosines: torch.Tensor,
    grad: torch.Tensor,
) -> torch.Tensor:
    """``grad`` times the gradient G (``direction``, with respect to p_hat_j = p_j / n_j)
    carried to the raw proxies: (G_j - <G_j, p_hat_j> p_hat_j) / n_j, given the clamped
    norms n and the ``cosines`` <G_j, p_hat_j>. Two passes over the (CN, d) proxies where
    autograd through ``F.normalize`` makes several times as many."""
    scale = grad / norms
    # F.normalize's clamp: below NORM_EPS the map is p / eps, with no radial term.
    radial = torch.where(norms > NORM_EPS, cosines * scale / norms, 0)
    grad_proxies = direction * scale.unsqueeze(1)
    return grad_proxies.addcmul_(radial.unsqueeze(1), proxies, value=-1)


class _ExactRegularizer(torch.autograd.Function):
    """L^p of the raw (CN, d) proxies, through their normalisation p_hat = p / n.

    The forward takes L^p and G = dL^p/dp_hat in one pass (``regularizer_value_and_gradient``);
    the backward carries G through the normalisation (``_through_normalization``). A recorded
    backward (``create_graph=True``, ``torch.func``) differentiates the plain composition
    ``proxy_regularizer(F.normalize(p))`` instead, so that L^p stays twice differentiable.
    """

    @staticmethod
    def forward(proxies, proxies_per_class, block_elements):
        norms = proxy_norms(proxies)
        value, gradient = regularizer_value_and_gradient(
            proxies / norms.unsqueeze(1), proxies_per_class, block_elements
        )
        return value, gradient, norms

    @staticmethod
    def setup_context(ctx, inputs, output):
        proxies, ctx.proxies_per_class, ctx.block_elements = inputs
        _, gradient, norms = output
        ctx.mark_non_differentiable(gradient, norms)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(proxies, gradient, norms)

    @staticmethod
    def backward(ctx, grad, _grad_gradient, _grad_norms):
        if grad is None:
            return None, None, None
        proxies, gradient, norms = ctx.saved_tensors
        if torch.is_grad_enabled() and (grad.requires_grad or proxies.requires_grad):
            with torch.enable_grad():
                unit = F.normalize(proxies, p=2, dim=1)
                value = proxy_regularizer(unit, ctx.proxies_per_class, ctx.block_elements)
            (grad_proxies,) = torch.autograd.grad(value, proxies, grad, create_graph=True)
            return grad_proxies, None, None
        cosines = torch.linalg.vecdot(gradient, proxies) / norms
        return _through_normalization(proxies, norms, gradient, cosines, grad), None, None


def exact_regularizer(
    proxies: torch.Tensor,
    proxies_per_class: int,
    block_elements: int = DEFAULT_REGULARIZER_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """``proxy_regularizer(F.normalize(proxies), proxies_per_class)`` of the raw proxies,
    with a backward that passes over them twice (``_ExactRegularizer``): same value and
    gradient, a fraction of the elementwise work at small C, where it dominates. Without a
    gradient to take, the value alone (a third of the products)."""
    if not (torch.is_grad_enabled() and proxies.requires_grad):
        unit = F.normalize(proxies, p=2, dim=1)
        return proxy_regularizer(unit, proxies_per_class, block_elements)
    value, _, _ = _ExactRegularizer.apply(proxies, proxies_per_class, block_elements)
    return value


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
        return _through_normalization(proxies, norms, direction, cosines, grad), None


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

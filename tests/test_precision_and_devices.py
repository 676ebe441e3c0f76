"""Dtypes, autocast, and readiness for CUDA without a GPU (host syncs, device placement)."""

import pytest
import torch
from pytorch_metric_learning.reducers import DoNothingReducer
from torch.utils._python_dispatch import TorchDispatchMode

from pml_proxygml import ProxyGMLLoss
from pml_proxygml import functional as gml
from tests.golden import CASES, loss_for_case, tensor

CUB_CASE = next(case for case in CASES if int(case["N"]) == 12)


def cub_batch(dtype=torch.float32):
    return tensor(CUB_CASE, "embeddings_raw", dtype), torch.as_tensor(CUB_CASE["labels"])


def test_float64_everywhere_after_double():
    loss_fn = loss_for_case(CUB_CASE, torch.float32).double()
    embeddings = tensor(CUB_CASE, "embeddings_raw").requires_grad_()
    loss = loss_fn(embeddings, torch.as_tensor(CUB_CASE["labels"]))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(
        loss, torch.tensor(float(CUB_CASE["loss_total"]), dtype=torch.float64)
    )


def test_float32_embeddings_with_float64_proxies_compute_in_float64():
    loss_fn = loss_for_case(CUB_CASE, torch.float64, reducer=DoNothingReducer())
    embeddings, labels = cub_batch(torch.float32)
    sub_losses = loss_fn(embeddings, labels)
    per_sample = sub_losses["loss"]["losses"]
    assert per_sample.dtype == torch.float64
    assert sub_losses["proxy_reg_loss"]["losses"].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    loss_fn = loss_for_case(CUB_CASE, torch.float32)
    embeddings, labels = cub_batch(torch.float32)
    reference = loss_fn(embeddings, labels).item()
    low = embeddings.to(dtype).requires_grad_()
    loss = loss_fn(low, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert loss_fn.proxies.dtype == torch.float32 and loss_fn.proxies.grad.dtype == torch.float32
    assert low.grad.dtype == dtype and torch.isfinite(low.grad).all()
    assert torch.isfinite(loss) and abs(loss.item() - reference) < 1e-2


def test_cpu_autocast_does_not_lower_the_loss_precision():
    loss_fn = loss_for_case(CUB_CASE, torch.float32)
    embeddings, labels = cub_batch(torch.float32)
    head = torch.nn.Linear(embeddings.shape[1], embeddings.shape[1])
    reference = loss_fn(head(embeddings), labels).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = head(embeddings)
        assert projected.dtype == torch.bfloat16
        loss = loss_fn(projected, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and loss_fn.proxies.dtype == torch.float32
    assert abs(loss.item() - reference) < 1e-2


class HostSyncCounter(TorchDispatchMode):
    """Counts ops that force a device-to-host synchronisation on CUDA."""

    SYNCING = frozenset(
        {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}
    )

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith("aten.index") and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for index in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])
        )
        if name in self.SYNCING or boolean_index:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("check_inputs", "expected_syncs"), [(True, 1), (False, 0)])
def test_host_syncs_in_a_training_step(check_inputs, expected_syncs):
    loss_fn = loss_for_case(CUB_CASE, torch.float32, check_inputs=check_inputs)
    embeddings, labels = cub_batch()
    embeddings.requires_grad_()
    with HostSyncCounter() as counter:
        loss_fn(embeddings, labels).backward()
    assert len(counter.syncs) == expected_syncs, counter.syncs


def test_host_sync_counter_sees_item():
    with HostSyncCounter() as counter:
        torch.ones(3).sum().item()
    assert counter.syncs == ["aten._local_scalar_dense.default"]


def test_a_step_runs_on_the_meta_device():
    """Every tensor of forward and backward follows the inputs' device (meta has no data)."""
    with torch.device("meta"):
        loss_fn = ProxyGMLLoss(100, 64, proxies_per_class=12, check_inputs=False)
        embeddings = torch.randn(32, 64, requires_grad=True)
        labels = torch.randint(0, 100, (32,))
        loss = loss_fn(embeddings, labels)
        loss.backward()
        logits = loss_fn.get_logits(embeddings)
    assert loss.device.type == "meta" and logits.shape == (32, 100)
    assert embeddings.grad.device.type == "meta" and loss_fn.proxies.grad.shape == (1200, 64)


@pytest.mark.parametrize("weight_lambda", [0.0, 0.3])
def test_a_step_creates_no_tensor_on_the_default_device(weight_lambda):
    """CPU inputs, default device meta: a tensor made without ``device=`` breaks the step."""
    loss_fn = ProxyGMLLoss(100, 64, proxies_per_class=12, weight_lambda=weight_lambda)
    embeddings = torch.randn(32, 64, requires_grad=True)
    labels = torch.randint(0, 100, (32,))
    with torch.device("meta"):
        loss_fn(embeddings, labels).backward()
        loss_fn.get_logits(embeddings)
    assert embeddings.grad.device.type == "cpu" and torch.isfinite(loss_fn.proxies.grad).all()


@pytest.mark.parametrize(
    ("sparse_proxy_grad", "dense_weights"),
    [(False, True), (False, False), (True, False)],
    ids=["dense gradient by a GEMM", "dense gradient by sorted bags", "sparse gradient"],
)
@pytest.mark.parametrize("given_norms", [False, True], ids=["own norms", "selection's norms"])
def test_sparse_backward_creates_no_tensor_on_the_default_device(
    sparse_proxy_grad, dense_weights, given_norms
):
    """Autograd runs backward outside the caller's device context, so call it directly."""
    embeddings, proxies = torch.randn(8, 16), torch.randn(40, 16)
    indices, values = gml.select_topk(embeddings, proxies, torch.arange(8), 4, 10)
    norms = gml.proxy_norms(proxies) if given_norms else None

    class SavedContext:
        saved_tensors = (embeddings, proxies, indices, values, norms)
        needs_input_grad = (True, True, False, False, False, False, False)

    SavedContext.sparse_proxy_grad = sparse_proxy_grad
    SavedContext.dense_weights = dense_weights

    with torch.device("meta"):
        grads = gml._KeptSimilarities.backward(SavedContext, torch.ones_like(values))
    assert [grad.device.type for grad in grads[:2]] == ["cpu", "cpu"]


def test_proxies_are_never_cast_in_place():
    loss_fn = ProxyGMLLoss(20, 8, proxies_per_class=2, r=0.2)
    parameter = loss_fn.proxies
    loss_fn(torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))
    assert loss_fn.proxies is parameter and parameter.dtype == torch.float32

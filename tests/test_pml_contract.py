"""ProxyGMLLoss behaves like every other pytorch-metric-learning loss."""

import copy
import io
import pickle

import pytest
import torch
import torch.distributed as dist
from pytorch_metric_learning import distances, miners, reducers, regularizers, trainers
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import distributed as pml_distributed
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

import pml_proxygml
from pml_proxygml import ProxyGMLLoss

NUM_CLASSES, DIM, BATCH = 8, 16, 24


def make_loss(**kwargs):
    torch.manual_seed(0)
    return ProxyGMLLoss(NUM_CLASSES, DIM, proxies_per_class=3, r=0.25, **kwargs)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(BATCH, DIM, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    return embeddings, labels


def sub_losses(embeddings, labels, indices_tuple=None, **kwargs):
    """Per-sample classification losses and lambda * L^p, read through DoNothingReducer."""
    loss_dict = make_loss(reducer=reducers.DoNothingReducer(), **kwargs)(
        embeddings, labels, indices_tuple
    )
    return loss_dict["loss"]["losses"], loss_dict["proxy_reg_loss"]["losses"]


def test_is_a_pml_loss_and_importable_everywhere():
    assert issubclass(ProxyGMLLoss, pml_losses.BaseMetricLossFunction)
    assert pml_proxygml.losses.ProxyGMLLoss is ProxyGMLLoss
    assert pml_losses.ProxyGMLLoss is ProxyGMLLoss
    import importlib

    importlib.reload(pml_proxygml)  # registering again is harmless
    assert pml_losses.ProxyGMLLoss is pml_proxygml.ProxyGMLLoss


def test_proxies_layout_and_official_init_scale():
    loss_fn = ProxyGMLLoss(100, 512, proxies_per_class=12)
    names = [name for name, _ in loss_fn.named_parameters()]
    assert names == ["proxies"]
    assert loss_fn.proxies.shape == (1200, 512) and loss_fn.proxies.dtype == torch.float32
    bound = 1 / 1200**0.5
    assert loss_fn.proxies.abs().max() <= bound
    assert loss_fn.proxies.abs().max() > 0.99 * bound  # uniform over the whole interval
    assert abs(loss_fn.proxies.std().item() - bound / 3**0.5) < 1e-3


def test_defaults_are_the_official_cub_recipe():
    loss_fn = ProxyGMLLoss(100, 512)
    assert (loss_fn.proxies_per_class, loss_fn.weight_lambda) == (12, 0.3)
    assert loss_fn.r is None and loss_fn.top_k == 60 == ProxyGMLLoss(100, 512, r=0.05).top_k


def test_warns_about_degenerate_k_and_costly_regularizer():
    with pytest.warns(UserWarning, match="no proxy of another class"):
        ProxyGMLLoss(10, 8, r=0.05)  # k = ceil(0.05 * 120) = 6 < N = 12
    with pytest.warns(UserWarning, match="weight_lambda=0"):
        ProxyGMLLoss(20000, 512, proxies_per_class=1, r=0.001)


def expected_mean(per_sample, reg):
    return per_sample.mean() + reg


REDUCER_CASES = {
    "MeanReducer": (reducers.MeanReducer(), expected_mean),
    "SumReducer": (reducers.SumReducer(), lambda losses, reg: losses.sum() + reg),
    "AvgNonZeroReducer": (
        reducers.AvgNonZeroReducer(),
        lambda losses, reg: losses[losses > 0].mean() + reg,
    ),
    "DivisorReducer": (reducers.DivisorReducer(), expected_mean),
    "ThresholdReducer": (
        reducers.ThresholdReducer(low=0.5),
        lambda losses, reg: losses[losses > 0.5].mean() + reg,
    ),
    "PerAnchorReducer": (reducers.PerAnchorReducer(), expected_mean),
}


@pytest.mark.parametrize("name", [*REDUCER_CASES, "ClassWeightedReducer"])
def test_double_proxies_give_a_float64_loss_through_every_reducer(batch, name):
    """float32 embeddings, .double() proxies: computed and returned in float64."""
    embeddings, labels = batch
    if name == "ClassWeightedReducer":
        reducer = reducers.ClassWeightedReducer(torch.linspace(0.1, 2.0, NUM_CLASSES))
    else:
        reducer = REDUCER_CASES[name][0]
    loss_fn = make_loss(reducer=reducer).double()
    loss = loss_fn(embeddings, labels)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, loss_fn(embeddings.double(), labels), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(REDUCER_CASES))
def test_reducers(batch, name):
    reducer, expected = REDUCER_CASES[name]
    per_sample, reg = sub_losses(*batch)
    loss = make_loss(reducer=reducer)(*batch)
    torch.testing.assert_close(loss, expected(per_sample, reg))


def test_class_weighted_reducer(batch):
    embeddings, labels = batch
    weights = torch.linspace(0.1, 2.0, NUM_CLASSES)
    per_sample, reg = sub_losses(embeddings, labels)
    loss = make_loss(reducer=reducers.ClassWeightedReducer(weights))(embeddings, labels)
    torch.testing.assert_close(loss, (per_sample * weights[labels]).mean() + reg)


def test_every_pml_reducer_is_covered():
    covered = set(REDUCER_CASES) | {
        "ClassWeightedReducer",
        "DoNothingReducer",
        "MultipleReducers",
        "BaseReducer",
    }
    available = {
        name
        for name, value in vars(reducers).items()
        if isinstance(value, type) and issubclass(value, reducers.BaseReducer)
    }
    assert available <= covered


def test_do_nothing_and_multiple_reducers(batch):
    loss_dict = make_loss(reducer=reducers.DoNothingReducer())(*batch)
    assert set(loss_dict) == {"loss", "proxy_reg_loss"}
    assert loss_dict["loss"]["losses"].shape == (BATCH,)
    assert loss_dict["proxy_reg_loss"]["reduction_type"] == "already_reduced"
    per_sample, reg = sub_losses(*batch)
    custom = reducers.MultipleReducers(
        {"loss": reducers.SumReducer(), "proxy_reg_loss": reducers.MeanReducer()}
    )
    torch.testing.assert_close(make_loss(reducer=custom)(*batch), per_sample.sum() + reg)


def test_sampled_regularizer_is_unbiased(batch):
    exact = sub_losses(*batch)[1]
    torch.manual_seed(0)
    loss_fn = make_loss(reducer=reducers.DoNothingReducer(), regularizer_samples=5)
    samples = torch.stack([loss_fn(*batch)["proxy_reg_loss"]["losses"] for _ in range(400)])
    standard_error = samples.std() / len(samples) ** 0.5
    assert samples.std() > 0  # it does sample
    assert abs(samples.mean() - exact) < 4 * standard_error
    all_rows = make_loss(reducer=reducers.DoNothingReducer(), regularizer_samples=10**6)
    torch.testing.assert_close(all_rows(*batch)["proxy_reg_loss"]["losses"], exact)


def test_sparse_proxy_grad_for_sparse_adam(batch):
    embeddings, labels = batch[0][:3], batch[1][:3]  # 3 samples keep 6 of the 24 proxies each
    dense = make_loss(weight_lambda=0.0)
    dense(embeddings, labels).backward()
    sparse = make_loss(weight_lambda=0.0, sparse_proxy_grad=True)
    sparse(embeddings, labels).backward()
    grad = sparse.proxies.grad
    assert grad.is_sparse
    touched = grad.coalesce().indices()[0]
    assert 0 < len(touched) < len(sparse.proxies)
    torch.testing.assert_close(grad.to_dense(), dense.proxies.grad)

    before = sparse.proxies.detach().clone()
    torch.optim.SparseAdam(sparse.parameters(), lr=0.1).step()
    moved = (sparse.proxies.detach() != before).any(dim=1)
    assert torch.equal(moved.nonzero().flatten(), touched)


def test_sparse_proxy_grad_refuses_dense_proxy_terms():
    with pytest.raises(ValueError, match="sparse_proxy_grad=True needs weight_lambda=0"):
        make_loss(sparse_proxy_grad=True)
    with pytest.raises(ValueError, match="no weight_regularizer"):
        make_loss(
            weight_lambda=0.0,
            sparse_proxy_grad=True,
            weight_regularizer=regularizers.LpRegularizer(),
        )


def test_lambda_zero_reports_a_zero_regularizer(batch):
    per_sample, reg = sub_losses(*batch, weight_lambda=0.0)
    assert reg == 0
    torch.testing.assert_close(make_loss(weight_lambda=0.0)(*batch), per_sample.mean())


def test_embedding_and_weight_regularizers(batch):
    embeddings, labels = batch
    base = make_loss()(embeddings, labels)
    with_embedding_reg = make_loss(
        embedding_regularizer=regularizers.LpRegularizer(), embedding_reg_weight=0.5
    )(embeddings, labels)
    embedding_norms = embeddings.norm(dim=1).mean()
    torch.testing.assert_close(with_embedding_reg, base + 0.5 * embedding_norms)

    loss_fn = make_loss(
        weight_regularizer=regularizers.RegularFaceRegularizer(), weight_reg_weight=0.1
    )
    with_weight_reg = loss_fn(embeddings, labels)
    expected = base + 0.1 * regularizers.RegularFaceRegularizer()(loss_fn.proxies)
    torch.testing.assert_close(with_weight_reg, expected)
    with_weight_reg.backward()
    assert loss_fn.proxies.grad is not None


@pytest.mark.parametrize(
    "miner",
    [miners.TripletMarginMiner(margin=0.2), miners.MultiSimilarityMiner()],
    ids=["triplets", "pairs"],
)
def test_miner_indices_tuple_weights_samples(batch, miner):
    embeddings, labels = batch
    indices_tuple = miner(embeddings, labels)
    assert len(indices_tuple[0]) > 0
    per_sample, reg = sub_losses(embeddings, labels)
    weights = lmu.convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
    assert not torch.all(weights == 1)
    loss = make_loss()(embeddings, labels, indices_tuple)
    torch.testing.assert_close(loss, (per_sample * weights).mean() + reg)


def test_empty_indices_tuple_equals_none(batch):
    embeddings, labels = batch
    expected = make_loss()(embeddings, labels)
    empty_pairs = tuple(torch.empty(0, dtype=torch.long) for _ in range(4))
    for indices_tuple in [(), empty_pairs]:
        torch.testing.assert_close(make_loss()(embeddings, labels, indices_tuple), expected)


def test_ref_emb_and_missing_labels_raise_pmls_errors(batch):
    embeddings, labels = batch
    with pytest.raises(ValueError, match="ref_emb is not supported for this loss function"):
        make_loss()(embeddings, labels, ref_emb=embeddings.clone(), ref_labels=labels)
    with pytest.raises(ValueError, match="labels are required for this loss function"):
        make_loss()(embeddings)
    pairs = lmu.get_all_pairs_indices(labels)
    with pytest.raises(ValueError, match="labels are required"):
        make_loss()(embeddings, indices_tuple=pairs)


def test_get_logits_sums_the_k_most_similar_proxies(batch):
    embeddings, _ = batch
    loss_fn = make_loss().double()
    embeddings = embeddings.double()
    logits = loss_fn.get_logits(embeddings)
    assert logits.shape == (BATCH, NUM_CLASSES)
    unit = torch.nn.functional.normalize
    similarities = unit(embeddings, dim=1) @ unit(loss_fn.proxies, dim=1).T
    per_proxy = similarities.view(BATCH, NUM_CLASSES, 3)
    kth_best = similarities.topk(loss_fn.top_k, dim=1).values[:, -1:]
    kept = per_proxy >= kth_best.unsqueeze(2)
    expected = (per_proxy * kept).sum(dim=2).masked_fill(~kept.any(dim=2), float("-inf"))
    torch.testing.assert_close(logits, expected)
    logits.masked_fill(logits.isinf(), 0).sum().backward()
    assert loss_fn.proxies.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="embeddings must have shape"):
        loss_fn.get_logits(embeddings[:, :5])


def test_collect_stats(batch):
    loss_fn = make_loss(collect_stats=True, distance=distances.CosineSimilarity(collect_stats=True))
    loss_fn(*batch)
    assert 1 <= loss_fn.avg_classes_per_subgraph <= loss_fn.top_k
    assert loss_fn.proxy_reg_value > 0
    assert loss_fn.distance.initial_avg_query_norm > 0
    assert abs(loss_fn.distance.final_avg_ref_norm - 1) < 1e-6


def test_multiple_losses(batch):
    combined = pml_losses.MultipleLosses(
        [make_loss(), pml_losses.ContrastiveLoss()], weights=[1, 2]
    )
    expected = make_loss()(*batch) + 2 * pml_losses.ContrastiveLoss()(*batch)
    torch.testing.assert_close(combined(*batch), expected)


def test_state_dict_to_deepcopy_pickle_and_torch_save(batch, tmp_path):
    loss_fn = make_loss()
    expected = loss_fn(*batch)
    state = loss_fn.state_dict()
    assert list(state) == ["proxies", "_extra_state"]
    assert state["_extra_state"] == {"num_classes": 8, "proxies_per_class": 3, "embedding_size": 16}
    fresh = ProxyGMLLoss(NUM_CLASSES, DIM, proxies_per_class=3, r=0.25)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(*batch), expected)

    for clone in [copy.deepcopy(loss_fn), pickle.loads(pickle.dumps(loss_fn))]:
        torch.testing.assert_close(clone(*batch), expected)
    buffer = io.BytesIO()
    torch.save(loss_fn, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(*batch), expected)

    as_double = copy.deepcopy(loss_fn).to(torch.float64)
    assert as_double.proxies.dtype == torch.float64
    embeddings, labels = batch
    torch.testing.assert_close(as_double(embeddings.double(), labels), expected.double())


def test_distributed_loss_wrapper_single_process(batch, tmp_path):
    wrapped = pml_distributed.DistributedLossWrapper(make_loss())
    expected = make_loss()(*batch)
    with pytest.warns(UserWarning, match="non-distributed"):
        torch.testing.assert_close(wrapped(*batch), expected)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.testing.assert_close(wrapped(*batch), expected)
    finally:
        dist.destroy_process_group()


def test_metric_loss_only_trainer_moves_the_proxies():
    torch.manual_seed(0)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(8)
    data = torch.randn(NUM_CLASSES, DIM)[labels] + 0.1 * torch.randn(len(labels), DIM)
    trunk, embedder = torch.nn.Linear(DIM, DIM), torch.nn.Linear(DIM, DIM)
    loss_fn = make_loss()
    before = loss_fn.proxies.detach().clone()
    losses = []
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={
            "trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.01),
            "embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.01),
            "metric_loss_optimizer": torch.optim.Adam(loss_fn.parameters(), lr=0.05),
        },
        batch_size=16,
        loss_funcs={"metric_loss": loss_fn},
        dataset=torch.utils.data.TensorDataset(data, labels),
        dataloader_num_workers=0,
        end_of_iteration_hook=lambda t: losses.append(t.losses["metric_loss"].item()),
    )
    trainer.train(num_epochs=3)
    assert not torch.allclose(loss_fn.proxies.detach(), before)
    assert len(losses) == 12 and losses[-1] < losses[0]

"""The regulariser's cheaper estimators (``regularizer_estimator``) against the exact one.

The reference is the official dense regulariser, written here literally: the (CN, CN) cosine
matrix times the (CN, C) one-hot, then a cross-entropy. Sampled estimators are checked in
expectation twice: exactly, by averaging the functional estimate over every subset of rows,
and statistically through the loss (its own random rows), where every mean over draws must
lie within ``Z_TOLERANCE`` standard errors (computed from the draws) of the exact value.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
import torch.nn.functional as F

from pml_proxygml import ProxyGMLLoss
from pml_proxygml import functional as gml

C, N, D, B = 6, 3, 4, 8
LAMBDA = 0.3
# |mean - exact| <= Z_TOLERANCE * standard error, for each of the 1 + C*N*D checked numbers:
# a false alarm has probability about 1e-4 per run at 5 standard errors (and the draws are
# seeded, so a pass is reproducible).
Z_TOLERANCE = 5.0


def dense_regularizer(raw_proxies: torch.Tensor) -> torch.Tensor:
    """The official L^p: CE((P_hat P_hat^T) onehot, class), all proxies."""
    unit = F.normalize(raw_proxies, dim=1)
    classes = torch.arange(len(raw_proxies)) // N
    one_hot = F.one_hot(classes, len(raw_proxies) // N).to(unit.dtype)
    return F.cross_entropy(unit @ unit.T @ one_hot, classes)


def exact_value_and_gradient(raw_proxies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    proxies = raw_proxies.detach().clone().requires_grad_()
    value = dense_regularizer(proxies)
    (gradient,) = torch.autograd.grad(value, proxies)
    return value.detach(), gradient


def make_loss(**kwargs) -> ProxyGMLLoss:
    torch.manual_seed(0)
    return ProxyGMLLoss(C, D, N, top_k=5, weight_lambda=LAMBDA, **kwargs).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, dtype=torch.float64, generator=generator)
    return x, torch.randint(0, C, (B,), generator=generator)


def random_proxies(seed: int) -> torch.Tensor:
    return torch.randn(C * N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def regularizer_step(loss: ProxyGMLLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's regulariser estimate (divided by lambda) and its proxy gradient."""
    x, y = batch()
    reg = loss.compute_loss(x, y, None, x, y)["proxy_reg_loss"]
    value = reg["losses"] / LAMBDA if torch.is_tensor(reg["losses"]) else None
    if value is None or not value.requires_grad:  # PML's zero_loss: nothing this step
        return torch.zeros((), dtype=torch.float64), torch.zeros_like(loss.proxies)
    (gradient,) = torch.autograd.grad(value, loss.proxies)
    return value.detach(), gradient


def set_proxies(loss: ProxyGMLLoss, raw: torch.Tensor) -> None:
    with torch.no_grad():
        loss.proxies.copy_(raw)


def assert_unbiased(draws: list[tuple[torch.Tensor, torch.Tensor]], raw: torch.Tensor) -> None:
    """Mean value and gradient over the draws within Z_TOLERANCE standard errors of exact."""
    exact = exact_value_and_gradient(raw)
    for samples, target in zip(zip(*draws), exact):
        samples = torch.stack(samples).reshape(len(samples), -1)
        mean, error = samples.mean(0), samples.std(0) / len(samples) ** 0.5
        target = target.flatten()
        assert error.max() > 0, "the estimate does not vary: this test would not catch a bias"
        deviation = (mean - target).abs()
        assert (deviation <= Z_TOLERANCE * error + 1e-12).all(), (
            f"worst deviation {(deviation / error.clamp_min(1e-300)).max():.1f} standard errors"
        )


# ----------------------------------------------------------------------------- functional


def test_value_and_gradient_match_the_dense_regularizer():
    raw = random_proxies(2)
    value, gradient = gml.regularizer_value_and_gradient(F.normalize(raw, dim=1), N)
    exact, exact_gradient = exact_value_and_gradient(raw)
    torch.testing.assert_close(value, exact, rtol=1e-12, atol=0)
    proxies = raw.clone().requires_grad_()
    chained = torch.autograd.grad(F.normalize(proxies, dim=1), proxies, gradient)[0]
    torch.testing.assert_close(chained, exact_gradient, rtol=1e-10, atol=1e-14)


def test_linearized_regularizer_is_the_first_order_expansion_around_the_anchor():
    anchor_raw, raw = random_proxies(3), random_proxies(4)
    raw[5] = 0  # F.normalize's clamp: p / eps, no radial term
    anchor = F.normalize(anchor_raw, dim=1)
    value, gradient = gml.regularizer_value_and_gradient(anchor, N)
    proxies = raw.clone().requires_grad_()
    estimate = gml.linearized_regularizer(proxies, anchor, value, gradient)
    unit = F.normalize(raw, dim=1)
    expected = dense_regularizer(anchor_raw) + (gradient * (unit - anchor)).sum()
    torch.testing.assert_close(estimate.detach(), expected, rtol=1e-12, atol=0)
    (applied,) = torch.autograd.grad(estimate, proxies)
    expected_gradient = torch.autograd.grad(F.normalize(proxies, dim=1), proxies, gradient)[0]
    torch.testing.assert_close(applied, expected_gradient, rtol=1e-12, atol=1e-15)
    assert applied[5].abs().sum() > 0


def anchored_at(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised proxies, exact value, exact gradient) at ``raw``: an svrg anchor."""
    unit = F.normalize(raw, dim=1)
    return (unit, *gml.regularizer_value_and_gradient(unit, N))


def sampled_estimate(sampler: str, proxies: torch.Tensor, rows: torch.Tensor, anchor: tuple):
    if sampler == "uniform":
        return gml.proxy_regularizer(F.normalize(proxies, dim=1), N, rows=rows)
    return gml.variance_reduced_regularizer(proxies, *anchor, N, rows)


@pytest.mark.parametrize("sampler", ["uniform", "svrg"])
def test_sampled_estimates_average_to_the_exact_regularizer_over_every_subset(sampler):
    """Uniform rows without replacement: every subset of 4 of the 18 rows equally likely."""
    anchor = anchored_at(random_proxies(5))
    raw = random_proxies(6)
    values, gradients = [], []
    for rows in itertools.combinations(range(C * N), 4):
        proxies = raw.clone().requires_grad_()
        estimate = sampled_estimate(sampler, proxies, torch.tensor(rows), anchor)
        values.append(estimate.detach())
        gradients.append(torch.autograd.grad(estimate, proxies)[0])
    exact, exact_gradient = exact_value_and_gradient(raw)
    torch.testing.assert_close(torch.stack(values).mean(), exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(
        torch.stack(gradients).mean(0), exact_gradient, rtol=1e-9, atol=1e-13
    )
    assert torch.stack(values).std() > 1e-3  # each subset's estimate is not the mean


def test_svrg_has_far_less_variance_than_uniform_rows_near_its_anchor():
    anchor_raw = random_proxies(7)
    raw = anchor_raw + 0.05 * random_proxies(8)  # a few optimizer steps away
    anchor = anchored_at(anchor_raw)
    exact_gradient = exact_value_and_gradient(raw)[1]
    errors = {"uniform": [], "svrg": []}
    for rows in itertools.islice(itertools.combinations(range(C * N), 4), 0, None, 50):
        for sampler in errors:
            proxies = raw.clone().requires_grad_()
            estimate = sampled_estimate(sampler, proxies, torch.tensor(rows), anchor)
            gradient = torch.autograd.grad(estimate, proxies)[0]
            errors[sampler].append((gradient - exact_gradient).norm() / exact_gradient.norm())
    uniform, svrg = (torch.stack(errors[name]).mean() for name in ("uniform", "svrg"))
    assert svrg < 0.2 * uniform, (svrg, uniform)


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("estimator", ["lazy", "cached", "svrg"])
@pytest.mark.parametrize("period", [1, 4])
def test_periodic_estimators_sum_to_the_period_times_exact_over_a_cycle(estimator, period):
    """At fixed proxies, the m steps of a cycle apply m times the exact value and gradient."""
    samples = {"regularizer_samples": 5} if estimator == "svrg" else {}
    loss = make_loss(regularizer_estimator=estimator, regularizer_period=period, **samples)
    raw = random_proxies(9)
    set_proxies(loss, raw)
    exact, exact_gradient = exact_value_and_gradient(raw)
    for _ in range(2):  # two cycles: the second starts from a refreshed cache
        steps = [regularizer_step(loss) for _ in range(period)]
        total = torch.stack([value for value, _ in steps]).sum()
        total_gradient = torch.stack([gradient for _, gradient in steps]).sum(0)
        torch.testing.assert_close(total, period * exact, rtol=1e-12, atol=0)
        torch.testing.assert_close(total_gradient, period * exact_gradient, rtol=1e-10, atol=1e-14)


def test_lazy_applies_the_period_times_exact_on_the_first_step_of_each_cycle_only():
    loss = make_loss(regularizer_estimator="lazy", regularizer_period=3)
    exact_values = []
    for step in range(7):
        raw = random_proxies(10 + step)
        set_proxies(loss, raw)
        value, gradient = regularizer_step(loss)
        exact, exact_gradient = exact_value_and_gradient(raw)
        exact_values.append(exact)
        expected_weight = 3.0 if step % 3 == 0 else 0.0
        torch.testing.assert_close(value, expected_weight * exact, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            gradient, expected_weight * exact_gradient, rtol=1e-10, atol=1e-14
        )
    assert int(loss.regularizer_step) == 7


def test_cached_applies_the_last_exact_gradient_through_the_current_normalization():
    loss = make_loss(regularizer_estimator="cached", regularizer_period=3)
    anchor_raw = random_proxies(20)
    set_proxies(loss, anchor_raw)
    regularizer_step(loss)  # step 0 refreshes the cache at anchor_raw
    anchor = F.normalize(anchor_raw, dim=1)
    anchor_value, anchor_gradient = exact_value_and_gradient(anchor_raw)
    anchor_unit_gradient = gml.regularizer_value_and_gradient(anchor, N)[1]
    for step in (1, 2):
        raw = random_proxies(20 + step)
        set_proxies(loss, raw)
        value, gradient = regularizer_step(loss)
        unit = F.normalize(raw, dim=1)
        torch.testing.assert_close(
            value, anchor_value + (anchor_unit_gradient * (unit - anchor)).sum(), rtol=1e-12, atol=0
        )
        proxies = raw.clone().requires_grad_()
        expected = torch.autograd.grad(F.normalize(proxies, dim=1), proxies, anchor_unit_gradient)
        torch.testing.assert_close(gradient, expected[0], rtol=1e-10, atol=1e-14)
        assert not torch.allclose(gradient, anchor_gradient)  # the normalisation is the current one


@pytest.mark.parametrize(
    "estimator, kwargs",
    [("uniform", {"regularizer_samples": 4}), ("svrg", {"regularizer_samples": 4})],
)
def test_sampled_estimators_of_the_loss_are_unbiased_statistically(estimator, kwargs):
    """Mean over 600 of the loss's own draws within Z_TOLERANCE standard errors of exact."""
    period = {"regularizer_period": 1000} if estimator == "svrg" else {}
    loss = make_loss(regularizer_estimator=estimator, **kwargs, **period)
    set_proxies(loss, random_proxies(30))
    regularizer_step(loss)  # svrg: the anchor, here
    raw = random_proxies(30) + 0.3 * random_proxies(31)
    set_proxies(loss, raw)
    torch.manual_seed(2)
    assert_unbiased([regularizer_step(loss) for _ in range(600)], raw)


def test_regularizer_samples_alone_still_means_uniform_rows():
    loss = make_loss(regularizer_samples=4)
    assert loss.regularizer_estimator == "uniform"
    assert make_loss().regularizer_estimator == "exact"
    # No estimator buffers: the proxies and their layout only, so old checkpoints still load.
    assert list(make_loss().state_dict()) == ["proxies", "_extra_state"]


def test_calls_without_gradients_take_no_step_and_report_the_exact_value():
    loss = make_loss(regularizer_estimator="lazy", regularizer_period=4)
    raw = random_proxies(40)
    set_proxies(loss, raw)
    x, y = batch()
    with torch.no_grad():
        reg = loss.compute_loss(x, y, None, x, y)["proxy_reg_loss"]["losses"]
    torch.testing.assert_close(reg / LAMBDA, exact_value_and_gradient(raw)[0])
    assert int(loss.regularizer_step) == 0


def test_sharing_the_loss_state_in_float32_and_float64():
    """Buffers follow ``.double()``; a float32 loss estimates what the float64 one does."""
    loss32 = ProxyGMLLoss(C, D, N, top_k=5, regularizer_estimator="cached", regularizer_period=2)
    loss64 = copy.deepcopy(loss32).double()
    assert loss64.regularizer_anchor_gradient.dtype == torch.float64
    x, y = batch()
    for _ in range(3):
        torch.testing.assert_close(loss32(x.float(), y), loss64(x, y).float(), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- resuming


def train(loss: ProxyGMLLoss, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    x, y = batch()
    values = []
    for _ in range(steps):
        optimizer.zero_grad()
        total = loss(x, y)
        total.backward()
        optimizer.step()
        values.append(total.item())
    return values


def adam(loss: ProxyGMLLoss) -> torch.optim.Optimizer:
    return torch.optim.Adam(loss.parameters(), lr=0.05, eps=0.01)


@pytest.mark.parametrize(
    "estimator, kwargs",
    [("lazy", {}), ("cached", {}), ("svrg", {"regularizer_samples": 5})],
)
def test_resuming_mid_cycle_equals_an_uninterrupted_run(estimator, kwargs):
    settings = dict(regularizer_estimator=estimator, regularizer_period=4, **kwargs)
    torch.manual_seed(3)
    uninterrupted = make_loss(**settings)
    optimizer = adam(uninterrupted)
    torch.manual_seed(4)
    expected = train(uninterrupted, optimizer, 10)

    torch.manual_seed(3)
    first = make_loss(**settings)
    first_optimizer = adam(first)
    torch.manual_seed(4)
    values = train(first, first_optimizer, 6)  # stops at step 6 of 10: mid-cycle
    buffer = io.BytesIO()
    torch.save(
        {
            "loss": first.state_dict(),
            "optimizer": first_optimizer.state_dict(),
            "rng": torch.get_rng_state(),
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = ProxyGMLLoss(C, D, N, top_k=5, weight_lambda=LAMBDA, **settings).double()
    resumed.load_state_dict(checkpoint["loss"])
    assert int(resumed.regularizer_step) == 6
    resumed_optimizer = adam(resumed)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    values += train(resumed, resumed_optimizer, 4)
    assert values == expected
    assert torch.equal(resumed.proxies, uninterrupted.proxies)


def test_a_resumed_lazy_schedule_continues_mid_cycle_and_not_from_its_start():
    trained = make_loss(regularizer_estimator="lazy", regularizer_period=4)
    for _ in range(2):
        regularizer_step(trained)
    fresh = make_loss(regularizer_estimator="lazy", regularizer_period=4)
    container = torch.nn.ModuleDict({"loss": fresh})  # loaded through a parent module
    container.load_state_dict({"loss." + key: value for key, value in trained.state_dict().items()})
    resumed = container["loss"]
    weights = []
    for _ in range(4):  # steps 2, 3, 4, 5: only step 4 starts a cycle
        value, _ = regularizer_step(resumed)
        weights.append(bool(value != 0))
    assert weights == [False, False, True, False]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(regularizer_estimator="stochastic"), "regularizer_estimator must be one of"),
        (dict(regularizer_estimator=1), "regularizer_estimator must be one of"),
        (dict(regularizer_estimator="lazy", regularizer_period=True), "regularizer_period must"),
        (dict(regularizer_estimator="lazy", regularizer_period=0), "regularizer_period must"),
        (dict(regularizer_estimator="lazy", regularizer_period=2.0), "regularizer_period must"),
        (dict(regularizer_estimator="exact", regularizer_period=4), "regularizer_period applies"),
        (dict(regularizer_samples=4, regularizer_period=4), "regularizer_period applies"),
        (dict(regularizer_estimator="svrg"), "regularizer_samples is needed by, and only by"),
        (dict(regularizer_estimator="uniform"), "regularizer_samples is needed by, and only by"),
        (
            dict(regularizer_estimator="cached", regularizer_samples=4),
            "regularizer_samples is needed by, and only by",
        ),
        (
            dict(regularizer_estimator="exact", regularizer_samples=4),
            "regularizer_samples is needed by, and only by",
        ),
        (
            dict(regularizer_estimator="svrg", regularizer_samples=True),
            "regularizer_samples must be a positive integer",
        ),
        (dict(regularizer_estimator="lazy", weight_lambda=0.0), "needs weight_lambda > 0"),
        (
            dict(regularizer_estimator="cached", sparse_proxy_grad=True),
            "sparse_proxy_grad=True needs weight_lambda=0",
        ),
        (
            dict(regularizer_estimator="cached", sparse_proxy_grad=True, weight_lambda=0.0),
            "needs weight_lambda > 0",
        ),
    ],
)
def test_bad_estimator_options_are_rejected_with_a_clear_error(kwargs, message):
    arguments = dict(weight_lambda=LAMBDA, top_k=5) | kwargs
    with pytest.raises(ValueError, match=message):
        ProxyGMLLoss(C, D, N, **arguments)


# ----------------------------------------------------------------------------- the benchmark


@pytest.mark.parametrize(
    "estimator, period", [("exact", None), ("lazy", 3), ("cached", 3), ("svrg", 3)]
)
def test_the_benchmark_measures_the_gradient_the_loss_applies(estimator, period):
    """benchmarks.regularizer_estimators rebuilds each estimator from functional's pieces;
    on the deterministic steps (all but svrg's sampled ones) it must apply what the loss does."""
    from benchmarks import regularizer_estimators as bench

    setting = bench.Setting(estimator, period, 5 if estimator == "svrg" else None)
    loss = ProxyGMLLoss(C, D, N, top_k=5, **setting.loss_kwargs(LAMBDA)).double()
    shape = bench.Shape("tiny", C, N, D, batch_size=B, r=0.05, weight_lambda=LAMBDA)
    applied = bench.AppliedGradient(setting, shape, seed=0)
    for step in range(7):
        raw = random_proxies(50 + step)
        set_proxies(loss, raw)
        unit = F.normalize(raw, dim=1)
        value, unit_gradient = gml.regularizer_value_and_gradient(unit, N)
        exact = bench.Exact(unit, value, unit_gradient, exact_value_and_gradient(raw)[1])
        expected = applied(step, raw, exact)
        actual = regularizer_step(loss)[1]
        if estimator != "svrg" or step % period == 0:
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)


def test_the_benchmark_meter_on_a_short_synthetic_run():
    """Exact gives the real Adam update; lazy's cosine is 1 on a period's first step, else 0."""
    from benchmarks import regularizer_estimators as bench
    from benchmarks.core import recipes

    settings = [bench.Setting("exact"), bench.Setting("lazy", 4), bench.Setting("cached", 4)]
    shape = bench.Shape("tiny", 20, 2, 8, batch_size=32, r=0.05, weight_lambda=0.3)
    sop_optimizer = recipes.load_recipe("sop_512").plan("proxygml", 0).loss_optimizer
    meter, trajectory = bench.synthetic_trajectory(
        settings, shape, sop_optimizer, 8, warmup=3, seed=0
    )
    rows = {row["setting"]: row for row in meter.summary([None])}
    assert trajectory["steps"] == 8
    assert rows["exact"]["cosine_mean"] == pytest.approx(1.0)
    assert rows["exact"]["adam_relative_error_mean"] < 1e-5
    assert rows["lazy m=4"]["cosine_mean"] == pytest.approx(2 / 8)
    assert rows["lazy m=4"]["relative_error_mean"] == pytest.approx((2 * 3 + 6 * 1) / 8)
    assert (
        0
        < rows["cached m=4"]["adam_relative_error_mean"]
        < rows["lazy m=4"]["adam_relative_error_mean"]
    )


@pytest.mark.parametrize(
    "variant, estimator", [("proxygml_cached", "cached"), ("proxygml_lazy", "lazy")]
)
def test_cheaper_regulariser_losses_are_proxygml_with_their_estimator_in_every_recipe(
    variant, estimator, capsys
):
    from benchmarks import run
    from benchmarks.core import recipes, registry
    from benchmarks.core.errors import RecipeError

    for name in recipes.names():
        recipe = recipes.load_recipe(name)
        if "proxygml" not in recipe.losses:
            with pytest.raises(RecipeError, match=f"no settings for loss '{variant}'"):
                recipe.loss(variant)
            continue
        base, config = recipe.loss("proxygml"), recipe.loss(variant)
        expected = {**base.settings, "regularizer_estimator": estimator, "regularizer_period": 16}
        assert config.settings == expected
        assert (config.optimizer, config.source) == (base.optimizer, base.source)
        assert recipe.plan(variant, 0) == recipe.plan("proxygml", 0)
        # A variant runs by default only where the recipe names it (emoji_quick does).
        assert (variant in recipe.losses_to_run) == (variant in recipe.default_losses)
    settings = recipes.load_recipe("emoji").loss(variant).settings
    loss = registry.build_loss(variant, 10, 8, settings)
    assert (loss.regularizer_estimator, loss.regularizer_period) == (estimator, 16)
    assert (loss.proxies_per_class, loss.r, loss.weight_lambda) == (12, 0.05, 0.3)
    assert run.main(["--recipe", "emoji", "--loss", variant, "--show"]) == 0
    assert "proxygml" in capsys.readouterr().out


def test_the_benchmark_runs_end_to_end_on_tiny_recipes(tmp_path, capsys):
    """The whole script on fake emoji data and tiny recipes that extend the shipped ones."""
    import json

    from benchmarks import regularizer_estimators as bench
    from tests.benchmarks.fakes import write_fake_emoji

    data = write_fake_emoji(tmp_path / "emoji")  # 4 training classes of 3 images
    tiny_emoji = {
        "extends": "emoji",
        "data": {"resize": 12, "crop": 12},
        "model": {"embedding_size": 8},
        "train": {"batch_size": 4},
        "losses": {"proxygml": {"settings": {"proxies_per_class": 2, "r": 0.5}}},
    }
    tiny_sop = {
        "extends": "sop_512",
        "dataset": {"train_classes": 20},
        "model": {"embedding_size": 8},
    }
    for name, recipe in (("tiny_emoji", tiny_emoji), ("tiny_sop", tiny_sop)):
        (tmp_path / f"{name}.json").write_text(json.dumps(recipe))
    out = tmp_path / "out"
    argv = [
        *("--recipe", str(tmp_path / "tiny_emoji.json"), "--data-root", str(data)),
        *("--sop-recipe", str(tmp_path / "tiny_sop.json"), "--out", str(out)),
        *("--epochs", "1", "--sop-steps", "4", "--sop-warmup", "2"),
        *("--emoji-rounds", "1", "--sop-rounds", "1"),
    ]
    assert bench.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    emoji, sop = results["shapes"]["emoji"], results["shapes"]["sop"]
    assert emoji["shape"] == {
        "name": "emoji",
        "num_classes": 4,
        "proxies_per_class": 2,
        "embedding_size": 8,
        "batch_size": 4,
        "r": 0.5,
        "weight_lambda": 0.3,
    }
    assert emoji["trajectory"]["steps"] == 3 and sop["trajectory"]["steps"] == 4
    assert sop["shape"]["num_classes"] == 20 and sop["shape"]["proxies_per_class"] == 1
    assert sop["trajectory"]["proxy_optimizer"]["lr"] == 0.3
    for result in (emoji, sop):
        exact = next(e for e in result["errors"] if e["setting"] == "exact")
        assert exact["cosine_mean"] == pytest.approx(1.0)
        timed = {row["setting"] for row in result["timing"]}
        assert {"none", "exact", "cached m=16"} <= timed
    assert results["environment"]["command"].startswith("python -m benchmarks.regularizer_")
    assert "## sop: all 4 steps" in (out / "results.md").read_text()

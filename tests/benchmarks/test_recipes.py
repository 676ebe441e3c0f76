"""Recipes as data: the shipped recipes hold the official values, ``extends`` and ``--set``
work, epoch lists parse, and recipes cite no file the repository lacks."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.core import recipes, registry
from benchmarks.core.errors import RecipeError
from benchmarks.core.harness import OptimizerSpec


def test_every_shipped_recipe_loads() -> None:
    names = recipes.names()
    expected = [f"{d}_{n}" for d in ("cars", "cub", "sop") for n in (384, 512, 64)]
    expected += [f"proxyanchor_{d}_512" for d in ("cars", "cub", "sop")]
    assert names == sorted(
        [*expected, "emoji", "emoji_quick", "folder", "han_glyphs", "spoken_words"]
    )
    for name in names:
        recipe = recipes.load_recipe(name)
        assert recipe.name == name
        assert set(recipe.losses) <= set(registry.LOSSES)


def test_paper_recipes_hold_the_official_values() -> None:
    cub = recipes.load_recipe("cub_512")
    assert (cub.model.backbone, cub.model.pooling, cub.model.embedding_size) == (
        "bn_inception",
        "avg",
        512,
    )
    assert cub.loss("proxygml").settings == {
        "proxies_per_class": 12,
        "r": 0.05,
        "weight_lambda": 0.3,
    }
    plan = cub.plan("proxygml", 0)
    assert (plan.epochs, plan.batch_size, plan.milestones, plan.gamma) == (50, 32, (19, 39), 0.1)
    assert plan.backbone_optimizer == OptimizerSpec("adam", 1e-4, 1e-4, eps=0.01)
    assert plan.loss_optimizer == OptimizerSpec("adam", 0.03, 1e-4, eps=0.01)
    assert plan.freeze_trunk_batchnorm and plan.frozen_trunk_epochs == (2,)
    assert plan.eval_epochs == (1, 2, *range(35, 51))
    assert (cub.data.resize, cub.data.crop, cub.data.flip) == (256, 224, 0.5)
    assert cub.evaluation.recall_ks == (1, 2, 4, 8)

    sop = recipes.load_recipe("sop_512")
    assert sop.loss("proxygml").settings == {
        "proxies_per_class": 1,
        "r": 0.05,
        "weight_lambda": 0.0,
    }
    assert sop.plan("proxygml", 0).loss_optimizer.lr == 0.3
    assert not sop.train.freeze_trunk_batchnorm
    assert sop.evaluation.recall_ks == (1, 10, 100, 1000)
    assert (recipes.load_recipe("cars_512").dataset.train_classes, sop.dataset.train_classes) == (
        98,
        11318,
    )
    # 64 and 384 dimensions: the 512-d recipe with another embedding size.
    for dataset, base in (("cub", cub), ("sop", sop)):
        for dim in (64, 384):
            other = recipes.load_recipe(f"{dataset}_{dim}")
            assert other.model.embedding_size == dim
            assert (other.train, other.data, other.losses) == (base.train, base.data, base.losses)

    anchor = recipes.load_recipe("proxyanchor_cub_512")
    assert anchor.losses_to_run == ("proxyanchor",)
    assert anchor.loss("proxyanchor").settings == {"margin": 0.1, "alpha": 32}
    assert (anchor.model.pooling, anchor.train.batch_size, anchor.train.epochs) == (
        "avg+max",
        180,
        60,
    )
    assert anchor.plan("proxyanchor", 1).milestones == (10, 20, 30, 40, 50)
    assert anchor.plan("proxyanchor", 1).loss_optimizer.lr == pytest.approx(100 * 1e-4)
    assert recipes.load_recipe("proxyanchor_sop_512").plan("proxyanchor", 1).gamma == 0.25


def test_paper_numbers_are_in_the_recipes() -> None:
    cub = ("NMI", "recall_at_1", "recall_at_2", "recall_at_4")
    sop = ("NMI", "recall_at_1", "recall_at_10", "recall_at_100")
    expected = {
        "cub_512": ("proxygml", dict(zip(cub, (69.8, 66.6, 77.6, 86.4)))),
        "sop_64": ("proxygml", dict(zip(sop, (89.8, 76.2, 89.4, 95.4)))),
        "proxyanchor_cars_512": ("proxyanchor", {"recall_at_1": 86.1}),
    }
    for name, (loss, metrics) in expected.items():
        (reported,) = recipes.load_recipe(name).reported
        assert (reported.loss, reported.metrics) == (loss, metrics)


def test_emoji_recipes_keep_the_committed_settings() -> None:
    emoji = recipes.load_recipe("emoji")
    assert emoji.losses_to_run == (
        "proxygml",
        "proxyanchor",
        "softtriple",
        "normsoftmax",
        "proxynca",
    )
    assert emoji.train.seeds == (0, 1, 2) and emoji.train.epochs == 20
    assert emoji.plan("proxygml", 0).milestones == (8, 16)
    # proxy lr = the paper's multiplier x the backbone lr 1e-3, with its optimizer
    optimizers = {name: emoji.plan(name, 0).loss_optimizer for name in emoji.losses}
    assert {n: (o.name, o.lr, o.eps) for n, o in optimizers.items()} == {
        "proxygml": ("adam", 0.3, 0.01),
        "proxyanchor": ("adamw", 0.1, 1e-8),
        "softtriple": ("adam", 0.1, 0.01),
        "normsoftmax": ("adam", 0.001, 1e-8),
        "proxynca": ("adam", 0.001, 1e-8),
    }
    quick = recipes.load_recipe("emoji_quick")
    assert quick.losses_to_run == ("proxygml_cached", "proxyanchor") and quick.train.seeds == (0,)
    assert quick.plan("proxygml_cached", 0).milestones == (6, 13)
    assert quick.train.backbone_optimizer.lr == 3e-4  # chosen on validation classes
    assert quick.loss("proxygml_cached").optimizer == emoji.loss("proxygml").optimizer
    assert (quick.model, quick.data) == (emoji.model, emoji.data)
    assert recipes.load_recipe("emoji", epochs=1).plan("proxygml", 0).milestones == ()


def test_epoch_lists() -> None:
    assert recipes.parse_epochs(" 3, 1-2 ,", 10) == (1, 2, 3)
    assert recipes.parse_epochs("", 10) == ()
    assert recipes.parse_epochs("all", 3) == (1, 2, 3)
    assert recipes.parse_epochs("40%,80%", 10) == (4, 8)
    assert recipes.parse_epochs("40%,80%", 20) == (8, 16)
    assert recipes.parse_epochs("40%,80%", 1) == ()  # a milestone must fall inside the run
    for bad in ("3-1", "x", "0"):
        with pytest.raises(RecipeError, match="bad epoch"):
            recipes.parse_epochs(bad, 10)


def test_overrides_change_existing_keys_only() -> None:
    recipe = recipes.load_recipe(
        "cub_512",
        [
            "train.epochs=30",
            "losses.proxygml.settings.r=0.1",
            "train.gamma=1",
            "model.weights=/tmp/bn.pth",
            "train.eval_epochs=5",
            "losses.proxyanchor.settings.alpha=16",
            'losses.normsoftmax={"settings": {"temperature": 0.1}}',
        ],
        seeds=[3],
    )
    assert recipe.train.epochs == 30 and recipe.train.seeds == (3,)
    assert recipe.train.gamma == 1.0 and recipe.plan("proxygml", 3).eval_epochs == (5,)
    assert recipe.loss("proxygml").settings["r"] == 0.1
    assert recipe.loss("proxyanchor").settings["alpha"] == 16
    assert recipe.loss("normsoftmax").settings == {"temperature": 0.1}
    assert recipe.model.weights == "/tmp/bn.pth"

    bad = {
        "train.epoch=3": "unknown key 'epoch'",
        "trian.epochs=3": "no 'trian'",
        "train.epochs=many": "not a JSON value",
        "train.epochs=2.5": "expected a int",
        "model.pretrained=1": "expected a bool",
        "train.eval_epochs=3-1": "bad epoch range",
        "model.backbone=vgg": "model.backbone must be one of",
        "losses.arcface={}": "unknown loss 'arcface'",
        "train": "expected KEY=VALUE",
        "train.loss_optimizer=null": "proxygml needs train.loss_optimizer",
        "train.sampler=sorted": "sampler must be",
    }
    for override, message in bad.items():
        with pytest.raises(RecipeError, match=message):
            recipes.load_recipe("cub_512", [override])


def test_a_recipe_file_extends_a_shipped_one(tmp_path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"extends": "emoji_quick", "name": "mine", "train": {"epochs": 3}}))
    recipe = recipes.load_recipe(str(path))
    assert (recipe.name, recipe.train.epochs, recipe.train.batch_size) == ("mine", 3, 32)
    path.write_text(json.dumps({"extends": "emoji", "name": "mine", "train": {"epochs": "3"}}))
    with pytest.raises(RecipeError, match=r"train\.epochs: expected int, got '3'"):
        recipes.load_recipe(str(path))
    path.write_text(json.dumps({"extends": "emoji", "name": "mine", "modle": {}}))
    with pytest.raises(RecipeError, match=r"unknown keys \['modle'\]"):
        recipes.load_recipe(str(path))


def test_recipes_cite_no_file_outside_the_repository() -> None:
    for path in recipes.RECIPES_DIR.glob("*.json"):
        text = path.read_text()
        assert "shared/" not in text and "official_reference" not in text, path.name
        assert not re.search(r"(?<![\w.])/(work|tmp|root|home)/", text), path.name

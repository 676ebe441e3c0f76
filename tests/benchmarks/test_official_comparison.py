"""benchmarks/official_comparison.py on a stand-in for the official module.

The stand-in has the official module's interface (an ``opt`` namespace, d x CN proxies,
``forward(input, target) -> (loss, loss_cls)``) and computes the loss with the test suite's
dense float64 reference, so the comparison must find the same values and gradients.
"""

import json

import pytest
import torch

from benchmarks import official_comparison
from benchmarks.core.errors import BenchmarkError

STAND_IN = """
import math
import torch
from tests.reference import dense_official_loss


class ProxyGML(torch.nn.Module):
    def __init__(self, opt, dim=512):
        super().__init__()
        print("a banner the comparison silences")
        self.opt = opt
        self.Proxies = torch.nn.Parameter(torch.randn(opt.dim, opt.C * opt.N))

    def forward(self, input, target):
        k = math.ceil(self.opt.r * self.opt.C * self.opt.N)
        out = dense_official_loss(
            input.double(), self.Proxies.T.double(), target, self.opt.N, k,
            self.opt.weight_lambda,
        )
        return out["loss_total"].float(), out["loss_cls"].float()
"""


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "ProxyGML.py"
    path.write_text(STAND_IN)
    return official_comparison.load_official(path)


@pytest.mark.parametrize("weight_lambda", [0.0, 0.3])
def test_the_comparison_finds_the_same_loss_and_gradients(stand_in, weight_lambda, capsys):
    config = official_comparison.Config("tiny", 40, 3, 5, weight_lambda, 1.0)  # k = 6
    row = official_comparison.compare(stand_in, config, repeats=1)
    assert capsys.readouterr().out == ""
    assert row["loss official"] > 0
    assert row["rel. diff loss"] < 1e-6
    assert row["rel. diff grad x"] < 1e-5
    assert row["rel. diff grad proxies"] < 1e-5
    assert row["speed-up"] == pytest.approx(row["official ms"] / row["ours ms"])
    assert row["met"] == (row["speed-up"] >= 1.0)
    assert row["target ms"] == pytest.approx(row["official ms"] / config.target_speedup)
    assert row["target x floor"] == pytest.approx(row["target ms"] / row["floor ms"])
    assert row["ours x floor"] == pytest.approx(row["ours ms"] / row["floor ms"])


@pytest.mark.parametrize("weight_lambda", [0.0, 0.3])
def test_the_floor_is_the_forward_products_of_the_configuration(weight_lambda):
    config = official_comparison.Config("tiny", 7, 3, 5, weight_lambda, 1.0)
    embeddings, proxies = torch.randn(5, 16, dtype=torch.float64), torch.randn(21, 16)
    products = official_comparison.floor_step(config, embeddings.float(), proxies)
    units = proxies.double() / proxies.double().norm(dim=1, keepdim=True)
    expected = [embeddings / embeddings.norm(dim=1, keepdim=True) @ units.T]
    if weight_lambda:
        class_of_proxy = torch.arange(21) // 3
        one_hot = torch.nn.functional.one_hot(class_of_proxy, 7).double()
        expected.append(units @ (one_hot.T @ units).T)  # each proxy against each class sum
    assert len(products) == len(expected)
    for product, reference in zip(products, expected):
        torch.testing.assert_close(product.double(), reference, rtol=1e-5, atol=1e-5)


def test_the_seed_fixes_the_official_proxies_and_the_batch(stand_in):
    config = official_comparison.Config("tiny", 40, 3, 5, 0.0, 1.0)
    rows = [official_comparison.compare(stand_in, config, 1, seed) for seed in (3, 3, 4)]
    assert rows[0]["loss official"] == rows[1]["loss official"] != rows[2]["loss official"]


def test_a_wrong_official_path_is_one_line_error(tmp_path):
    with pytest.raises(BenchmarkError, match="no such file"):
        official_comparison.load_official(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(BenchmarkError, match="defines no class ProxyGML"):
        official_comparison.load_official(tmp_path / "empty.py")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(BenchmarkError, match="cannot import it"):
        official_comparison.load_official(tmp_path / "broken.py")


def test_the_script_writes_its_results(stand_in, tmp_path, monkeypatch):
    monkeypatch.setattr(
        official_comparison, "CONFIGS", (official_comparison.Config("tiny", 40, 2, 4, 0.3, 1.0),)
    )
    path = tmp_path / "ProxyGML.py"
    path.write_text(STAND_IN)
    out = tmp_path / "out"
    argv = ["--official", str(path), "--repeats", "1", "--out", str(out)]
    assert official_comparison.main(argv) == 0
    assert (
        "ProxyGMLLoss against the official module" in (out / "official_comparison.md").read_text()
    )
    saved = json.loads((out / "official_comparison.json").read_text())
    assert [row["config"] for row in saved["rows"]] == ["tiny"]
    assert saved["rows"][0]["rel. diff loss"] < 1e-6

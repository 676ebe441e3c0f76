"""A ProxyGMLLoss checkpoint records its layout (C, N, d); another layout is refused."""

import io

import pytest
import torch

from pml_proxygml import ProxyGMLLoss


def layout(loss: ProxyGMLLoss) -> dict:
    return {
        "num_classes": loss.num_classes,
        "proxies_per_class": loss.proxies_per_class,
        "embedding_size": loss.embedding_size,
    }


def test_state_dict_records_the_layout_and_survives_torch_save_weights_only():
    loss = ProxyGMLLoss(5, 8, proxies_per_class=4)
    buffer = io.BytesIO()
    torch.save(loss.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["_extra_state"] == layout(loss)
    fresh = ProxyGMLLoss(5, 8, proxies_per_class=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.proxies, loss.proxies)


@pytest.mark.parametrize(
    ("saved", "loading"),
    [((5, 8, 4), (10, 8, 2)), ((10, 8, 2), (5, 8, 4)), ((10, 8, 2), (20, 8, 1))],
    ids=["5x4_into_10x2", "10x2_into_5x4", "10x2_into_20x1"],
)
def test_another_layout_with_the_same_proxy_count_is_refused(saved, loading):
    """The issue's case: C * N and d agree, so only the recorded layout tells them apart."""
    classes, dim, per_class = saved
    checkpoint = ProxyGMLLoss(classes, dim, proxies_per_class=per_class).state_dict()
    classes, dim, per_class = loading
    loss = ProxyGMLLoss(classes, dim, proxies_per_class=per_class)
    before = loss.proxies.detach().clone()
    message = (
        rf"this checkpoint has layout .*'num_classes': {saved[0]}, 'proxies_per_class': "
        rf"{saved[2]}.*this loss has layout .*'num_classes': {loading[0]}, "
        rf"'proxies_per_class': {loading[2]}"
    )
    with pytest.raises(ValueError, match=message):
        loss.load_state_dict(checkpoint)
    assert torch.equal(loss.proxies, before)
    with pytest.raises(ValueError, match="this checkpoint has layout"):
        loss.load_state_dict(checkpoint, strict=False)
    assert torch.equal(loss.proxies, before)


def test_a_checkpoint_without_layout_loads_when_the_shapes_agree():
    """Saved before the layout was recorded: the proxies' shape is all there is to check."""
    source = ProxyGMLLoss(5, 8, proxies_per_class=4)
    legacy = {"proxies": source.proxies.detach().clone()}
    loss = ProxyGMLLoss(5, 8, proxies_per_class=4)
    loss.load_state_dict(legacy)  # strict: the missing layout is not a missing key
    assert torch.equal(loss.proxies, source.proxies)

    other_shape = ProxyGMLLoss(5, 8, proxies_per_class=3)
    before = other_shape.proxies.detach().clone()
    with pytest.raises(RuntimeError, match="size mismatch for proxies"):
        other_shape.load_state_dict(legacy)
    assert torch.equal(other_shape.proxies, before)


def test_a_loss_inside_a_model_checks_its_layout_under_its_prefix():
    model = torch.nn.ModuleDict({"loss": ProxyGMLLoss(5, 8, proxies_per_class=4)})
    state = model.state_dict()
    assert set(state) == {"loss.proxies", "loss._extra_state"}
    other = torch.nn.ModuleDict({"loss": ProxyGMLLoss(10, 8, proxies_per_class=2)})
    with pytest.raises(ValueError, match="this checkpoint has layout"):
        other.load_state_dict(state)

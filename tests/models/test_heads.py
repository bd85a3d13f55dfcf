"""Prediction heads: shared and per-layer heads, their initialisation (focal prior, zero box delta) and
their outputs against hand-written linear maps and inverse sigmoids."""

from __future__ import annotations

import math

import pytest
import torch

from litedetr.models.heads import PredictionHeads, init_box_head, init_class_head
from litedetr.nn.decoder import MLP

D_MODEL, NUM_CLASSES, NUM_LAYERS = 32, 5, 3


def logit_clamped(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The inverse sigmoid written out: clamp to [0, 1], then log(max(x, eps) / max(1 - x, eps)), in float64."""
    x = x.double().clamp(0.0, 1.0)
    return torch.log(torch.maximum(x, torch.tensor(eps, dtype=torch.float64)) / torch.maximum(1 - x, torch.tensor(eps, dtype=torch.float64)))


def linear_by_hand(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return torch.matmul(x.double(), layer.weight.double().t()) + layer.bias.double()


def mlp_by_hand(x: torch.Tensor, mlp: MLP) -> torch.Tensor:
    """Linear layers with a ReLU between each two, none after the last."""
    x = x.double()
    for i, layer in enumerate(mlp.layers):
        x = linear_by_hand(x, layer)
        if i < len(mlp.layers) - 1:
            x = torch.clamp(x, min=0.0)
    return x


def randomise(heads: PredictionHeads) -> None:
    """Non-zero weights everywhere (the box heads' last layer starts at zero)."""
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def test_shared_heads_are_one_pair_reused_by_every_layer():
    heads = PredictionHeads(D_MODEL, NUM_CLASSES, NUM_LAYERS, shared=True, inverse_sigmoid_eps=1e-3)
    assert len(heads.class_heads) == 1 and len(heads.box_heads) == 1
    assert len(heads.box_per_layer) == NUM_LAYERS and len(heads.class_per_layer) == NUM_LAYERS
    assert all(box is heads.box_heads[0] for box in heads.box_per_layer)
    assert all(cls is heads.class_heads[0] for cls in heads.class_per_layer)


def test_per_layer_heads_are_distinct_modules_one_per_layer():
    heads = PredictionHeads(D_MODEL, NUM_CLASSES, NUM_LAYERS, shared=False, inverse_sigmoid_eps=1e-5)
    assert len(heads.class_heads) == NUM_LAYERS and len(heads.box_heads) == NUM_LAYERS
    assert len({id(m) for m in heads.box_per_layer}) == NUM_LAYERS and len({id(m) for m in heads.class_per_layer}) == NUM_LAYERS
    assert all(box is heads.box_heads[i] for i, box in enumerate(heads.box_per_layer))
    assert all(cls is heads.class_heads[i] for i, cls in enumerate(heads.class_per_layer))
    assert sum(p.numel() for p in heads.parameters()) == NUM_LAYERS * sum(
        p.numel() for p in (*heads.class_heads[0].parameters(), *heads.box_heads[0].parameters())
    )


@pytest.mark.parametrize("shared", [True, False])
def test_a_fresh_class_head_starts_every_class_at_probability_one_percent(shared):
    heads = PredictionHeads(D_MODEL, NUM_CLASSES, NUM_LAYERS, shared=shared, inverse_sigmoid_eps=1e-3)
    prior_logit = math.log(0.01 / 0.99)
    for head in heads.class_per_layer:
        assert head.bias.shape == (NUM_CLASSES,)
        torch.testing.assert_close(head.bias, torch.full((NUM_CLASSES,), prior_logit), rtol=0, atol=1e-6)
        torch.testing.assert_close(head.bias.sigmoid(), torch.full((NUM_CLASSES,), 0.01), rtol=0, atol=1e-7)
        assert head.weight.abs().sum() > 0  # the weight is left as built
    other = torch.nn.Linear(4, 7)
    init_class_head(other)
    assert torch.equal(other.bias, torch.full((7,), -math.log(99.0)))


def test_init_box_head_zeroes_only_the_last_layer():
    mlp = MLP(8, 8, 4, 3)
    init_box_head(mlp)
    assert torch.equal(mlp.layers[-1].weight, torch.zeros(4, 8)) and torch.equal(mlp.layers[-1].bias, torch.zeros(4))
    assert all(layer.weight.abs().sum() > 0 for layer in mlp.layers[:-1])
    assert torch.equal(mlp(torch.randn(5, 8)), torch.zeros(5, 4))


def test_a_fresh_box_head_returns_the_reference_boxes():
    heads = PredictionHeads(D_MODEL, NUM_CLASSES, NUM_LAYERS, shared=False, inverse_sigmoid_eps=1e-5)
    hidden = [torch.randn(2, 4, D_MODEL) for _ in range(NUM_LAYERS)]
    references = [torch.rand(2, 4, 4) * 0.9 + 0.05 for _ in range(NUM_LAYERS)]
    with torch.no_grad():
        layers = heads(hidden, references)
    assert len(layers) == NUM_LAYERS
    for layer, ref in zip(layers, references):
        assert layer["pred_boxes"].shape == (2, 4, 4) and layer["pred_logits"].shape == (2, 4, NUM_CLASSES)
        torch.testing.assert_close(layer["pred_boxes"], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_a_fresh_box_head_near_the_clamp_follows_the_clamped_logit(eps):
    heads = PredictionHeads(D_MODEL, NUM_CLASSES, 1, shared=True, inverse_sigmoid_eps=eps)
    ref = torch.tensor([[[0.0, 1.0, 1e-4, 1 - 1e-4], [5e-4, 0.9995, 2e-3, 0.5]]])
    with torch.no_grad():
        (layer,) = heads([torch.randn(1, 2, D_MODEL)], [ref])
    expected = torch.sigmoid(logit_clamped(ref, eps)).float()
    torch.testing.assert_close(layer["pred_boxes"], expected, rtol=0, atol=1e-6)
    # the clamp bites where x or 1 - x is below eps: x = 0 comes back as eps / (1 + eps), not 0
    torch.testing.assert_close(layer["pred_boxes"][0, 0, 0], torch.tensor(eps / (1 + eps)), rtol=1e-4, atol=0)
    torch.testing.assert_close(layer["pred_boxes"][0, 0, 1], torch.tensor(1 / (1 + eps)), rtol=0, atol=1e-6)
    if eps == 1e-3:  # 1e-4 < eps: the box grows to eps / (eps + 1 - 1e-4), ten times the reference
        torch.testing.assert_close(layer["pred_boxes"][0, 0, 2], torch.tensor(1e-3 / (1e-3 + 1 - 1e-4)), rtol=1e-4, atol=0)
    else:  # 1e-4 > eps: the reference comes back
        torch.testing.assert_close(layer["pred_boxes"][0, 0, 2], torch.tensor(1e-4), rtol=1e-3, atol=0)


@pytest.mark.parametrize("shared", [True, False])
def test_outputs_equal_the_heads_written_out(shared):
    eps = 1e-3
    heads = PredictionHeads(D_MODEL, NUM_CLASSES, NUM_LAYERS, shared=shared, inverse_sigmoid_eps=eps)
    randomise(heads)
    hidden = [torch.randn(2, 3, D_MODEL) for _ in range(NUM_LAYERS)]
    references = [torch.rand(2, 3, 4) for _ in range(NUM_LAYERS)]
    references[0][0, 0] = torch.tensor([0.0, 1.0, 1e-5, 0.5])  # inside the clamp too
    with torch.no_grad():
        layers = heads(hidden, references)
    for i, (layer, h, r) in enumerate(zip(layers, hidden, references)):
        k = 0 if shared else i
        logits = linear_by_hand(h, heads.class_heads[k])
        boxes = torch.sigmoid(mlp_by_hand(h, heads.box_heads[k]) + logit_clamped(r, eps))
        torch.testing.assert_close(layer["pred_logits"], logits.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer["pred_boxes"], boxes.float(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(layer["pred_boxes"], r, atol=1e-3)  # the random heads do move the boxes

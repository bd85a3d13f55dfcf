"""The deformable decoder's parts: the MLP, the query positions and iterative box refinement (each layer's
reference from the previous layer's box head, stopped between layers; looking forward once or twice)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from litedetr.nn.decoder import MLP, AnchorQueryPosition, DeformableDecoder, StaticQueryPosition

D_MODEL, N_HEADS, N_LEVELS, N_POINTS, NUM_LAYERS, NUM_QUERIES = 32, 2, 2, 2, 3, 4
SHAPES = ((4, 4), (2, 2))


def logit_clamped(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Inverse sigmoid written out: clamp to [0, 1], then log(max(x, eps) / max(1 - x, eps))."""
    x = x.clamp(0.0, 1.0)
    return torch.log(torch.maximum(x, torch.full_like(x, eps)) / torch.maximum(1 - x, torch.full_like(x, eps)))


def mlp_by_hand(x: torch.Tensor, mlp: MLP) -> torch.Tensor:
    for i, layer in enumerate(mlp.layers):
        x = x @ layer.weight.t() + layer.bias
        if i < len(mlp.layers) - 1:
            x = torch.where(x > 0, x, torch.zeros_like(x))
    return x


def box_sine_by_hand(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """``(N, 4)`` cxcywh -> ``(N, 4 * num_feats)``: y, x, w, h, each as sin (even channel) / cos (odd channel)
    of ``2 pi v / T^(2 floor(k / 2) / num_feats)``."""
    rows = []
    for box in boxes.tolist():
        cx, cy, w, h = box
        row = []
        for value in (cy, cx, w, h):
            for k in range(num_feats):
                angle = value * 2 * math.pi / temperature ** (2 * (k // 2) / num_feats)
                row.append(math.sin(angle) if k % 2 == 0 else math.cos(angle))
        rows.append(row)
    return torch.tensor(rows)


def memory_inputs(batch: int = 2) -> dict[str, object]:
    """Encoder memory of two levels; image 1 is padded (level 0: 3 of 4 rows, 2 of 4 columns; level 1: 2 rows, 1 column)."""
    masks = [torch.zeros(batch, h, w, dtype=torch.bool) for h, w in SHAPES]
    masks[0][1, 3:, :] = True
    masks[0][1, :, 2:] = True
    masks[1][1, :, 1:] = True
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 1.0]]])[:batch]
    return {
        "memory": torch.randn(batch, sum(h * w for h, w in SHAPES), D_MODEL),
        "spatial_shapes": SHAPES,
        "valid_ratios": ratios,
        "memory_padding_mask": torch.cat([m.flatten(1) for m in masks], 1),
    }


def build_decoder(look_forward_twice: bool, anchor: bool, norm: nn.Module, eps: float = 1e-3) -> tuple[DeformableDecoder, list[MLP]]:
    decoder = DeformableDecoder(
        NUM_LAYERS, d_model=D_MODEL, n_levels=N_LEVELS, n_heads=N_HEADS, n_points=N_POINTS, d_ffn=64,
        query_position=AnchorQueryPosition(D_MODEL) if anchor else StaticQueryPosition(),
        norm=norm, look_forward_twice=look_forward_twice, inverse_sigmoid_eps=eps,
    )  # fmt: skip
    with torch.no_grad():  # non-zero sampling offsets and attention weights: every input reaches the output
        for layer in decoder.layers:
            layer.cross_attn.sampling_offsets.weight.normal_(0, 0.1)
            layer.cross_attn.attention_weights.weight.normal_(0, 0.1)
    box_heads = [MLP(D_MODEL, D_MODEL, 4, 3) for _ in range(NUM_LAYERS)]  # random last layers: the boxes move
    return decoder, box_heads


def run_decoder(decoder: DeformableDecoder, box_heads: list[MLP], tgt, reference_logits, static_position, inputs) -> tuple[list, list, dict]:
    """The decoder's outputs, and what each layer received and returned (via hooks)."""
    seen: dict[str, list] = {"layer_in": [], "layer_out": []}
    hooks = []
    for layer in decoder.layers:
        hooks.append(layer.register_forward_pre_hook(lambda module, args: seen["layer_in"].append(args)))
        hooks.append(layer.register_forward_hook(lambda module, args, out: seen["layer_out"].append(out)))
    try:
        hidden, references = decoder(
            tgt, reference_logits, static_position, inputs["memory"], inputs["spatial_shapes"], inputs["valid_ratios"],
            inputs["memory_padding_mask"], box_heads,
        )  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    return hidden, references, seen


def decoder_queries(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(batch, NUM_QUERIES, D_MODEL), torch.randn(batch, NUM_QUERIES, 4), torch.randn(batch, NUM_QUERIES, D_MODEL)


def test_mlp_is_linear_layers_with_relu_between_and_none_after_the_last():
    torch.manual_seed(0)
    mlp = MLP(6, 8, 3, 3)
    assert [(layer.in_features, layer.out_features) for layer in mlp.layers] == [(6, 8), (8, 8), (8, 3)]
    x = torch.randn(5, 6)
    out = mlp(x)
    torch.testing.assert_close(out, mlp_by_hand(x, mlp))
    assert (out < 0).any()  # no ReLU after the last layer
    single = MLP(6, 8, 3, 1)
    torch.testing.assert_close(single(x), x @ single.layers[0].weight.t() + single.layers[0].bias)


def test_static_query_position_returns_the_position_it_is_given():
    position = torch.randn(2, NUM_QUERIES, D_MODEL)
    assert StaticQueryPosition()(torch.rand(2, NUM_QUERIES, 4), position) is position
    with pytest.raises(ValueError, match="takes its query positions from the query selection"):
        StaticQueryPosition()(torch.rand(2, NUM_QUERIES, 4), None)


def test_anchor_query_position_is_the_mlp_of_the_boxes_sine_embedding():
    torch.manual_seed(0)
    anchor = AnchorQueryPosition(D_MODEL)
    boxes = torch.rand(2, NUM_QUERIES, 4)
    with torch.no_grad():
        out = anchor(boxes, torch.randn(2, NUM_QUERIES, D_MODEL))  # the static position is ignored
        expected = mlp_by_hand(box_sine_by_hand(boxes.reshape(-1, 4), D_MODEL // 2), anchor.mlp).reshape(2, NUM_QUERIES, D_MODEL)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("anchor", [False, True])
@pytest.mark.parametrize("look_forward_twice", [False, True])
def test_each_reference_is_the_previous_one_refined_by_its_layers_box_head(anchor, look_forward_twice):
    torch.manual_seed(0)
    eps = 1e-3
    norm = nn.LayerNorm(D_MODEL)
    with torch.no_grad():  # an affine norm: its output differs from its input, which is already normalised by the FFN
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.5)
    decoder, box_heads = build_decoder(look_forward_twice, anchor, norm, eps)
    tgt, reference_logits, static_position = decoder_queries()
    inputs = memory_inputs()
    with torch.no_grad():
        hidden, references, seen = run_decoder(decoder, box_heads, tgt, reference_logits, None if anchor else static_position, inputs)
    assert len(hidden) == NUM_LAYERS and len(references) == NUM_LAYERS
    torch.testing.assert_close(references[0], torch.sigmoid(reference_logits))
    box_ratios = torch.cat([inputs["valid_ratios"], inputs["valid_ratios"]], -1)  # (B, L, 4): (w, h, w, h)
    for i in range(NUM_LAYERS):
        query, query_pos, boxes_per_level = seen["layer_in"][i][:3]
        out = seen["layer_out"][i]
        # layer i reads its reference scaled to each level's valid area, and its input is the previous layer's output
        torch.testing.assert_close(boxes_per_level, references[i][:, :, None, :] * box_ratios[:, None], rtol=0, atol=0)
        torch.testing.assert_close(query, tgt if i == 0 else seen["layer_out"][i - 1], rtol=0, atol=0)
        if anchor:
            expected_pos = mlp_by_hand(box_sine_by_hand(boxes_per_level[:, :, 0].reshape(-1, 4), D_MODEL // 2), decoder.query_position.mlp)
            torch.testing.assert_close(query_pos, expected_pos.reshape(query_pos.shape), rtol=1e-5, atol=1e-5)
        else:
            assert query_pos is static_position
        # the returned output is the norm of the layer's; the refinement reads the layer's output before the norm
        torch.testing.assert_close(hidden[i], decoder.norm(out), rtol=0, atol=0)
        assert (hidden[i] - out).abs().max() > 0.1
        if i + 1 < NUM_LAYERS:
            expected = torch.sigmoid(mlp_by_hand(out, box_heads[i]) + logit_clamped(references[i], eps))
            torch.testing.assert_close(references[i + 1], expected, rtol=1e-5, atol=1e-6)
            assert (references[i + 1] - references[i]).abs().max() > 1e-3  # the boxes do move


def test_the_reference_clamp_is_the_decoders_inverse_sigmoid_eps():
    torch.manual_seed(0)
    decoder, box_heads = build_decoder(False, False, nn.Identity(), eps=1e-2)
    for head in box_heads:
        nn.init.zeros_(head.layers[-1].weight)
        nn.init.zeros_(head.layers[-1].bias)
    tgt, _, position = decoder_queries()
    reference_logits = torch.full((2, NUM_QUERIES, 4), -9.0)  # sigmoid ~1.2e-4, below the clamp
    with torch.no_grad():
        _, references, _ = run_decoder(decoder, box_heads, tgt, reference_logits, position, memory_inputs())
    x = 1 / (1 + math.exp(9.0))
    for later in references[1:]:  # with a zero delta, x < eps comes back as sigmoid(log(eps / (1 - x))) = eps / (eps + 1 - x)
        x = 1e-2 / (1e-2 + 1 - x)
        torch.testing.assert_close(later, torch.full_like(later, x), rtol=1e-5, atol=0)


def test_looking_forward_twice_lets_the_heads_see_the_previous_refinement_with_its_gradient():
    """Same weights, same values: only what the next layer's heads can back-propagate into differs."""
    torch.manual_seed(0)
    eps = 1e-3
    once, box_heads = build_decoder(False, True, nn.Identity(), eps)
    twice = copy.deepcopy(once)
    twice.look_forward_twice = True
    tgt, reference_logits, _ = decoder_queries()
    inputs = memory_inputs()
    hidden_once, refs_once, _ = run_decoder(once, box_heads, tgt, reference_logits, None, inputs)
    hidden_twice, refs_twice, _ = run_decoder(twice, box_heads, tgt, reference_logits, None, inputs)
    for a, b in zip(hidden_once + refs_once, hidden_twice + refs_twice):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(not r.requires_grad for r in refs_once)  # look once: every returned reference is the stopped one
    assert all(r.requires_grad and r.grad_fn is not None for r in refs_twice[1:])

    last, previous = box_heads[-1], box_heads[-2]
    params = list(previous.parameters())

    def final_boxes(hidden, references):  # the last layer's predicted boxes, as the prediction heads make them
        return torch.sigmoid(last(hidden[-1]) + logit_clamped(references[-1], eps))

    grads_once = torch.autograd.grad(final_boxes(hidden_once, refs_once).sum(), params, allow_unused=True)
    grads_twice = torch.autograd.grad(final_boxes(hidden_twice, refs_twice).sum(), params, allow_unused=True)
    assert all(g is None for g in grads_once)
    # by hand: the last reference is sigmoid(previous_head(h) + logit(reference)), h and the reference without gradient
    last_reference = torch.sigmoid(previous(hidden_twice[-2].detach()) + logit_clamped(refs_twice[-2].detach(), eps))
    by_hand = torch.sigmoid(last(hidden_twice[-1].detach()) + logit_clamped(last_reference, eps))
    expected = torch.autograd.grad(by_hand.sum(), params)
    for got, want in zip(grads_twice, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        assert want.abs().max() > 0
    # between layers the reference is stopped in both modes: a layer's output does not depend on an earlier box head
    for hidden in (hidden_once, hidden_twice):
        assert all(g is None for g in torch.autograd.grad(hidden[-1].sum(), params, allow_unused=True))


def test_a_box_head_per_layer_is_required():
    decoder, box_heads = build_decoder(look_forward_twice=False, anchor=False, norm=nn.Identity())
    tgt, reference_logits, position = decoder_queries()
    with pytest.raises(ValueError, match=f"{NUM_LAYERS - 1} box heads given for {NUM_LAYERS} decoder layers"):
        run_decoder(decoder, box_heads[:-1], tgt, reference_logits, position, memory_inputs())

"""MultiScaleDeformableAttention against the authors' tensors, its initialisation and padding behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_fixture

from litedetr.nn import KeyAwareOptions, MultiScaleDeformableAttention
from litedetr.weights.loading import load_official_state_dict


@pytest.mark.parametrize("case", ["kda_points", "kda_boxes", "msda_points"])
def test_matches_authors_attention(case):
    c = load_fixture("attention_seed0.pt")[case]
    attn = MultiScaleDeformableAttention(c["d_model"], c["n_levels"], c["n_heads"], c["n_points"], key_aware=c["key_aware"]).eval()
    load_official_state_dict(attn, c["state_dict"], rules=[(r"(.+)", r"\1")])
    with torch.no_grad():
        out = attn(c["query"], c["reference_points"], c["input_flatten"], c["spatial_shapes"], c["input_padding_mask"])
    assert (out - c["output"]).abs().max().item() < 1e-4


def test_sampling_offsets_start_on_a_ring():
    attn = MultiScaleDeformableAttention(64, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x, head 1 along +y (after normalising by the max |component|), point i at i+1
    torch.testing.assert_close(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[1, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0  # uniform weights at start


def test_key_aware_module_has_no_weight_layer():
    kda = MultiScaleDeformableAttention(64, 2, 4, 2, key_aware=True)
    names = {n for n, _ in kda.named_parameters()}
    assert not any(n.startswith("attention_weights") for n in names) and "query_proj.weight" in names


def test_boxes_sample_inside_the_box():
    """With box references, offsets are scaled by box size / (2 P)."""
    attn = MultiScaleDeformableAttention(32, n_levels=1, n_heads=1, n_points=2)
    shapes = torch.tensor([[8, 8]])
    boxes = torch.tensor([[[[0.5, 0.5, 0.2, 0.4]]]])
    locations = attn.sampling(torch.zeros(1, 1, 32), boxes, shapes)
    # initial offsets: head 0 points along +x at 1 and 2 -> cx + o / P * w / 2
    torch.testing.assert_close(locations[0, 0, 0, 0, :, 0], torch.tensor([0.5 + 0.5 * 0.1, 0.5 + 1.0 * 0.1]))
    torch.testing.assert_close(locations[0, 0, 0, 0, :, 1], torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("key_aware", [False, True])
def test_padded_image_gives_the_same_output_as_alone(key_aware):
    """Image A alone vs A padded beside a larger image: equal outputs for A's queries."""
    d, heads = 32, 4
    attn = MultiScaleDeformableAttention(d, n_levels=2, n_heads=heads, n_points=3, key_aware=key_aware).eval()
    small, big = torch.tensor([[4, 6], [2, 3]]), torch.tensor([[6, 8], [3, 4]])
    maps = [torch.randn(1, h, w, d) for h, w in small.tolist()]
    padded, mask = [], []
    for m, (h, w) in zip(maps, big.tolist()):
        canvas = torch.randn(1, h, w, d)  # junk in the padding
        canvas[:, : m.shape[1], : m.shape[2]] = m
        padded.append(canvas.flatten(1, 2))
        valid = torch.ones(1, h, w, dtype=torch.bool)
        valid[:, : m.shape[1], : m.shape[2]] = False
        mask.append(valid.flatten(1))
    alone_value = torch.cat([m.flatten(1, 2) for m in maps], 1)
    batch_value = torch.cat([torch.cat(padded, 1), torch.randn(1, padded[0].shape[1] + padded[1].shape[1], d)])
    batch_mask = torch.cat([torch.cat(mask, 1), torch.zeros(1, batch_value.shape[1], dtype=torch.bool)])
    query = torch.randn(1, 5, d)
    ref_alone = torch.rand(1, 5, 2, 2)
    ratios = small.flip(-1).float() / big.flip(-1).float()  # (w, h) valid fraction per level
    ref_batch = torch.cat([ref_alone * ratios, torch.rand(1, 5, 2, 2)])
    with torch.no_grad():
        alone = attn(query, ref_alone, alone_value, small)
        batched = attn(torch.cat([query, torch.randn(1, 5, d)]), ref_batch, batch_value, big, batch_mask)
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)
    assert not math.isclose(batched[1].abs().sum().item(), 0.0)


def _attention_inputs(d: int = 32, levels: int = 2, queries: int = 6) -> tuple:
    shapes = torch.tensor([[6, 5], [3, 3]])[:levels]
    value = torch.randn(2, int(shapes.prod(1).sum()), d, dtype=torch.float64)
    return torch.randn(2, queries, d, dtype=torch.float64), torch.rand(2, queries, levels, 4, dtype=torch.float64), value, shapes


def _captured_weights(attn: MultiScaleDeformableAttention, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
    captured = []
    attn.capture = lambda locations, weights: captured.append(weights)
    with torch.no_grad():
        out = attn(*inputs)
    return out, captured[0]


def test_zero_query_start_weighs_every_sampled_point_alike():
    """``zero_query``: q = 0, so the softmax of q.k is 1 / (L*P), exactly plain deformable attention's start."""
    kda = MultiScaleDeformableAttention(32, 2, 4, 3, key_aware=True, kda=KeyAwareOptions(zero_query=True)).double()
    msda = MultiScaleDeformableAttention(32, 2, 4, 3).double()
    assert kda.query_proj.weight.abs().sum() == 0 and kda.query_proj.bias.abs().sum() == 0
    for name in ("sampling_offsets", "value_proj", "output_proj"):
        getattr(msda, name).load_state_dict(getattr(kda, name).state_dict())
    inputs = _attention_inputs()
    out, weights = _captured_weights(kda, *inputs)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 6))
    torch.testing.assert_close(out, msda(*inputs).detach())
    # the default (the authors') start is random: the weights differ between points
    _, authors = _captured_weights(MultiScaleDeformableAttention(32, 2, 4, 3, key_aware=True).double(), *inputs)
    assert authors.flatten(-2).std(-1).min() > 1e-3


def test_key_proj_weighs_by_its_own_keys_and_sums_the_values():
    """``key_proj``: the weights come from the key projection alone, the values from ``value_proj`` alone."""
    torch.manual_seed(1)
    kda = MultiScaleDeformableAttention(32, 2, 4, 3, key_aware=True, kda=KeyAwareOptions(key_proj=True)).double()
    shared = MultiScaleDeformableAttention(32, 2, 4, 3, key_aware=True).double()
    assert set(kda.state_dict()) - set(shared.state_dict()) == {"key_proj.weight", "key_proj.bias"}
    shared.load_state_dict({k: v for k, v in kda.state_dict().items() if not k.startswith("key_proj")})
    inputs = _attention_inputs()
    # keys projected like the values: the authors' shared layout, to rounding
    kda.key_proj.load_state_dict(kda.value_proj.state_dict())
    torch.testing.assert_close(kda(*inputs).detach(), shared(*inputs).detach())
    # zero keys: q.k = 0 for every point, so uniform weights whatever the query; the values are unchanged
    torch.nn.init.zeros_(kda.key_proj.weight)
    out, weights = _captured_weights(kda, *inputs)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 6))
    msda = MultiScaleDeformableAttention(32, 2, 4, 3).double()
    for name in ("sampling_offsets", "value_proj", "output_proj"):
        getattr(msda, name).load_state_dict(getattr(kda, name).state_dict())
    torch.testing.assert_close(out, msda(*inputs).detach())
    # another key projection changes the weights, not only the scale of the output
    torch.nn.init.normal_(kda.key_proj.weight)
    _, other = _captured_weights(kda, *inputs)
    assert (other - 1 / 6).abs().max() > 0.05


def test_query_logits_add_the_query_only_logits_of_plain_attention_to_q_dot_k():
    """``query_logits``: weights = softmax(q.k / sqrt(D) + attention_weights(query)); zero at the start,
    so it starts as KDA without it (and, with ``zero_query``, as plain deformable attention)."""
    torch.manual_seed(2)
    options = KeyAwareOptions(zero_query=True, query_logits=True)
    kda = MultiScaleDeformableAttention(32, 2, 4, 3, key_aware=True, kda=options).double()
    plain_kda = MultiScaleDeformableAttention(32, 2, 4, 3, key_aware=True).double()
    assert set(kda.state_dict()) - set(plain_kda.state_dict()) == {"attention_weights.weight", "attention_weights.bias"}
    assert kda.attention_weights.weight.abs().sum() == 0 and kda.attention_weights.bias.abs().sum() == 0
    inputs = _attention_inputs()
    _, start = _captured_weights(kda, *inputs)
    torch.testing.assert_close(start, torch.full_like(start, 1 / 6))
    # trained-like weights in every layer: the module's output is the naive softmax of the summed logits
    for layer in (kda.query_proj, kda.attention_weights):
        torch.nn.init.normal_(layer.weight, std=0.3)
        torch.nn.init.normal_(layer.bias, std=0.3)
    out, weights = _captured_weights(kda, *inputs)
    query, reference, value, shapes = inputs
    b, lq, _ = query.shape
    v = kda.value_proj(value).view(b, -1, 4, 8)
    locations = kda.sampling(query, reference, shapes)
    sampled = []  # the sampled keys (the projected values), level by level
    start_token = 0
    for level, (h, w) in enumerate(shapes.tolist()):
        maps = v[:, start_token : start_token + h * w].permute(0, 2, 3, 1).reshape(b * 4, 8, h, w)
        grid = 2 * locations[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(b * 4, lq, 3, 2) - 1
        sampled.append(F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False))  # (B*M, D, Lq, P)
        start_token += h * w
    sampled_keys = torch.cat(sampled, -1).view(b, 4, 8, lq, 6).permute(0, 3, 1, 4, 2)  # (B, Lq, M, L*P, D)
    q = kda.query_proj(query).view(b, lq, 4, 1, 8)
    logits = (q * sampled_keys).sum(-1) / math.sqrt(8) + kda.attention_weights(query).view(b, lq, 4, 6)
    expected = logits.softmax(-1)
    torch.testing.assert_close(weights.flatten(-2), expected.detach())
    expected_out = kda.output_proj((expected[..., None] * sampled_keys).sum(-2).flatten(2))
    torch.testing.assert_close(out, expected_out.detach())
    # the query-only term moves the weights: without it (the authors' KDA) they differ
    plain_kda.load_state_dict({k: t for k, t in kda.state_dict().items() if not k.startswith("attention_weights")})
    _, without = _captured_weights(plain_kda, *inputs)
    assert (without - weights).abs().max() > 0.05


def test_key_aware_options_are_ignored_by_plain_attention():
    msda = MultiScaleDeformableAttention(32, 2, 4, 3, kda=KeyAwareOptions(key_proj=True, zero_query=True))
    assert msda.kda == KeyAwareOptions() and not hasattr(msda, "key_proj")

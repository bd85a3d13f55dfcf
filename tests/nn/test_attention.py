"""MultiScaleDeformableAttention against the authors' tensors, its initialisation and padding behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import load_fixture
from litedetr.nn import MultiScaleDeformableAttention
from litedetr.models.convert import load_official_state_dict


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

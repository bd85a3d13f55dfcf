"""Standard and Lite encoders: the authors' Lite-DINO encoder memory, the token schedule, padding."""

from __future__ import annotations

import pytest
import torch
from conftest import load_fixture
from torch import nn

from litedetr.nn import DeformableEncoder, EncoderInput, LiteEncoder
from litedetr.ops import encoder_reference_points, valid_ratios
from litedetr.weights.loading import load_official_state_dict


def authors_encoder_part(fixture: dict) -> dict[str, torch.Tensor]:
    prefixes = ("input_proj.", "transformer.level_embed", "transformer.encoder.")
    return {k: v.float() for k, v in fixture["state_dict_without_backbone_body"].items() if k.startswith(prefixes)}


def test_lite_encoder_reproduces_authors_memory():
    f = load_fixture("lite_dino_h3l1_2x3_seed0.pt")
    args = f["official_args"]
    model = nn.ModuleDict(
        {
            "input_stage": EncoderInput((512, 1024, 2048), args["hidden_dim"], args["num_feature_levels"], args["pe_temperatureH"], args["pe_temperatureW"]),
            "encoder": LiteEncoder(
                n_high=args["enc_scale"],
                high_updates=args["enc_layers"] // args["num_expansion"],
                blocks=args["num_expansion"],
                d_ffn=args["dim_feedforward_enc"],
                d_ffn_low=256,
                key_aware=args["key_aware"],
            ),
        }
    ).eval()
    load_official_state_dict(model, authors_encoder_part(f))
    with torch.no_grad():
        tokens = model["input_stage"]([feat for feat, _ in f["backbone_features"]], f["image_mask"])
        memory = model["encoder"](tokens.src, tokens.pos, tokens.spatial_shapes, tokens.valid_ratios, tokens.padding_mask)
    for lvl, (_, mask) in enumerate(f["backbone_features"]):
        torch.testing.assert_close(tokens.valid_ratios[:, lvl], valid_ratios(mask))
    assert memory.shape == f["encoder_memory"].shape
    assert (memory - f["encoder_memory"]).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "n_high,a,b,expected_first_levels",
    [(3, 2, 3, [1, 0, 1, 0, 1, 0]), (3, 6, 1, [1, 1, 1, 1, 1, 0]), (2, 2, 3, [2, 0, 2, 0, 2, 0]), (3, 3, 2, [1, 1, 0, 1, 1, 0])],
)
def test_schedule_follows_hl_a_plus_1_x_b(n_high, a, b, expected_first_levels):
    shapes = torch.tensor([[100, 167], [50, 84], [25, 42], [13, 21]])
    enc = LiteEncoder(n_high, a, b, d_model=32, n_heads=4, d_ffn=64, d_ffn_low=32)
    schedule = enc.schedule(shapes)
    assert len(schedule) == a * b == len(enc.layers)
    assert [s.first_level for s in schedule] == expected_first_levels
    sizes = shapes.prod(1).tolist()
    for step in schedule:
        assert step.num_queries == sum(sizes[step.first_level :])
        assert step.narrow_ffn_tokens == (sum(sizes[: 4 - n_high]) if step.first_level == 0 else 0)
    assert sum(s.first_level == 0 for s in schedule) == b  # low-level tokens updated once per block


def test_standard_encoder_updates_every_token_every_layer():
    shapes = torch.tensor([[8, 8], [4, 4]])
    enc = DeformableEncoder(3, d_model=32, n_levels=2, n_heads=4, d_ffn=64)
    assert [(s.first_level, s.num_queries, s.narrow_ffn_tokens) for s in enc.schedule(shapes)] == [(0, 80, 0)] * 3


def test_lite_encoder_only_changes_high_level_tokens_in_high_only_layers():
    shapes = torch.tensor([[6, 6], [3, 3], [2, 2]])
    enc = LiteEncoder(n_high=2, high_updates=2, blocks=1, d_model=32, n_levels=3, n_heads=4, d_ffn=64).eval()
    src, pos = torch.randn(1, 49, 32), torch.randn(1, 49, 32)
    ratios = torch.ones(1, 3, 2)
    first = enc.layers[0]
    ref = encoder_reference_points(shapes, ratios)
    with torch.no_grad():
        high = first(src[:, 36:], pos[:, 36:], ref[:, 36:], src, shapes, None)
        expected_after_first = torch.cat([src[:, :36], high], 1)
        expected = torch.cat(
            [
                enc.layers[1].ffn_low(
                    enc.layers[1].norm(
                        expected_after_first[:, :36]
                        + enc.layers[1].self_attn(expected_after_first[:, :36] + pos[:, :36], ref[:, :36], expected_after_first, shapes)
                    )
                ),
                enc.layers[1](expected_after_first[:, 36:], pos[:, 36:], ref[:, 36:], expected_after_first, shapes, None),
            ],
            1,
        )
        out = enc(src, pos, shapes, ratios)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def padded_batch(d: int, small: torch.Tensor, big: torch.Tensor):
    """Tokens of one image alone and the same image padded into a batch beside another image."""
    alone, batch, mask = [], [], []
    for (h, w), (hb, wb) in zip(small.tolist(), big.tolist()):
        m = torch.randn(1, h, w, d)
        canvas = torch.randn(2, hb, wb, d)
        canvas[:1, :h, :w] = m
        valid = torch.zeros(2, hb, wb, dtype=torch.bool)
        valid[0] = True
        valid[0, :h, :w] = False
        alone.append(m.flatten(1, 2))
        batch.append(canvas.flatten(1, 2))
        mask.append(valid)
    return alone, batch, mask


@pytest.mark.parametrize("lite", [False, True])
def test_padded_image_encodes_as_alone(lite):
    d = 32
    small, big = torch.tensor([[8, 6], [4, 3], [2, 2]]), torch.tensor([[10, 8], [5, 4], [3, 2]])
    enc = (
        LiteEncoder(2, 2, 2, d_model=d, n_levels=3, n_heads=4, d_ffn=64, d_ffn_low=32, key_aware=True)
        if lite
        else DeformableEncoder(2, d_model=d, n_levels=3, n_heads=4, d_ffn=64)
    ).eval()
    alone, batch, masks = padded_batch(d, small, big)
    pos_alone = [torch.randn_like(a) for a in alone]
    pos_batch = []
    for p, (h, w), (hb, wb) in zip(pos_alone, small.tolist(), big.tolist()):
        canvas = torch.randn(2, hb, wb, d)
        canvas[:1, :h, :w] = p.view(1, h, w, d)
        pos_batch.append(canvas.flatten(1, 2))
    with torch.no_grad():
        out_alone = enc(torch.cat(alone, 1), torch.cat(pos_alone, 1), small, torch.ones(1, 3, 2))
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        out_batch = enc(torch.cat(batch, 1), torch.cat(pos_batch, 1), big, ratios, torch.cat([m.flatten(1) for m in masks], 1))
    valid = ~torch.cat([m.flatten(1) for m in masks], 1)[0]
    torch.testing.assert_close(out_batch[0, valid], out_alone[0], atol=1e-4, rtol=1e-4)


def test_lite_encoder_rejects_bad_splits():
    with pytest.raises(ValueError, match="n_high"):
        LiteEncoder(n_high=4, n_levels=4)
    with pytest.raises(ValueError, match="high_updates"):
        LiteEncoder(high_updates=0)


def test_input_stage_shapes_and_level_embeddings():
    stage = EncoderInput((16, 32, 64), d_model=64, n_levels=4)
    feats = [torch.randn(2, c, 32 // s, 40 // s) for c, s in ((16, 1), (32, 2), (64, 4))]
    mask = torch.zeros(2, 256, 320, dtype=torch.bool)
    mask[1, 200:] = True
    tokens = stage(feats, mask)
    assert tokens.spatial_shapes == ((32, 40), (16, 20), (8, 10), (4, 5))  # Python ints: no device sync downstream
    assert all(type(size) is int for shape in tokens.spatial_shapes for size in shape)
    assert tokens.src.shape == tokens.pos.shape == (2, 32 * 40 + 16 * 20 + 80 + 20, 64)
    assert tokens.padding_mask[0].sum() == 0 and tokens.padding_mask[1].sum() > 0
    torch.testing.assert_close(tokens.valid_ratios[0], torch.ones(4, 2))
    assert tokens.valid_ratios[1, 0].tolist() == [1.0, 25 / 32]

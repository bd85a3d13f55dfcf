"""The encoder input stage: backbone maps and an image padding mask -> flat multi-scale tokens, their level
shapes, padding masks, valid ratios and position embeddings, against references written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from litedetr.nn import EncoderInput, MultiScaleTokens
from litedetr.nn.input_stage import resize_mask

D_MODEL = 32
IN_CHANNELS = (8, 16)
IMAGE = (32, 40)
VALID = [(32, 40), (12, 20)]
"""Image 0 fills the padded batch; image 1 is 12 x 20 pixels, padded at the bottom and right."""


def image_mask() -> torch.Tensor:
    mask = torch.ones(len(VALID), *IMAGE, dtype=torch.bool)
    for b, (h, w) in enumerate(VALID):
        mask[b, :h, :w] = False
    return mask


def features(batch: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, 8, 8, 10), torch.randn(batch, 16, 4, 5)]


def nearest_by_hand(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize by index: output ``(i, j)`` reads input ``(floor(i * H / h), floor(j * W / w))``."""
    _, big_h, big_w = mask.shape
    h, w = size
    rows = [min(math.floor(i * big_h / h), big_h - 1) for i in range(h)]
    cols = [min(math.floor(j * big_w / w), big_w - 1) for j in range(w)]
    return mask[:, rows][:, :, cols]


def sine_by_hand(mask: torch.Tensor, num_feats: int, temperature_h: float, temperature_w: float, offset: float) -> torch.Tensor:
    """``(B, H, W)`` mask -> ``(B, 2 num_feats, H, W)``: per pixel, the count of image pixels up to it in its column
    (y) and row (x), plus ``offset``, over the column's / row's count, times 2 pi; y channels then x, sin on even
    channels and cos on odd ones of ``v / T^(2 floor(k / 2) / num_feats)``."""
    b, h, w = mask.shape
    out = torch.zeros(b, 2 * num_feats, h, w, dtype=torch.float64)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                column = [not mask[n, r, j] for r in range(h)]
                row = [not mask[n, i, c] for c in range(w)]
                y = (sum(column[: i + 1]) + offset) / (sum(column) + 1e-6) * 2 * math.pi
                x = (sum(row[: j + 1]) + offset) / (sum(row) + 1e-6) * 2 * math.pi
                for part, (value, temperature) in enumerate([(y, temperature_h), (x, temperature_w)]):
                    for k in range(num_feats):
                        angle = value / temperature ** (2 * (k // 2) / num_feats)
                        out[n, part * num_feats + k, i, j] = math.sin(angle) if k % 2 == 0 else math.cos(angle)
    return out


def level(tokens: torch.Tensor, shapes, lvl: int) -> torch.Tensor:
    """Level ``lvl``'s tokens ``(B, H_l * W_l, ...)`` out of the flat sequence."""
    start = sum(h * w for h, w in shapes[:lvl])
    h, w = shapes[lvl]
    return tokens[:, start : start + h * w]


def run(n_levels: int, **kwargs) -> tuple[EncoderInput, list[torch.Tensor], MultiScaleTokens]:
    torch.manual_seed(0)
    stage = EncoderInput(IN_CHANNELS, D_MODEL, n_levels, **kwargs)
    maps = features()
    with torch.no_grad():
        return stage, maps, stage(maps, image_mask())


@pytest.mark.parametrize(
    "n_levels,shapes",
    [(2, ((8, 10), (4, 5))), (3, ((8, 10), (4, 5), (2, 3))), (4, ((8, 10), (4, 5), (2, 3), (1, 2)))],
)
def test_token_count_and_level_shapes_include_the_extra_stride_2_levels(n_levels, shapes):
    _, _, tokens = run(n_levels)
    assert tokens.spatial_shapes == shapes
    count = sum(h * w for h, w in shapes)
    assert tokens.src.shape == (2, count, D_MODEL) and tokens.pos.shape == (2, count, D_MODEL)
    assert tokens.padding_mask.shape == (2, count) and tokens.padding_mask.dtype == torch.bool
    assert tokens.valid_ratios.shape == (2, n_levels, 2)


def test_levels_are_the_projected_maps_then_convolutions_of_the_last_map():
    stage, maps, tokens = run(4)
    shapes = tokens.spatial_shapes
    for lvl, x in enumerate(maps):  # backbone levels: 1x1 conv + group norm of their own map
        conv, norm = stage.input_proj[lvl]
        expected = F.group_norm(F.conv2d(x, conv.weight, conv.bias), 32, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(level(tokens.src, shapes, lvl), expected.flatten(2).transpose(1, 2))
    previous = maps[-1]  # the first extra level reads the last backbone map itself, not its projection
    for lvl in (2, 3):
        conv, norm = stage.input_proj[lvl]
        assert conv.kernel_size == (3, 3) and conv.stride == (2, 2) and conv.padding == (1, 1)
        assert conv.in_channels == (IN_CHANNELS[-1] if lvl == 2 else D_MODEL)
        previous = F.group_norm(F.conv2d(previous, conv.weight, conv.bias, stride=2, padding=1), 32, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(level(tokens.src, shapes, lvl), previous.flatten(2).transpose(1, 2))


def test_padding_mask_is_the_image_mask_resized_to_each_level_by_nearest_neighbour():
    _, _, tokens = run(4)
    mask = image_mask()
    for lvl, (h, w) in enumerate(tokens.spatial_shapes):
        expected = F.interpolate(mask[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0.5
        assert torch.equal(expected, nearest_by_hand(mask, (h, w)))
        assert torch.equal(level(tokens.padding_mask, tokens.spatial_shapes, lvl), expected.flatten(1))
    assert not tokens.padding_mask[0].any() and tokens.padding_mask[1].any()


def test_resize_mask_reads_the_nearest_input_pixel():
    mask = torch.rand(3, 7, 9) > 0.5
    for size in [(3, 4), (7, 9), (2, 5), (14, 18), (5, 3)]:
        out = resize_mask(mask, size)
        assert out.dtype == torch.bool and torch.equal(out, nearest_by_hand(mask, size))


def test_valid_ratios_are_each_levels_unpadded_fraction():
    _, _, tokens = run(3)
    # image 1 (12 x 20 of 32 x 40): nearest rows / columns 4i < 12, 4j < 20 at 8 x 10; 8i < 12, 8j < 20 at 4 x 5;
    # 16i < 12 and floor(40j / 3) < 20 at 2 x 3. As (w, h).
    expected = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], [[5 / 10, 3 / 8], [3 / 5, 2 / 4], [2 / 3, 1 / 2]]])
    torch.testing.assert_close(tokens.valid_ratios, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("temperatures,offset", [((20.0, 20.0), 0.0), ((10000.0, 20.0), -0.5)])
def test_position_is_the_sine_embedding_of_each_levels_mask_plus_its_level_embedding(temperatures, offset):
    stage, _, tokens = run(3, temperature_h=temperatures[0], temperature_w=temperatures[1], position_offset=offset)
    mask = image_mask()
    for lvl, (h, w) in enumerate(tokens.spatial_shapes):
        level_mask = nearest_by_hand(mask, (h, w))
        sine = sine_by_hand(level_mask, D_MODEL // 2, *temperatures, offset).float().flatten(2).transpose(1, 2)
        expected = sine + stage.level_embed[lvl]
        got = level(tokens.pos, tokens.spatial_shapes, lvl)
        # a row or column with no image pixel normalises by 1e-6: with an offset its angle is huge; compare the image's tokens there
        image_only = ~level_mask.flatten(1) if offset else torch.ones_like(level_mask.flatten(1))
        torch.testing.assert_close(got[image_only], expected[image_only], rtol=0, atol=2e-5)


def test_levels_of_equal_size_differ_by_their_level_embeddings_only():
    torch.manual_seed(0)
    stage = EncoderInput(IN_CHANNELS, D_MODEL, 2)
    maps = [torch.randn(2, 8, 4, 5), torch.randn(2, 16, 4, 5)]
    with torch.no_grad():
        tokens = stage(maps, image_mask())
    assert tokens.spatial_shapes == ((4, 5), (4, 5))
    first, second = tokens.pos[:, :20], tokens.pos[:, 20:]
    torch.testing.assert_close(first - second, (stage.level_embed[0] - stage.level_embed[1]).expand_as(first), rtol=0, atol=1e-6)
    assert torch.equal(tokens.padding_mask[:, :20], tokens.padding_mask[:, 20:])
    assert (stage.level_embed[0] - stage.level_embed[1]).abs().min() > 0


def test_too_few_levels_a_wrong_number_of_maps_or_a_width_off_the_groups_are_refused():
    with pytest.raises(ValueError, match=r"n_levels \(1\) < number of backbone maps \(2\)"):
        EncoderInput(IN_CHANNELS, D_MODEL, 1)
    with pytest.raises(ValueError, match=r"d_model \(48\) must be a multiple of 32"):
        EncoderInput(IN_CHANNELS, 48, 3)
    with pytest.raises(ValueError, match="expected 2 feature maps, got 1"):
        EncoderInput(IN_CHANNELS, D_MODEL, 3)(features()[:1], image_mask())

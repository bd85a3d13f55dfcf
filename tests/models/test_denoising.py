"""DINO's contrastive denoising queries: layout, noise bounds and rates, attention mask, splitting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from litedetr.models.criterion import dn_match_indices
from litedetr.models.denoising import DenoisingQueries, build_denoising_queries
from litedetr.ops import box_cxcywh_to_xyxy


def make_target(labels: list[int], boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor(labels, dtype=torch.long), "boxes": torch.tensor(boxes).reshape(-1, 4)}


def uneven_targets() -> list[dict[str, torch.Tensor]]:
    """Three images with 3, 1 and 0 targets."""
    return [
        make_target([1, 4, 2], [[0.3, 0.4, 0.2, 0.1], [0.6, 0.5, 0.3, 0.4], [0.5, 0.5, 0.8, 0.6]]),
        make_target([3], [[0.7, 0.2, 0.1, 0.2]]),
        make_target([], []),
    ]


def central_targets(num_images: int, num_boxes: int, num_classes: int) -> list[dict[str, torch.Tensor]]:
    """Boxes so far inside the image that shifts of up to a full box size are never clamped."""
    targets = []
    for _ in range(num_images):
        centres = 0.4 + 0.2 * torch.rand(num_boxes, 2)
        sizes = 0.05 + 0.15 * torch.rand(num_boxes, 2)
        labels = torch.randint(0, num_classes, (num_boxes,))
        targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], 1)})
    return targets


def no_noise(targets, label_embed, num_classes=5, num_matching_queries=7, num_dn=10) -> DenoisingQueries:
    return build_denoising_queries(targets, label_embed, num_classes, num_matching_queries, num_dn, label_noise_ratio=0.0, box_noise_scale=0.0)


def test_group_count_layout_and_meta_for_uneven_targets():
    embed = nn.Embedding(5, 8)
    dn = no_noise(uneven_targets(), embed, num_dn=10)
    assert (dn.num_groups, dn.group_size, dn.pad) == (3, 6, 18)  # N_max = 3, G = 10 // 3
    assert dn.meta() == {"num_groups": 3, "group_size": 6}
    assert dn.num_matching_queries == 7
    assert dn.content.shape == (3, 18, 8)
    assert dn.boxes.shape == (3, 18, 4)
    assert dn.attn_mask.shape == (25, 25) and dn.attn_mask.dtype == torch.bool
    assert dn.content.requires_grad
    for b, target in enumerate(uneven_targets()):
        for g in range(3):
            for half in (0, 3):
                for j, label in enumerate(target["labels"]):
                    slot = g * 6 + half + j
                    torch.testing.assert_close(dn.content[b, slot], embed.weight[label])
                    torch.testing.assert_close(dn.boxes[b, slot].sigmoid(), target["boxes"][j], atol=1e-6, rtol=0)


def test_positive_slots_are_the_ones_the_criterion_pairs():
    targets = uneven_targets()
    dn = no_noise(targets, nn.Embedding(5, 8), num_dn=10)
    sizes = [len(t["labels"]) for t in targets]
    for b, (query_idx, tgt_idx) in enumerate(dn_match_indices(sizes, **dn.meta())):
        assert len(query_idx) == dn.num_groups * sizes[b]
        torch.testing.assert_close(dn.boxes[b, query_idx].sigmoid(), targets[b]["boxes"][tgt_idx], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("num_dn", "n_max", "groups"), [(100, 3, 33), (100, 1, 100), (4, 3, 1), (2, 5, 1)])
def test_number_of_groups(num_dn, n_max, groups):
    targets = central_targets(2, n_max, num_classes=5)
    targets[1] = {"labels": targets[1]["labels"][:1], "boxes": targets[1]["boxes"][:1]}
    dn = build_denoising_queries(targets, nn.Embedding(5, 4), 5, num_matching_queries=3, num_dn=num_dn)
    assert dn.num_groups == groups
    assert dn.group_size == 2 * n_max
    assert dn.content.shape[1] == dn.boxes.shape[1] == groups * 2 * n_max


def test_padding_slots_are_zero_with_noise_on():
    dn = build_denoising_queries(uneven_targets(), nn.Embedding(5, 8), 5, num_matching_queries=7, num_dn=10)
    slots = torch.arange(dn.pad) % dn.group_size % (dn.group_size // 2)  # offset j inside each half
    for b, num in enumerate([3, 1, 0]):
        padding = slots >= num
        assert (dn.content[b, padding] == 0).all() and (dn.boxes[b, padding] == 0).all()
        assert (dn.content[b, ~padding] != 0).any(-1).all()
        assert (dn.boxes[b, ~padding] != 0).any(-1).all()


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_box_noise_bounds_for_positives_and_negatives(scale):
    targets = central_targets(4, 10, num_classes=3)
    dn = build_denoising_queries(targets, nn.Embedding(3, 4), 3, 5, num_dn=100, box_noise_scale=scale)
    corners = box_cxcywh_to_xyxy(torch.stack([t["boxes"] for t in targets]))  # (B, N, 4)
    half_wh = torch.stack([t["boxes"][:, 2:] / 2 for t in targets])
    half_size = torch.cat([half_wh, half_wh], -1) * scale
    noisy_boxes = dn.boxes.sigmoid().unflatten(1, (dn.num_groups, 2, 10))  # (B, G, 2, N, 4)
    ratio = (box_cxcywh_to_xyxy(noisy_boxes) - corners[:, None, None]) / half_size[:, None, None]
    # Where both corners of an axis move inwards far enough, they cross; the width is then negative
    # and inverse_sigmoid clamps it to its eps, so the corners cannot be read back. Only negatives
    # at scale > 0.5 can cross: both move inwards (chance 1/4) by at least one half size each.
    collapsed = (noisy_boxes[..., 2:] < 2e-3).repeat(1, 1, 1, 1, 2)
    assert collapsed[:, :, 0].float().mean() < 0.01
    expected_collapsed = 0.25 if scale > 0.5 else 0.0
    assert abs(collapsed[:, :, 1].float().mean().item() - expected_collapsed) < 0.05
    positives = ratio[:, :, 0][~collapsed[:, :, 0]].abs()
    negatives = ratio[:, :, 1][~collapsed[:, :, 1]].abs()
    tol = 1e-3
    assert positives.max() <= 1 + tol
    assert negatives.min() >= 1 - tol and negatives.max() <= 2 + tol
    # The magnitudes fill their ranges and both directions occur.
    assert positives.min() < 0.05 and positives.max() > 0.95
    assert negatives.min() < 1.05 and negatives.max() > 1.95
    assert 0.4 < (ratio[~collapsed] > 0).float().mean() < 0.6


def test_box_noise_is_clamped_to_the_image():
    target = make_target([0], [[0.05, 0.95, 0.1, 0.1]])
    dn = build_denoising_queries([target], nn.Embedding(2, 4), 2, 3, num_dn=200, box_noise_scale=1.0)
    corners = box_cxcywh_to_xyxy(dn.boxes.sigmoid())
    assert corners.min() >= -1e-6 and corners.max() <= 1 + 1e-6
    assert corners[..., 0].min() < 1e-6 and corners[..., 3].max() > 1 - 1e-6


def test_label_noise_rate_is_half_the_ratio():
    num_classes, ratio = 100, 0.5
    targets = central_targets(50, 20, num_classes)
    # A one-dimensional embedding that reads back the class index.
    embed = nn.Embedding.from_pretrained(torch.arange(num_classes, dtype=torch.float)[:, None])
    dn = build_denoising_queries(targets, embed, num_classes, 5, num_dn=100, label_noise_ratio=ratio, box_noise_scale=0.0)
    noisy = dn.content[..., 0].unflatten(1, (dn.num_groups, 2, 20)).long()  # (B, G, 2, N)
    original = torch.stack([t["labels"] for t in targets])[:, None, None]
    changed = (noisy != original).float()  # a replacement draws the original class with probability 1 / K
    expected = ratio / 2 * (1 - 1 / num_classes)
    assert changed.numel() == 10_000
    assert abs(changed.mean().item() - expected) < 0.015
    for half in (0, 1):
        assert abs(changed[:, :, half].mean().item() - expected) < 0.025
    assert noisy.min() >= 0 and noisy.max() < num_classes
    assert len(noisy[noisy != original].unique()) > 90  # replacements spread over the classes


def test_no_noise_reproduces_the_targets():
    targets = central_targets(3, 6, num_classes=7)
    embed = nn.Embedding(7, 16)
    dn = no_noise(targets, embed, num_classes=7, num_dn=12)
    layout = (dn.num_groups, 2, 6)
    boxes = dn.boxes.sigmoid().unflatten(1, layout)
    content = dn.content.unflatten(1, layout)
    for b, target in enumerate(targets):
        torch.testing.assert_close(boxes[b], target["boxes"].expand(*layout, 4), atol=1e-6, rtol=0)
        torch.testing.assert_close(content[b], embed(target["labels"]).expand(*layout, 16))


def test_box_logits_are_clamped_with_dinos_eps():
    whole_image = make_target([0], [[0.5, 0.5, 1.0, 1.0]])
    dn = no_noise([whole_image], nn.Embedding(5, 4), num_dn=1)
    limit = torch.log(torch.tensor(1 / 1e-3))  # inverse_sigmoid(1, eps=1e-3), finite
    torch.testing.assert_close(dn.boxes[0], torch.tensor([[0.0, 0.0, limit, limit]] * 2))


def test_same_seed_same_queries():
    targets = central_targets(2, 4, num_classes=5)
    embed = nn.Embedding(5, 8)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(build_denoising_queries(targets, embed, 5, 3))
    assert torch.equal(runs[0].content, runs[1].content) and torch.equal(runs[0].boxes, runs[1].boxes)
    assert not torch.equal(runs[0].boxes, build_denoising_queries(targets, embed, 5, 3).boxes)


def test_attention_mask_entries():
    targets = [make_target([0, 1], [[0.5, 0.5, 0.2, 0.2]] * 2), make_target([2], [[0.4, 0.4, 0.1, 0.1]])]
    dn = no_noise(targets, nn.Embedding(5, 4), num_matching_queries=3, num_dn=4)
    assert (dn.num_groups, dn.group_size, dn.pad) == (2, 4, 8)
    mask = dn.attn_mask
    assert mask.shape == (11, 11)
    for i in range(11):
        for j in range(11):
            if i >= 8:  # matching query: blind to every denoising query
                blocked = j < 8
            else:  # denoising query: sees its own group and the matching queries
                blocked = j < 8 and i // 4 != j // 4
            assert mask[i, j].item() == blocked, (i, j)


def test_attention_mask_isolates_groups_and_matching_queries_in_attention():
    targets = central_targets(2, 3, num_classes=5)
    dn = build_denoising_queries(targets, nn.Embedding(5, 8), 5, num_matching_queries=4, num_dn=6)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    queries = torch.cat([dn.content, torch.randn(2, 4, 8)], 1).detach()
    changed = queries.clone()
    changed[:, : dn.group_size] = torch.randn(2, dn.group_size, 8)  # perturb group 0 only
    with torch.no_grad():
        before = attention(queries, queries, queries, attn_mask=dn.attn_mask)[0]
        after = attention(changed, changed, changed, attn_mask=dn.attn_mask)[0]
    dn_before, match_before = before[:, : dn.pad], before[:, dn.pad :]
    dn_after, match_after = after[:, : dn.pad], after[:, dn.pad :]
    torch.testing.assert_close(match_after, match_before)
    torch.testing.assert_close(dn_after[:, dn.group_size :], dn_before[:, dn.group_size :])
    assert not torch.allclose(dn_after[:, : dn.group_size], dn_before[:, : dn.group_size])


def test_no_targets_gives_none():
    empty = make_target([], [])
    assert build_denoising_queries([empty, empty], nn.Embedding(5, 4), 5, 3) is None
    assert build_denoising_queries([], nn.Embedding(5, 4), 5, 3) is None


@pytest.mark.parametrize(("ratio", "scale"), [(-0.1, 1.0), (1.5, 1.0), (0.5, -1.0)])
def test_noise_parameters_out_of_range_raise(ratio, scale):
    with pytest.raises(ValueError, match="label_noise_ratio|box_noise_scale"):
        build_denoising_queries(uneven_targets(), nn.Embedding(5, 4), 5, 3, label_noise_ratio=ratio, box_noise_scale=scale)

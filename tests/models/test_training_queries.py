"""Training-only decoder queries: none (NoTrainingQueries), H-DETR's one-to-many group and DINO's denoising
queries, their attention masks, group slices and values against loops written here."""

from __future__ import annotations

import pytest
import torch

from litedetr.models.query_selection import DecoderQueries
from litedetr.models.training_queries import Denoising, NoTrainingQueries, OneToManyGroup, TrainingQueries
from litedetr.ops import box_cxcywh_to_xyxy

D_MODEL, NUM_CLASSES, Q = 32, 3, 5


def decoder_queries(batch: int = 2, num: int = Q, position: bool = False) -> DecoderQueries:
    return DecoderQueries(
        content=torch.randn(batch, num, D_MODEL),
        reference=torch.randn(batch, num, 4),
        position=torch.randn(batch, num, D_MODEL) if position else None,
        groups={"one_to_one": slice(0, num)},
    )


def targets() -> list[dict[str, torch.Tensor]]:
    """Two images: two objects and one, away from the image borders."""
    return [
        {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.5, 0.4, 0.2, 0.3], [0.3, 0.6, 0.1, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.3, 0.2]])},
    ]


def no_targets() -> list[dict[str, torch.Tensor]]:
    return [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2


def test_none_returns_the_queries_unchanged_and_the_base_class_is_only_the_interface():
    queries = decoder_queries(position=True)
    parts = NoTrainingQueries()
    assert parts.extra_selected == 0
    assert parts(queries, targets()) is queries
    with pytest.raises(NotImplementedError):
        TrainingQueries()(queries, targets())


def test_one_to_many_group_masks_the_two_groups_from_each_other():
    n = 3
    queries = decoder_queries(num=Q + n, position=True)
    part = OneToManyGroup(n)
    assert part.extra_selected == n
    out = part(queries, targets())
    assert out.content is queries.content and out.reference is queries.reference and out.position is queries.position
    assert out.groups == {"one_to_one": slice(0, Q), "one_to_many": slice(Q, Q + n)}
    expected = torch.tensor([[(i < Q) != (j < Q) for j in range(Q + n)] for i in range(Q + n)])
    assert out.attn_mask.dtype == torch.bool and torch.equal(out.attn_mask, expected)
    assert not out.attn_mask[:Q, :Q].any() and not out.attn_mask[Q:, Q:].any()
    assert out.attn_mask[:Q, Q:].all() and out.attn_mask[Q:, :Q].all()
    assert out.dn_meta is None


def test_denoising_without_noise_puts_the_targets_in_front():
    torch.manual_seed(0)
    part = Denoising(D_MODEL, NUM_CLASSES, number=4, label_noise_ratio=0.0, box_noise_scale=0.0)
    queries = decoder_queries()
    out = part(queries, targets())
    n_max, groups = 2, 2  # G = max(1, 4 // N_max)
    group_size, pad = 2 * n_max, 2 * 2 * n_max
    assert out.dn_meta == {"num_groups": groups, "group_size": group_size}
    assert out.groups == {"dn": slice(0, pad), "one_to_one": slice(pad, pad + Q)}
    assert list(out.groups) == ["dn", "one_to_one"]
    assert out.content.shape == (2, pad + Q, D_MODEL) and out.reference.shape == (2, pad + Q, 4)
    assert torch.equal(out.content[:, pad:], queries.content) and torch.equal(out.reference[:, pad:], queries.reference)
    assert out.position is None

    weight = part.label_embed.weight
    for b, target in enumerate(targets()):
        for g in range(groups):
            for half in range(2):  # positives, then negatives
                for j in range(n_max):
                    slot = g * group_size + half * n_max + j
                    if j < len(target["labels"]):
                        assert torch.equal(out.content[b, slot], weight[target["labels"][j]])
                        torch.testing.assert_close(out.reference[b, slot].sigmoid(), target["boxes"][j], rtol=0, atol=1e-6)
                    else:  # padding slot
                        assert torch.equal(out.content[b, slot], torch.zeros(D_MODEL))
                        assert torch.equal(out.reference[b, slot], torch.zeros(4))

    total = pad + Q
    expected = torch.zeros(total, total, dtype=torch.bool)
    for i in range(total):
        for j in range(total):
            if i >= pad and j < pad:  # a matching query never reads the ground truth
                expected[i, j] = True
            elif i < pad and j < pad:  # denoising groups do not read each other
                expected[i, j] = i // group_size != j // group_size
    assert torch.equal(out.attn_mask, expected)


def test_denoising_shifts_the_groups_and_keeps_the_one_to_many_mask():
    n = 2
    queries = OneToManyGroup(n)(decoder_queries(num=Q + n), targets())
    out = Denoising(D_MODEL, NUM_CLASSES, number=4, label_noise_ratio=0.0, box_noise_scale=0.0)(queries, targets())
    pad = 8
    assert out.groups == {"dn": slice(0, pad), "one_to_one": slice(pad, pad + Q), "one_to_many": slice(pad + Q, pad + Q + n)}
    assert torch.equal(out.attn_mask[pad:, pad:], queries.attn_mask)
    assert out.attn_mask[pad:, :pad].all() and not out.attn_mask[:pad, pad:].any()
    for name in ("one_to_one", "one_to_many"):
        assert torch.equal(out.content[:, out.groups[name]], queries.content[:, queries.groups[name]])


def test_noised_denoising_queries_stay_within_their_bounds_and_repeat_with_the_seed():
    part = Denoising(D_MODEL, NUM_CLASSES, number=6, label_noise_ratio=1.0, box_noise_scale=1.0)
    queries = decoder_queries()
    torch.manual_seed(7)
    out = part(queries, targets())
    torch.manual_seed(7)
    again = part(queries, targets())
    assert torch.equal(out.content, again.content) and torch.equal(out.reference, again.reference)

    n_max, groups = 2, 3
    group_size = 2 * n_max
    weight = part.label_embed.weight
    changed_label = moved = False
    checked_negatives = 0
    for b, target in enumerate(targets()):
        for g in range(groups):
            for j, (label, box) in enumerate(zip(target["labels"], target["boxes"])):
                positive, negative = g * group_size + j, g * group_size + n_max + j
                for slot in (positive, negative):  # a noised label is one of the K classes, never the extra row K
                    rows = [k for k in range(NUM_CLASSES + 1) if torch.equal(out.content[b, slot], weight[k])]
                    assert len(rows) == 1 and rows[0] < NUM_CLASSES
                    changed_label |= rows[0] != int(label)
                # a positive's corners move by less than half the box size (boxes are inside the image: no clamp)
                half = torch.cat([box[2:], box[2:]]) / 2
                shift = box_cxcywh_to_xyxy(out.reference[b, positive].sigmoid()) - box_cxcywh_to_xyxy(box)
                assert (shift.abs() <= half + 1e-5).all()
                moved |= bool((shift.abs() > 1e-4).any())
                # a negative's corners move by one to two half sizes, on each axis whose box did not turn inside out
                negative_box = out.reference[b, negative].sigmoid()
                shift = box_cxcywh_to_xyxy(negative_box) - box_cxcywh_to_xyxy(box)
                for axis in (0, 1):
                    if negative_box[2 + axis] > 2e-3:  # a width or height at the clamp (about 1e-3) hides the corners
                        corners = shift[[axis, axis + 2]].abs()
                        assert (corners >= half[axis] - 1e-5).all() and (corners < 2 * half[axis] + 1e-5).all()
                        checked_negatives += 1
    assert changed_label and moved and checked_negatives > 0
    assert torch.equal(out.content[:, groups * group_size :], queries.content)


def test_denoising_without_targets_keeps_the_queries_and_a_zero_gradient_for_the_labels():
    part = Denoising(D_MODEL, NUM_CLASSES, number=4, label_noise_ratio=0.5, box_noise_scale=1.0)
    queries = decoder_queries()
    out = part(queries, no_targets())
    assert torch.equal(out.content, queries.content)
    assert out.reference is queries.reference and out.attn_mask is None and out.dn_meta is None
    assert out.groups == {"one_to_one": slice(0, Q)}
    out.content.sum().backward()
    grad = part.label_embed.weight.grad
    assert grad is not None and torch.equal(grad, torch.zeros_like(part.label_embed.weight))

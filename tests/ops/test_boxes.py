import pytest
import torch
import torchvision.ops as tvops
from conftest import fast_nms_reference

from litedetr.ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, distinct_topk, generalized_box_iou, inverse_sigmoid


def random_xyxy(n: int, generator: torch.Generator) -> torch.Tensor:
    top_left = torch.rand(n, 2, generator=generator)
    size = torch.rand(n, 2, generator=generator) * 0.5 + 0.01
    return torch.cat([top_left, top_left + size], 1)


def test_conversions_match_torchvision_and_round_trip():
    g = torch.Generator().manual_seed(0)
    cxcywh = torch.rand(2, 7, 4, generator=g)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert xyxy.shape == (2, 7, 4)
    torch.testing.assert_close(xyxy.view(-1, 4), tvops.box_convert(cxcywh.view(-1, 4), "cxcywh", "xyxy"))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)


def test_conversion_by_hand():
    box = torch.tensor([0.5, 0.4, 0.2, 0.6])
    torch.testing.assert_close(box_cxcywh_to_xyxy(box), torch.tensor([0.4, 0.1, 0.6, 0.7]))


def test_box_iou_matches_torchvision():
    g = torch.Generator().manual_seed(1)
    a, b = random_xyxy(5, g), random_xyxy(8, g)
    iou, union = box_iou(a, b)
    assert iou.shape == union.shape == (5, 8)
    torch.testing.assert_close(iou, tvops.box_iou(a, b))


def test_box_iou_of_batches_is_each_pairs():
    g = torch.Generator().manual_seed(2)
    a, b = random_xyxy(6, g).view(2, 3, 4), random_xyxy(10, g).view(2, 5, 4)
    iou, _ = box_iou(a, b)
    assert iou.shape == (2, 3, 5)
    for i in range(2):
        torch.testing.assert_close(iou[i], tvops.box_iou(a[i], b[i]))


@pytest.mark.parametrize("threshold, candidates", [(0.5, 40), (0.3, 25), (0.8, 12)])
def test_distinct_topk_matches_a_loop_reference(threshold, candidates):
    g = torch.Generator().manual_seed(3)
    scores, boxes = torch.rand(3, 40, generator=g), random_xyxy(120, g).view(3, 40, 4)
    picked = distinct_topk(scores, boxes, 10, threshold, candidates)
    assert picked.shape == (3, 10)
    for i in range(3):
        assert picked[i].tolist() == fast_nms_reference(scores[i], boxes[i], 10, threshold, candidates)


def test_distinct_topk_keeps_one_box_per_cluster_as_greedy_nms_then_fills_in_by_score():
    # three far-apart clusters of near-copies: greedy NMS (torchvision) keeps each cluster's best
    g = torch.Generator().manual_seed(4)
    centres = torch.tensor([[0.1, 0.1], [0.5, 0.5], [0.8, 0.2]]).repeat_interleave(4, 0)
    jitter = torch.rand(12, 2, generator=g) * 0.004
    boxes = torch.cat([centres + jitter, centres + jitter + 0.1], 1)
    scores = torch.rand(12, generator=g)
    picked = distinct_topk(scores[None], boxes[None], 5, 0.7, 12)[0]
    assert sorted(picked[:3].tolist()) == sorted(tvops.nms(boxes, scores, 0.7).tolist())
    assert scores[picked[:3]].tolist() == sorted(scores[picked[:3]].tolist(), reverse=True)
    rest = [i for i in scores.argsort(descending=True).tolist() if i not in picked[:3].tolist()]
    assert picked[3:].tolist() == rest[:2]
    assert torch.equal(distinct_topk(scores[None], boxes[None], 5, 0.99, 12)[0], scores.topk(5).indices)


def test_box_iou_and_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    iou, union = box_iou(a, b)
    # overlap 1, union 4 + 4 - 1 = 7; disjoint: union 4 + 1; identical: union 4
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0, 1.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 5.0, 4.0]]))
    # enclosing boxes: 3x3 = 9, 5x2 = 10, 2x2 = 4
    expected = torch.tensor([[1 / 7 - (9 - 7) / 9, 0.0 - (10 - 5) / 10, 1.0]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected)


def test_generalized_box_iou_matches_torchvision():
    g = torch.Generator().manual_seed(2)
    a, b = random_xyxy(6, g), random_xyxy(4, g)
    giou = generalized_box_iou(a, b)
    assert giou.shape == (6, 4)
    torch.testing.assert_close(giou, tvops.generalized_box_iou(a, b))
    assert (giou <= 1).all() and (giou >= -1).all()


def test_generalized_box_iou_empty():
    assert generalized_box_iou(torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 1.0, 1.0]])).shape == (0, 1)


def test_generalized_box_iou_rejects_degenerate_boxes():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 0.4, 1.0]])
    with pytest.raises(ValueError, match=r"boxes2.*x1 < x0.*index 1"):
        generalized_box_iou(good, bad)
    with pytest.raises(ValueError, match="boxes1"):
        generalized_box_iou(bad, good)


def test_inverse_sigmoid():
    x = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(inverse_sigmoid(x).sigmoid(), x)
    torch.testing.assert_close(inverse_sigmoid(x), torch.logit(x))
    extremes = inverse_sigmoid(torch.tensor([0.0, 1.0, -0.5, 1.5]))
    bound = torch.log(torch.tensor(1e-5))
    assert torch.isfinite(extremes).all()
    torch.testing.assert_close(extremes, torch.stack([bound, -bound, bound, -bound]))
    assert inverse_sigmoid(torch.tensor([0.0]), eps=1e-3) == torch.log(torch.tensor(1e-3))


def reference_iou_giou(a: list[float], b: list[float], eps: float) -> tuple[float, float]:
    """One pair of xyxy boxes, written out: DINO's formulas for ``eps = 1e-6``, Deformable DETR's for 0."""
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = area_a + area_b - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    iou = inter / (union + eps)
    return iou, iou - (enclosing - union) / (enclosing + eps)


def test_iou_and_giou_eps_on_tiny_boxes_by_hand():
    # areas of 1e-6: an eps of 1e-6 in the denominators changes the values a lot
    a = [[0.0, 0.0, 1e-3, 1e-3]]
    b = [[0.0, 0.0, 1e-3, 1e-3], [5e-4, 5e-4, 1.5e-3, 1.5e-3], [2e-3, 0.0, 3e-3, 1e-3], [0.1, 0.1, 0.3, 0.4]]
    a_t, b_t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    for eps in (0.0, 1e-6):
        expected = [reference_iou_giou(a[0], box, eps) for box in b]
        iou, union = box_iou(a_t, b_t, eps=eps)
        torch.testing.assert_close(iou, torch.tensor([[i for i, _ in expected]], dtype=torch.float64))
        torch.testing.assert_close(union, box_iou(a_t, b_t)[1])  # the union is returned without eps
        torch.testing.assert_close(generalized_box_iou(a_t, b_t, eps=eps), torch.tensor([[g for _, g in expected]], dtype=torch.float64))
    # identical boxes: 1 without eps, 1e-6 / 2e-6 with; disjoint: -1/3 without, -1/4 with
    torch.testing.assert_close(generalized_box_iou(a_t, b_t)[0, [0, 2]], torch.tensor([1.0, -1 / 3], dtype=torch.float64))
    torch.testing.assert_close(generalized_box_iou(a_t, b_t, eps=1e-6)[0, [0, 2]], torch.tensor([0.5, -0.25], dtype=torch.float64))


def test_giou_eps_keeps_zero_area_boxes_finite():
    points = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.3, 0.2, 0.3]])
    assert torch.isnan(generalized_box_iou(points, points)).all()
    giou = generalized_box_iou(points, points, eps=1e-6)
    # same point: iou 0 / 1e-6, enclosing 0; different points: union 0, enclosing 0.09 -> -0.09 / (0.09 + 1e-6)
    torch.testing.assert_close(giou, torch.tensor([[0.0, -0.09 / (0.09 + 1e-6)], [-0.09 / (0.09 + 1e-6), 0.0]]))


def test_eps_zero_is_the_default_and_large_boxes_barely_change():
    g = torch.Generator().manual_seed(3)
    a, b = random_xyxy(5, g), random_xyxy(3, g)
    assert torch.equal(generalized_box_iou(a, b, eps=0.0), generalized_box_iou(a, b))
    torch.testing.assert_close(generalized_box_iou(a, b, eps=1e-6), generalized_box_iou(a, b), rtol=0, atol=1e-3)

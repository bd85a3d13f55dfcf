import pytest
import torch
import torchvision.ops as tvops

from litedetr.ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou, inverse_sigmoid


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

import itertools

import torch

from litedetr.models.matcher import HungarianMatcher, focal_class_cost
from litedetr.ops import box_cxcywh_to_xyxy, generalized_box_iou


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.2 + 0.05
    return torch.cat([centre, size], 1)


def perfect_outputs(targets, num_queries: int, num_classes: int, permutations):
    """Queries ``permutation[j]`` predict target ``j`` exactly; the rest predict junk."""
    g = torch.Generator().manual_seed(3)
    logits = torch.full((len(targets), num_queries, num_classes), -8.0)
    boxes = random_boxes(len(targets) * num_queries, g).view(len(targets), num_queries, 4) * 0.3
    for b, (t, perm) in enumerate(zip(targets, permutations)):
        logits[b, perm, t["labels"]] = 8.0
        boxes[b, perm] = t["boxes"]
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_recovers_known_permutation():
    g = torch.Generator().manual_seed(0)
    targets = [
        {"labels": torch.tensor([3, 1, 4, 1]), "boxes": random_boxes(4, g)},
        {"labels": torch.tensor([0, 2]), "boxes": random_boxes(2, g)},
    ]
    permutations = [torch.tensor([7, 2, 9, 0]), torch.tensor([5, 1])]
    outputs = perfect_outputs(targets, num_queries=10, num_classes=5, permutations=permutations)
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == 2
    for (pred_idx, tgt_idx), perm in zip(indices, permutations):
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert torch.equal(pred_idx, perm.sort().values)
        assert torch.equal(perm[tgt_idx], pred_idx)


def test_assignment_is_the_minimum_cost_one():
    g = torch.Generator().manual_seed(1)
    outputs = {"pred_logits": torch.randn(1, 4, 3, generator=g), "pred_boxes": random_boxes(4, g)[None]}
    targets = [{"labels": torch.tensor([0, 2, 1]), "boxes": random_boxes(3, g)}]
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"])
    pred_idx, tgt_idx = matcher(outputs, targets)[0]
    best = min(sum(cost[q, j] for j, q in enumerate(queries)) for queries in itertools.permutations(range(4), 3))
    torch.testing.assert_close(cost[pred_idx, tgt_idx].sum(), best)


def test_cost_matrix_terms():
    g = torch.Generator().manual_seed(2)
    logits, boxes = torch.randn(5, 4, generator=g), random_boxes(5, g)
    labels, tgt_boxes = torch.tensor([1, 3]), random_boxes(2, g)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    prob = logits.sigmoid()[:, labels]
    pos = 0.25 * (1 - prob) ** 2 * -torch.log(prob)
    neg = 0.75 * prob**2 * -torch.log(1 - prob)
    l1 = (boxes[:, None] - tgt_boxes[None]).abs().sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    expected = 2.0 * (pos - neg) + 5.0 * l1 - 2.0 * giou
    torch.testing.assert_close(matcher.cost_matrix(logits, boxes, labels, tgt_boxes), expected)
    torch.testing.assert_close(focal_class_cost(logits, labels), pos - neg, rtol=1e-5, atol=1e-6)


def test_images_with_zero_targets():
    g = torch.Generator().manual_seed(4)
    outputs = {"pred_logits": torch.randn(3, 6, 2, generator=g), "pred_boxes": random_boxes(18, g).view(3, 6, 4)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    some = {"labels": torch.tensor([1, 0]), "boxes": random_boxes(2, g)}
    matcher = HungarianMatcher()

    indices = matcher(outputs, [empty, some, empty])
    assert [len(p) for p, _ in indices] == [0, 2, 0]
    assert indices[0][0].dtype == torch.int64
    assert sorted(indices[1][1].tolist()) == [0, 1]

    all_empty = matcher(outputs, [empty, empty, empty])
    assert [(len(p), len(t)) for p, t in all_empty] == [(0, 0)] * 3
    assert all(p.dtype == t.dtype == torch.int64 for p, t in all_empty)


def test_more_targets_than_queries_matches_every_query():
    g = torch.Generator().manual_seed(5)
    outputs = {"pred_logits": torch.randn(1, 2, 3, generator=g), "pred_boxes": random_boxes(2, g)[None]}
    targets = [{"labels": torch.tensor([0, 1, 2]), "boxes": random_boxes(3, g)}]
    pred_idx, tgt_idx = HungarianMatcher()(outputs, targets)[0]
    assert pred_idx.tolist() == [0, 1] and len(set(tgt_idx.tolist())) == 2


def test_giou_eps_reaches_the_cost():
    # tiny boxes (areas ~1e-6), where DINO's eps of 1e-6 moves the GIoU a lot
    f64 = {"dtype": torch.float64}
    logits = torch.tensor([[0.3, -1.0, 2.0], [-0.5, 1.5, 0.0]], **f64)
    boxes = torch.tensor([[0.5, 0.5, 1e-3, 1e-3], [0.5012, 0.5, 1e-3, 1e-3]], **f64)
    labels, tgt_boxes = torch.tensor([1]), torch.tensor([[0.5, 0.5, 1e-3, 1e-3]], **f64)
    plain, dino = HungarianMatcher(), HungarianMatcher(giou_eps=1e-6)
    assert dino.giou_eps == 1e-6 and plain.giou_eps == 0.0
    l1 = torch.tensor([[0.0], [0.0012]], **f64)
    # identical boxes: iou 1e-6 / (1e-6 + eps); shifted: disjoint, union 2e-6, enclosing 2.2e-3 x 1e-3
    giou = torch.tensor([[1.0], [0.0 - (2.2e-6 - 2e-6) / 2.2e-6]], **f64)
    giou_eps = torch.tensor([[1e-6 / 2e-6], [0.0 - (2.2e-6 - 2e-6) / 3.2e-6]], **f64)
    cost_class = focal_class_cost(logits, labels)
    torch.testing.assert_close(plain.cost_matrix(logits, boxes, labels, tgt_boxes), 2 * cost_class + 5 * l1 - 2 * giou)
    torch.testing.assert_close(dino.cost_matrix(logits, boxes, labels, tgt_boxes), 2 * cost_class + 5 * l1 - 2 * giou_eps)


def test_giou_eps_matches_zero_area_predictions():
    outputs = {"pred_logits": torch.zeros(1, 2, 2), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.0, 0.0]]])}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.21, 0.2, 0.0, 0.0]])}]
    plain = HungarianMatcher()
    assert not torch.isfinite(plain.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"])).all()
    assert [idx.tolist() for idx in plain(outputs, targets)[0]] == [[0], [0]]  # NaN costs rank last, not raise: the loss shows it
    pred_idx, tgt_idx = HungarianMatcher(giou_eps=1e-6)(outputs, targets)[0]
    assert pred_idx.tolist() == [1] and tgt_idx.tolist() == [0]

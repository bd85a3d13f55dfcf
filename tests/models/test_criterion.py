import itertools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from litedetr.models.criterion import DEFAULT_WEIGHTS, DEFORMABLE_WEIGHTS, SetCriterion, dn_match_indices, sigmoid_focal_loss
from litedetr.models.matcher import HungarianMatcher

K = 5
BASE = ("loss_class", "loss_bbox", "loss_giou")


def random_boxes(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    centre = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(*shape, 2, generator=generator) * 0.2 + 0.05
    return torch.cat([centre, size], -1)


def make_targets(sizes, generator):
    return [{"labels": torch.randint(0, K, (n,), generator=generator), "boxes": random_boxes((n,), generator)} for n in sizes]


def random_outputs(batch: int, queries: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "pred_logits": torch.randn(batch, queries, K, generator=generator),
        "pred_boxes": random_boxes((batch, queries), generator),
    }


@pytest.fixture
def criterion() -> SetCriterion:
    return SetCriterion(K, HungarianMatcher())


def reference_class_loss(logits, targets, indices, num_boxes):
    onehot = torch.zeros_like(logits)
    for b, (src, tgt) in enumerate(indices):
        onehot[b, src, targets[b]["labels"][tgt]] = 1
    loss = tv_sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction="none")
    return loss.mean(1).sum() / num_boxes * logits.shape[1]


def test_sigmoid_focal_loss_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, K, generator=g) * 3
    targets = (torch.rand(2, 7, K, generator=g) > 0.7).float()
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 0.25, 2.0), tv_sigmoid_focal_loss(logits, targets, 0.25, 2.0, "none"))


def test_class_and_box_losses_match_references(criterion):
    g = torch.Generator().manual_seed(1)
    targets = make_targets([3, 1], g)
    outputs = random_outputs(2, 6, g)
    losses = criterion(outputs, targets)
    assert set(losses) == set(BASE)
    indices = criterion.matcher(outputs, targets)
    torch.testing.assert_close(losses["loss_class"], reference_class_loss(outputs["pred_logits"], targets, indices, 4))
    l1 = sum((outputs["pred_boxes"][b, src] - targets[b]["boxes"][tgt]).abs().sum() for b, (src, tgt) in enumerate(indices))
    torch.testing.assert_close(losses["loss_bbox"], l1 / 4)
    assert 0 < losses["loss_giou"] < 2


def test_perfect_predictions_give_zero_box_losses(criterion):
    g = torch.Generator().manual_seed(2)
    targets = make_targets([2, 3], g)
    outputs = random_outputs(2, 8, g)
    outputs["pred_logits"].fill_(-10.0)
    for b, t in enumerate(targets):
        slots = torch.randperm(8, generator=g)[: len(t["labels"])]
        outputs["pred_boxes"][b, slots] = t["boxes"]
        outputs["pred_logits"][b, slots, t["labels"]] = 10.0
    losses = criterion(outputs, targets)
    assert losses["loss_bbox"] < 1e-6
    assert losses["loss_giou"] < 1e-6
    assert losses["loss_class"] < 1e-3


def test_all_output_kinds_give_suffixed_keys(criterion):
    g = torch.Generator().manual_seed(3)
    targets = make_targets([2, 1], g)
    outputs = random_outputs(2, 10, g)
    outputs["aux_outputs"] = [random_outputs(2, 10, g) for _ in range(2)]
    outputs["enc_outputs"] = random_outputs(2, 10, g)
    outputs["dn_outputs"] = {**random_outputs(2, 8, g), "aux_outputs": [random_outputs(2, 8, g)]}
    outputs["dn_meta"] = {"num_groups": 2, "group_size": 4}
    outputs["one_to_many"] = {**random_outputs(2, 20, g), "aux_outputs": [random_outputs(2, 20, g)]}
    losses = criterion(outputs, targets)
    suffixes = ["", "_0", "_1", "_enc", "_dn", "_dn_0", "_o2m", "_0_o2m"]
    assert set(losses) == {base + s for base in BASE for s in suffixes}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())


def test_dn_match_indices_layout():
    indices = dn_match_indices([2, 0, 1], num_groups=2, group_size=4)
    assert [q.tolist() for q, _ in indices] == [[0, 1, 4, 5], [], [0, 4]]
    assert [t.tolist() for _, t in indices] == [[0, 1, 0, 1], [], [0, 0]]
    with pytest.raises(ValueError, match="at most 2 targets"):
        dn_match_indices([3], num_groups=1, group_size=4)


def test_dn_losses_use_fixed_matching(criterion):
    g = torch.Generator().manual_seed(4)
    targets = make_targets([2, 1], g)  # N_max = 2: group_size 4; 2 groups -> 8 dn queries
    num_groups, group_size = 2, 4
    dn = random_outputs(2, 8, g)
    positives = {0: [(0, 0), (1, 1), (4, 0), (5, 1)], 1: [(0, 0), (4, 0)]}  # (query, target)
    shift = torch.tensor([0.01, 0.0, 0.0, 0.0])
    for b, pairs in positives.items():
        for q, j in pairs:
            dn["pred_boxes"][b, q] = targets[b]["boxes"][j] + shift
    # negatives and padding get boxes equal to targets: box losses must ignore them
    dn["pred_boxes"][0, 2:4] = targets[0]["boxes"]
    dn["pred_boxes"][1, 2] = targets[1]["boxes"][0]
    outputs = {**random_outputs(2, 6, g), "dn_outputs": dn, "dn_meta": {"num_groups": num_groups, "group_size": group_size}}
    losses = criterion(outputs, targets)

    num_boxes = 3 * num_groups
    torch.testing.assert_close(losses["loss_bbox_dn"], torch.tensor(0.01 * 6 / num_boxes))
    assert losses["loss_giou_dn"] > 0
    onehot = torch.zeros(2, 8, K)
    for b, pairs in positives.items():
        for q, j in pairs:
            onehot[b, q, targets[b]["labels"][j]] = 1
    focal = tv_sigmoid_focal_loss(dn["pred_logits"], onehot, 0.25, 2.0, "none")
    torch.testing.assert_close(losses["loss_class_dn"], focal.mean(1).sum() / num_boxes * 8)


def test_dn_meta_must_fit_outputs(criterion):
    g = torch.Generator().manual_seed(5)
    outputs = {**random_outputs(1, 4, g), "dn_outputs": random_outputs(1, 6, g), "dn_meta": {"num_groups": 2, "group_size": 4}}
    with pytest.raises(ValueError, match="6 queries"):
        criterion(outputs, make_targets([1], g))


def test_one_to_many_uses_repeated_targets():
    g = torch.Generator().manual_seed(6)
    criterion = SetCriterion(K, HungarianMatcher(), one_to_many_repeat=3)
    targets = make_targets([2, 1], g)
    o2m = random_outputs(2, 12, g)
    outputs = {**random_outputs(2, 6, g), "one_to_many": o2m}
    losses = criterion(outputs, targets)
    repeated = [{"labels": t["labels"].repeat(3), "boxes": t["boxes"].repeat(3, 1)} for t in targets]
    expected = criterion(o2m, repeated)
    for base in BASE:
        torch.testing.assert_close(losses[base + "_o2m"], expected[base])
    # every one of the 3 copies of each target is matched to its own query
    indices = criterion.matcher(o2m, repeated)
    assert [len(src) for src, _ in indices] == [6, 3]


def test_zero_targets_give_finite_losses(criterion):
    g = torch.Generator().manual_seed(7)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    outputs = {**random_outputs(2, 5, g), "aux_outputs": [random_outputs(2, 5, g)]}
    outputs["dn_outputs"] = random_outputs(2, 0, g)
    outputs["dn_meta"] = {"num_groups": 3, "group_size": 0}
    losses = criterion(outputs, [empty, empty])
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0 and losses["loss_class_dn"] == 0
    reference = tv_sigmoid_focal_loss(outputs["pred_logits"], torch.zeros(2, 5, K), 0.25, 2.0, "none")
    torch.testing.assert_close(losses["loss_class"], reference.mean(1).sum() * 5)  # num_boxes clamped to 1


def test_non_finite_predictions_give_non_finite_losses_without_raising(criterion):
    """The criterion raises nothing, so that under DDP no rank leaves the step early: the trainer checks the
    sum once, after its all-reduce. Only the terms that see the bad value are not finite."""
    g = torch.Generator().manual_seed(8)
    targets = make_targets([2], g)
    outputs = {**random_outputs(1, 4, g), "aux_outputs": [random_outputs(1, 4, g)]}
    outputs["aux_outputs"][0]["pred_logits"][0, 1, 2] = float("inf")
    losses = criterion(outputs, targets)
    assert sorted(k for k, v in losses.items() if not torch.isfinite(v)) == ["loss_class_0"]

    outputs = {**random_outputs(1, 4, g), "dn_outputs": random_outputs(1, 4, g), "dn_meta": {"num_groups": 1, "group_size": 4}}
    outputs["dn_outputs"]["pred_boxes"][0, 0, 0] = float("nan")
    losses = criterion(outputs, targets)
    assert sorted(k for k, v in losses.items() if not torch.isfinite(v)) == ["loss_bbox_dn", "loss_giou_dn"]


def test_weighted_losses_and_gradients():
    g = torch.Generator().manual_seed(10)
    criterion = SetCriterion(K, HungarianMatcher(), weight_dict={**DEFAULT_WEIGHTS, "loss_class_enc": 0.5})
    outputs = {**random_outputs(2, 6, g), "enc_outputs": random_outputs(2, 6, g), "aux_outputs": [random_outputs(2, 6, g)]}
    outputs["pred_logits"].requires_grad_(True)
    losses = criterion(outputs, make_targets([1, 2], g))
    assert criterion.weight("loss_bbox_0") == 5.0
    assert criterion.weight("loss_giou_enc") == 2.0
    assert criterion.weight("loss_class_enc") == 0.5
    assert criterion.weight("loss_mask") is None
    base_of = {key: next(b for b in BASE if key.startswith(b)) for key in losses}
    expected = sum((0.5 if key == "loss_class_enc" else DEFAULT_WEIGHTS[base_of[key]]) * value for key, value in losses.items())
    total = sum(criterion.weighted(losses).values())
    torch.testing.assert_close(total, expected)
    total.backward()
    assert outputs["pred_logits"].grad is not None and outputs["pred_logits"].grad.abs().sum() > 0


def test_num_boxes_under_single_process_group(criterion, tmp_path):
    g = torch.Generator().manual_seed(11)
    targets = make_targets([2, 3], g)
    outputs = random_outputs(2, 6, g)
    plain = criterion(outputs, targets)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        distributed = criterion(outputs, targets)
    finally:
        dist.destroy_process_group()
    for key in plain:
        torch.testing.assert_close(distributed[key], plain[key])


# ---------------------------------------------------------------------------------------------------
# The three code bases, re-implemented from their formulas (float64, brute-force matching) and compared
# with the criterion configured as each of them.


@dataclass(frozen=True)
class Family:
    weights: dict[str, float]
    giou_eps: float  # in box_ops.box_iou / generalized_box_iou, matcher and loss alike
    binary_encoder: bool  # enc_outputs matched and supervised with every label set to 0
    repeat: int = 0  # one-to-many: targets repeated k times (H-DETR k_one2many), 0 for none
    one_to_many_weight: float = 1.0  # H-DETR lambda_one2many


FAMILIES = {
    "deformable-detr": Family({"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}, 0.0, True),
    "h-detr": Family({"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}, 0.0, True, repeat=2, one_to_many_weight=0.5),
    "dino": Family({"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}, 1e-6, False),
}


def family_criterion(family: Family, num_classes: int = K) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, giou_eps=family.giou_eps)
    return SetCriterion(
        num_classes,
        matcher,
        weight_dict=DEFORMABLE_WEIGHTS if family.binary_encoder else DEFAULT_WEIGHTS,
        giou_eps=family.giou_eps,
        binary_encoder_targets=family.binary_encoder,
        one_to_many_repeat=max(family.repeat, 1),
        one_to_many_weight=family.one_to_many_weight,
    )


def ref_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def ref_giou(pred, tgt, eps):
    """``(P, 4)`` x ``(T, 4)`` cxcywh -> ``(P, T)``: inter / (union + eps) - (enclosing - union) / (enclosing + eps)."""
    a, b = ref_xyxy(pred)[:, None], ref_xyxy(tgt)[None]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter_w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    inter_h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = inter_w * inter_h
    union = area_a + area_b - inter
    enclosing = (torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])) * (
        torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    )
    return inter / (union + eps) - (enclosing - union) / (enclosing + eps)


def ref_match(out, targets, eps):
    """Exhaustive minimum of cost 2 * focal-cost + 5 * L1 - 2 * GIoU per image (alpha 0.25, gamma 2, log eps 1e-8)."""
    indices = []
    for b, t in enumerate(targets):
        prob = out["pred_logits"][b].sigmoid()[:, t["labels"]]
        pos = 0.25 * (1 - prob) ** 2 * -torch.log(prob + 1e-8)
        neg = 0.75 * prob**2 * -torch.log(1 - prob + 1e-8)
        l1 = (out["pred_boxes"][b][:, None] - t["boxes"][None]).abs().sum(-1)
        cost = 2 * (pos - neg) + 5 * l1 - 2 * ref_giou(out["pred_boxes"][b], t["boxes"], eps)
        num_queries, num_targets = cost.shape
        if math.perm(num_queries, num_targets) > 5000:  # too many to try: the same minimum via scipy
            rows, cols = linear_sum_assignment(cost.numpy())
            pairs = sorted(zip(rows.tolist(), cols.tolist()))
        else:
            orders = itertools.permutations(range(num_queries), num_targets)  # order[j]: the query of target j
            best = min(orders, key=lambda order: sum(cost[q, j] for j, q in enumerate(order)))
            pairs = [(q, j) for j, q in enumerate(best)]
        indices.append(pairs)
    return indices


def ref_paired_losses(out, targets, pairs, num_boxes, eps):
    """Focal (alpha 0.25, gamma 2) mean over queries, summed, / num_boxes * Q; L1 and 1 - GIoU summed / num_boxes."""
    logits = out["pred_logits"]
    onehot = torch.zeros_like(logits)
    l1 = giou = torch.zeros((), dtype=logits.dtype)
    for b, image_pairs in enumerate(pairs):
        for q, j in image_pairs:
            onehot[b, q, targets[b]["labels"][j]] = 1
            pred, tgt = out["pred_boxes"][b, q], targets[b]["boxes"][j]
            l1 = l1 + (pred - tgt).abs().sum()
            giou = giou + 1 - ref_giou(pred[None], tgt[None], eps)[0, 0]
    prob = logits.sigmoid()
    cross_entropy = -(onehot * F.logsigmoid(logits) + (1 - onehot) * F.logsigmoid(-logits))
    p_true = torch.where(onehot == 1, prob, 1 - prob)
    alpha_true = torch.where(onehot == 1, 0.25, 0.75)
    focal = alpha_true * (1 - p_true) ** 2 * cross_entropy
    return {
        "loss_class": focal.mean(1).sum() / num_boxes * logits.shape[1],
        "loss_bbox": l1 / num_boxes,
        "loss_giou": giou / num_boxes,
    }


def ref_set_losses(outputs, targets, family, suffix, scale):
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    named = [("", outputs, targets)] + [(f"_{i}", aux, targets) for i, aux in enumerate(outputs.get("aux_outputs", []))]
    if "enc_outputs" in outputs:
        enc_targets = targets
        if family.binary_encoder:
            enc_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
        named.append(("_enc", outputs["enc_outputs"], enc_targets))
    losses = {}
    for name, out, tgts in named:
        pairs = ref_match(out, tgts, family.giou_eps)
        for key, value in ref_paired_losses(out, tgts, pairs, num_boxes, family.giou_eps).items():
            losses[key + name + suffix] = scale * value
    return losses


def reference_losses(outputs, targets, family):
    losses = ref_set_losses(outputs, targets, family, "", 1.0)
    if "dn_outputs" in outputs:  # DINO: positive j of group g is query g * group_size + j; / (num_boxes * groups)
        groups, size = outputs["dn_meta"]["num_groups"], outputs["dn_meta"]["group_size"]
        pairs = [[(g * size + j, j) for g in range(groups) for j in range(len(t["labels"]))] for t in targets]
        num_boxes = max(sum(len(t["labels"]) for t in targets), 1) * groups
        dn = outputs["dn_outputs"]
        for name, out in [("_dn", dn)] + [(f"_dn_{i}", aux) for i, aux in enumerate(dn.get("aux_outputs", []))]:
            for key, value in ref_paired_losses(out, targets, pairs, num_boxes, family.giou_eps).items():
                losses[key + name] = value
    if "one_to_many" in outputs:
        repeated = [{"labels": t["labels"].repeat(family.repeat), "boxes": t["boxes"].repeat(family.repeat, 1)} for t in targets]
        losses.update(ref_set_losses(outputs["one_to_many"], repeated, family, "_o2m", family.one_to_many_weight))
    return losses


def small_boxes_near_targets(out, targets, generator, slots):
    """Put tiny predicted boxes (areas ~1e-5, where the GIoU eps of 1e-6 matters) close to each tiny target
    ``j``, at queries ``slots(j)``."""
    for b, t in enumerate(targets):
        for j in range(len(t["boxes"])):
            if t["boxes"][j, 2:].max() < 0.01:
                for q in slots(j):
                    noise = (torch.rand(4, generator=generator, dtype=torch.float64) - 0.5) * 1e-3
                    out["pred_boxes"][b, q] = t["boxes"][j] + noise
    return out


def family_example(family: Family, num_queries: int = 5, num_encoder: int = 7):
    """Two images (2 and 1 targets, labels not 0, one tiny box each); final layer, one auxiliary layer and
    the encoder; denoising for DINO, a one-to-many branch for H-DETR; float64."""
    g = torch.Generator().manual_seed(20)
    f64 = {"dtype": torch.float64}
    targets = [
        {"labels": torch.tensor([3, 1]), "boxes": torch.tensor([[0.30, 0.40, 0.20, 0.30], [0.05, 0.06, 0.003, 0.004]], **f64)},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.07, 0.05, 0.004, 0.003]], **f64)},
    ]

    def predictions(queries, slots=lambda j: [2 * j + 1]):
        out = {"pred_logits": torch.randn(2, queries, K, generator=g, **f64), "pred_boxes": random_boxes((2, queries), g).double()}
        return small_boxes_near_targets(out, targets, g, slots)

    outputs = {**predictions(num_queries), "aux_outputs": [predictions(num_queries)], "enc_outputs": predictions(num_encoder)}
    if family.repeat:
        outputs["one_to_many"] = {**predictions(3 * family.repeat), "aux_outputs": [predictions(3 * family.repeat)]}
    if not family.binary_encoder:  # two denoising groups of 4: target j's positives are queries j and 4 + j
        outputs["dn_outputs"] = {**predictions(8, lambda j: [j, 4 + j]), "aux_outputs": [predictions(8, lambda j: [j, 4 + j])]}
        outputs["dn_meta"] = {"num_groups": 2, "group_size": 4}
    return outputs, targets


def assert_losses_close(actual, expected):
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-9, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_losses_match_reference(name):
    family = FAMILIES[name]
    outputs, targets = family_example(family)
    losses = family_criterion(family)(outputs, targets)
    expected = reference_losses(outputs, targets, family)
    assert_losses_close(losses, expected)
    assert len(expected) == 3 * {"deformable-detr": 3, "h-detr": 5, "dino": 5}[name]


def test_family_example_exercises_every_difference():
    """Each setting changes the reference values of the example, so the comparisons above can fail."""
    deformable, h_detr, dino = FAMILIES["deformable-detr"], FAMILIES["h-detr"], FAMILIES["dino"]
    outputs, targets = family_example(dino)
    with_eps = reference_losses(outputs, targets, dino)
    without_eps = reference_losses(outputs, targets, Family(dino.weights, 0.0, False))
    for key in ("loss_giou", "loss_giou_0", "loss_giou_enc", "loss_giou_dn"):
        assert abs(with_eps[key] - without_eps[key]) > 1e-3, key

    outputs, targets = family_example(deformable)
    binary = reference_losses(outputs, targets, deformable)
    real_labels = reference_losses(outputs, targets, Family(deformable.weights, 0.0, False))
    assert abs(binary["loss_class_enc"] - real_labels["loss_class_enc"]) > 1e-2
    assert binary["loss_class"] == real_labels["loss_class"]

    outputs, targets = family_example(h_detr)
    weighted = reference_losses(outputs, targets, h_detr)
    unweighted = reference_losses(outputs, targets, Family(h_detr.weights, 0.0, True, repeat=2))
    for key in weighted:
        assert weighted[key] == (0.5 if key.endswith("_o2m") else 1.0) * unweighted[key]


def test_binary_encoder_targets_only_touch_the_encoder():
    family = FAMILIES["deformable-detr"]
    outputs, targets = family_example(family)
    binary = family_criterion(family)(outputs, targets)
    real = SetCriterion(K, HungarianMatcher(), weight_dict=DEFORMABLE_WEIGHTS)(outputs, targets)
    assert binary["loss_class_enc"] != real["loss_class_enc"]
    for key in binary:
        if not key.endswith("_enc"):
            assert torch.equal(binary[key], real[key]), key
    assert targets[0]["labels"].tolist() == [3, 1]  # the caller's targets are left alone


def test_binary_encoder_targets_with_all_encoder_tokens():
    """Deformable DETR / H-DETR supervise the proposals of every encoder token: S = 340 predictions."""
    family = FAMILIES["h-detr"]
    outputs, targets = family_example(family, num_encoder=340)
    losses = family_criterion(family)(outputs, targets)
    expected = reference_losses(outputs, targets, family)
    assert_losses_close(losses, expected)
    assert outputs["enc_outputs"]["pred_logits"].shape == (2, 340, K)


def test_one_to_many_weight_scales_only_one_to_many_losses():
    family = FAMILIES["h-detr"]
    outputs, targets = family_example(family)
    scaled = family_criterion(family)(outputs, targets)
    plain = SetCriterion(K, HungarianMatcher(), weight_dict=DEFORMABLE_WEIGHTS, binary_encoder_targets=True, one_to_many_repeat=2)(outputs, targets)
    assert {key for key in scaled if key.endswith("_o2m")} == {base + s for base in BASE for s in ("_o2m", "_0_o2m")}
    for key in scaled:
        torch.testing.assert_close(scaled[key], (0.5 if key.endswith("_o2m") else 1.0) * plain[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_weights_and_weighted_losses(name):
    family = FAMILIES[name]
    criterion = family_criterion(family)
    outputs, targets = family_example(family)
    expected = reference_losses(outputs, targets, family)
    for key in expected:
        assert criterion.weight(key) == family.weights[next(b for b in BASE if key.startswith(b))]
    total = sum(family.weights[next(b for b in BASE if key.startswith(b))] * value for key, value in expected.items())
    torch.testing.assert_close(sum(criterion.weighted(criterion(outputs, targets)).values()), total)


def test_weight_constants():
    assert DEFAULT_WEIGHTS == {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}  # DINO, Lite-DETR
    assert DEFORMABLE_WEIGHTS == {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}  # Deformable DETR, H-DETR


def test_giou_eps_must_match_the_matcher():
    with pytest.raises(ValueError, match="giou_eps"):
        SetCriterion(K, HungarianMatcher(giou_eps=1e-6))
    with pytest.raises(ValueError, match="giou_eps"):
        SetCriterion(K, HungarianMatcher(), giou_eps=1e-6)
    assert SetCriterion(K, HungarianMatcher(giou_eps=1e-6), giou_eps=1e-6).giou_eps == 1e-6


@pytest.mark.parametrize("binary", [False, True])
def test_dense_encoder_losses_match_every_copy_of_every_target(binary):
    """``enc_dense``: each target repeated ``encoder_one_to_many`` times, Hungarian-matched over every
    token, with the labels the encoder's own loss uses; the reference is a plain matching + losses."""
    g = torch.Generator().manual_seed(7)
    criterion = SetCriterion(K, HungarianMatcher(), encoder_one_to_many=3, binary_encoder_targets=binary)
    targets = make_targets([2, 1], g)
    dense = random_outputs(2, 40, g)
    losses = criterion({**random_outputs(2, 6, g), "enc_dense": dense}, targets)
    labelled = [{"labels": torch.zeros_like(t["labels"]) if binary else t["labels"], "boxes": t["boxes"]} for t in targets]
    repeated = [{"labels": t["labels"].repeat(3), "boxes": t["boxes"].repeat(3, 1)} for t in labelled]
    indices = HungarianMatcher()(dense, repeated)
    assert [len(src) for src, _ in indices] == [6, 3] and all(len(set(src.tolist())) == len(src) for src, _ in indices)
    torch.testing.assert_close(losses["loss_class_enc_dense"], reference_class_loss(dense["pred_logits"], repeated, indices, 9.0))
    pairs = [(dense["pred_boxes"][b, s], repeated[b]["boxes"][t]) for b, (src, tgt) in enumerate(indices) for s, t in zip(src, tgt)]
    torch.testing.assert_close(losses["loss_bbox_enc_dense"], sum((p - q).abs().sum() for p, q in pairs) / 9.0)
    plain = SetCriterion(K, HungarianMatcher(), binary_encoder_targets=binary)({**random_outputs(2, 6, g)}, targets)
    assert not any("dense" in key for key in plain)

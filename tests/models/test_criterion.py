import pytest
import torch
import torch.distributed as dist
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from litedetr.models.criterion import DEFAULT_WEIGHTS, SetCriterion, dn_match_indices, sigmoid_focal_loss
from litedetr.models.matcher import HungarianMatcher

K = 5
BASE = ("loss_class", "loss_bbox", "loss_giou")


def random_boxes(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    centre = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(*shape, 2, generator=generator) * 0.2 + 0.05
    return torch.cat([centre, size], -1)


def make_targets(sizes, generator):
    return [
        {"labels": torch.randint(0, K, (n,), generator=generator), "boxes": random_boxes((n,), generator)}
        for n in sizes
    ]


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
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, 0.25, 2.0), tv_sigmoid_focal_loss(logits, targets, 0.25, 2.0, "none")
    )


def test_class_and_box_losses_match_references(criterion):
    g = torch.Generator().manual_seed(1)
    targets = make_targets([3, 1], g)
    outputs = random_outputs(2, 6, g)
    losses = criterion(outputs, targets)
    assert set(losses) == set(BASE)
    indices = criterion.matcher(outputs, targets)
    torch.testing.assert_close(losses["loss_class"], reference_class_loss(outputs["pred_logits"], targets, indices, 4))
    l1 = sum(
        (outputs["pred_boxes"][b, src] - targets[b]["boxes"][tgt]).abs().sum() for b, (src, tgt) in enumerate(indices)
    )
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


def test_non_finite_loss_raises_naming_key(criterion):
    g = torch.Generator().manual_seed(8)
    targets = make_targets([2], g)
    outputs = {**random_outputs(1, 4, g), "aux_outputs": [random_outputs(1, 4, g)]}
    outputs["aux_outputs"][0]["pred_logits"][0, 1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="loss_class_0"):
        criterion(outputs, targets)

    outputs = {**random_outputs(1, 4, g), "dn_outputs": random_outputs(1, 4, g), "dn_meta": {"num_groups": 1, "group_size": 4}}
    outputs["dn_outputs"]["pred_boxes"][0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss_bbox_dn") as info:
        criterion(outputs, targets)
    assert "loss_class_dn" not in str(info.value)


def test_labels_out_of_range(criterion):
    targets = [{"labels": torch.tensor([K]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        criterion(random_outputs(1, 3, torch.Generator().manual_seed(9)), targets)


def test_weighted_total_and_gradients():
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
    expected = sum(
        (0.5 if key == "loss_class_enc" else DEFAULT_WEIGHTS[base_of[key]]) * value for key, value in losses.items()
    )
    total = criterion.weighted_total(losses)
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

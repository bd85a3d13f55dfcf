import math

import pytest
import torch
from torch import nn

from litedetr.engine.config import TrainConfig
from litedetr.engine.optim import COSINE_FLOOR, build_optimizer, lr_factor, set_learning_rates


class _Toy(nn.Module):
    """Parameters in each of the three groups: backbone, sampling offsets and the rest."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.sampling_offsets = nn.Linear(4, 2)
        self.head = nn.Linear(4, 1)


def _config(**changes) -> TrainConfig:
    return TrainConfig(
        model="dino-r18-tiny", train_annotations="a.json", train_images="i", lr=1e-2, lr_backbone=1e-3, lr_sampling_mult=0.1, weight_decay=1e-2, **changes
    )


def test_cpu_parameters_take_the_fused_adamw_and_it_steps_as_the_reference():
    torch.manual_seed(0)
    model, reference = _Toy(), _Toy()
    reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, _config())
    assert optimizer.defaults["fused"] is True
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"backbone": 1e-3, "sampling": 1e-3, "rest": 1e-2}
    expected = torch.optim.AdamW(
        [
            {"params": list(reference.backbone.parameters()), "lr": 1e-3},
            {"params": list(reference.sampling_offsets.parameters()), "lr": 1e-3},
            {"params": list(reference.head.parameters()), "lr": 1e-2},
        ],
        weight_decay=1e-2,
        foreach=False,
    )
    for step in range(5):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, optimizer), (reference, expected)):
            opt.zero_grad()
            m.head(m.sampling_offsets(m.backbone(x)).repeat(1, 2)).square().mean().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name
    assert not torch.equal(model.head.weight, _Toy().head.weight)


def test_parameters_without_a_fused_kernel_take_the_loop():
    model = _Toy().to(torch.float64).to("meta")
    optimizer = build_optimizer(model, _config())
    assert not optimizer.defaults["fused"]


def test_step_schedule_drops_10x_at_each_milestone_after_the_warm_up():
    config = _config(lr_drop=(2, 3), warmup_steps=4)
    factors = [lr_factor(config, step, epoch, total_steps=8) for step, epoch in enumerate([0, 0, 1, 1, 2, 2, 3, 3])]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_cosine_schedule_falls_from_1_to_the_floor_over_the_run():
    config = _config(lr_schedule="cosine", lr_drop=(1,))  # milestones do not apply
    total = 101
    factors = [lr_factor(config, step, step // 10, total) for step in range(total)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(COSINE_FLOOR) and factors[50] == pytest.approx((1 + COSINE_FLOOR) / 2)
    assert factors[25] == pytest.approx(COSINE_FLOOR + (1 - COSINE_FLOOR) * (1 + math.cos(math.pi / 4)) / 2)
    assert all(a > b for a, b in zip(factors, factors[1:]))
    warm = _config(lr_schedule="cosine", warmup_steps=10)  # the cosine starts after the warm-up
    assert [lr_factor(warm, s, 0, total) for s in (0, 4, 9, 10, 11)] == pytest.approx(
        [0.1, 0.5, 1.0, 1.0, 1.0 - (1 - COSINE_FLOOR) * (1 - math.cos(math.pi / 90)) / 2]
    )


def test_set_learning_rates_scales_every_group_from_its_initial_rate():
    optimizer = build_optimizer(_Toy(), _config(lr_schedule="cosine"))
    set_learning_rates(optimizer, _config(lr_schedule="cosine"), 50, 0, 101)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx({"backbone": 1e-3 * 0.505, "sampling": 1e-3 * 0.505, "rest": 1e-2 * 0.505})


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="lr_schedule must be 'step' or 'cosine', got 'linear'"):
        _config(lr_schedule="linear")

import torch
from torch import nn

from litedetr.engine.config import TrainConfig
from litedetr.engine.optim import build_optimizer


class _Toy(nn.Module):
    """Parameters in each of the three groups: backbone, sampling offsets and the rest."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.sampling_offsets = nn.Linear(4, 2)
        self.head = nn.Linear(4, 1)


def _config() -> TrainConfig:
    return TrainConfig(model="dino-r18-tiny", train_annotations="a.json", train_images="i", lr=1e-2, lr_backbone=1e-3, lr_sampling_mult=0.1, weight_decay=1e-2)


def test_cpu_parameters_take_the_fused_adamw_and_it_steps_as_the_reference():
    torch.manual_seed(0)
    model, reference = _Toy(), _Toy()
    reference.load_state_dict(model.state_dict())
    optimizer, _ = build_optimizer(model, _config())
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
    optimizer, _ = build_optimizer(model, _config())
    assert not optimizer.defaults["fused"]

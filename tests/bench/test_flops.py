"""GFLOPs counting: agreement with fvcore on our model, with fvcore on the authors' code, path independence, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from litedetr import build_model
from litedetr.bench.flops import AUTHORS_FVCORE, COMPONENTS, FlopCounter, count_flops
from litedetr.cli import main
from litedetr.nn import MultiScaleDeformableAttention

fvcore_nn = pytest.importorskip("fvcore.nn")

TINY = "lite-dino-r18-tiny-h3l1-2x3"
SIZE = (128, 160)


class _Features(nn.Module):
    """Backbone + forward_features, every output tensor returned (so tracing keeps every head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tree_leaves(self.model.forward_features(self.model.backbone(image), mask)))


def _fvcore_sdpa(inputs, outputs) -> int:
    """fvcore has no handle for scaled_dot_product_attention (our decoder's self-attention): q.k and weights.v products."""
    q, k, v = (fvcore_nn.jit_handles.get_shape(x) for x in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _fvcore_by_module(model: nn.Module, size: tuple[int, int]) -> dict[str, float]:
    """fvcore's GFLOPs per top-level module of our model, traced with autograd on (our grid_sample path)."""
    h, w = size
    inputs = (torch.rand(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.bool))
    analysis = fvcore_nn.FlopCountAnalysis(_Features(model), inputs).set_op_handle("aten::scaled_dot_product_attention", _fvcore_sdpa)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    assert "grid_sampler" in analysis.by_operator() and "aten::embedding_bag" not in analysis.unsupported_ops()
    by_module = analysis.by_module()
    return {name: by_module[f"model.{name}"] / 1e9 for name, _ in model.named_children()} | {"total": analysis.total() / 1e9}


def _encoder_core_terms_fvcore_skips(model: nn.Module, report) -> float:
    """GFLOPs we count in the encoder's attention cores and fvcore does not: one softmax entry per query,
    head, level and point (the grid_sample path's weighted sum and KDA's q.k are matrix products, which
    fvcore counts as we do: D each per sample)."""
    queries = sum(s.num_queries for s in report.schedule)
    attn = next(m for m in model.encoder.modules() if isinstance(m, MultiScaleDeformableAttention))
    return queries * attn.n_heads * attn.n_levels * attn.n_points / 1e9


@pytest.mark.parametrize("preset", [TINY, "dino-r18-tiny"])
def test_agrees_with_fvcore_on_our_model(preset):
    model = build_model(preset).eval()
    ours = count_flops(model, SIZE)
    theirs = _fvcore_by_module(model, SIZE)
    assert ours.total == pytest.approx(theirs["total"], rel=0.02)
    for part in ("backbone", "input_stage"):
        assert ours.components[part] == pytest.approx(theirs[part], rel=1e-9)
    assert ours.components["query_selection"] == pytest.approx(theirs["query_selection"], rel=1e-9)
    # the encoder differs by exactly what fvcore leaves out of the attention cores
    assert ours.components["encoder"] - theirs["encoder"] == pytest.approx(_encoder_core_terms_fvcore_skips(model, ours), rel=1e-9)
    # fvcore names the box head's refinement calls inside the decoder "heads"; its trace drops the
    # last layer's refinement, whose output is unused, which we count as run
    decoder_and_heads = theirs["decoder"] + theirs["heads"]
    assert ours.components["decoder"] + ours.components["heads"] == pytest.approx(decoder_and_heads, rel=0.1)


def test_count_does_not_depend_on_the_attention_path():
    """Gather path (no autograd) and grid_sample path (autograd) count the same; skipping the arithmetic changes nothing."""
    model = build_model(TINY).eval()
    image, mask = torch.rand(1, 3, *SIZE), torch.zeros(1, *SIZE, dtype=torch.bool)
    counts = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad), FlopCounter(model) as counter:
            model.forward_features(model.backbone(image), mask)
        counts.append(dict(counter.flops))
    assert counts[0] == counts[1]
    assert count_flops(model, SIZE, execute=True).components == count_flops(model, SIZE).components


def test_components_add_up_and_schedule_is_reported():
    report = count_flops(TINY, SIZE)
    assert report.other == 0 and all(report.components[c] > 0 for c in COMPONENTS)
    assert report.total == pytest.approx(sum(report.components.values()))
    assert report.spatial_shapes == [(16, 20), (8, 10), (4, 5), (2, 3)]
    assert [s.num_queries for s in report.schedule] == [106, 426] * 3


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(AUTHORS_FVCORE))
def test_agrees_with_fvcore_on_the_authors_code(preset):
    """Within 3% of fvcore's count of the original code at 850x1040, in every bucket it was measured in
    (their decoder = our decoder + heads; Deformable DETR's entry has only total and encoder).

    About 5 s per preset on one core (R50 at 850x1040, matrix products skipped, see ``FlopCounter``)."""
    ours = count_flops(preset).authors_buckets()
    measured = AUTHORS_FVCORE[preset]
    assert "total" in measured and set(measured) <= set(ours), sorted(measured)
    for bucket, theirs in measured.items():
        assert ours[bucket] == pytest.approx(theirs, rel=0.03), bucket


def test_cli_json(capsys):
    assert main(["flops", "--model", TINY, "--size", "128x160", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == pytest.approx(sum(report[c] for c in COMPONENTS) + report["other"])
    assert report["tokens_per_level"] == [320, 80, 20, 6] and report["queries_per_encoder_layer"] == [106, 426] * 3
    assert main(["flops", "--model", TINY, "--size", "0x160"]) == 2


@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_counts_as_fvcore(train):
    """Eval: scale and shift, 2 per element; training: 5 per element (fvcore's norm count)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).train(train)
    with FlopCounter(model) as counter:
        model(torch.rand(1, 3, 5, 6))
    assert counter.flops["other"] == 3 * 4 * 30 + (5 if train else 2) * 4 * 30


def test_the_readme_example_is_what_the_command_prints():
    """The README's `litedetr flops` block is this code's output, to the digit."""
    from pathlib import Path

    from litedetr.tools.flops import format_report

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = "$ litedetr flops --model lite-dino-r50-h3l1-2x3\n"
    assert command in readme
    block = readme.split(command, 1)[1].split("```", 1)[0].rstrip("\n")
    assert block == format_report(count_flops("lite-dino-r50-h3l1-2x3"))


def test_query_logits_add_their_linear_layer_and_one_addition_per_sample():
    """Per KDA layer, ``attention_weights`` over its queries (Lq x C x M L P) and the query-only logit added (1) per query, head, level and point."""
    authors, hybrid = (count_flops(build_model(TINY, kda_query_logits=flag).eval(), SIZE) for flag in (False, True))
    model = build_model(TINY)
    attn = next(m for m in model.encoder.modules() if isinstance(m, MultiScaleDeformableAttention))
    logits = attn.n_heads * attn.n_levels * attn.n_points
    encoder_queries = sum(s.num_queries for s in authors.schedule)
    decoder_queries = model.config.num_decoder_layers * model.config.num_queries
    for component, queries in (("encoder", encoder_queries), ("decoder", decoder_queries)):
        expected = queries * (attn.d_model * logits + logits)
        assert (hybrid.components[component] - authors.components[component]) * 1e9 == pytest.approx(expected, rel=1e-9), component


def test_a_key_projection_adds_its_linear_layer_and_the_key_samples():
    """Per KDA layer, ``key_proj`` over its S input tokens (S x C x C) and one more bilinear sample (4 D) per query, head, level and point."""
    shared, own = (count_flops(build_model(TINY, kda_key_proj=flag).eval(), SIZE) for flag in (False, True))
    tokens = sum(h * w for h, w in shared.spatial_shapes)
    model = build_model(TINY)
    attn = next(m for m in model.encoder.modules() if isinstance(m, MultiScaleDeformableAttention))
    d, per_point = attn.d_model, attn.n_heads * attn.n_levels * attn.n_points * 4 * (attn.d_model // attn.n_heads)
    queries = sum(s.num_queries for s in shared.schedule)
    encoder = len(shared.schedule) * tokens * d * d + queries * per_point
    decoder = model.config.num_decoder_layers * (tokens * d * d + model.config.num_queries * per_point)
    assert (own.components["encoder"] - shared.components["encoder"]) * 1e9 == pytest.approx(encoder, rel=1e-9)
    assert (own.components["decoder"] - shared.components["decoder"]) * 1e9 == pytest.approx(decoder, rel=1e-9)

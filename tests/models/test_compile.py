"""``torch.compile``: the encoders and the detector's forward trace into one graph (no graph breaks,
so no host reads) and the compiled model computes what the eager one does.

Most tests compile with a backend that runs dynamo's captured graph as it is (tracing is what breaks
graphs; a code generator would only add minutes on a CPU); one compiles a deformable attention with
inductor. Graph breaks are dynamo's own count (``counters["graph_break"]``), with their reasons.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from litedetr.models.image_batch import batch_images
from litedetr.nn import DeformableEncoder, EncoderInput, LiteEncoder, MultiScaleDeformableAttention, MultiScaleTokens
from litedetr.ops import cpu_kernels
from litedetr.weights import build_model

TOLERANCE = 1e-5
FORWARD_FEATURES_PRESETS = ["dino-r18-tiny", "lite-dino-r18-tiny-h3l1-2x3", "h-detr-r18-tiny"]
"""With the whole call of ``deformable-detr-r18-tiny`` below, every family, and the Lite encoder inside a detector."""


def compile_and_run(fn: Callable[..., Any], *args: Any) -> tuple[Any, list[str], int]:
    """``fn(*args)`` through ``torch.compile``: the output, the graph-break reasons and the number of graphs."""
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()
    out = torch.compile(fn, backend=backend)(*args)
    return out, [reason.splitlines()[0] for reason in counters["graph_break"]], backend.frame_count


def encoder_tokens() -> MultiScaleTokens:
    """Input-stage tokens of 2 images (the second padded) over 4 levels, ``d_model`` 32."""
    stage = EncoderInput((8, 16, 32), d_model=32, n_levels=4)
    features = [torch.randn(2, c, 16 // s, 20 // s) for c, s in ((8, 1), (16, 2), (32, 4))]
    mask = torch.zeros(2, 128, 160, dtype=torch.bool)
    mask[1, 96:] = True
    mask[1, :, 120:] = True
    with torch.no_grad():
        return stage(features, mask)


def small_encoder(kind: str, key_aware: bool) -> DeformableEncoder:
    sizes = dict(d_model=32, n_levels=4, n_heads=2, n_points=2, d_ffn=64, key_aware=key_aware)
    if kind == "lite":
        return LiteEncoder(n_high=3, high_updates=2, blocks=2, d_ffn_low=32, **sizes).eval()
    return DeformableEncoder(num_layers=2, **sizes).eval()


@pytest.mark.parametrize("kind", ["lite", "standard"])
@pytest.mark.parametrize("key_aware", [True, False], ids=["kda", "msda"])
def test_encoders_compile_to_one_graph_with_the_eager_result(kind, key_aware):
    tokens, encoder = encoder_tokens(), small_encoder(kind, key_aware)
    args = (tokens.src, tokens.pos, tokens.spatial_shapes, tokens.valid_ratios, tokens.padding_mask)
    with torch.no_grad():
        eager = encoder(*args)  # the C++ kernels where they build; the compiled graph runs the PyTorch path
        compiled, breaks, graphs = compile_and_run(encoder, *args)
    assert breaks == [] and graphs == 1
    torch.testing.assert_close(compiled, eager, rtol=0, atol=TOLERANCE)


def test_shapes_as_a_tensor_still_work_and_are_what_breaks_graphs():
    """The old input form: accepted with the same result, but each read of it is a graph break (and a
    device sync on a GPU), which is why the model carries Python ints. Also shows the count is live."""
    tokens, encoder = encoder_tokens(), small_encoder("lite", True)
    shapes = torch.tensor(tokens.spatial_shapes)
    with torch.no_grad():
        eager = encoder(tokens.src, tokens.pos, tokens.spatial_shapes, tokens.valid_ratios, tokens.padding_mask)
        compiled, breaks, _ = compile_and_run(encoder, tokens.src, tokens.pos, shapes, tokens.valid_ratios, tokens.padding_mask)
    assert breaks and all("Tensor.item()" in reason or "Data dependent" in reason for reason in breaks)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=TOLERANCE)


def detector_inputs(preset: str, training: bool = False, **overrides: Any) -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    """A tiny preset with random weights, and backbone maps and padding mask of two images (64x96 and 48x80)."""
    model = build_model(preset, **overrides).train(training)
    images = [torch.rand(3, 64, 96), torch.rand(3, 48, 80)]
    batch = batch_images(images, (64,), 96, training=False)
    with torch.no_grad():
        return model, model.backbone(batch.tensors), batch.mask


@pytest.mark.parametrize(
    "preset, overrides", [*((preset, {}) for preset in FORWARD_FEATURES_PRESETS), ("lite-dino-r18-tiny-h3l1-2x3", {"query_nms": 0.3})], ids=str
)
def test_eval_forward_features_compiles_to_one_graph_with_the_eager_result(preset, overrides):
    model, features, mask = detector_inputs(preset, **overrides)
    with torch.no_grad():
        compiled, breaks, graphs = compile_and_run(model.forward_features, features, mask)
        # eager on the path the graph runs: near-tied proposal scores (random weights) could otherwise
        # rank differently at float rounding; the C++ kernels' agreement is tested in tests/ops
        with cpu_kernels.cpu_kernels_disabled():
            eager = model.forward_features(features, mask)
    assert breaks == [] and graphs == 1
    assert set(compiled) == {"pred_logits", "pred_boxes", "aux_outputs", "enc_outputs"}
    torch.testing.assert_close(compiled, eager, rtol=0, atol=TOLERANCE)


def test_eval_detector_call_compiles_to_one_graph_batching_and_postprocessing_included():
    """``model(images)``: resizing, normalising and padding the batch, forward_features, top-k post-processing."""
    model = build_model("deformable-detr-r18-tiny").eval()
    images = [torch.rand(3, 60, 90), torch.rand(3, 50, 70)]
    with torch.no_grad(), cpu_kernels.cpu_kernels_disabled():
        compiled, breaks, graphs = compile_and_run(model, images)
        eager = model(images)
    assert breaks == [] and graphs == 1
    torch.testing.assert_close(compiled, eager, rtol=0, atol=TOLERANCE)


def test_training_forward_features_with_denoising_compiles_to_one_graph():
    """DINO in training: denoising queries from the targets, noise drawn in the graph (same seed, same draws)."""
    model, features, mask = detector_inputs("dino-r18-tiny", training=True)
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.6, 0.1, 0.1]]), "labels": torch.tensor([0, 2])},
    ]
    torch.manual_seed(1)
    compiled, breaks, graphs = compile_and_run(model.forward_features, features, mask, targets)
    torch.manual_seed(1)
    eager = model.forward_features(features, mask, targets)
    assert breaks == [] and graphs == 1
    assert compiled["dn_meta"] == eager["dn_meta"] and compiled["pred_logits"].requires_grad
    torch.testing.assert_close(compiled, eager, rtol=0, atol=TOLERANCE)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor's CPU code needs a C++ compiler")
def test_inductor_compiles_key_aware_attention_to_the_eager_result():
    shapes = ((8, 10), (4, 5), (2, 3))
    tokens = sum(h * w for h, w in shapes)
    attention = MultiScaleDeformableAttention(32, n_levels=3, n_heads=2, n_points=2, key_aware=True).eval()
    query, value = torch.randn(2, tokens, 32), torch.randn(2, tokens, 32)
    reference_points = torch.rand(2, tokens, 3, 2)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(attention, fullgraph=True)(query, reference_points, value, shapes)
        eager = attention(query, reference_points, value, shapes)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=TOLERANCE)

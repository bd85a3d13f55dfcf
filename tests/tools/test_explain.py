"""``litedetr explain``: captured sampling locations and weights equal an independent recomputation, and are drawn."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from litedetr import build_model, save_model
from litedetr.cli import main
from litedetr.ops import level_start_index
from litedetr.tools.draw import synthetic_scene
from litedetr.tools.explain import explain

SIDE = 256  # the image; the model resizes it to 128x128 (maps 16x16, 8x8, 4x4, 2x2)


def tiny(name: str):
    torch.manual_seed(0)
    return build_model(name, num_classes=3, min_size=(128,), max_size=128, num_queries=20, num_select=10).eval()


def bilinear(level_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``(H, W, D)`` map at normalised ``(x, y)``: align_corners=False, zero outside (written out by hand)."""
    h, w, _ = level_map.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(level_map.shape[-1])
    for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yi < h and 0 <= xi < w:
                out += wy * wx * level_map[yi, xi]
    return out


def record_encoder_calls(model) -> tuple[dict[int, tuple], list]:
    calls: dict[int, tuple] = {}
    handles = [
        layer.self_attn.register_forward_hook(lambda mod, args, out, i=i: calls.__setitem__(i, (args, out))) for i, layer in enumerate(model.encoder.layers)
    ]
    return calls, handles


@pytest.mark.parametrize("name", ["lite-dino-r18-tiny-h3l1-2x3", "deformable-detr-r18-tiny"])
def test_locations_and_weights_equal_an_independent_recomputation(name):
    model = tiny(name)
    attn = model.encoder.layers[0].self_attn
    m, n_levels, p = attn.n_heads, attn.n_levels, attn.n_points
    image = synthetic_scene(SIDE, SIDE, seed=2)
    shapes = torch.tensor([[16, 16], [8, 8], [4, 4], [2, 2]])
    token = int(level_start_index(shapes)[1]) + 8 * 8 // 2 + 3  # a central stride-16 token: a query in every layer
    calls, handles = record_encoder_calls(model)
    try:
        result = explain(model, image, query=token)
    finally:
        for handle in handles:
            handle.remove()

    assert (result.level, result.row, result.col) == (1, 4, 3) and result.spatial_shapes == [tuple(s) for s in shapes.tolist()]
    assert result.token_xy == (3.5 * 16 * 2, 4.5 * 16 * 2)
    assert [s.layer for s in result.layers] == list(range(len(model.encoder.layers)))
    for samples in result.layers:
        (query, reference_points, value, spatial_shapes, _), output = calls[samples.layer]
        row = token - int(level_start_index(shapes)[model.encoder.query_levels[samples.layer]])
        q = query[0, row]
        offsets = attn_of(model, samples.layer).sampling_offsets(q).view(m, n_levels, p, 2)
        expected = reference_points[0, row][None, :, None] + offsets / shapes.flip(-1)[None, :, None]
        torch.testing.assert_close(samples.normalized, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(samples.pixels, expected * SIDE, atol=1e-4, rtol=0)  # 128x128 maps of a 256x256 image
        inside = ((expected >= 0) & (expected <= 1)).all(-1)
        assert torch.equal(inside, ((samples.pixels >= 0) & (samples.pixels <= SIDE)).all(-1))
        assert bool(inside[:, 0].all())  # the central token's stride-8 samples all fall inside the image

        module = attn_of(model, samples.layer)
        v = module.value_proj(value[0]).view(value.shape[1], m, -1)
        maps = [level.view(h, w, m, -1) for level, (h, w) in zip(v.split(shapes.prod(1).tolist()), shapes.tolist())]
        sampled = torch.stack([torch.stack([torch.stack([bilinear(maps[lvl][:, :, head], *expected[head, lvl, pt].tolist())
                                                         for pt in range(p)]) for lvl in range(n_levels)]) for head in range(m)])  # fmt: skip
        if module.key_aware:
            qh = module.query_proj(q).view(m, 1, 1, -1)
            logits = (sampled * qh).sum(-1) / math.sqrt(qh.shape[-1])
        else:
            logits = module.attention_weights(q).view(m, n_levels, p)
        weights = logits.flatten(1).softmax(-1).view(m, n_levels, p)
        torch.testing.assert_close(samples.weights, weights, atol=1e-5, rtol=0)
        # the captured weights are the ones the layer applied: they rebuild its output
        rebuilt = module.output_proj((samples.weights[..., None] * sampled).sum((1, 2)).flatten())
        torch.testing.assert_close(rebuilt, output[0, row], atol=1e-4, rtol=0)
    assert all(layer.self_attn.capture is None for layer in model.encoder.layers)


def attn_of(model, layer: int):
    return model.encoder.layers[layer].self_attn


def test_object_token_is_the_detection_centre():
    model = tiny("lite-dino-r18-tiny-h3l1-2x3")
    image = synthetic_scene(SIDE, SIDE, seed=4)
    top = model.predict(image, threshold=0.0)[0]["boxes"][0]
    result = explain(model, image, object_index=0)
    assert result.level == 1  # the finest level queried in every layer of H3L1
    cx, cy = float(top[0] + top[2]) / 2, float(top[1] + top[3]) / 2
    assert abs(result.token_xy[0] - cx) <= 16 and abs(result.token_xy[1] - cy) <= 16  # within half a stride-16 cell (x2)


def test_cli_writes_pictures_and_numbers(tmp_path, capsys):
    model = tiny("lite-h-detr-r18-tiny-h3l1-2x3")
    checkpoint = save_model(model, tmp_path / "m.safetensors")
    picture = tmp_path / "scene.png"
    synthetic_scene(SIDE, SIDE, seed=1).save(picture)
    out = tmp_path / "explained"
    assert main(["explain", "--checkpoint", str(checkpoint), str(picture), "--out", str(out), "--query", "10"]) == 0
    for name in ("attention.png", "schedule.png"):
        width, height = Image.open(out / name).size
        assert width > 400 and height > 200
    report = json.loads((out / "explain.json").read_text())
    assert report["token"] == 10 and report["level"] == 0
    assert [layer["layer"] for layer in report["layers"]] == [1, 3, 5]  # a stride-8 token is a query only in all-token layers
    direct = explain(model, picture, query=10)
    torch.testing.assert_close(torch.tensor(report["layers"][0]["locations_px"]), direct.layers[0].pixels)
    assert "is a query in 3 of 6 layers" in capsys.readouterr().out
    assert main(["explain", "--checkpoint", str(checkpoint), str(picture), "--out", str(out), "--query", "99999"]) == 2
    assert "query must be a token index in 0..339" in capsys.readouterr().err

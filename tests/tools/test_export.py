"""ONNX export: every family, Lite encoder with KDA and a standard encoder; onnxruntime reproduces PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from litedetr import ExportedDetector, build_model, save_model
from litedetr.cli import main
from litedetr.models.exported import graph_runner
from litedetr.models.image_batch import IMAGENET_MEAN, IMAGENET_STD
from litedetr.models.quantized import calibration_inputs, quantize_onnx
from litedetr.ops import custom_ops
from litedetr.tools import export
from litedetr.tools.draw import synthetic_scene
from litedetr.tools.export import (
    OnnxDetector,
    QueryProbe,
    compare_with_runtime,
    cpu_model,
    export_onnx,
    export_openvino,
    normalized_scene,
    onnx_session,
    query_parity,
    require,
    spread_class_logits,
)

SIZE = (128, 128)


def tiny(name: str, **overrides):
    torch.manual_seed(0)
    return build_model(name, num_classes=5, num_queries=20, num_select=20, min_size=(SIZE[0],), max_size=SIZE[1], **overrides).eval()


@pytest.mark.parametrize(
    "name",
    ["lite-deformable-detr-r18-tiny-h3l1-2x3", "lite-dino-r18-tiny-h3l1-2x3", "lite-h-detr-r18-tiny-h3l1-2x3", "deformable-detr-r18-tiny"],
)
def test_onnxruntime_reproduces_pytorch(name, tmp_path):
    model = tiny(name)
    path = export_onnx(model, tmp_path / "model.onnx", SIZE)
    graph = onnx.load(str(path))
    assert any(node.op_type == "GridSample" for node in graph.graph.node)
    assert [o.name for o in graph.graph.output] == ["boxes", "scores", "labels"]
    diff = compare_with_runtime(model, path, normalized_scene(2, *SIZE, seed=3), SIZE)
    assert diff["boxes"] < 1e-3 and diff["scores"] < 1e-3 and diff["labels_equal"] == 1.0, diff


@pytest.mark.parametrize(
    "name,overrides",
    [("lite-dino-r18-tiny-h3l1-2x3", {}), ("lite-dino-r18-tiny-h3l1-2x3", {"kda_key_proj": True}), ("deformable-detr-r18-tiny", {})],
    ids=["kda-shared-keys", "kda-distinct-keys", "msda"],
)
def test_gather_sampling_has_no_grid_sample_and_matches_pytorch_per_query(name, overrides, tmp_path):
    """``sampling="gather"``: Gather and MatMul instead of GridSample, and every query's outputs as
    PyTorch's on two sizes through one dynamic graph (padding masks included). The whole exported
    graph and its detections: ``test_cli_export``."""
    model = spread_class_logits(tiny(name, **overrides))
    inputs = [normalized_scene(2, h, w, seed=h + w) for h, w in (SIZE, (96, 128))]
    parity = query_parity(model, inputs, SIZE, tmp_path, sampling="gather")
    assert parity["logits"] < 1e-4 and parity["boxes_px"] < 1e-2 and parity["reordered_gap"] < 1e-4, parity
    ops = {node.op_type for node in onnx.load(str(tmp_path / "query_probe.onnx")).graph.node}  # the graph query_parity traced
    assert "GridSample" not in ops and "Gather" in ops


def test_an_unknown_sampling_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sampling must be one of grid_sample, gather"):
        export_onnx(tiny("deformable-detr-r18-tiny"), tmp_path / "model.onnx", SIZE, sampling="bilinear")


def test_graph_equals_the_detectors_own_inference():
    model = tiny("lite-dino-r18-tiny-h3l1-2x3")
    with torch.no_grad():
        model.heads.box_heads[-1].layers[-1].bias[2:] += 3.0  # wide boxes, some reaching past the image
    images = normalized_scene(2, *SIZE, seed=5)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        boxes, scores, labels = OnnxDetector(model, SIZE)(images)
        expected = model(list(images * std + mean))
    assert (boxes >= 0).all() and (boxes <= SIZE[0]).all()  # clipped to the image in the graph, as predict clips
    for i, pred in enumerate(expected):
        torch.testing.assert_close(scores[i], pred["scores"])
        assert torch.equal(labels[i], pred["labels"])
        torch.testing.assert_close(boxes[i], pred["boxes"].clamp(0, SIZE[0]), atol=1e-3, rtol=0)
    assert (expected[0]["boxes"] < 0).any() or (expected[0]["boxes"] > SIZE[0]).any(), "no box to clip: the clipping is untested"


def test_dynamic_size_pads_onto_the_canvas(tmp_path):
    model = tiny("lite-h-detr-r18-tiny-h3l1-2x3")
    path = export_onnx(model, tmp_path / "dynamic.onnx", SIZE, dynamic_size=True)
    for h, w in (SIZE, (96, 128), (128, 80)):
        diff = compare_with_runtime(model, path, normalized_scene(1, h, w, seed=h + w), SIZE)
        assert diff["boxes"] < 1e-3 and diff["scores"] < 1e-3 and diff["labels_equal"] == 1.0, (h, w, diff)
    boxes, _, _ = onnx_session(path).run(None, {"images": normalized_scene(1, 96, 80).numpy()})
    assert boxes.shape == (1, 20, 4)


def test_fixed_size_graph_refuses_other_sizes(tmp_path):
    path = export_onnx(tiny("dino-r18-tiny"), tmp_path / "fixed.onnx", SIZE)
    with pytest.raises(Exception, match="images"):
        onnx_session(path).run(None, {"images": np.zeros((1, 3, 96, 128), np.float32)})


def test_cli_export(tmp_path, capsys):
    checkpoint = save_model(tiny("lite-dino-r18-tiny-h3l1-2x3"), tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--size", "128x128", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert out.exists() and "labels equal 100%" in report
    gathered = tmp_path / "gather.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--size", "128x128", "--sampling", "gather", "--out", str(gathered)]) == 0
    assert "labels equal 100%" in capsys.readouterr().out
    assert "GridSample" not in {node.op_type for node in onnx.load(str(gathered)).graph.node}
    assert main(["export", "--checkpoint", str(tmp_path / "none.safetensors"), "--size", "128x128", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("litedetr: error: ")


def test_missing_dependency_is_a_clear_error():
    with pytest.raises(ValueError, match=r"pip install 'litedetr\[export\]'"):
        require("onnx_not_installed_anywhere")


@pytest.fixture
def traced(monkeypatch):
    """Record, at the moment ``torch.onnx.export`` runs, whether Triton is on and where the traced module and input live."""
    seen: dict = {}
    real = torch.onnx.export

    def spy(wrapper, args, *rest, **kwargs):
        seen.update(triton=custom_ops.triton_enabled(), model=wrapper.model, devices={t.device.type for t in [*wrapper.state_dict().values(), *args]})
        return real(wrapper, args, *rest, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    return seen


def test_export_traces_on_the_cpu_with_triton_off(traced, tmp_path):
    model = tiny("deformable-detr-r18-tiny")
    export_onnx(model, tmp_path / "m.onnx", SIZE)
    assert traced["triton"] is False and traced["devices"] == {"cpu"} and traced["model"] is model
    assert custom_ops.triton_enabled() is custom_ops.TRITON_AVAILABLE  # switched back on


def test_a_model_off_the_cpu_is_exported_from_a_cpu_copy(traced, tmp_path, monkeypatch):
    """A GPU model (simulated: the device check says so) is traced as an equal CPU copy; the model itself is not moved."""
    model = tiny("lite-dino-r18-tiny-h3l1-2x3")
    monkeypatch.setattr(export, "_on_cpu", lambda m: False)
    copied = cpu_model(model)
    assert copied is not model and not copied.training
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), model.state_dict().values(), strict=True))
    path = export_onnx(model, tmp_path / "m.onnx", SIZE)
    assert traced["model"] is not model and traced["triton"] is False and traced["devices"] == {"cpu"}
    diff = compare_with_runtime(model, path, normalized_scene(1, *SIZE, seed=1), SIZE)
    assert diff["boxes"] < 1e-3 and diff["scores"] < 1e-3 and diff["labels_equal"] == 1.0, diff


@pytest.mark.parametrize("name", ["dino-r18-tiny", "lite-dino-r18-tiny-h3l1-2x3", "lite-h-detr-r18-tiny-h3l1-2x3", "deformable-detr-r18-tiny"])
def test_every_query_matches_pytorch_given_the_same_ranking_on_several_sizes(name, tmp_path):
    model = tiny(name)
    spread_class_logits(model)
    inputs = [normalized_scene(2, h, w, seed=h + w) for h, w in (SIZE, (96, 128), (128, 64))]
    parity = query_parity(model, inputs, SIZE, tmp_path)
    assert parity["logits"] < 1e-4 and parity["boxes_px"] < 1e-2, parity
    assert parity["reordered_gap"] < 1e-4, parity  # only near-tied proposals may come out in another order


def test_queries_selected_among_distinct_proposals_export_as_pytorch_selects_them(tmp_path):
    model = tiny("lite-dino-r18-tiny-h3l1-2x3", query_nms=0.3)
    spread_class_logits(model)
    parity = query_parity(model, [normalized_scene(2, *SIZE, seed=5), normalized_scene(1, 96, 128, seed=6)], SIZE, tmp_path)
    assert parity["logits"] < 1e-4 and parity["boxes_px"] < 1e-2 and parity["reordered_gap"] < 1e-4, parity


def test_query_parity_catches_a_graph_that_computes_something_else(tmp_path, monkeypatch):
    """As if the graph baked in a wrong constant: the exported model's last class head differs by 1e-3."""
    model = tiny("lite-dino-r18-tiny-h3l1-2x3")
    real_export = torch.onnx.export

    def export_altered(module, *args, **kwargs):
        with torch.no_grad():
            module.model.heads.class_heads[-1].bias += 1e-3
            real_export(module, *args, **kwargs)
            module.model.heads.class_heads[-1].bias -= 1e-3

    monkeypatch.setattr(torch.onnx, "export", export_altered)
    parity = query_parity(model, normalized_scene(1, *SIZE), SIZE, tmp_path)
    assert parity["logits"] > 5e-4 and parity["reordered"] == 0, parity


def test_dino_queries_take_their_content_by_rank():
    """Why a swap of two near-tied proposals changes outputs: the content embedding goes by rank, so
    swapping the ranks of two tokens gives those queries other outputs (not the same outputs swapped)."""
    model = tiny("dino-r18-tiny")
    probe = QueryProbe(model, SIZE).eval()
    images = normalized_scene(1, *SIZE)
    with torch.no_grad():
        logits, _, tokens = probe(images)
        probe.ranking = tokens.clone()
        probe.ranking[0, [0, 1]] = tokens[0, [1, 0]]
        swapped, _, _ = probe(images)
    others = (swapped[0, 2:] - logits[0, 2:]).abs().max()  # through self-attention, a little
    assert (swapped[0, 0] - logits[0, 1]).abs().max() > 10 * others and (swapped[0, 1] - logits[0, 0]).abs().max() > 10 * others


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """A model with spread class logits, its PyTorch predictions on three images that all resize to
    128x160, and its 128x160 graph as ONNX and as OpenVINO IR."""
    pytest.importorskip("openvino")
    folder = tmp_path_factory.mktemp("graphs")
    torch.manual_seed(0)
    model = build_model("lite-dino-r18-tiny-h3l1-2x3", num_classes=5, num_queries=20, num_select=20, min_size=(128,), max_size=160)
    spread_class_logits(model.eval())
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 100, 125, generator=g), torch.rand(3, 200, 250, generator=g), torch.rand(3, 100, 125, generator=g)]
    onnx_path = export_onnx(model, folder / "m.onnx", (128, 160))
    xml_path = export_openvino(model, folder / "m.xml", (128, 160))
    return model, images, model.predict(images, threshold=0.0), {"onnx": onnx_path, "xml": xml_path}


@pytest.mark.parametrize("backend,graph", [("onnxruntime", "onnx"), ("openvino", "onnx"), ("openvino", "xml")])
def test_an_exported_graph_predicts_as_the_model(graphs, backend, graph):
    model, images, expected, paths = graphs
    exported = ExportedDetector(paths[graph], backend)
    assert exported.config == model.config and exported.canvas == (128, 160) and not exported.dynamic_size
    for got, want in zip(exported.predict(images, threshold=0.0, batch_size=2), expected, strict=True):
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-2, rtol=0)
        torch.testing.assert_close(got["scores"], want["scores"], atol=1e-4, rtol=0)
        assert torch.equal(got["labels"], want["labels"]) and got["names"] == want["names"]


def test_an_exported_graph_refuses_what_it_cannot_run(graphs, tmp_path):
    model, images, _, paths = graphs
    fixed = ExportedDetector(paths["onnx"], "onnxruntime")
    with pytest.raises(ValueError, match=r"resized to 160x120 does not fit the graph, which takes exactly 128x160 \(or export with --dynamic-size\)"):
        fixed.predict(torch.rand(3, 200, 150))
    with pytest.raises(ValueError, match="ONNX Runtime runs .onnx graphs"):
        ExportedDetector(paths["xml"], "onnxruntime")
    bare = onnx.load(str(paths["onnx"]))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="has no litedetr metadata"):
        ExportedDetector(tmp_path / "bare.onnx", "onnxruntime")


def test_cli_exports_openvino_and_predicts_with_each_backend(tmp_path, capsys):
    pytest.importorskip("openvino")
    checkpoint = save_model(spread_class_logits(tiny("lite-dino-r18-tiny-h3l1-2x3")), tmp_path / "m.safetensors")
    xml = tmp_path / "m.xml"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "openvino", "--size", "96x128", "--out", str(xml)]) == 0
    assert "openvino vs PyTorch" in capsys.readouterr().out and xml.with_suffix(".bin").exists()
    image = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)).save(image)
    found = {}
    for backend, model_file in (("pytorch", checkpoint), ("openvino", xml)):
        out = tmp_path / backend
        assert main(["predict", str(image), "--checkpoint", str(model_file), "--backend", backend, "--threshold", "0", "--out", str(out)]) == 0
        found[backend] = json.loads((out / "predictions.json").read_text())[0]["detections"]
    assert len(found["pytorch"]) == len(found["openvino"]) == 20

    def same(a: dict, b: dict) -> bool:
        return a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-3 and max(abs(x - y) for x, y in zip(a["box"], b["box"])) < 0.1

    # as sets: two detections whose scores agree to rounding may come out in either order
    assert all(any(same(a, b) for b in found["openvino"]) for a in found["pytorch"])
    assert main(["predict", str(image), "--checkpoint", str(xml), "--backend", "openvino", "--preset", "dino-r50", "--out", str(tmp_path / "x")]) == 2
    assert "--preset and --device apply to PyTorch checkpoints" in capsys.readouterr().err


def _constant_weight_matmuls(graph) -> int:
    """MatMul/Gemm nodes of ``graph`` whose second input is a stored weight (the linear layers)."""
    weights = {init.name for init in graph.graph.initializer}
    weights |= {node.output[0] for node in graph.graph.node if node.op_type == "Constant"}
    return sum(node.op_type in ("MatMul", "Gemm") and node.input[1] in weights for node in graph.graph.node)


def test_int8_quantises_every_linear_layer_and_keeps_the_interface(tmp_path):
    model = spread_class_logits(tiny("lite-dino-r18-tiny-h3l1-2x3"))
    path = export_onnx(model, tmp_path / "m.onnx", SIZE)
    quantized = quantize_onnx(path, tmp_path / "m8.onnx")
    before, after = onnx.load(str(path)), onnx.load(str(quantized))
    linear = _constant_weight_matmuls(before)
    assert linear >= 40  # projections, FFNs and heads of the encoder and decoder
    assert sum(node.op_type == "MatMulInteger" for node in after.graph.node) == linear and _constant_weight_matmuls(after) == 0
    assert [o.name for o in after.graph.output] == ["boxes", "scores", "labels"]
    assert ExportedDetector(quantized, "onnxruntime").config == model.config  # the metadata came along
    images = normalized_scene(2, *SIZE, seed=4).numpy()
    (_, scores, _), (boxes8, scores8, _) = onnx_session(path).run(None, {"images": images}), onnx_session(quantized).run(None, {"images": images})
    # random weights: the proposal ranking moves with the weights, so compare the top-k score
    # distributions (a wrong scale or a dropped layer moves them by far more), not query by query
    moved = np.abs(np.sort(scores8, axis=1) - np.sort(scores, axis=1))
    assert 0 < np.median(moved) < 0.03 and moved.max() < 0.2, moved
    assert ((boxes8 >= 0) & (boxes8 <= SIZE[0])).all()


def test_cli_calibration_goes_with_openvino_int8(tmp_path, capsys):
    checkpoint = save_model(tiny("lite-dino-r18-tiny-h3l1-2x3"), tmp_path / "m.safetensors")
    export = ["export", "--checkpoint", str(checkpoint), "--size", "64x64"]
    assert main([*export, "--format", "openvino", "--int8", "--out", str(tmp_path / "m.xml")]) == 2
    assert "--format openvino --int8 calibrates on images: give --calibration FOLDER" in capsys.readouterr().err
    assert main([*export, "--int8", "--calibration", str(tmp_path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--calibration is for OpenVINO's static INT8" in capsys.readouterr().err


def test_calibration_inputs_are_the_graphs_inputs_and_skip_what_does_not_fit(tmp_path, caplog):
    config = tiny("lite-dino-r18-tiny-h3l1-2x3").config  # resizes to 128 on the short side, at most 128
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (64, 64), "b": (100, 100), "c": (64, 128), "d": (32, 32)}.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "e.png").write_text("not an image")
    with caplog.at_level("WARNING"):
        inputs = calibration_inputs(tmp_path, config, SIZE, dynamic_size=False)
    assert [x.shape for x in inputs] == [(1, 3, 128, 128)] * 3 and "skipped 2 image(s)" in caplog.text  # c: 64x128, e: unreadable
    image = torch.from_numpy(np.array(Image.open(tmp_path / "a.png"))).permute(2, 0, 1).float() / 255
    expected = torch.nn.functional.interpolate(image[None], size=SIZE, mode="bilinear", antialias=True)[0]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(inputs[0][0], ((expected - mean) / std).numpy(), atol=1e-5)
    assert len(calibration_inputs(tmp_path, config, SIZE, dynamic_size=False, count=2)) == 2
    assert len(calibration_inputs(tmp_path, config, (128, 256), dynamic_size=True)) == 4
    with pytest.raises(ValueError, match="no image to calibrate on"):
        calibration_inputs(tmp_path, config, (64, 64), dynamic_size=False)


def test_openvino_int8_quantises_convolutions_and_matrix_products_and_keeps_the_interface(tmp_path, capsys):
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    torch.manual_seed(0)  # one decoder layer and 64x64: NNCF's time grows with the graph
    size = (64, 64)
    model = build_model("lite-dino-r18-tiny-h3l1-2x3", num_classes=5, num_queries=20, num_select=20, min_size=(64,), max_size=64, num_decoder_layers=1)
    model = spread_class_logits(model.eval())
    checkpoint = save_model(model, tmp_path / "m.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.array(synthetic_scene(*size, seed=10 + i))).save(images / f"{i}.png")
    xml = tmp_path / "m8.xml"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "openvino", "--int8", "--calibration", str(images),
                 "--size", "64x64", "--out", str(xml)]) == 0  # fmt: skip
    assert "(INT8, NNCF)" in capsys.readouterr().out
    graph = ov.Core().read_model(str(xml))
    quantizers = [op for op in graph.get_ops() if op.get_type_name() == "FakeQuantize"]
    products = [op for op in graph.get_ops() if op.get_type_name() in ("MatMul", "Convolution")]
    assert len(quantizers) >= len(products) // 2 > 20
    assert ExportedDetector(xml, "openvino").config == model.config  # the metadata came along
    float32 = export_openvino(model, tmp_path / "m.xml", size)
    scene = normalized_scene(2, *size, seed=4).numpy()
    (_, scores, _), (boxes8, scores8, _) = (graph_runner(path, "openvino")(scene) for path in (float32, xml))
    moved = np.abs(np.sort(scores8, axis=1) - np.sort(scores, axis=1))  # as for ONNX Runtime's INT8 above
    assert 0 < np.median(moved) < 0.05 and moved.max() < 0.3, moved
    assert ((boxes8 >= 0) & (boxes8 <= size[0])).all()

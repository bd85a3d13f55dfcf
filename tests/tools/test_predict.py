"""``litedetr predict``: predictions.json matches Detector.predict; PNGs have the boxes drawn; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from litedetr import build_model, save_model
from litedetr.cli import main
from litedetr.tools.draw import draw_detections, label_color, synthetic_scene


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("lite-dino-r18-tiny-h3l1-2x3", num_classes=2, class_names=("ball", "box"), min_size=(96,), max_size=128, num_queries=20, num_select=8)
    return model.eval(), save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_writes_json_and_drawings_matching_the_api(checkpoint, tmp_path):
    model, path = checkpoint
    images = tmp_path / "images"
    images.mkdir()
    synthetic_scene(90, 120, seed=1).save(images / "a.png")
    synthetic_scene(100, 80, seed=2).save(images / "b.jpg")
    (images / "notes.txt").write_text("not an image")
    other = tmp_path / "elsewhere"
    other.mkdir()
    synthetic_scene(64, 64, seed=3).save(other / "a.png")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(path), str(images), str(other / "a.png"), "--out", str(out), "--threshold", "0"]) == 0

    entries = json.loads((out / "predictions.json").read_text())
    assert [e["drawing"] for e in entries] == ["a.png", "b.png", "a-2.png"]
    assert [(e["width"], e["height"]) for e in entries] == [(120, 90), (80, 100), (64, 64)]
    expected = model.predict([images / "a.png", images / "b.jpg", other / "a.png"], threshold=0.0)
    for entry, result in zip(entries, expected):
        assert [d["name"] for d in entry["detections"]] == result["names"]
        assert [d["label"] for d in entry["detections"]] == result["labels"].tolist()
        np.testing.assert_allclose([d["box"] for d in entry["detections"]], result["boxes"].numpy(), atol=0.01)
        np.testing.assert_allclose([d["score"] for d in entry["detections"]], result["scores"].numpy(), atol=1e-4)
        drawing = np.asarray(Image.open(out / entry["drawing"]))
        assert drawing.shape == (entry["height"], entry["width"], 3)


def test_drawn_box_outline_and_label_are_in_the_picture():
    image = Image.new("RGB", (200, 150), (128, 128, 128))
    drawn = np.asarray(draw_detections(image, torch.tensor([[40.0, 50.0, 160.0, 120.0]]), torch.tensor([0.9]), torch.tensor([3]), ["cat"]))
    color = np.array(label_color(3))
    assert (drawn[85, 40] == color).all() and (drawn[85, 159] == color).all()  # left and right edges
    assert (drawn[120 - 1, 100] == color).all() and (drawn[85, 100] == 128).all()  # bottom edge; inside untouched
    label = drawn[:50, 40:100]
    assert (label == color).all(-1).sum() > 100 and (~(label == color).all(-1) & ~(label == 128).all(-1)).sum() > 10  # tag with text


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: ["--checkpoint", str(d / "none.safetensors"), str(d)], "none.safetensors: no such checkpoint file"),
        (lambda d: [str(d / "missing.jpg")], "missing.jpg: no such image file or directory"),
        (lambda d: [str(d / "bad.jpg"), "--strict"], "bad.jpg: not a readable image"),
        (lambda d: [str(d / "empty")], "no image files in"),
        (lambda d: ["--checkpoint", str(d / "checkpoint.pt"), str(d)], "checkpoint.pt: a litedetr training checkpoint (for `train --resume`)"),
        (lambda d: ["--checkpoint", str(d / "checkpoint.pt"), "--preset", "dino-r50", str(d)], "load the model.safetensors its run wrote beside it"),
    ],
)
def test_errors_are_one_line(checkpoint, tmp_path, capsys, make, message):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    (tmp_path / "empty").mkdir()
    run_state = {"model": build_model("dino-r18-tiny", num_classes=2).state_dict(), "train_config": json.dumps({"model": "dino-r18-tiny"})}
    torch.save(run_state, tmp_path / "checkpoint.pt")  # what a run's checkpoint holds besides optimiser and random states
    args = make(tmp_path)
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(checkpoint[1]), *args]
    assert main(["predict", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("litedetr: error: ") and message in err and err.count("\n") == 1


def test_an_unreadable_image_is_skipped_with_a_warning_and_counted(checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    synthetic_scene(90, 120, seed=1).save(images / "a.png")
    (images / "b.jpg").write_bytes(b"garbage")
    synthetic_scene(64, 64, seed=3).save(images / "c.png")
    assert main(["predict", "--checkpoint", str(checkpoint[1]), str(images), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "litedetr: warning: skipped" in captured.err and "b.jpg: not a readable image" in captured.err
    assert "2 images (1 unreadable images skipped, named above)" in captured.out
    entries = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [e["drawing"] for e in entries] == ["a.png", "c.png"]
    assert main(["predict", "--checkpoint", str(checkpoint[1]), str(images / "b.jpg"), "--out", str(tmp_path / "o2")]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err


def test_detections_carry_the_datasets_category_ids(tmp_path):
    torch.manual_seed(0)
    model = build_model(
        "lite-dino-r18-tiny-h3l1-2x3",
        num_classes=2,
        class_names=("ball", "box"),
        category_ids=(7, 20),
        min_size=(96,),
        max_size=128,
        num_queries=20,
        num_select=8,
    )
    path = save_model(model, tmp_path / "ids.safetensors")
    synthetic_scene(90, 120, seed=1).save(tmp_path / "a.png")
    assert main(["predict", "--checkpoint", str(path), str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), "--threshold", "0"]) == 0
    detections = json.loads((tmp_path / "out" / "predictions.json").read_text())[0]["detections"]
    assert detections and all(d["category_id"] == (7, 20)[d["label"]] for d in detections)


def test_an_image_with_nothing_above_the_threshold_gets_its_best_few_drawn(checkpoint, tmp_path):
    model, _ = checkpoint
    image = tmp_path / "scene.png"
    synthetic_scene(96, 96, seed=4).save(image)
    best = model.predict([image], threshold=0.0)[0]
    above = float(best["scores"][0]) + 1e-3  # nothing reaches it

    from litedetr.tools.predict import predict_files

    shown = predict_files(model, [image], tmp_path / "top", threshold=above, top_if_none=3)[0]
    assert shown["below_threshold"] is True
    np.testing.assert_allclose([d["score"] for d in shown["detections"]], best["scores"][:3].numpy(), atol=1e-4)
    assert [d["label"] for d in shown["detections"]] == best["labels"][:3].tolist()
    assert predict_files(model, [image], tmp_path / "none", threshold=above)[0]["detections"] == []  # the default: draw nothing

    kept = predict_files(model, [image], tmp_path / "kept", threshold=float(best["scores"][1]), top_if_none=3)[0]
    assert "below_threshold" not in kept and len(kept["detections"]) == int((best["scores"] >= best["scores"][1]).sum())


def test_bf16_predicts_under_autocast_near_float32(checkpoint, tmp_path, monkeypatch):
    model, path = checkpoint
    image = tmp_path / "a.png"
    synthetic_scene(90, 120, seed=1).save(image)
    seen = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or forward(self, *a, **k))
    runs = {}
    for precision in ("float32", "bf16"):
        out = tmp_path / precision
        assert main(["predict", "--checkpoint", str(path), str(image), "--out", str(out), "--threshold", "0", "--precision", precision]) == 0
        (entry,) = json.loads((out / "predictions.json").read_text())
        runs[precision] = entry["detections"]
    assert seen == [False, True]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (expected,) = model.predict([image], threshold=0.0)
    bf16 = runs["bf16"]
    assert [d["label"] for d in bf16] == expected["labels"].tolist()  # the CLI's bf16 is the model's forward under bf16 autocast
    np.testing.assert_allclose([d["box"] for d in bf16], expected["boxes"].numpy(), atol=0.01)
    np.testing.assert_allclose([d["score"] for d in bf16], expected["scores"].numpy(), atol=1e-4)
    # bf16 moves the scores a little, not far; which boxes come first is not compared: with random weights the
    # encoder's proposal scores nearly tie, and bf16's rounding picks other proposals (seen on an AVX-512 BF16 CPU)
    assert 0 < abs(bf16[0]["score"] - runs["float32"][0]["score"]) < 0.05


def test_bf16_is_refused_for_onnxruntime_with_one_line(checkpoint, tmp_path, capsys):
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"")
    image = tmp_path / "a.png"
    synthetic_scene(64, 64, seed=1).save(image)
    assert main(["predict", "--checkpoint", str(graph), "--backend", "onnxruntime", "--precision", "bf16", str(image), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "ONNX Runtime runs the exported graph in float32" in err and err.count("\n") == 1

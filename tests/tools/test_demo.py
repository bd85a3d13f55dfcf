"""`litedetr demo` end to end on a shrunken recipe: every promised file and a complete summary."""

from __future__ import annotations

import json

from litedetr.data import SyntheticSpec
from litedetr.tools.demo import DemoRecipe, run_demo

TINY = DemoRecipe(data=SyntheticSpec(num_train=4, num_val=2, image_size=(80, 80), max_objects=4), image_size=64, epochs=1, lr_drop=(1,), workers=0, predicted_images=2)


def test_demo_writes_summary_predictions_and_resumes_as_a_report(tmp_path):
    summary = run_demo(tmp_path, TINY)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert set(summary["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(v is None or 0 <= v <= 1 for v in summary["metrics"].values())
    gflops = summary["encoder_gflops"]
    assert 0 < gflops["lite_encoder"] < gflops["standard_encoder"] and gflops["ratio"] == gflops["lite_encoder"] / gflops["standard_encoder"]
    for key in ("model", "checkpoint", "log", "curves", "detections"):
        assert (tmp_path / summary["files"][key]).relative_to(tmp_path).parts[0] == "run" and (tmp_path / summary["files"][key]).exists()
    predictions = json.loads((tmp_path / "predictions" / "predictions.json").read_text())
    assert len(predictions) == 2 and all((tmp_path / "predictions" / p["drawing"]).exists() for p in predictions)
    assert summary["train_steps"] == 1

    again = run_demo(tmp_path, TINY)  # a finished run is reported again, not retrained
    assert again["train_steps"] == 1 and again["metrics"] == summary["metrics"]

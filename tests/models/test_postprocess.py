from pathlib import Path

import pytest
import torch

from litedetr.models.postprocess import postprocess

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "lite_dino_h3l1_2x3_seed0.pt"


def test_topk_over_query_class_pairs_by_hand():
    logits = torch.full((1, 3, 2), -5.0)
    logits[0, 2, 1] = 3.0  # best: query 2, class 1
    logits[0, 0, 0] = 2.0  # second: query 0, class 0
    logits[0, 2, 0] = 1.0  # third: query 2 again, class 0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]])
    sizes = torch.tensor([[100, 200]])  # H = 100, W = 200
    (result,) = postprocess(logits, boxes, sizes, num_select=3)
    torch.testing.assert_close(result["scores"], torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    assert result["labels"].tolist() == [1, 0, 0]
    box_query_2 = [0.0, 50.0, 100.0, 100.0]
    box_query_0 = [80.0, 30.0, 120.0, 70.0]
    torch.testing.assert_close(result["boxes"], torch.tensor([box_query_2, box_query_0, box_query_2]))


def test_shapes_and_order():
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 10, 4, generator=g), torch.rand(2, 10, 4, generator=g)
    results = postprocess(logits, boxes, torch.tensor([[32, 48], [64, 16]]), num_select=7)
    assert len(results) == 2
    for r in results:
        assert r["scores"].shape == (7,) and r["labels"].shape == (7,) and r["boxes"].shape == (7, 4)
        assert r["labels"].dtype == torch.int64
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
        assert ((r["labels"] >= 0) & (r["labels"] < 4)).all()
    with pytest.raises(ValueError, match="num_select"):
        postprocess(logits, boxes, torch.tensor([[32, 48], [64, 16]]), num_select=41)


@pytest.mark.skipif(not FIXTURE.exists(), reason=f"fixture {FIXTURE} not present")
def test_matches_authors_postprocessing():
    data = torch.load(FIXTURE, weights_only=True)
    results = postprocess(data["pred_logits"], data["pred_boxes"], data["image_sizes"], num_select=30)
    assert len(results) == len(data["postprocessed"]) == 2
    for ours, theirs in zip(results, data["postprocessed"]):
        assert torch.equal(ours["scores"], theirs["scores"])
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=0, atol=1e-4)

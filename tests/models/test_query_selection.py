"""``query_nms``: the top-k query selection passes over proposals that a higher-scoring one overlaps."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_nms_reference

from litedetr.models.query_selection import QUERY_NMS_CANDIDATES
from litedetr.ops import box_cxcywh_to_xyxy
from litedetr.weights import build_model


def captured_selection(model, images):
    """The query selection's inputs and the queries it returned, from one forward pass."""
    seen = {}

    def hook(module, args, output):
        seen["memory"], seen["tokens"], seen["num_queries"] = args
        seen["queries"] = output[0]

    handle = model.query_selection.register_forward_hook(hook)
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen


@pytest.mark.parametrize("preset", ["lite-dino-r18-tiny-h3l1-2x3", "deformable-detr-r18-tiny", "h-detr-r18-tiny"])
def test_selected_queries_are_the_distinct_top_proposals(preset):
    torch.manual_seed(0)
    model = build_model(preset, num_classes=3, query_nms=0.2).eval()
    images = [torch.rand(3, 160, 160), torch.rand(3, 128, 160)]
    seen = captured_selection(model, images)
    selection, k = model.query_selection, seen["num_queries"]
    with torch.no_grad():
        features, proposals = selection.proposals(seen["memory"], seen["tokens"], k)
        logits = selection.class_head(features)
        boxes = selection.box_head(features) + proposals
    scores = logits[..., 0] if preset != "lite-dino-r18-tiny-h3l1-2x3" else logits.max(-1).values
    reference = seen["queries"].reference
    suppressed_any = False
    for i in range(len(images)):
        picked = fast_nms_reference(scores[i], box_cxcywh_to_xyxy(boxes[i].sigmoid()), k, 0.2, QUERY_NMS_CANDIDATES * k)
        torch.testing.assert_close(reference[i], boxes[i, picked], rtol=1e-5, atol=1e-5)
        suppressed_any |= picked != scores[i].topk(k).indices.tolist()
    assert suppressed_any, "no proposal was passed over: the test would not see the option"


def test_without_query_nms_the_selection_is_the_plain_top_k():
    torch.manual_seed(0)
    model = build_model("lite-dino-r18-tiny-h3l1-2x3", num_classes=3).eval()
    seen = captured_selection(model, [torch.rand(3, 160, 160)])
    selection, k = model.query_selection, seen["num_queries"]
    with torch.no_grad():
        features, proposals = selection.proposals(seen["memory"], seen["tokens"], k)
        top = selection.class_head(features).max(-1).values.topk(k).indices[0]
        expected = selection.box_head(features[0, top]) + proposals[0, top]
    torch.testing.assert_close(seen["queries"].reference[0], expected)


def test_query_nms_must_be_an_iou():
    with pytest.raises(ValueError, match=r"query_nms must be an IoU in \(0, 1\)"):
        build_model("lite-dino-r18-tiny-h3l1-2x3", num_classes=3, query_nms=1.5)


def test_the_former_name_of_the_box_embedding_selection_still_works_with_a_warning():
    from litedetr.models import query_selection

    with pytest.warns(DeprecationWarning, match="PosTransQuerySelection is now BoxEmbeddingQuerySelection"):
        assert query_selection.PosTransQuerySelection is query_selection.BoxEmbeddingQuerySelection
    with pytest.raises(AttributeError, match="has no attribute 'PosTrans'"):
        query_selection.PosTrans  # noqa: B018

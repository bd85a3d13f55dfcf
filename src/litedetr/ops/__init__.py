"""Pure tensor functions: no parameters, no modules."""

from litedetr.ops.boxes import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, distinct_topk, generalized_box_iou, inverse_sigmoid
from litedetr.ops.deform_attn import TRACED_SAMPLING, attention_backend, key_aware_attention_weights, ms_deform_attn, ms_deform_attn_key_aware, traced_sampling
from litedetr.ops.geometry import (
    LevelShapes,
    SpatialShapes,
    box_sine_embedding,
    encoder_proposals,
    encoder_reference_points,
    level_shapes,
    level_start_index,
    level_starts,
    sine_position_embedding,
    valid_ratios,
)

__all__ = [
    "attention_backend",
    "traced_sampling",
    "TRACED_SAMPLING",
    "ms_deform_attn",
    "ms_deform_attn_key_aware",
    "key_aware_attention_weights",
    "LevelShapes",
    "SpatialShapes",
    "level_shapes",
    "level_starts",
    "level_start_index",
    "valid_ratios",
    "encoder_reference_points",
    "sine_position_embedding",
    "box_sine_embedding",
    "encoder_proposals",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou",
    "distinct_topk",
    "generalized_box_iou",
    "inverse_sigmoid",
]

"""Pure tensor functions: no parameters, no modules."""

from litedetr.ops.deform_attn import ms_deform_attn, ms_deform_attn_key_aware
from litedetr.ops.geometry import encoder_reference_points, level_start_index, sine_position_embedding, valid_ratios

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_key_aware",
    "level_start_index",
    "valid_ratios",
    "encoder_reference_points",
    "sine_position_embedding",
]

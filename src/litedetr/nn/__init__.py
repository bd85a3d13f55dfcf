"""Neural-network modules: attention, encoders, encoder input stage."""

from litedetr.nn.attention import KeyAwareOptions, MultiScaleDeformableAttention
from litedetr.nn.encoder import FFN, DeformableEncoder, EncoderLayer, LayerQueries, LiteEncoder
from litedetr.nn.input_stage import EncoderInput, MultiScaleTokens

__all__ = [
    "MultiScaleDeformableAttention",
    "KeyAwareOptions",
    "FFN",
    "EncoderLayer",
    "DeformableEncoder",
    "LiteEncoder",
    "LayerQueries",
    "EncoderInput",
    "MultiScaleTokens",
]

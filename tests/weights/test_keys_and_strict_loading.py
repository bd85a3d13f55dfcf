"""Converting the authors' state dicts: every key accounted for, loud errors naming keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from litedetr.nn import EncoderInput, LiteEncoder
from litedetr.weights import ConversionError
from litedetr.weights.keys import COMMON_RULES, rename_official
from litedetr.weights.loading import load_official_state_dict


def small_model() -> nn.ModuleDict:
    return nn.ModuleDict(
        {
            "input_stage": EncoderInput((32, 64), d_model=32, n_levels=3),
            "encoder": LiteEncoder(2, 2, 1, d_model=32, n_levels=3, n_heads=4, d_ffn=64, d_ffn_low=32),
        }
    )


def authors_names(model: nn.ModuleDict) -> dict[str, torch.Tensor]:
    """The model's weights under the authors' names (the inverse of the conversion table)."""
    inverse = {
        "norm": "norm1", "ffn.linear1": "linear1", "ffn.linear2": "linear2", "ffn.norm": "norm2",
        "ffn_low.linear1": "linear12", "ffn_low.linear2": "linear22", "ffn_low.norm": "norm22",
    }  # fmt: skip
    out = {}
    for key, value in model.state_dict().items():
        if key == "input_stage.level_embed":
            out["transformer.level_embed"] = value
        elif key.startswith("input_stage."):
            out[key.removeprefix("input_stage.")] = value
        else:
            _, _, idx, rest = key.split(".", 3)
            part, param = rest.rsplit(".", 1)
            part = "self_attn." + part.removeprefix("self_attn.") if part.startswith("self_attn") else inverse[part]
            out[f"transformer.encoder.layers.{idx}.{part}.{param}"] = value
    return out


def test_round_trip_loads_every_weight():
    source, target = small_model(), small_model()
    load_official_state_dict(target, authors_names(source))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_unknown_key_is_named():
    sd = authors_names(small_model())
    sd["transformer.decoder.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="transformer.decoder.mystery.weight"):
        rename_official(sd, COMMON_RULES)


def test_missing_and_leftover_keys_are_named():
    sd = authors_names(small_model())
    del sd["transformer.encoder.layers.1.linear12.weight"]
    sd["transformer.encoder.layers.7.norm1.weight"] = torch.ones(32)
    with pytest.raises(ConversionError) as err:
        load_official_state_dict(small_model(), sd)
    message = str(err.value)
    assert "encoder.layers.1.ffn_low.linear1.weight" in message and "missing" in message
    assert "encoder.layers.7.norm.weight" in message and "no place" in message


def test_shape_mismatch_is_named():
    sd = authors_names(small_model())
    sd["transformer.encoder.layers.0.linear1.weight"] = torch.zeros(128, 32)
    with pytest.raises(ConversionError, match=r"encoder.layers.0.ffn.linear1.weight: file \(128, 32\) vs model \(64, 32\)"):
        load_official_state_dict(small_model(), sd)

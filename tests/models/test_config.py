"""DetectorConfig's renamed fields: model files from before the renaming read as they were, the old names
still work in get_config and as attributes, with a DeprecationWarning."""

from __future__ import annotations

import warnings

import pytest

from litedetr.models.config import PRESETS, RENAMED_FIELDS, config_from_dict, get_config


def test_a_config_written_with_the_old_names_reads_as_the_same_config():
    config = PRESETS["lite-dino-r18-tiny-h3l1-2x3"]
    old = config.to_dict()
    for former, current in RENAMED_FIELDS.items():
        old[former] = old.pop(current)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model file is data, not a caller to warn
        assert config_from_dict(old) == config
    assert config_from_dict(config.to_dict()) == config


def test_old_names_in_get_config_and_as_attributes_warn_and_work():
    with pytest.warns(DeprecationWarning) as caught:
        config = get_config("dino-r18-tiny", decoder_layers=2, n_points=2)
    assert sorted(str(w.message) for w in caught) == [
        "DetectorConfig field 'decoder_layers' is now 'num_decoder_layers'",
        "DetectorConfig field 'n_points' is now 'num_points'",
    ]
    assert (config.num_decoder_layers, config.num_points) == (2, 2)
    with pytest.warns(DeprecationWarning, match="DetectorConfig.n_levels is now num_levels"):
        assert config.n_levels == config.num_levels == 4
    with pytest.raises(AttributeError, match="no attribute 'n_layers'"):
        config.n_layers  # noqa: B018
    with pytest.raises(ValueError, match="both 'n_heads' and its new name 'num_heads' given"), pytest.warns(DeprecationWarning):
        get_config("dino-r18-tiny", n_heads=4, num_heads=4)

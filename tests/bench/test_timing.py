import time

import pytest
import torch

from litedetr.bench.timing import PARTS, bench_images, bench_model, part_seconds


def test_part_seconds_puts_a_slow_part_where_it_is():
    """The encoder made 0.3 s slower shows up in the encoder's column and nowhere else; parts and
    the rest add up to the whole call."""
    model = bench_model("lite-dino-r18-tiny-h3l1-2x3", (64, 64)).eval()
    images = bench_images(1, (64, 64))
    plain = part_seconds(model, images, repeats=2)
    encoder_forward = model.encoder.forward

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return encoder_forward(*args, **kwargs)

    model.encoder.forward = slow
    slowed = part_seconds(model, images, repeats=2)
    for record in plain + slowed:
        assert set(record) == {*PARTS, "other", "total"}
        assert all(record[part] > 0 for part in PARTS)
        assert sum(record[part] for part in (*PARTS, "other")) == pytest.approx(record["total"], rel=1e-9)
    for record in slowed:
        assert record["encoder"] >= 0.3
        assert all(record[part] < 0.3 for part in (*PARTS, "other") if part != "encoder"), record
    assert all(r["encoder"] < 0.3 for r in plain)


def test_part_seconds_refuses_what_it_cannot_time():
    model = bench_model("lite-dino-r18-tiny-h3l1-2x3", (64, 64)).eval()
    with pytest.raises(ValueError, match="CPU calls only"):
        part_seconds(model, torch.rand(1, 3, 64, 64, device="meta"), repeats=1)

"""Level shapes: the one normalisation (tuples of Python ints or an (L, 2) tensor) and what is derived from it."""

from __future__ import annotations

import pytest
import torch

from litedetr.ops import encoder_proposals, encoder_reference_points, level_shapes, level_start_index, level_starts
from litedetr.ops.geometry import shapes_tensor

SHAPES = ((6, 8), (3, 4), (2, 2))


def test_every_accepted_form_normalises_to_int_pairs():
    for form in (SHAPES, [list(s) for s in SHAPES], torch.tensor(SHAPES), torch.tensor(SHAPES, dtype=torch.int32)):
        shapes = level_shapes(form)
        assert shapes == SHAPES and all(type(size) is int for pair in shapes for size in pair)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [((), "one or more"), (((6, 8, 1),), "pairs"), (((6, 0),), "positive"), (torch.ones(3), "integer tensor"), (torch.ones(3, 2), "integer tensor")],
)
def test_bad_shapes_are_refused(shapes, message):
    with pytest.raises(ValueError, match=message):
        level_shapes(shapes)


def test_level_starts_agree_for_tuples_and_tensors():
    assert level_starts(SHAPES) == (0, 48, 60)
    assert level_start_index(SHAPES).tolist() == level_start_index(torch.tensor(SHAPES)).tolist() == [0, 48, 60]


def test_shapes_tensor_of_a_tuple_is_made_once():
    first = shapes_tensor(SHAPES, "cpu")
    assert first.tolist() == [list(s) for s in SHAPES] and first.dtype == torch.long
    assert shapes_tensor(SHAPES, torch.device("cpu")) is first
    with torch.inference_mode():
        assert shapes_tensor(((5, 5),)).is_inference() is False  # autograd may save it in later training steps


def test_reference_points_and_proposals_do_not_depend_on_the_form():
    ratios = torch.tensor([[[1.0, 1.0]] * 3, [[0.75, 0.5]] * 3])
    torch.testing.assert_close(encoder_reference_points(SHAPES, ratios), encoder_reference_points(torch.tensor(SHAPES), ratios), rtol=0, atol=0)
    memory = torch.randn(2, 64, 4)
    padding = torch.zeros(2, 64, dtype=torch.bool)
    padding[1, 40:48] = True
    for a, b in zip(encoder_proposals(memory, padding, SHAPES), encoder_proposals(memory, padding, torch.tensor(SHAPES))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

"""The training curves' picture: the AP axis follows the run's best AP."""

from __future__ import annotations

import pytest

from litedetr.engine.plots import ap_axis_top, plot_curves


@pytest.mark.parametrize(("best", "top"), [(0.0, 0.1), (0.02, 0.1), (0.1, 0.2), (0.35, 0.4), (0.61, 0.7), (0.95, 1.0), (1.0, 1.0)])
def test_ap_axis_ends_at_the_next_tenth_above_the_best(best, top):
    assert ap_axis_top(best) == pytest.approx(top)


def test_curves_with_an_evaluation_per_epoch(tmp_path):
    history = [{"kind": "train", "step": s, "loss": 30.0 - s, "epoch": s // 3} for s in range(1, 10)]
    history += [{"kind": "eval", "epoch": e, "step": 3 * e, "AP": 0.01 * e, "AP50": 0.02 * e, "AP75": 0.005 * e} for e in (1, 2, 3)]
    path = plot_curves(history, tmp_path / "curves.png")
    assert path.stat().st_size > 10_000

"""The end-of-training picture: training loss per step and validation AP per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ap_axis_top", "plot_curves"]


def ap_axis_top(best: float) -> float:
    """The AP axis' upper end for a best value ``best`` in [0, 1]: the next tenth above it (at least 0.1,
    at most 1), so that a run that reaches 0.05 still shows its curve and one that reaches 0.9 fits."""
    return min(1.0, max(0.1, (int(best * 10) + 1) / 10))


def plot_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Draw ``history`` (the run's ``log.jsonl`` records) into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r["kind"] == "train"]
    evals = [r for r in history if r["kind"] == "eval"]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
        window = max(1, len(losses) // 25)
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        ax_loss.plot(steps, smooth, color="tab:blue", label=f"mean of {window}")
        ax_loss.set_yscale("log")
        ax_loss.legend()
    ax_loss.set(title="training loss", xlabel="optimiser step", ylabel="weighted loss sum")
    top = 0.0
    for key, colour in (("AP", "tab:red"), ("AP50", "tab:orange"), ("AP75", "tab:green")):
        points = [(r["epoch"], r[key]) for r in evals if key in r]
        if points:
            ax_ap.plot(*zip(*points), marker="o", color=colour, label=key)
            top = max(top, *(value for _, value in points))
    ax_ap.set(title="validation (COCO box metrics)", xlabel="epoch", ylim=(0, ap_axis_top(top)))
    if evals:
        ax_ap.legend()
    ax_ap.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

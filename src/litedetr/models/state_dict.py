"""Checking that a state dict fits a module, with every problem named."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["fit_problems"]


def _listing(title: str, keys: list[str], limit: int = 20) -> str:
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}):\n    {shown}{more}"


def fit_problems(module: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Descriptions of the keys of ``state_dict`` missing from, left over in, or mis-shaped for ``module``; empty if it fits."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape
    )
    titles = ("missing keys", "unexpected keys (no place in the model)", "shape mismatches")
    return [_listing(title, keys) for title, keys in zip(titles, (missing, unexpected, wrong_shape)) if keys]

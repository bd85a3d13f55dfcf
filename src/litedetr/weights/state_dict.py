"""Strict loading: a state dict must fill a module exactly, and every problem is named."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["ConversionError", "NOT_FITTING", "fit_problems", "load_strictly", "fold_keys"]


class ConversionError(ValueError):
    """A checkpoint that does not fit the target model (another family, architecture or class count); the message names the keys."""


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


NOT_FITTING = "the checkpoint does not fit this model (another preset or class count?)"


def load_strictly(model: nn.Module, state: dict[str, Tensor], fresh: set[str] = frozenset(), context: str = NOT_FITTING) -> None:
    """Load ``state`` into ``model``, which must fill every tensor but ``fresh`` (kept as initialised), with equal shapes.
    ``context``: the first line of the error.

    Raises:
        ConversionError: keys missing, left over or of another shape, each listed by name.
    """
    own = model.state_dict()
    problems = fit_problems(model, {**{k: own[k] for k in fresh}, **state})
    if problems:
        raise ConversionError(context + "\n" + "\n".join(problems))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def fold_keys(keys: set[str]) -> str:
    """Keys with their first index folded and ``weight``/``bias`` left out, e.g. ``encoder.layers.{1,3,5}.ffn_low.linear1``."""
    groups: dict[tuple[str, str], set[int]] = {}
    for key in keys:
        key = re.sub(r"\.(weight|bias)$", "", key)
        head, *rest = re.split(r"\.(\d+)\.", key, maxsplit=1)
        index, tail = rest if rest else ("-1", "")
        groups.setdefault((head, tail), set()).add(int(index))
    names = []
    for (head, tail), indices in sorted(groups.items()):
        if indices == {-1}:
            names.append(head)
        else:
            folded = str(*indices) if len(indices) == 1 else "{" + ",".join(map(str, sorted(indices))) + "}"
            names.append(f"{head}.{folded}.{tail}")
    return ", ".join(names)

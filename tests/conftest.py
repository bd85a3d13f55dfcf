"""Shared test helpers: the authors' reference tensors in ../shared/fixtures (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def load_fixture(name: str) -> dict:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} is not present")
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)

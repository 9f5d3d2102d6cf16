"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

#: ``../shared`` beside the checkout (data, fixtures); tests that need it skip when it is absent.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny tensors: on 2 shared cores two OpenMP threads mostly
    wait for each other. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def anyup_parity() -> dict:
    """The AnyUp parity fixture (official model's state dict and cases); skips when it is absent."""
    path = SHARED / "fixtures" / "anyup_parity_v1.pt"
    if not path.is_file():
        pytest.skip(f"AnyUp parity fixture not found at {path} (needs ../shared beside the checkout)")
    return torch.load(path, weights_only=True)

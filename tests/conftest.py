"""Shared test fixtures: the official golden fixture set and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: ../shared beside the repository (CI clones main with shared/ beside it).
SHARED = REPO.parent / "shared"
OFFICIAL_FIXTURE = SHARED / "fixtures" / "official-viq"


def require_official_fixture() -> Path:
    if not (OFFICIAL_FIXTURE / "expected.safetensors").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"golden fixture missing in CI: {OFFICIAL_FIXTURE}")
        pytest.skip(f"golden fixture not found at {OFFICIAL_FIXTURE}")
    return OFFICIAL_FIXTURE


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return require_official_fixture()


@pytest.fixture(scope="session")
def test_model():
    """A tiny random ViQ model (preset viq-test) with every component, float32, eval mode."""
    from viq import ViQModel

    return ViQModel.from_config("viq-test", seed=0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The tiny random model of :func:`test_model` saved as a viq directory named ``viq-test``
    (tests only read it)."""
    from viq import ViQModel

    path = tmp_path_factory.mktemp("model") / "viq-test"
    ViQModel.from_config("viq-test", seed=0).save_pretrained(path)
    return path


def random_pixels(h: int, w: int, seed: int) -> torch.Tensor:
    """(3, h, w) float32 pixels in [-1, 1] on the official 8-bit grid."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float() / 255 * 2 - 1

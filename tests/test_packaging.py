"""Packaging facts users rely on: viq never replaces their torch, ships its type information, and its
extras exist under the names the docs use."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import viq

REPO = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirement(specs: list[str], name: str) -> str:
    found = [s for s in specs if re.match(rf"^{name}\b(?![-_.\w])", s)]
    assert len(found) == 1, f"{name} must be listed once, found {found}"
    return found[0]


def test_torch_is_a_range_not_a_pin():
    torch_spec = _requirement(_project()["dependencies"], "torch")
    assert "==" not in torch_spec and "===" not in torch_spec, torch_spec
    lower = re.search(r">=\s*(\d+)\.(\d+)", torch_spec)
    assert lower, f"torch needs a lower bound: {torch_spec}"
    assert (int(lower.group(1)), int(lower.group(2))) <= (2, 5), "the issue asks for a floor of at most 2.5"


def test_constraints_pin_this_machines_torch_and_forbid_torchvision():
    lines = [ln.strip() for ln in (REPO / "constraints.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert "torch==2.13.0" in lines
    assert any(ln.startswith("torchvision==") and "never" in ln for ln in lines)


def test_extras_named_for_what_they_bring():
    extras = _project()["optional-dependencies"]
    for name in ("vae", "train", "eval", "track", "data", "test"):
        assert name in extras, name
    assert any(s.startswith("torchmetrics") for s in extras["eval"])
    assert {s.split(">")[0].split("=")[0] for s in extras["track"]} >= {"tensorboard", "wandb"}
    assert any(s.startswith("pyarrow") for s in extras["data"])


def test_py_typed_shipped():
    assert (Path(viq.__file__).parent / "py.typed").is_file()
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["viq"]
    assert "py.typed" in data

"""Packaging facts users rely on: viq never replaces their torch, ships its type information, and its
extras exist under the names the docs use."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

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
    import importlib.util

    from packaging.requirements import Requirement

    pins = {
        r.name: r.specifier
        for r in (
            Requirement(ln.split("#")[0].strip())
            for ln in (REPO / "constraints.txt").read_text().splitlines()
            if ln.split("#")[0].strip()
        )
    }
    assert str(pins["torch"]) == "==2.13.0"
    # torchvision / torchaudio: a pin no published release can satisfy, so any package pulling them in
    # fails to resolve instead of installing a CUDA build...
    for name in ("torchvision", "torchaudio"):
        for version in ("0.20.0", "0.28.1", "0.29.1", "1.0.0", "2.9.1", "2.13.0"):
            assert not pins[name].contains(version, prereleases=True), (name, version)
    # ... and in this environment, installed with those constraints, neither is there.
    assert importlib.util.find_spec("torchvision") is None and importlib.util.find_spec("torchaudio") is None


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
